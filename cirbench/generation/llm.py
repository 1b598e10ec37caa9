"""Language models that rewrite text or reason over images: any OpenAI-compatible chat endpoint, or a local
transformers model.

``build_llm("openai:gpt-4o-mini")`` talks to ``--llm-url`` (default ``$OPENAI_BASE_URL`` or the OpenAI API)
with the key in ``$OPENAI_API_KEY`` (never written anywhere); vLLM, llama.cpp's server, Ollama and the like
serve the same protocol locally. ``build_llm("hf:PATH_OR_REPO")`` runs a causal language model with
transformers (its chat template when it has one), and with ``vision=True`` an image-text-to-text model whose
processor places the messages' images. All take a list of OpenAI-style chat messages per prompt (images as
``image_url`` parts holding ``data:`` URLs) and return one text per prompt; a stop string ends the text.
"""

from __future__ import annotations

import inspect
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from ..errors import CirbenchError
from ..util import one_line
from .hf import from_pretrained_args, load_image_text_to_text

Messages = list[dict[str, Any]]  # OpenAI chat messages: content is a text, or a list of text and image_url parts
OnResult = Callable[[int, str], None]  # (index of the prompt, its answer), called as each answer arrives
DEFAULT_OPENAI_URL = "https://api.openai.com/v1"


MAX_RETRY_WAIT_S = 60.0


