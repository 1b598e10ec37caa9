"""Tiny local generation models and a fake OpenAI-compatible endpoint on the loopback address (no network).

* :func:`write_tiny_blip2` / :func:`write_tiny_lm`: randomly initialised BLIP-2 (OPT) and GPT-2 models with a
  small byte-level BPE tokenizer trained here, saved as transformers folders (``hf:PATH``);
* :func:`write_tiny_clip_text`: a randomly initialised CLIP text tower with CLIP's own tokenizer (CompoDiff's text
  encoder); :func:`save_hf_clip`: a transformers CLIPModel of the tiny backbone's shape (``--pretrained hf:``);
* :class:`FakeChatEndpoint`: ``POST /v1/chat/completions`` answering "Edited Description: ..." made from the
  prompt's instruction, recording every request; it can be told to fail.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "</s>", "<unk>", "<image>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["a red dog on the grass", "a photo of a green cat", "edited description: make it blue",
                             "yellow square image content instruction"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="</s>",
                                   unk_token="<unk>")


TINY_HF = {"text_config": {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "max_position_embeddings": 77},
           "vision_config": {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 1,
                             "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
           "projection_dim": 32}  # cirbench.testing's TINY_CLIP, as transformers configures it


def save_hf_clip(folder: Path, act: str = "quick_gelu", seed: int = 0, safetensors: bool = True, **vision):
    """A randomly initialised transformers CLIPModel of the tiny backbone's shape, saved as save_pretrained does."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    cfg = json.loads(json.dumps(TINY_HF))
    for tower in ("text_config", "vision_config"):
        cfg[tower]["hidden_act"] = act
    cfg["vision_config"].update(vision)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(**cfg)).eval()
    with torch.no_grad():  # the norms and biases too, so that every mapped tensor counts
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    if not safetensors:  # as transformers before 4.35 saved by default (transformers 5 writes safetensors only)
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return model


def write_tiny_clip_text(folder: Path, width: int = 24, pad_token: str = "!") -> Path:
    """A randomly initialised transformers ``CLIPTextModel`` (``width``-d, 2 layers) with a ``CLIPTokenizer`` of
    CLIP's own BPE (open_clip's vocabulary and merges, the special tokens under transformers' names), padding with
    ``pad_token`` as LAION's CLIP repositories do; saved as a transformers folder."""
    import open_clip
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    bpe = open_clip.tokenizer.SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(k, k): v for k, v in bpe.encoder.items()}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    merges = sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m, _ in merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token,
                              model_max_length=77)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                            projection_dim=width, pad_token_id=vocab[pad_token], bos_token_id=49406,
                            eos_token_id=49407)
    CLIPTextModel(config).save_pretrained(folder)
    return folder


def write_tiny_blip2(folder: Path, dtype=None) -> Path:
    """``dtype``: the dtype the weights are saved in (default fp32)."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
    )

    tok = _tokenizer()
    vision = Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=32, patch_size=8)
    qformer = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 encoder_hidden_size=32, vocab_size=tok.vocab_size)
    text = OPTConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2,
                     max_position_embeddings=128, word_embed_proj_dim=32, pad_token_id=0, eos_token_id=1,
                     bos_token_id=1)
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                         num_query_tokens=4, image_token_index=tok.convert_tokens_to_ids("<image>"))
    import torch

    torch.manual_seed(0)
    Blip2ForConditionalGeneration(config).to(dtype or torch.float32).save_pretrained(folder)
    Blip2Processor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok,
                   num_query_tokens=4).save_pretrained(folder)
    return Path(folder)


def write_tiny_lm(folder: Path, dtype=None, chat: bool = False) -> Path:
    """``dtype``: the dtype the weights are saved in (default fp32); ``chat``: a tokenizer that adds a BOS token
    to what it encodes and a chat template that writes one too (as Llama's)."""
    import torch
    from tokenizers.processors import TemplateProcessing
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = _tokenizer()
    if chat:
        bos = tok.convert_tokens_to_ids("</s>")
        tok._tokenizer.post_processor = TemplateProcessing(single="</s> $A", special_tokens=[("</s>", bos)])
        tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=32, n_layer=1, n_head=2,
                                       bos_token_id=1, eos_token_id=1, pad_token_id=0))
    model.to(dtype or torch.float32).save_pretrained(folder)
    tok.save_pretrained(folder)
    return Path(folder)


