"""SEARLE: official weights (download or file) on the shared SEARLE protocol."""

from __future__ import annotations

from pathlib import Path

from cirbench.backbones import Backbone
from cirbench.errors import CheckpointError
from cirbench.hub import url_file
from cirbench.methods._shared.textinv import SearleProtocol, load_phi_weights, searle_prompt

PLACEHOLDER = "$"
RELEASE = "https://github.com/miccunifi/SEARLE/releases/download/weights/SEARLE_{tag}.pt"
OFFICIAL = {("ViT-B-32", "openai"): "ViT-B32", ("ViT-L-14", "openai"): "ViT-L14"}


def release_url(model: str, pretrained: str) -> str:
    """The official Phi's release URL for this backbone; CheckpointError for a backbone without one."""
    tag = OFFICIAL.get((model, pretrained))
    if tag is None:
        raise CheckpointError(f"SEARLE publishes weights for ViT-B-32 and ViT-L-14 with OpenAI weights only; "
                              f"for {model}/{pretrained} pass --checkpoint")
    return RELEASE.format(tag=tag)


def official_weights(backbone: Backbone) -> Path:
    """Download (once, into torch's hub cache) the official Phi for this backbone."""
    return url_file(release_url(backbone.model_name, backbone.pretrained), "the official SEARLE weights",
                    "checkpoint")


def downloads(options: dict, model: str, pretrained: str) -> list[tuple[str, str]]:
    """What ``Searle`` fetches (MethodSpec.downloads): the official weights, unless --checkpoint names some."""
    return [] if options.get("checkpoint") else [("the official SEARLE weights", release_url(model, pretrained))]


def prompt(text: str) -> str:
    return searle_prompt(text, PLACEHOLDER)


class Searle(SearleProtocol):
    """Query feature = text feature of "a photo of $ that {caption}" with $ = Phi(image embedding)."""

    def __init__(self, backbone, options, dataset=None):
        super().__init__(backbone, options, dataset)
        path = options.get("checkpoint") or official_weights(backbone)
        tensors, self.sha256 = load_phi_weights(path, "searle", backbone)
        self.build_phi(tensors, str(path))
        self.checkpoint = str(path)