def retry_after(headers: Any) -> float | None:
    """How long an endpoint asked to wait before the next request: OpenAI's ``retry-after-ms``, else the
    standard ``Retry-After`` in seconds (an HTTP date is not honoured); capped at :data:`MAX_RETRY_WAIT_S`."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            continue
        if seconds >= 0:
            return min(seconds, MAX_RETRY_WAIT_S)
    return None


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return text[:cut] if cut >= 0 else text


class OpenAIChat:
    """Chat completions over HTTP (``POST {url}/chat/completions``), several requests in flight."""

    def __init__(self, model: str, url: str | None = None, temperature: float = 0.0, max_tokens: int | None = 700,
                 stop: tuple[str, ...] = ("\n\n",), seed: int | None = None, timeout: float = 60.0,
                 retries: int = 6, parallel: int = 8, api_key_env: str = "OPENAI_API_KEY"):
        self.model = model
        self.url = (url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_OPENAI_URL).rstrip("/")
        self.temperature, self.max_tokens, self.stop, self.seed = temperature, max_tokens, tuple(stop), seed
        self.timeout, self.retries, self.parallel = timeout, retries, parallel
        self.api_key = os.environ.get(api_key_env)
        self.api_key_env = api_key_env
        self.url_option = "--llm-url"  # the option an error tells the user to pass

    @property
    def id(self) -> str:
        return f"openai:{self.model}"

    def source(self) -> str:
        return f"live:{self.url}"

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(f"{self.url}/chat/completions", data=json.dumps(body).encode(),
                                         headers=headers, method="POST")
        delay = 1.0
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 - user's URL
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as exc:
                if exc.code in (401, 403):
                    raise CirbenchError(f"LLM endpoint {self.url} refused the request (HTTP {exc.code}): set "
                                        f"${self.api_key_env} to a valid key") from None
                if exc.code in (429, 500, 502, 503, 504) and attempt < self.retries:
                    time.sleep(retry_after(exc.headers) or delay)  # a rate limit says how long it lasts
                    delay = min(2 * delay, MAX_RETRY_WAIT_S)
                    continue
                detail = one_line(exc.read().decode("utf-8", errors="replace") or str(exc))[:200]
                raise CirbenchError(f"LLM endpoint {self.url} answered HTTP {exc.code} for model {self.model}: "
                                    f"{detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                # a timeout or a dropped connection is retried; a refused one (nothing listening) is not
                if attempt < self.retries and isinstance(reason, (TimeoutError, ConnectionResetError)):
                    time.sleep(delay)
                    delay = min(2 * delay, MAX_RETRY_WAIT_S)
                    continue
                raise CirbenchError(f"LLM endpoint {self.url} is unreachable ({one_line(str(reason))}): start it or "
                                    f"pass {self.url_option}; or replay cached generations with --generation "
                                    "replay") from None
            except ValueError:
                raise CirbenchError(f"LLM endpoint {self.url} did not answer with JSON") from None
        raise CirbenchError(f"LLM endpoint {self.url} kept failing after {self.retries + 1} attempts")

    def _one(self, messages: Messages) -> str:
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": self.temperature}
        if self.max_tokens is not None:  # LDRE's script sends none: the model's own limit
            body["max_tokens"] = self.max_tokens
        if self.stop:
            body["stop"] = list(self.stop)
        if self.seed is not None:
            body["seed"] = self.seed
        answer = self._post(body)
        try:
            text = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise CirbenchError(f"LLM endpoint {self.url} answered without choices[0].message.content") from None
        return cut_at_stop(text or "", self.stop)

    def generate(self, prompts: list[Messages], on_result: OnResult | None = None) -> list[str]:
        """One answer per prompt, ``parallel`` requests in flight. ``on_result(i, text)`` is called (in this
        thread) as each answer arrives; when a request fails for good, the answers of the others still come in
        and are passed on before its error is raised, so that no paid-for answer is lost."""
        out: list[str | None] = [None] * len(prompts)
        first_error: BaseException | None = None
        with ThreadPoolExecutor(max(1, min(self.parallel, len(prompts)))) as pool:
            futures = {pool.submit(self._one, p): i for i, p in enumerate(prompts)}
            for future in as_completed(futures):
                i = futures[future]
                try:
                    text = out[i] = future.result()
                except Exception as exc:  # noqa: BLE001 - re-raised below, after the others are kept
                    first_error = first_error or exc
                    continue
                if on_result is not None:
                    on_result(i, text)
        if first_error is not None:
            raise first_error
        return [text or "" for text in out]


class TransformersLM:
    """A local causal language model (transformers): greedy at temperature 0, seeded sampling otherwise."""

    kind = "language model"  # what a loading error calls it

    def __init__(self, path: str, temperature: float = 0.0, max_tokens: int = 700, stop: tuple[str, ...] = ("\n\n",),
                 seed: int | None = 0, device: str = "cpu", batch_size: int = 8, precision: str = "fp32"):
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # cirbench shows its own progress
            self._load(path, precision, device)
        except (OSError, ValueError) as exc:
            raise CirbenchError(f"cannot load the {self.kind} {path!r} ({one_line(exc)[:160]}): pass a local "
                                "folder or a cached hub id") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        self.path, self.device, self.batch_size = path, device, batch_size
        self.temperature, self.max_tokens, self.stop, self.seed = temperature, max_tokens, tuple(stop), seed

    def _load(self, path: str, precision: str, device: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        name, where, load = from_pretrained_args(path, precision)
        self.tokenizer = AutoTokenizer.from_pretrained(name, **where)
        model = AutoModelForCausalLM.from_pretrained(name, **load)
        self.model = model.to(device).eval()  # type: ignore[arg-type]  # transformers types .to oddly

    @property
    def id(self) -> str:
        return f"hf:{self.path}"

    def source(self) -> str:
        return f"live:{self.id}"

    def _encode(self, prompts: list[Messages]) -> Any:
        """The batch's model inputs (left-padded)."""
        texts = [self._text(m) for m in prompts]
        # a chat template writes the special tokens itself (BOS above all): the tokenizer must not add them again
        templated = bool(getattr(self.tokenizer, "chat_template", None))
        return self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not templated)

    def _text(self, messages: Messages) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return str(self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        return "\n\n".join(m["content"] for m in messages)

    def generate(self, prompts: list[Messages], on_result: OnResult | None = None) -> list[str]:
        """One answer per prompt, ``batch_size`` at a time; ``on_result(i, text)`` as each batch is done."""
        import torch

        out: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            enc = self._encode(prompts[start : start + self.batch_size]).to(self.device)
            kwargs: dict[str, Any] = {"max_new_tokens": self.max_tokens, "pad_token_id": self.tokenizer.pad_token_id}
            if self.temperature > 0:
                torch.manual_seed(self.seed or 0)
                # plain temperature sampling, as an endpoint's: not the top-k 50 / top-p a model's own
                # generation_config would add (Llama's: top-p 0.9) without being asked or recorded
                kwargs.update(do_sample=True, temperature=self.temperature, top_k=0, top_p=1.0)
            else:
                kwargs.update(do_sample=False)
            with torch.no_grad():
                ids = self.model.generate(**enc, **kwargs)
            encoder_decoder = bool(getattr(self.model.config, "is_encoder_decoder", False))
            new = ids if encoder_decoder else ids[:, enc["input_ids"].shape[1]:]  # a decoder repeats the prompt
            for text in self.tokenizer.batch_decode(new, skip_special_tokens=True):
                out.append(cut_at_stop(text, self.stop))
                if on_result is not None:
                    on_result(len(out) - 1, out[-1])
        return out


class TransformersVLM(TransformersLM):
    """A local vision-language model (transformers image-text-to-text, e.g. LLaVA, Qwen2-VL), asked with the
    same OpenAI-style messages as an endpoint: each ``image_url`` part (a ``data:`` URL) becomes an image
    placeholder of the processor's chat template, and the image goes to the processor beside the text."""

    kind = "vision-language model"

    def _load(self, path: str, precision: str, device: str) -> None:
        self.processor, self.model = load_image_text_to_text(path, precision, device, chat=True)
        self.tokenizer = self.processor.tokenizer

    def _encode(self, prompts: list[Messages]) -> Any:
        texts, images = [], []
        for messages in prompts:
            converted, pictures = split_images(messages)
            texts.append(str(self.processor.apply_chat_template(converted, add_generation_prompt=True,
                                                                tokenize=False)))
            images += pictures
        enc = self.processor(text=texts, images=images or None, return_tensors="pt", padding=True)
        if "token_type_ids" in enc and "token_type_ids" not in inspect.signature(self.model.forward).parameters:
            del enc["token_type_ids"]  # some processors' tokenizers add them; generate refuses what forward lacks
        if "pixel_values" in enc:  # the processor makes fp32 pixels; the vision tower takes its own dtype
            enc["pixel_values"] = enc["pixel_values"].to(self.model.dtype)
        return enc


def split_images(messages: Messages) -> tuple[Messages, list[Any]]:
    """OpenAI-style messages with their ``image_url`` parts (``data:`` URLs) replaced by ``{"type": "image"}``
    placeholders, and the decoded images in order (RGB PIL images)."""
    import base64
    import io

    from PIL import Image

    converted: Messages = []
    images: list[Any] = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") == "image_url":
                    url = str(part["image_url"]["url"])
                    if not url.startswith("data:") or "," not in url:
                        raise CirbenchError("a local vision-language model takes images as data: URLs")
                    images.append(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
                    parts.append({"type": "image"})
                else:
                    parts.append(part)
            content = parts
        converted.append({**message, "content": content})
    return converted, images


def check_llm(spec: str) -> str:
    """``spec``, or a one-line error naming the language models there are (checked before any work)."""
    kind, _, name = spec.partition(":")
    if kind in ("openai", "hf") and name:
        return spec
    raise CirbenchError(f"unknown language model {spec!r}: use openai:MODEL (any OpenAI-compatible endpoint, "
                        "--llm-url) or hf:PATH_OR_REPO (a local transformers model)")


def build_llm(spec: str, *, url: str | None = None, temperature: float = 0.0, max_tokens: int | None = 700,
              stop: tuple[str, ...] = ("\n\n",), seed: int | None = None, device: str = "cpu", precision: str = "fp32",
              vision: bool = False):
    """``openai:MODEL`` (an OpenAI-compatible endpoint) or ``hf:PATH_OR_REPO`` (local transformers: a
    vision-language model when the prompts hold images, ``vision``)."""
    kind, _, name = check_llm(spec).partition(":")
    if kind == "openai":
        return OpenAIChat(name, url, temperature, max_tokens, stop, seed)
    local = TransformersVLM if vision else TransformersLM
    return local(name, temperature, max_tokens or 700, stop, seed, device, precision=precision)
