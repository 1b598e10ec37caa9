"""cirbench: a pluggable harness for zero-shot composed image retrieval (ZS-CIR).

The core (this package) knows nothing about any one method or dataset. Built-in plugins live in
``cirbench.methods`` and ``cirbench.datasets`` and register through the same pluggy hooks as
third-party plugins (entry-point group ``cirbench``).

The public API for plugin authors is importable from here (``from cirbench import hookimpl, MethodSpec,
Method, Query, Ranking``); names are resolved lazily, so ``import cirbench`` stays fast and never imports
torch until a name that needs it is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> defining module (imported on first use)
_EXPORTS = {
    "hookimpl": "cirbench.hookspecs",
    "hookspec": "cirbench.hookspecs",
    "MethodSpec": "cirbench.types",
    "DatasetSpec": "cirbench.types",
    "OptionSpec": "cirbench.types",
    "PaperRow": "cirbench.types",
    "ImageRef": "cirbench.types",
    "ImageView": "cirbench.types",
    "Query": "cirbench.types",
    "EvalSet": "cirbench.types",
    "CirbenchError": "cirbench.errors",
    "AnnotationError": "cirbench.errors",
    "CheckpointError": "cirbench.errors",
    "ImageError": "cirbench.errors",
    "PluginError": "cirbench.errors",
    "UnknownNameError": "cirbench.errors",
    "Dataset": "cirbench.dataset",
    "Method": "cirbench.method",
    "caption_variants": "cirbench.method",
    "average_variants": "cirbench.method",
    "Ranking": "cirbench.retrieval",
    "rank": "cirbench.retrieval",
    "Backbone": "cirbench.backbones",
    "load_backbone": "cirbench.backbones",
    "Preprocessor": "cirbench.preprocess",
    "hits_matrix": "cirbench.metrics",
    "recall_at_k": "cirbench.metrics",
    "map_at_k": "cirbench.metrics",
    "TrainableMethod": "cirbench.training",
    "NetTrainable": "cirbench.training",
    "contrastive_loss": "cirbench.training",
    "RunConfig": "cirbench.evaluate",
}  # (the loop itself is cirbench.evaluate.evaluate: a function cannot share its module's name here)

__all__ = [
    "__version__",
    "hookimpl",
    "hookspec",
    "MethodSpec",
    "DatasetSpec",
    "OptionSpec",
    "PaperRow",
    "ImageRef",
    "ImageView",
    "Query",
    "EvalSet",
    "CirbenchError",
    "AnnotationError",
    "CheckpointError",
    "ImageError",
    "PluginError",
    "UnknownNameError",
    "Dataset",
    "Method",
    "caption_variants",
    "average_variants",
    "Ranking",
    "rank",
    "Backbone",
    "load_backbone",
    "Preprocessor",
    "hits_matrix",
    "recall_at_k",
    "map_at_k",
    "TrainableMethod",
    "NetTrainable",
    "contrastive_loss",
    "RunConfig",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cirbench' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from .backbones import Backbone, load_backbone
    from .dataset import Dataset
    from .errors import (
        AnnotationError,
        CheckpointError,
        CirbenchError,
        ImageError,
        PluginError,
        UnknownNameError,
    )
    from .evaluate import RunConfig
    from .hookspecs import hookimpl, hookspec
    from .method import Method, average_variants, caption_variants
    from .metrics import hits_matrix, map_at_k, recall_at_k
    from .preprocess import Preprocessor
    from .retrieval import Ranking, rank
    from .training import NetTrainable, TrainableMethod, contrastive_loss
    from .types import DatasetSpec, EvalSet, ImageRef, ImageView, MethodSpec, OptionSpec, PaperRow, Query
