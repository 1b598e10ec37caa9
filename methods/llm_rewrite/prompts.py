"""Prompts that ask a language model for the target image's description, and reading the answer.

A prompt is a ``system`` message (optional), a ``user`` template and a ``parse`` rule for the answer. There are
two kinds:

* ``rewrite`` (CIReVL, LDRE, SEIZE): the template holds ``{caption}`` and ``{instruction}`` (filled by plain
  substitution, so other braces are left alone); the reference image is known by its caption alone;
* ``reason`` (OSrCIR): the template holds ``{instruction}``, and the reference image itself goes with it to a
  multimodal model.

Parse rules:

* ``edited-description``: the first line that starts with "Edited Description:" gives the text between its
  first and second colon (CIReVL's rule); when there is none, or it is empty, the instruction itself is used;
* ``raw``: the whole answer, stripped (LDRE's prompts end with "Edited Description:");
* ``target-description``: a JSON object whose "Target Image Description" is the text (OSrCIR's rule: a
  leading ``<Response>`` tag or a ```` ```json ```` fence is removed first; an answer that is not JSON, or
  whose description is missing or empty, gives the instruction itself).

``--prompt`` takes the built-in prompt of its kind (``builtin``, written for cirbench), a ``.toml`` file with
``system``, ``user`` and ``parse`` keys, a ``.txt`` file (a rewrite prompt: CIReVL's style, a base prompt
followed by "Image Content:" and "Instruction:" lines, unless it holds ``{caption}`` itself; a reason prompt:
the system message, as OSrCIR's ``prompts.py`` holds it, with the demo's user message), or ``name:ID``: a
prompt known only by name, which can only replay generations recorded under that name (imported ones).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cirbench.errors import CirbenchError
from cirbench.util import TEXT_ENCODING, json_hash

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

MARKER = "Edited Description:"
TARGET_FIELD = "Target Image Description"
PARSE_RULES = ("edited-description", "raw", "target-description")

BUILTIN_SYSTEM = "You rewrite short image descriptions."
BUILTIN_USER = (
    "Below is a description of a photo and an instruction that changes the photo. Write the description of the "
    "photo after the change, as one short sentence: keep what the instruction leaves as it is, apply the change "
    "exactly, and mention only things one could see. Answer with a single line that starts with "
    "\"Edited Description:\".\n\nImage Content: {caption}\nInstruction: {instruction}"
)


REASON_SYSTEM = (
    "You describe the image that a person is searching for. You are given an image and a text saying how the "
    "image they want differs from it. First describe the given image in detail: its objects, their attributes, "
    "colours, counts and relations, the scene and the kind of image. Then think about what the text asks to "
    "change, keep or remove, and what of the given image the wanted image must still show. Then reflect on how "
    "these changes alter the image as a whole. Finally write a short description of the wanted image alone: one "
    "sentence of what one could see in it, without style words, without naming the change.\n\n"
    "Answer with one JSON object and nothing else, with these four keys in this order: "
    "\"Original Image Description\", \"Thoughts\", \"Reflections\", \"" + TARGET_FIELD + "\"."
)
# the official demo's user message (src/utils.py), whitespace and all; the image goes after it as an image_url part
REASON_USER = ("\n" + " " * 16 + "<Input>\n" + " " * 20 + "{\n" + " " * 24 + '"Original Image": <image_url>\n'
               + " " * 24 + '"Manipulation text": {instruction}.\n' + " " * 20 + "}\n" + " " * 16)
NEEDS = {"rewrite": ("{caption}", "{instruction}"), "reason": ("{instruction}",)}


@dataclass(frozen=True)
class Prompt:
    name: str
    system: str | None
    user: str | None
    parse: str = "edited-description"

    @property
    def identity(self) -> str:
        """What the generation cache keys rewrites by: the name of a name-only prompt, else the text's hash."""
        if self.user is None:
            return f"name:{self.name}"
        return "sha256:" + json_hash({"system": self.system, "user": self.user, "parse": self.parse})

    def messages(self, caption: str, instruction: str, image_url: str | None = None) -> list[dict[str, Any]]:
        """The chat messages; ``image_url`` (a ``data:`` URL) goes after the user text, as OSrCIR sends it."""
        if self.user is None:
            raise CirbenchError(f"prompt name:{self.name} is known only by name and can only replay recorded "
                                "generations (--generation replay)")
        values = {"caption": caption, "instruction": instruction}
        user = re.sub(r"\{(caption|instruction)\}", lambda m: values[m.group(1)], self.user)  # one pass
        system = [{"role": "system", "content": self.system}] if self.system else []
        if image_url is None:
            return system + [{"role": "user", "content": user}]
        return system + [{"role": "user", "content": [{"type": "text", "text": user},
                                                      {"type": "image_url", "image_url": {"url": image_url}}]}]

    def parse_answer(self, answer: str, instruction: str) -> tuple[str, bool]:
        """The rewritten text, and whether the instruction had to stand in for it."""
        if self.parse == "target-description":
            fields = answer_fields(answer)
            text = fields.get(TARGET_FIELD) if fields is not None else None
            return (text, False) if isinstance(text, str) and text else (instruction, True)
        if self.parse == "raw" or self.user is None:
            text = answer.strip()
            return (text, False) if text else (instruction, True)
        for line in answer.split("\n"):
            if line.strip().startswith(MARKER):
                parts = line.split(":")
                text = parts[1].strip() if len(parts) > 1 else ""
                return (text, False) if text else (instruction, True)
        return instruction, True


