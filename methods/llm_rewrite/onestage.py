"""OSrCIR (Tang et al., "Reason-before-Retrieve: One-Stage Reflective Chain-of-Thoughts for Training-Free
Zero-Shot Composed Image Retrieval", CVPR 2025; github.com/Pter61/osrcir, ``src/demo.py`` and ``src/utils.py``).

One stage instead of two: a multimodal language model sees the reference image itself with the modification
text, and answers, in one JSON object, a description of the reference, its thoughts on the change, its
reflections, and the target image's description; the CLIP text feature of that description is ranked against
the gallery's image features, as CIReVL ranks its rewrite. As the official demo: the system message is the
reflective chain-of-thought prompt, the user message the modification (FashionIQ's two captions joined as
CIReVL joins them) with the image after it as a ``data:`` URL, temperature 0, at most 1,024 tokens, stopped at a
blank line or ``<|endoftext|>``; an answer that is not JSON, or whose target description is missing or empty,
gives the modification text itself.

The model is any OpenAI-compatible endpoint that takes images (OpenAI's GPT-4o, as the paper; vLLM, llama.cpp
or Ollama serving a local one), or a local transformers vision-language model (``hf:``, with its processor's
chat template). Answers are cached by content like the other language-model methods' (the
image's sha256, the instruction, the model, the prompt, the decoding), so a run replays offline exactly.
"""

from __future__ import annotations

from typing import Any

from cirbench.generation import GenerationCache
from cirbench.generation.images import image_data_url, image_digests
from cirbench.method import QuerySet
from cirbench.types import Query

from .pipeline import LanguageModelMethod
from .prompts import answer_fields, instruction_of

ORIGINAL_FIELD = "Original Image Description"


class OSrCIR(LanguageModelMethod):
    """See the module docstring."""

    task = "reason"
    prompt_kind = "reason"
    generates = "target descriptions"
    vision = True

    def reason_key(self, image: str, instruction: str) -> dict[str, Any]:
        return {**self.rewrite_request, "image": image, "instruction": instruction}

    def _prepare(self, qs: QuerySet, cache: GenerationCache) -> None:
        digest = dict(zip(qs.references, image_digests(list(qs.references.values()), qs.name, qs.progress),
                          strict=True))

        def requests():
            for q in qs.queries:
                name = (digest[q.reference], instruction_of(q))  # one request per reference image and instruction
                ref = qs.references[q.reference]
                yield name, self.reason_key(*name), q, (
                    lambda ref=ref, instruction=name[1]: self.prompt.messages("", instruction, image_data_url(ref)))

        model, prompt = self.rewrite_request["model"], self.prompt.identity[:19]
        answers = self._answers(qs, cache, requests(), "queries", lambda q: (
            f"query {q.id} (target description from reference image {q.reference} by {model} with prompt {prompt})"))
        for q in qs.queries:
            instruction = instruction_of(q)
            answer = answers[(digest[q.reference], instruction)]
            text, fell = self.prompt.parse_answer(answer, instruction)
            original = (answer_fields(answer) or {}).get(ORIGINAL_FIELD)
            self.stats["fallback_to_instruction"] += int(fell)
            self.texts[q.id] = {"rewrites": [text], "fallbacks": int(fell),
                                "original": original if isinstance(original, str) else None}

    def query_details(self, query: Query) -> dict[str, Any] | None:
        t = self.texts.get(query.id)
        return None if t is None else {"target_description": t["rewrites"][0], "fallback": bool(t["fallbacks"]),
                                       "original_description": t["original"]}
