"""SEARLE: Phi, prompts, official weights (download or file)."""

from __future__ import annotations

import socket
from pathlib import Path

import torch

from cirbench.backbones import Backbone
from cirbench.checkpoints import checkpoint_sha256, load_checkpoint
from cirbench.errors import CheckpointError, CirbenchError
from cirbench.method import Method, average_variants, caption_variants
from cirbench.methods._shared.textinv import (
    Phi,
    RawImageReferences,
    clean_text,
    encode_with_pseudo_tokens,
    load_module_weights,
    token_width,
)
from cirbench.safe_unpickle import load_state_dict
from cirbench.types import Query
from cirbench.util import file_sha256

PLACEHOLDER = "$"
RELEASE = "https://github.com/miccunifi/SEARLE/releases/download/weights/SEARLE_{tag}.pt"
OFFICIAL = {("ViT-B-32", "openai"): "ViT-B32", ("ViT-L-14", "openai"): "ViT-L14"}


def official_weights(backbone: Backbone) -> Path:
    """Download (once, into torch's hub cache) the official Phi for this backbone."""
    tag = OFFICIAL.get((backbone.model_name, backbone.pretrained))
    if tag is None:
        raise CheckpointError(f"SEARLE publishes weights for ViT-B-32 and ViT-L-14 with OpenAI weights only; "
                              f"for {backbone.model_name}/{backbone.pretrained} pass --checkpoint")
    url = RELEASE.format(tag=tag)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if not cached.exists():
        try:
            socket.create_connection(("github.com", 443), timeout=3).close()
        except OSError:
            raise CirbenchError(f"cannot download the official SEARLE weights ({url}): no network. Download the "
                                "file on a connected machine and pass --checkpoint PATH") from None
        torch.hub.download_url_to_file(url, str(cached), progress=True)
    return cached


def prompt(text: str) -> str:
    return f"a photo of {PLACEHOLDER} that {clean_text(text, PLACEHOLDER)}"


class Searle(RawImageReferences, Method):
    """Query feature = text feature of "a photo of $ that {caption}" with $ = Phi(image embedding)."""

    def __init__(self, backbone, options, dataset=None):
        super().__init__(backbone, options, dataset)
        embed = backbone.embed_dim
        self.phi = Phi(embed, 4 * embed, token_width(backbone), dropout=0.5)
        path = options.get("checkpoint") or official_weights(backbone)
        if Path(path).is_file() and Path(path).suffix in (".pt", ".pth"):
            tensors, self.sha256 = load_state_dict(path, "Phi"), file_sha256(Path(path))
        else:
            tensors, _ = load_checkpoint(path, "searle", backbone.identity())
            self.sha256 = checkpoint_sha256(path)
        load_module_weights(self.phi, tensors, str(path))
        self.phi = self.phi.to(backbone.device).eval()
        self.checkpoint = str(path)

    @torch.no_grad()
    def compose(self, references: torch.Tensor, queries: list[Query]) -> torch.Tensor:
        tokens = self.phi(references.to(self.backbone.device).float())
        variants = [caption_variants(q.texts) for q in queries]
        counts = [len(v) for v in variants]
        prompts = [prompt(t) for v in variants for t in v]
        repeated = tokens.repeat_interleave(torch.tensor(counts, device=tokens.device), dim=0)
        feats = encode_with_pseudo_tokens(self.backbone, prompts, repeated, PLACEHOLDER)
        return average_variants(feats, counts)

    def info(self) -> dict:
        return {"checkpoint": self.checkpoint, "sha256": self.sha256}