def answer_fields(answer: str) -> dict[str, Any] | None:
    """The JSON object of an OSrCIR-style answer (its demo's rule: a ``<Response>`` tag, then a ```` ```json ````
    fence, removed where the answer starts with one), or None where the answer is not one."""
    if answer.startswith("<Response>"):
        answer = answer.replace("<Response>", "").replace("</Response>", "").strip()
    if answer.startswith("```json"):
        answer = answer.replace("```json", "").replace("```", "").strip()
    try:
        fields = json.loads(answer)
    except ValueError:
        return None
    return fields if isinstance(fields, dict) else None


def load_prompt(spec: str, kind: str = "rewrite") -> Prompt:
    """The prompt named by ``--prompt`` for a method of ``kind`` (see the module docstring)."""
    needs = NEEDS[kind]
    if spec in ("", "builtin"):
        if kind == "reason":
            return Prompt("builtin-reason", REASON_SYSTEM, REASON_USER, "target-description")
        return Prompt("builtin", BUILTIN_SYSTEM, BUILTIN_USER)
    if spec.startswith("name:"):
        if not spec[5:]:
            raise CirbenchError("--prompt name:ID needs an ID")
        return Prompt(spec[5:], None, None, "target-description" if kind == "reason" else "raw")
    path = Path(spec).expanduser()
    if not path.is_file():
        raise CirbenchError(f"prompt file {path} does not exist (--prompt takes builtin, a .toml or .txt file, or "
                            "name:ID)")
    try:
        text = path.read_text(encoding=TEXT_ENCODING)
    except (OSError, UnicodeDecodeError) as exc:
        raise CirbenchError(f"cannot read prompt file {path}: {exc}") from None
    if path.suffix.lower() == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise CirbenchError(f"prompt file {path} is not valid TOML: {exc}") from None
        default_parse = "target-description" if kind == "reason" else "edited-description"
        user, system, parse = data.get("user"), data.get("system"), data.get("parse", default_parse)
        if not isinstance(user, str) or not all(n in user for n in needs):
            raise CirbenchError(f"prompt file {path}: 'user' must be a string holding {' and '.join(needs)}")
        if parse not in PARSE_RULES:
            raise CirbenchError(f"prompt file {path}: parse must be one of {', '.join(PARSE_RULES)}")
        if system is not None and not isinstance(system, str):
            raise CirbenchError(f"prompt file {path}: 'system' must be a string")
        return Prompt(path.stem, system, user, parse)
    if kind == "reason":  # the system message (OSrCIR's prompts.py constant), with the official user message
        return Prompt(path.stem, text, REASON_USER, "target-description")
    if "{caption}" in text:
        return Prompt(path.stem, None, text, "edited-description")
    return Prompt(path.stem, None, text + "\nImage Content: {caption}\nInstruction: {instruction}",
                  "edited-description")


def join_instruction(texts) -> str:
    """The modification text given to the language model: FashionIQ's two captions as CIReVL joins them,
    "{c1} and {c2}" with ".?, " stripped at both ends; otherwise the one text."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if len(texts) >= 2:
        return f"{texts[0].strip('.?, ')} and {texts[1].strip('.?, ')}"
    return texts[0] if texts else ""


def instruction_of(query) -> str:
    return join_instruction(query.texts)
