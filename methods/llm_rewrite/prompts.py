"""Prompts that ask a language model to rewrite an image caption with a modification, and reading the answer.

A prompt is a ``system`` message (optional), a ``user`` template holding ``{caption}`` and ``{instruction}``
(filled by plain substitution, so other braces are left alone) and a ``parse`` rule for the answer:

* ``edited-description``: the first line that starts with "Edited Description:" gives the text between its
  first and second colon (CIReVL's rule); when there is none, or it is empty, the instruction itself is used;
* ``raw``: the whole answer, stripped (LDRE's prompts end with "Edited Description:").

``--prompt`` takes the built-in prompt (``builtin``, written for cirbench), a ``.toml`` file with ``system``,
``user`` and ``parse`` keys, a ``.txt`` file (CIReVL's style: a base prompt followed by "Image Content:" and
"Instruction:" lines, unless it holds ``{caption}`` itself), or ``name:ID``: a prompt known only by name,
which can only replay generations recorded under that name (imported ones).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cirbench.errors import CirbenchError
from cirbench.util import json_hash

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

MARKER = "Edited Description:"
PARSE_RULES = ("edited-description", "raw")

BUILTIN_SYSTEM = "You rewrite short image descriptions."
BUILTIN_USER = (
    "Below is a description of a photo and an instruction that changes the photo. Write the description of the "
    "photo after the change, as one short sentence: keep what the instruction leaves as it is, apply the change "
    "exactly, and mention only things one could see. Answer with a single line that starts with "
    "\"Edited Description:\".\n\nImage Content: {caption}\nInstruction: {instruction}"
)


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

    def messages(self, caption: str, instruction: str) -> list[dict[str, str]]:
        if self.user is None:
            raise CirbenchError(f"prompt name:{self.name} is known only by name and can only replay recorded "
                                "generations (--generation replay)")
        values = {"caption": caption, "instruction": instruction}
        user = re.sub(r"\{(caption|instruction)\}", lambda m: values[m.group(1)], self.user)  # one pass
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [{"role": "user", "content": user}]

    def parse_answer(self, answer: str, instruction: str) -> tuple[str, bool]:
        """The rewritten text, and whether the instruction had to stand in for it."""
        if self.parse == "raw" or self.user is None:
            text = answer.strip()
            return (text, False) if text else (instruction, True)
        for line in answer.split("\n"):
            if line.strip().startswith(MARKER):
                parts = line.split(":")
                text = parts[1].strip() if len(parts) > 1 else ""
                return (text, False) if text else (instruction, True)
        return instruction, True


def load_prompt(spec: str) -> Prompt:
    """The prompt named by ``--prompt`` (see the module docstring)."""
    if spec in ("", "builtin"):
        return Prompt("builtin", BUILTIN_SYSTEM, BUILTIN_USER)
    if spec.startswith("name:"):
        if not spec[5:]:
            raise CirbenchError("--prompt name:ID needs an ID")
        return Prompt(spec[5:], None, None, "raw")
    path = Path(spec).expanduser()
    if not path.is_file():
        raise CirbenchError(f"prompt file {path} does not exist (--prompt takes builtin, a .toml or .txt file, or "
                            "name:ID)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CirbenchError(f"cannot read prompt file {path}: {exc}") from None
    if path.suffix.lower() == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise CirbenchError(f"prompt file {path} is not valid TOML: {exc}") from None
        user, system, parse = data.get("user"), data.get("system"), data.get("parse", "edited-description")
        if not isinstance(user, str) or "{caption}" not in user or "{instruction}" not in user:
            raise CirbenchError(f"prompt file {path}: 'user' must be a string holding {{caption}} and {{instruction}}")
        if parse not in PARSE_RULES:
            raise CirbenchError(f"prompt file {path}: parse must be one of {', '.join(PARSE_RULES)}")
        if system is not None and not isinstance(system, str):
            raise CirbenchError(f"prompt file {path}: 'system' must be a string")
        return Prompt(path.stem, system, user, parse)
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
