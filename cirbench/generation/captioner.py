"""Image captioners: transformers image-to-text models (BLIP-2 and any other it loads), or a multimodal chat
model, behind an OpenAI-compatible endpoint or loaded locally.

``build_captioner("hf:Salesforce/blip2-flan-t5-xxl")`` loads the processor and the model
(``AutoModelForImageTextToText``, else ``AutoModelForVision2Seq``). Decoding follows LAVIS's BLIP-2
``generate`` defaults, which CIReVL and LDRE used: beam search with 5 beams, at most 30 new tokens, at least
1, no repetition or length penalty; ``n > 1`` captions per image (LDRE's dense captions) use nucleus sampling
(top-p 0.9, with transformers' default top-k 50 that LAVIS ran with, temperature 1) with a seed.

``build_captioner("openai:gpt-4o", url=...)`` asks a multimodal chat model (GPT-4o, or a vision-language model
that vLLM, llama.cpp or Ollama serve): one request per caption, the prompt as the user text and the image after
it; one caption at temperature 0, several at temperature 1, each with its own seed (OSrCIR's "CIReVL*"
baseline captions with GPT-4o this way).

``build_captioner("hf-chat:llava-hf/llava-1.5-7b-hf")`` asks a local transformers vision-language model (LLaVA,
Qwen2-VL, any image-text-to-text model whose processor has a chat template) the same messages with the same
decoding as a chat endpoint: the multimodal-LLM captions of WeiMoCIR without a server.
"""

from __future__ import annotations

from typing import Any

from ..errors import CirbenchError
from ..util import one_line
from .hf import load_image_text_to_text


def salted_seed(seed: int, salt: str, index: int, nbytes: int = 8) -> int:
    """A seed of ``nbytes * 8 - 1`` bits drawn from the run's ``seed``, the caller's ``salt`` (its name for a
    batch or an image) and an ``index`` within it: sampled captions that differ where their names differ."""
    import hashlib

    digest = hashlib.sha256(f"{seed}\0{salt}\0{index}".encode()).digest()
    return int.from_bytes(digest[:nbytes], "little") >> 1


