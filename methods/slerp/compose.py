"""The Slerp composition formula (REFERENCE: official slerp.py), batched."""

from __future__ import annotations

import torch

PARALLEL_THRESHOLD = 0.9995


def slerp(v: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation from ``v`` (alpha=0) to ``w`` (alpha=1), row by row, normalised output.

    ``theta = acos(v . w)``; ``c = sin((1 - alpha) theta) / sin theta * v + sin(alpha theta) / sin theta * w``.
    Rows whose ``|v . w| > 0.9995`` (nearly parallel, where ``sin theta`` vanishes) use the linear
    interpolation ``v + alpha (w - v)`` instead. Inputs are normalised here; the result is normalised; at
    ``alpha`` 0 and 1 it is exactly the normalised ``v`` and ``w``.
    """
    v = torch.nn.functional.normalize(v.float(), dim=-1)
    w = torch.nn.functional.normalize(w.float(), dim=-1)
    if alpha == 0:  # the endpoints are the inputs themselves, exactly (not a float round-off away)
        return v
    if alpha == 1:
        return w
    dot = (v * w).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    parallel = dot.abs() > PARALLEL_THRESHOLD
    safe_sin = torch.where(parallel, torch.ones_like(sin_theta), sin_theta)
    spherical = torch.sin((1 - alpha) * theta) / safe_sin * v + torch.sin(alpha * theta) / safe_sin * w
    linear = v + alpha * (w - v)
    return torch.nn.functional.normalize(torch.where(parallel, linear, spherical), dim=-1)
