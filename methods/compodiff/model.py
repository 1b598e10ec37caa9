"""CompoDiff as a cirbench method: the released denoiser, its text encoder, and the query it composes.

The official repository (github.com/navervision/CompoDiff) ships the model, its loader and a search demo, not an
evaluation script; the query follows its README's "Composed visual embeddings without mask for CIR" and
``demo_search.py``'s ``predict``:

* the reference image's CLIP ViT-L/14 ``image_embeds`` (unnormalised; transformers' CLIPImageProcessor, bicubic,
  shortest side 224, centre crop) is the image condition; the text's condition is the last hidden states of CLIP-G/14's
  text tower (transformers' ``CLIPTextModel`` of ``laion/CLIP-ViT-bigG-14-laion2B-39B-b160k``, 77 tokens padded,
  its attention mask passed); the negative text is encoded with the *text's* attention mask, as both official
  snippets do; the mask is empty (64 x 64 zeros);
* 2 samples of 10 DDIM steps at guidance scales 1.5 (image) and 7.5 (text) are averaged, then mixed with the
  reference embedding, ``(1 - w) sample + w image`` with the source weight ``w`` 0.1, and normalised; the gallery is
  the normalised ``image_embeds`` of its images, on the same CLIP.

Departures: the demo squashes the reference to 512 x 512 before its processor (for its sketch tool) and cirbench
does not; FashionIQ's two captions are one text, "{c1} and {c2}" (no official protocol); each query draws its noise
from its own seeded generator (the official from the global one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cirbench.backbones import Backbone
from cirbench.checkpoints import PRETRAINED_WEIGHTS, pretrained_weights_in, read_weights_file
from cirbench.errors import CheckpointError
from cirbench.hub import HubFile
from cirbench.method import Method, caption_variants
from cirbench.methods._shared.textinv import RawImageReferences
from cirbench.methods._shared.towers import last_loaded
from cirbench.types import Query
from cirbench.util import file_sha256, keyed_seed, one_line

from .prior import Denoiser, Guidance, Schedule, build, sample

HUB_REPO = "navervision/CompoDiff-Aesthetic"
#: the released file: the repository's head since 2023-04-27 (9e26bd4; the weights are e13da22's of 2023-04-23,
#: which replaced those of the first upload), by its Git LFS sha256
RELEASED = HubFile(HUB_REPO, "pytorch_model.bin", "9e26bd4a9305ca1b8572dd3a699dd4e3c14f5dcd",
                   "1f22dc90a1cb8b18ca1a05deb3afe299aa0d8a38f2b92cdfa10c217d5e5f4692")
RELEASED_FOR = ("ViT-L-14", "openai")  # the embeddings CompoDiff-Aesthetic denoises: openai/clip-vit-large-patch14
TEXT_ENCODER = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
WHAT = "CompoDiff-Aesthetic's weights"


def downloads(options: dict, model: str, pretrained: str) -> list[tuple[str, str]]:
    """MethodSpec.downloads of ``CompoDiff``: the released weights unless ``--checkpoint`` names them, and the text
    encoder (a transformers model: a local folder, the hub's cache, or a download)."""
    out = []
    if not options.get("checkpoint"):
        _check_released_backbone(model, pretrained)
        out.append((WHAT, RELEASED.source))
    out.append(("CompoDiff's text encoder (CLIP-G/14's text tower)",
                f"hf-model:{options.get('text_encoder') or TEXT_ENCODER}"))
    return out


def _check_released_backbone(model: str, pretrained: str) -> None:
    if (model, pretrained) != RELEASED_FOR:
        raise CheckpointError(f"{WHAT} denoise {'/'.join(RELEASED_FOR)} image embeddings; for {model}/{pretrained} "
                              "pass --checkpoint FILE (a denoiser trained on that backbone's embeddings)")


def weights_file(options: dict, backbone: Backbone) -> Path:
    """The denoiser's weights: the file (or ``save_pretrained`` folder) ``--checkpoint`` names, or the released
    file from the Hugging Face hub (its cache, or downloaded)."""
    given = options.get("checkpoint")
    if given:
        path = Path(given).expanduser()
        if path.is_dir():
            found = pretrained_weights_in(path)  # what CompoDiffModel.save_pretrained wrote, as from_pretrained picks
            if found is None:
                raise CheckpointError(f"--checkpoint {path} is a folder without {' or '.join(PRETRAINED_WEIGHTS)}")
            return found
        if not path.is_file():
            raise CheckpointError(f"--checkpoint {path} is not a file")
        return path
    _check_released_backbone(backbone.model_name, backbone.pretrained)
    return RELEASED.fetch(WHAT)


class TextEncoder:
    """CLIP-G/14's text tower as the official ``CLIPHF.encode_texts`` runs it: transformers' ``CLIPTokenizer``
    (padded to the model's 77 positions, truncated) and ``CLIPTextModel``'s ``last_hidden_state`` with the attention
    mask passed, in float32 (under the run's autocast)."""

    def __init__(self, name: str, device: torch.device):
        import transformers

        from cirbench.generation.hf import from_pretrained_args

        self.name = name
        try:
            source, where, load = from_pretrained_args(name, "fp32")
            self.tokenizer = transformers.CLIPTokenizer.from_pretrained(source, **where)
            self.model = transformers.CLIPTextModel.from_pretrained(source, **load).to(device).eval()
        except Exception as exc:  # noqa: BLE001 - offline, a wrong folder, another architecture: one line
            raise CheckpointError(f"cannot load CompoDiff's text encoder {name}: {type(exc).__name__}: "
                                  f"{one_line(exc)[:200]}. Download it on a connected machine and pass "
                                  "--text-encoder FOLDER") from None
        self.width = int(self.model.config.hidden_size)
        self.length = int(self.model.config.max_position_embeddings)
        self.device = device

    def tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.length,
                             return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    @torch.no_grad()
    def encode(self, ids: torch.Tensor, mask: torch.Tensor, backbone: Backbone) -> torch.Tensor:
        with backbone.autocast():
            return self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()

    def identity(self) -> dict:
        """What names the weights: a local folder's config sha256, or the hub repository and the revision its cache
        holds."""
        folder = Path(self.name).expanduser()
        if folder.is_dir():
            return {"path": str(folder), "config_sha256": file_sha256(folder / "config.json")}
        revision = getattr(self.model.config, "_commit_hash", None)
        return {"repo": self.name, "revision": revision}


def load_bundle(weights: Path, text_encoder: str, backbone: Backbone) -> dict[str, Any]:
    net, schedule = build(read_weights_file(weights), str(weights))
    if net.arch.dim != backbone.embed_dim:
        raise CheckpointError(f"checkpoint {weights} denoises {net.arch.dim}-d image embeddings; this backbone's are "
                              f"{backbone.embed_dim}-d")
    text = TextEncoder(text_encoder, backbone.device)
    if text.width != net.arch.text_width:
        raise CheckpointError(f"text encoder {text_encoder} gives {text.width}-d hidden states; the denoiser in "
                              f"{weights} reads {net.arch.text_width}-d ones (CLIP-G/14's text tower: "
                              f"--text-encoder {TEXT_ENCODER})")
    record = {"checkpoint": {"path": str(weights), "sha256": file_sha256(weights)},
              "architecture": net.arch.record(), "text_encoder": text.identity()}
    return {"net": net.to(backbone.device), "schedule": schedule, "text": text, "record": record}


class CompoDiff(RawImageReferences, Method):
    """Query = the denoised image embedding of "the reference, changed as the text says", mixed with the reference
    and normalised."""

    def __init__(self, backbone, options, dataset=None):
        super().__init__(backbone, options, dataset)
        weights = weights_file(options, backbone)
        text_encoder = str(options.get("text_encoder") or TEXT_ENCODER)
        self.bundle = last_loaded(backbone, f"compodiff with {text_encoder}", weights,
                                  lambda: load_bundle(weights, text_encoder, backbone))
        o = options
        self.guidance = Guidance(steps=int(o.get("steps", 10)), image_scale=float(o.get("image_scale", 1.5)),
                                 text_scale=float(o.get("text_scale", 7.5)), samples=int(o.get("samples", 2)))
        self.seed = int(o.get("sampling_seed", 0))

    @property
    def net(self) -> Denoiser:
        return self.bundle["net"]

    @property
    def schedule(self) -> Schedule:
        return self.bundle["schedule"]

    @torch.no_grad()
    def compose(self, references: torch.Tensor, queries: list[Query]) -> torch.Tensor:
        text = self.bundle["text"]
        ids, mask = text.tokens([caption_variants(q.texts)[0] for q in queries])
        negative_ids, _ = text.tokens([str(self.options.get("negative_text") or "")] * len(queries))
        text_cond = text.encode(ids, mask, self.backbone)
        negative = text.encode(negative_ids, mask, self.backbone)  # the text's mask, as the official code passes it
        image = references.to(self.backbone.device).float().unsqueeze(1)
        side = self.net.arch.mask_side
        empty = image.new_zeros(len(queries), side, side)
        generators = [torch.Generator().manual_seed(keyed_seed(self.seed, q.id)) for q in queries]
        with torch.autocast(self.backbone.device.type, enabled=False):  # the denoiser runs in float32
            drawn = sample(self.net, self.schedule, image, text_cond, negative, empty, self.guidance, generators)
        w = float(self.options.get("source_weight", 0.1))
        return F.normalize((1 - w) * drawn + w * image[:, 0], dim=-1)

    def info(self) -> dict:
        return dict(self.bundle["record"])