class TransformersCaptioner:
    def __init__(self, path: str, prompt: str = "", n: int = 1, num_beams: int = 5, max_new_tokens: int = 30,
                 top_p: float = 0.9, seed: int = 0, device: str = "cpu", batch_size: int = 8,
                 precision: str = "fp32"):
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # cirbench shows its own progress
            self.processor, self.model = load_image_text_to_text(path, precision, device)
        except (OSError, ValueError, KeyError) as exc:
            raise CirbenchError(f"cannot load the captioner {path!r} ({one_line(exc)[:160]}): pass a local folder "
                                "or a cached hub id (e.g. hf:Salesforce/blip2-flan-t5-xl)") from None
        self.path, self.prompt, self.n, self.num_beams = path, prompt, n, num_beams
        self.max_new_tokens, self.top_p, self.seed = max_new_tokens, top_p, seed
        self.device, self.batch_size = device, batch_size

    @property
    def id(self) -> str:
        return f"hf:{self.path}"

    def source(self) -> str:
        return f"live:{self.id}"

    def caption(self, images: list[Any], salt: str = "") -> list[list[str]]:
        """``n`` captions for each PIL image. Sampling is seeded per batch with the seed, mixed with ``salt`` when
        given: the caller's name for the batch, so that two batches holding the same image at the same place (two
        queries of one reference, captioned apart) draw different captions."""
        import torch

        out: list[list[str]] = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            kwargs: dict[str, Any] = {"images": batch, "return_tensors": "pt"}
            if self.prompt:
                kwargs["text"] = [self.prompt] * len(batch)
            inputs = self.processor(**kwargs).to(self.device)
            if "pixel_values" in inputs:  # the processor makes fp32 pixels; the vision tower takes its own dtype
                inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            # LAVIS's Blip2*.generate arguments, all of them: a checkpoint's generation_config must not add its own
            generate: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "min_new_tokens": 1,
                                        "num_beams": self.num_beams, "num_return_sequences": self.n,
                                        "repetition_penalty": 1.0, "length_penalty": 1.0, "do_sample": False}
            if self.n > 1:
                torch.manual_seed(salted_seed(self.seed, salt, start) if salt else self.seed)
                # top-k 50: transformers' default, which LAVIS's nucleus sampling ran with (it passes none)
                generate.update(do_sample=True, top_p=self.top_p, top_k=50, temperature=1.0)
            with torch.no_grad():
                ids = self.model.generate(**inputs, **generate)
            if "input_ids" in inputs and not self.model.config.is_encoder_decoder:
                prompt_len = inputs["input_ids"].shape[1]
                if ids.shape[1] > prompt_len and bool((ids[:, :prompt_len] == inputs["input_ids"].repeat_interleave(
                        self.n, 0)).all()):
                    ids = ids[:, prompt_len:]  # decoder-only models return the prompt first
            texts = [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
            out += [texts[i * self.n : (i + 1) * self.n] for i in range(len(batch))]
        return out


CHAT_CAPTION_TOKENS = 300  # a chat model's caption length limit
CHAT_CAPTION_PROMPT = "Describe the image in one sentence."  # a chat captioner's prompt when none is given


def chat_caption_decoding(n: int, seed: int) -> dict[str, Any]:
    """How a chat captioner is asked (part of every caption's cache key)."""
    return {"n": n, "temperature": 0.0 if n == 1 else 1.0, "max_tokens": CHAT_CAPTION_TOKENS, "seed": seed}


class ChatCaptioner:
    """Captions from a multimodal chat model (see the module docstring): ``client`` is an endpoint
    (:class:`~.llm.OpenAIChat`) or a local vision-language model (:class:`~.llm.TransformersVLM`), asked with
    the same OpenAI-style messages and decoded as :func:`chat_caption_decoding` says."""

    takes_urls = True  # caption() takes each image as its file's data: URL (the file's own bytes, as sent)

    def __init__(self, client: Any, prompt: str = "", n: int = 1, seed: int = 0):
        self.client = client
        self.prompt = prompt or CHAT_CAPTION_PROMPT
        self.n, self.seed = n, seed

    def source(self) -> str:
        return self.client.source()

    def _seeds(self, salt: str) -> list[int]:
        """The seed of each of the ``n`` samples: the run's own for one caption; for several, each its own,
        mixed with ``salt`` (the caller's name for the image) so that two units of one image differ."""
        if self.n == 1:
            return [self.seed]
        return [salted_seed(self.seed, salt, j, nbytes=4) for j in range(self.n)]  # an endpoint's seed: 31 bits

    def caption(self, urls: list[str], salt: str = "") -> list[list[str]]:
        """``n`` captions for each image, given as its ``data:`` URL (:func:`~.images.image_data_url`), each the
        model's whole answer, stripped."""
        out: list[list[str]] = [[] for _ in urls]
        for seed in self._seeds(salt):
            self.client.seed = seed  # the requests of one sample go out together, then the next sample's
            answers = self.client.generate([[{"role": "user", "content": [
                {"type": "text", "text": self.prompt}, {"type": "image_url", "image_url": {"url": url}}]}]
                for url in urls])
            for captions, answer in zip(out, answers, strict=True):
                captions.append(answer.strip())
        return out


CAPTIONER_KINDS = ("hf", "hf-chat", "openai")


def check_captioner(spec: str) -> str:
    """``spec``, or a one-line error naming the captioners there are (checked before anything is encoded)."""
    kind, _, name = spec.partition(":")
    if kind in CAPTIONER_KINDS and name:
        return spec
    raise CirbenchError(f"unknown captioner {spec!r}: use hf:PATH_OR_REPO (a transformers image-to-text model such "
                        "as hf:Salesforce/blip2-opt-2.7b), hf-chat:PATH_OR_REPO (a local vision-language chat "
                        "model such as hf-chat:llava-hf/llava-1.5-7b-hf) or openai:MODEL (a multimodal chat "
                        "endpoint, --captioner-url)")


def build_captioner(spec: str, *, prompt: str = "", n: int = 1, seed: int = 0, device: str = "cpu",
                    precision: str = "fp32", url: str | None = None):
    """``hf:PATH_OR_REPO`` (transformers image-to-text), ``hf-chat:PATH_OR_REPO`` (a local vision-language chat
    model) or ``openai:MODEL`` (a multimodal chat endpoint at ``url``)."""
    kind, _, name = check_captioner(spec).partition(":")
    if kind == "hf":
        return TransformersCaptioner(name, prompt=prompt, n=n, seed=seed, device=device, precision=precision)
    decoding = chat_caption_decoding(n, seed)
    if kind == "hf-chat":
        from .llm import TransformersVLM

        client: Any = TransformersVLM(name, decoding["temperature"], CHAT_CAPTION_TOKENS, (), seed, device,
                                      precision=precision)
    else:
        from .llm import OpenAIChat

        client = OpenAIChat(name, url, decoding["temperature"], CHAT_CAPTION_TOKENS, (), seed)
        client.url_option = "--captioner-url"
    return ChatCaptioner(client, prompt=prompt, n=n, seed=seed)