LLAVA_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %} | {% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


def write_tiny_llava(folder: Path) -> Path:
    """A randomly initialised LLaVA (a one-layer CLIP vision tower at 28 px, a one-layer Llama) with a
    processor whose chat template writes ``<image>`` where a message's image part is, saved as a transformers
    folder (``hf:PATH``): a local vision-language model."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = _tokenizer()
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=16)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                   chat_template=LLAVA_CHAT_TEMPLATE, num_additional_image_tokens=1).save_pretrained(folder)
    return Path(folder)


def free_port() -> int:
    """A loopback port nothing listens on (an unreachable endpoint)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeChatEndpoint:
    """An OpenAI-compatible chat endpoint on 127.0.0.1 (a random free port)."""

    def __init__(self):
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.fail_next: list[int] = []  # HTTP codes to answer the next requests with
        self.fail_headers: dict[str, str] = {}  # headers sent with those answers (e.g. Retry-After)
        self.fail_from: int | None = None  # answer HTTP 400 from this many requests on (an outage midway)
        self.drop_next = 0  # requests to answer by closing the connection (a proxy or server dropping it)
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if endpoint.drop_next:
                    endpoint.drop_next -= 1
                    self.close_connection = True
                    return  # no answer at all: the client sees the connection closed
                endpoint.requests.append(body)
                endpoint.headers.append(dict(self.headers))
                if endpoint.fail_from is not None and len(endpoint.requests) > endpoint.fail_from:
                    endpoint.fail_next.append(400)
                if endpoint.fail_next:
                    self.send_response(endpoint.fail_next.pop(0))
                    for name, value in endpoint.fail_headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(b'{"error": "nope"}')
                    return
                user = body["messages"][-1]["content"]
                if isinstance(user, list):  # a multimodal request: answer as OSrCIR's model would
                    content = endpoint.describe(user, body.get("seed"))
                    answer = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]})
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(answer.encode())))
                    self.end_headers()
                    self.wfile.write(answer.encode())
                    return
                caption = re.search(r"Image Content: (.*)", user)
                instruction = re.search(r"Instruction: (.*)", user)
                inst = instruction.group(1) if instruction else ""
                if "nomarker" in inst:
                    content = "I am not sure what to do."
                else:
                    content = (f"Here you go.\nEdited Description: {inst.replace('make it ', 'a ')} picture "
                               f"(from {len(caption.group(1)) if caption else 0} chars)\n\nExtra text")
                answer = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def describe(parts: list[dict], seed: int | None = None) -> str:
        """A vision model's answer: asked without a manipulation text (a caption), "a <colour> picture" (the
        image's mean pixel, named among the toy colours; ", take <seed>" when sampled); else OSrCIR's JSON
        with the image's colour and the manipulation text's ("nojson" in the text gives prose, "fenced" a
        ```json fence around the object)."""
        import base64
        import io

        from PIL import Image

        from cirbench.testing import TOY_COLOURS

        text = next(p["text"] for p in parts if p["type"] == "text")
        url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
        pixels = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB").resize((1, 1))
        mean = pixels.getpixel((0, 0))
        colour = min(TOY_COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(TOY_COLOURS[c], mean, strict=True)))
        manipulation = re.search(r'"Manipulation text": (.*)\.', text)
        if manipulation is None:
            return f"a {colour} picture" + (f", take {seed}" if seed else "") + "\n"
        wanted = manipulation.group(1).replace("make it ", "") if manipulation else ""
        if "nojson" in wanted:
            return "The target image shows something else."
        answer = json.dumps({"Original Image Description": f"a {colour} picture",
                             "Thoughts": f"The change asks for {wanted} instead of {colour}.",
                             "Reflections": "Only the colour changes.",
                             "Target Image Description": f"a {wanted} picture"})
        return f"```json\n{answer}\n```" if "fenced" in wanted else answer

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
