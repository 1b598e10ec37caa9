"""The weighted-sum method: the only code a method plugin has to write is ``compose``."""

from __future__ import annotations

import torch

from cirbench import Method, average_variants, caption_variants


class WeightedSum(Method):
    """Query = normalize((1 - w) * reference image feature + w * text feature)."""

    def compose(self, references, queries):
        variants = [caption_variants(q.texts) for q in queries]
        text = average_variants(self.backbone.encode_text([t for v in variants for t in v]), [len(v) for v in variants])
        w = float(self.options["weight"])
        return torch.nn.functional.normalize((1 - w) * references.float() + w * text, dim=-1)
