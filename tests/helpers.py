"""Test helpers: register a plugin for a test and always unregister it (``cirbench.testing.registered``); record
what the training loop does; serve a folder over HTTP on the loopback."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cirbench.testing import registered

__all__ = ["record_training", "registered", "serving"]


@contextlib.contextmanager
def serving(folder: Path) -> Iterator[str]:
    """The files of ``folder`` served over HTTP on the loopback while the block runs (a download host or a mirror,
    for the real download paths); yields the base URL. The server's request lines stay out of the output."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def record_training(events: list[list[Any]], patch: Callable[[Any, str, Any], None] = setattr) -> None:
    """Make the training loop append ``["epoch", n]`` when it opens epoch n's loader and ``["step", keys]`` (the
    keys of the step's samples) at each optimizer step; ``patch`` is ``setattr`` or a test's
    ``monkeypatch.setattr`` (which puts the loop back after the test)."""
    from cirbench import training

    real_step, real_loader = training._optimizer_step, training._loader

    def loader(*args):
        events.append(["epoch", args[6]])
        return real_loader(*args)

    def step(trainable, optimizer, scheduler, micro, *args):
        events.append(["step", [k for batch in micro for k in batch.keys]])
        return real_step(trainable, optimizer, scheduler, micro, *args)

    patch(training, "_loader", loader)
    patch(training, "_optimizer_step", step)


def official_vit_tokens(model: Any, image: Any) -> Any:
    """The tokens OpenAI's CLIP ViT has after its transformer, before ``ln_post`` (class token first), written out as
    the official repositories' copies of ``VisualTransformer`` compute them (Context-I2W's ``get_tokens``, TransAgg's
    modified ``forward``), over an open_clip model's weights (open_clip >= 2.24: batch-first tokens)."""
    import torch

    v = model.visual
    x = v.conv1(image)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([v.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype), x], dim=1)
    x = v.ln_pre(x + v.positional_embedding.to(x.dtype))
    return v.transformer(x)
