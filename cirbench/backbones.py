"""CLIP backbones through open_clip, with an identity that every cache key and result file records.

A backbone is named by ``--backbone`` and ``--pretrained``:

* ``--backbone``: an open_clip model name (``ViT-L-14``), or a path to an open_clip model-config JSON
  (registered under the file's stem), or ``cirbench-shapes-clip`` (the small CLIP bundled with cirbench).
* ``--pretrained``: an open_clip pretrained tag (``openai``, ``laion2b_s34b_b79k``), a path to a weights
  file (``.safetensors``, ``.pt``, ``.bin``), ``hf:REPO_OR_FOLDER`` (a CLIP saved by transformers, as
  fine-tuned CLIPs such as BGE-VL are published: see :mod:`cirbench.hf_clip`), ``remoteclip`` (RemoteCLIP's
  remote-sensing weights for ``RN50``, ``ViT-B-32`` and ``ViT-L-14``, from the Hugging Face hub), ``bundled`` (the
  weights shipped with cirbench), or ``none`` (random initialisation from ``--seed``; for tests and timing only).

**Activation.** OpenAI's CLIP weights were trained with QuickGELU; open_clip 3.x builds ``nn.GELU`` for
``ViT-L-14`` unless told otherwise (it only warns). cirbench builds the activation the weights need: QuickGELU
when the pretrained tag's config says ``quick_gelu`` (every ``openai`` tag), or the model config does
(``*-quickgelu`` names); the activation is part of the backbone identity and so of every cache key. A weights
*file* cannot say which it needs: name the ``-quickgelu`` variant of the model for OpenAI weights files.

**Precision.** ``fp32`` (the default) is what the official evaluators run and what reproduces the papers.
``bf16``/``fp16`` cast the weights once (open_clip's ``convert_weights_to_lp``; layer norms stay fp32) and
feed the model pixels of that type; training uses autocast over fp32 weights instead.

Downloads go through open_clip's real paths (OpenAI URLs, Hugging Face hub). Offline, cirbench checks
reachability first and fails at once with a clear message instead of minutes of retries.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, CirbenchError, UnknownNameError
from .hub import HubFile, host_reachable, hub_reachable
from .preprocess import CLIP_MEAN, CLIP_STD, Preprocessor
from .util import file_sha256, json_loads, one_line

ASSETS = Path(__file__).parent / "assets"
BUNDLED_MODEL = "cirbench-shapes-clip"
BUNDLED_DIR = ASSETS / BUNDLED_MODEL
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
HF_PREFIX = "hf:"  # --pretrained hf:REPO_OR_FOLDER, a CLIPModel saved by transformers
#: RemoteCLIP (Liu et al., IEEE TGRS 2024): CLIP tuned on remote-sensing image-text pairs, one open_clip state dict
#: per model on the hub (its README's ``hf_hub_download``), built as open_clip builds the model (nn.GELU); the
#: files of the repository's commit bf1d8a3 (2023-07-27, its only upload), by their Git LFS sha256
REMOTECLIP = ("remoteclip", "chendelong/RemoteCLIP", "RemoteCLIP-{model}.pt", {
    "RN50": "11657d33a87fc197e19a7654a76a632415ebea42feb8a61025ef389f8990c0f9",
    "ViT-B-32": "60014e395d930a3f2963d1d89c8522bf4ad56775571e4356e866864789af85c4",
    "ViT-L-14": "fcc2a7e21e171f4ffcb7a9c0206b8b74ac0c9eb83c67b576958b7a4ed6c8cecb",
})
REMOTECLIP_REVISION = "bf1d8a3ccf2ddbf7c875705e46373bfe542bce38"
LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``; CirbenchError for anything else."""
    text = str(device).strip()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise CirbenchError(f"unknown device {device!r}; valid: auto, cpu, cuda, cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise CirbenchError(f"unsupported device {device!r}; valid: auto, cpu, cuda, cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CirbenchError(f"device {device!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CirbenchError(f"device {device!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
    return dev


def resolve_precision(precision: str, device: torch.device, training: bool = False) -> str:
    """``auto`` is fp32 for evaluation (what the official evaluators run) and bf16 autocast for training on
    CUDA; ``fp16`` needs CUDA."""
    if precision not in PRECISIONS:
        raise UnknownNameError("precision", precision, PRECISIONS)
    if precision == "auto":
        return "bf16" if training and device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise CirbenchError("--precision fp16 needs a CUDA device (use fp32 or bf16 on the CPU)")
    return precision


def autocast_context(precision: str, device: torch.device):
    """Autocast for bf16/fp16 runs; a no-op for fp32."""
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    return nullcontext()


def _weights_reachable() -> bool:
    """open_clip tags download from the Hugging Face hub or OpenAI's own host."""
    return hub_reachable() or host_reachable("openaipublic.azureedge.net")


def _register_config(model: str) -> str:
    """Register a model-config JSON (or the bundled model) with open_clip; return the model name."""
    import open_clip

    if model == BUNDLED_MODEL:
        config = BUNDLED_DIR / f"{BUNDLED_MODEL}.json"
        if not config.exists():
            raise CirbenchError(f"the bundled backbone is missing from this installation ({config})")
        open_clip.add_model_config(str(config))
        return BUNDLED_MODEL
    if model.endswith(".json"):
        path = Path(model).expanduser()
        if not path.exists():
            raise CirbenchError(f"backbone config {path} does not exist")
        try:
            config = json_loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CirbenchError(f"backbone config {path} is not valid JSON: {exc}") from None
        except OSError as exc:
            raise CirbenchError(f"backbone config {path} is unreadable: {exc.strerror or exc}") from None
        needed = ("embed_dim", "vision_cfg", "text_cfg")  # what open_clip.add_model_config registers
        if not isinstance(config, dict) or not all(k in config for k in needed):
            raise CirbenchError(f"backbone config {path} is not an open_clip model config (it needs "
                                f"{', '.join(needed)})")
        open_clip.add_model_config(str(path))
        return path.stem
    if model not in open_clip.list_models():
        raise UnknownNameError("backbone", model, ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-H-14",
                               BUNDLED_MODEL, "<path/to/config.json>", "(any name in open_clip.list_models())"])
    return model


@dataclass
class Backbone:
    """An open_clip model, its tokenizer, device, precision, preprocessing and identity.

    ``encode_image`` and ``encode_text`` return L2-normalised float32 features. Text features are
    memoised by string for the life of the backbone (alpha sweeps and methods sharing a run reuse them).
    """

    model_name: str
    pretrained: str
    model: Any
    tokenizer: Any
    device: torch.device
    precision: str
    preprocess_cfg: dict
    weights_identity: dict
    config_sha256: str = ""
    seed: int = 0
    activation: str = "gelu"
    weights_cast: bool = False
    _text_memo: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _derived: dict[Any, Any] = field(default_factory=dict, repr=False)
    #: the run's feature cache (set by the evaluation loop): :meth:`encode_text_rows` keeps its rows there
    feature_store: Any = field(default=None, repr=False, compare=False)

    # -- identity ------------------------------------------------------------------------------------
    def identity(self) -> dict:
        """What identifies this backbone's features (goes into cache keys and result files)."""
        return {"model": self.model_name, "config_sha256": self.config_sha256, "pretrained": self.pretrained,
                "weights": self.weights_identity, "activation": self.activation}

    @property
    def slug(self) -> str:
        """A file-name-safe short name, e.g. ``ViT-L-14-openai``."""
        pre = Path(self.pretrained).stem if ("/" in self.pretrained or "." in self.pretrained) else self.pretrained
        return f"{self.model_name}-{pre}".replace("/", "_").replace(" ", "_")

    def preprocessor(self, kind: str, max_pixels: int | None = None) -> Preprocessor:
        """``targetpad`` (SEARLE's: bicubic, shortest side) or ``clip`` (this backbone's own resize mode and
        interpolation), at the backbone's input size, mean and std."""
        from .preprocess import DEFAULT_MAX_PIXELS, INTERPOLATIONS, RESIZE_MODES

        size = self.preprocess_cfg.get("size", 224)
        size = size[0] if isinstance(size, (tuple, list)) else size
        interpolation, resize_mode = "bicubic", "shortest"
        if kind == "clip":
            interpolation = str(self.preprocess_cfg.get("interpolation", "bicubic"))
            resize_mode = str(self.preprocess_cfg.get("resize_mode", "shortest"))
            if interpolation not in INTERPOLATIONS or resize_mode not in RESIZE_MODES:
                raise CirbenchError(f"backbone {self.model_name} preprocesses with {interpolation} interpolation and "
                                    f"'{resize_mode}' resizing, which cirbench does not reproduce (it supports "
                                    f"{'/'.join(INTERPOLATIONS)} and {'/'.join(RESIZE_MODES)})")
        return Preprocessor(kind=kind, size=int(size), mean=tuple(self.preprocess_cfg["mean"]),
                            std=tuple(self.preprocess_cfg["std"]), interpolation=interpolation,
                            resize_mode=resize_mode, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype the image tower takes (the weights' dtype: float32, or bf16/fp16 after a cast)."""
        return LOW_PRECISION.get(self.precision, torch.float32) if self.weights_cast else torch.float32

    def fp32_view(self) -> Backbone:
        """The same model (not a copy) run in fp32 with a text memo of its own (memoised features depend on the
        precision): what a training run validates through, as ``cirbench run`` at its default precision would
        evaluate, without a second copy of the weights on the device."""
        if self.weights_cast:
            raise ValueError("a backbone whose weights were cast to low precision has no fp32 view")
        return replace(self, precision="fp32", _text_memo={}, _derived={}, feature_store=None)

    def derived(self, key: Any, compute: Callable[[], Any]) -> Any:
        """What ``compute`` derives from this backbone, computed once per ``key`` (hashable, naming everything
        the value depends on besides the backbone) for the backbone's life: the values of a sweep, and the
        methods of one command, share it (WeiMoCIR's text features of a gallery's captions, hundreds of
        thousands on CIRCO, encoded once for every alpha and beta)."""
        if key not in self._derived:
            self._derived[key] = compute()
        return self._derived[key]

    @torch.no_grad()
    def state_token(self) -> tuple:
        """What changes when code changes the model in place, cheaply (no full pass over the weights): each parameter
        and buffer's identity, storage and torch's count of in-place writes, a strided sample of its values (an
        edit through ``.data``, such as merging an adapter, escapes the count), and the hooks on its modules."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        samples = [t.reshape(-1)[:: max(1, t.numel() // 64)].double().sum() for t in tensors if t.numel()]
        hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in self.model.modules())
        return (tuple((id(t), t.data_ptr(), t._version) for t in tensors), hooks,
                tuple(torch.stack(samples).cpu().tolist()) if samples else ())

    @property
    def embed_dim(self) -> int:
        """Width of the joint image-text embedding."""
        proj = getattr(self.model, "text_projection", None)
        if isinstance(proj, torch.nn.Linear):
            return int(proj.out_features)
        if isinstance(proj, torch.Tensor):
            return int(proj.shape[1])
        return int(self.encode_text(["a"]).shape[-1])

    def autocast(self):
        return autocast_context(self.precision, self.device)

    # -- encoding --------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device, dtype=self.input_dtype, non_blocking=True)
        with self.autocast():
            feats = self.model.encode_image(pixels)
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(texts)).to(self.device)

    @torch.no_grad()
    def encode_text(self, texts: list[str], batch_size: int = 512, memoize: bool = True,
                    normalize: bool = True) -> torch.Tensor:
        """Normalised text features for ``texts`` (``normalize=False``: the raw embeddings, which methods that
        weigh image and text embeddings before normalising combine), on the backbone's device; memoised per
        string unless ``memoize`` is False (texts met once, such as SEARLE-OTI's half a million concept prompts,
        would only fill the memo)."""
        if not texts:
            return torch.empty(0, self.embed_dim, device=self.device)
        if not memoize:
            feats = torch.cat([self._encode_texts(texts[start : start + batch_size])
                               for start in range(0, len(texts), batch_size)])
        else:
            todo = [t for t in dict.fromkeys(texts) if t not in self._text_memo]
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                for text, feat in zip(chunk, self._encode_texts(chunk), strict=True):
                    self._text_memo[text] = feat
            feats = torch.stack([self._text_memo[t] for t in texts])
        return torch.nn.functional.normalize(feats, dim=-1) if normalize else feats

    def encode_text_rows(self, texts: list[str], batch_size: int = 512, bar: Any = None) -> torch.Tensor:
        """Raw (unnormalised) float32 text features of many texts that later runs meet again (a gallery's captions,
        a method's vocabulary), on the backbone's device: rows of the run's feature cache (:attr:`feature_store`),
        keyed by this backbone, its precision and each text's sha256, so they are encoded once, not on every run
        (in memory only under ``--no-cache``; simply encoded outside a run). ``bar`` (a tqdm) counts the texts
        encoded."""
        def compute(todo: list[str], on_chunk: Callable[[torch.Tensor, torch.Tensor], None] | None = None):
            out = []
            for start in range(0, len(todo), batch_size):
                feats = self._encode_texts(todo[start : start + batch_size])
                if on_chunk is not None:
                    on_chunk(torch.arange(start, start + len(feats)), feats)
                out.append(feats)
                if bar is not None:
                    bar.update(len(feats))
            return torch.cat(out) if out else torch.empty(0, self.embed_dim)

        if not texts:
            return torch.empty(0, self.embed_dim, device=self.device)
        if self.feature_store is None:
            return compute(list(texts))
        key = {"format": 2, "backbone": self.identity(), "precision": self.precision,
               "feature": {"kind": "text", "normalized": False}}
        before = bar.n if bar is not None else 0
        rows = self.feature_store.text_rows(key, list(texts), compute).to(self.device)
        if bar is not None:  # the texts served from the cache (and repeated ones) count as done too
            bar.update(len(texts) - (bar.n - before))
        return rows

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Raw (unnormalised) float32 text embeddings."""
        with self.autocast():
            return self.model.encode_text(self.tokenize(texts)).float()


@contextmanager
def _quiet_random_init():
    """open_clip warns "No pretrained weights loaded" when it builds a model that cirbench fills itself."""
    import logging

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def needs_quick_gelu(model_name: str, pretrained: str | None) -> bool:
    """Whether the weights named by ``pretrained`` were trained with QuickGELU: the pretrained tag's config
    says so (every ``openai`` tag), or the model config does (``*-quickgelu`` models)."""
    import open_clip

    config = open_clip.get_model_config(model_name) or {}
    if config.get("quick_gelu"):
        return True
    tag = (pretrained or "").strip()
    if tag.lower() == "openai":
        return True
    if tag and tag in open_clip.list_pretrained_tags_by_model(model_name):
        return bool(open_clip.get_pretrained_cfg(model_name, tag).get("quick_gelu", False))
    return False


def activation_of(model: Any) -> str:
    """``quick_gelu`` or ``gelu`` (or the class name of another activation) used by the model's MLPs."""
    names = {type(m).__name__ for m in model.modules()}
    if "QuickGELU" in names:
        return "quick_gelu"
    if "GELU" in names:
        return "gelu"
    return next((n for n in sorted(names) if n.lower().endswith("gelu") or n.lower() in ("relu", "silu")), "unknown")


def load_backbone(
    model: str,
    pretrained: str | None,
    device: str = "auto",
    precision: str = "auto",
    seed: int = 0,
    cache_dir: str | None = None,
    training: bool = False,
) -> Backbone:
    """Build a :class:`Backbone`; raise :class:`CirbenchError` with a clear message on any failure.

    For evaluation (``training=False``) a bf16/fp16 precision casts the weights once; for training they stay
    fp32 under autocast.
    """
    import open_clip

    dev = resolve_device(device)
    prec = resolve_precision(precision, dev, training=training)
    model_name = _register_config(model)
    pre = _pretrained_of(model, pretrained)
    torch.manual_seed(seed)
    try:
        clip, weights_identity = _build(model, model_name, pre, needs_quick_gelu(model_name, pre), seed, cache_dir)
    except CirbenchError:
        raise
    except Exception as exc:  # noqa: BLE001 - open_clip/hub raise many kinds; give one clear line
        raise CirbenchError(f"could not build backbone {model_name} with weights '{pre}': "
                            f"{type(exc).__name__}: {one_line(exc)}") from None
    _check_finite_weights(clip, f"{model_name} / {pre}")
    clip = clip.to(dev).eval()
    for p in clip.parameters():
        p.requires_grad_(False)
    cast = not training and prec in LOW_PRECISION
    if cast:
        from open_clip.model import convert_weights_to_lp

        convert_weights_to_lp(clip, dtype=LOW_PRECISION[prec])
    config = open_clip.get_model_config(model_name) or {}
    return Backbone(model_name=model_name, pretrained=pre, model=clip, tokenizer=open_clip.get_tokenizer(model_name),
                    device=dev, precision=prec, preprocess_cfg=_preprocess_cfg(clip), weights_identity=weights_identity,
                    config_sha256=hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
                    seed=seed, activation=activation_of(clip), weights_cast=cast)


def _pretrained_of(model: str, pretrained: str | None) -> str:
    """``--pretrained`` as loading reads it: none when unset; the bundled model's own weights when it is empty."""
    pre = (pretrained or "none").strip()
    return "bundled" if model == BUNDLED_MODEL and pre in ("", "bundled") else pre


def _weights_source(model: str, model_name: str, pre: str) -> tuple[str, Any]:
    """What ``--pretrained`` names, checked as loading checks it (a name that cannot be is a one-line error):
    ``("random", None)``, ``("bundled", file)``, ``("hub", HubFile)`` (RemoteCLIP), ``("transformers",
    "hf:REPO_OR_FOLDER")``, ``("file", path)`` or ``("tag", open_clip's pretrained config)``. Loading
    (:func:`_build`) and ``--dry-run`` (:func:`weights_status`) both read it."""
    import open_clip

    if pre.lower() in ("none", "random"):
        return "random", None
    if pre == "bundled":
        if model != BUNDLED_MODEL:
            raise CirbenchError(f"--pretrained bundled is only available for --backbone {BUNDLED_MODEL}")
        return "bundled", BUNDLED_DIR / "model.safetensors"
    if pre.lower() == REMOTECLIP[0]:
        _, repo, pattern, models = REMOTECLIP
        if model_name not in models:
            raise CirbenchError(f"--pretrained remoteclip: RemoteCLIP has weights for {', '.join(models)}, not "
                                f"{model_name}")
        return "hub", HubFile(repo, pattern.format(model=model_name), REMOTECLIP_REVISION, models[model_name])
    if pre.startswith(HF_PREFIX):
        return "transformers", pre
    if os.path.sep in pre or pre.endswith((".safetensors", ".pt", ".bin", ".pth")) or Path(pre).exists():
        return "file", Path(pre).expanduser()
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pre not in tags:
        raise UnknownNameError(f"pretrained tag for {model_name}", pre, tags + ["none", "<path/to/weights>"])
    return "tag", open_clip.get_pretrained_cfg(model_name, pre)


def _build(model: str, model_name: str, pre: str, quick_gelu: bool, seed: int, cache_dir: str | None):
    """The open_clip model (on the CPU) and the identity of its weights, for each kind of ``--pretrained``."""
    import open_clip

    def empty(quick: bool = quick_gelu):
        with _quiet_random_init():
            return open_clip.create_model(model_name, pretrained=None, device="cpu", force_quick_gelu=quick)

    kind, where = _weights_source(model, model_name, pre)
    if kind == "random":
        return empty(), {"kind": "random-init", "seed": seed}
    if kind == "bundled":
        clip = empty()
        _load_weights_file(clip, where)
        return clip, {"kind": "bundled", "sha256": file_sha256(where)}
    if kind == "hub":
        path = where.fetch("RemoteCLIP's weights", option="pretrained")
        clip = empty()
        _load_weights_file(clip, path)
        return clip, {"kind": "hub-file", "tag": REMOTECLIP[0], "source": f"hf-hub:{where.repo}/{path.name}",
                      "sha256": file_sha256(path)}
    if kind == "transformers":
        from . import hf_clip
        from .checkpoints import read_weights_file

        config_path, weights = hf_clip.files_of(where)
        clip = empty(hf_clip.quick_gelu(hf_clip.read_config(config_path, where)))
        _load_state(clip, hf_clip.open_clip_state(read_weights_file(weights), str(weights)), weights)
        return clip, {"kind": "transformers", "source": where, "sha256": file_sha256(weights),
                      "config_sha256": file_sha256(config_path)}
    if kind == "file":
        clip = empty()
        _load_weights_file(clip, _existing(where))
        return clip, {"kind": "file", "path": str(where.resolve()), "sha256": file_sha256(where)}
    source = _tag_source(where, pre, model_name, cache_dir)
    clip = open_clip.create_model(model_name, pretrained=pre, device="cpu", cache_dir=cache_dir,
                                  require_pretrained=True, force_quick_gelu=quick_gelu)
    return clip, {"kind": "open_clip-tag", "tag": pre, "source": source}


def _existing(path: Path) -> Path:
    """A ``--pretrained`` weights file that is there; CheckpointError otherwise."""
    if not path.exists():
        raise CheckpointError(f"weights file {path} does not exist")
    return path


def _tag_source(cfg: dict, pre: str, model_name: str, cache_dir: str | None) -> str:
    """Where an open_clip tag's weights come from (its hub file or URL); CirbenchError at once when they are
    neither in the local cache nor reachable (open_clip would retry for minutes)."""
    source = cfg.get("hf_hub") or cfg.get("url") or ""
    if not _weights_cached(cfg, cache_dir) and not _weights_reachable():
        raise CirbenchError(f"cannot download pretrained weights '{pre}' for {model_name} ({source}): no network. "
                            "Download them on a connected machine (they land in the Hugging Face cache) or pass "
                            "--pretrained /path/to/weights")
    return source


def model_name_of(model: str) -> str:
    """The open_clip name ``model`` is registered under (a config file's stem), without registering it."""
    return Path(model).stem if model.endswith(".json") else model


def weights_status(model: str, pretrained: str | None, cache_dir: str | None = None) -> str:
    """Where a backbone's weights would come from, found without loading (``cirbench run --dry-run``): bundled,
    random, a file (present or not), RemoteCLIP's or an open_clip tag's in the local cache or to download (or
    that cannot be: no network). CirbenchError for a backbone or tag that does not exist, as loading would say."""
    from .hub import availability

    model_name = _register_config(model)
    kind, where = _weights_source(model, model_name, _pretrained_of(model, pretrained))
    if kind == "random":
        return "random initialisation"
    if kind == "bundled":
        return "bundled with cirbench"
    if kind == "hub":
        status, _ = availability(where.source)
        return f"{status} ({where.source})"
    if kind == "transformers":
        status, _ = availability(f"hf-model:{where.removeprefix(HF_PREFIX)}")
        return f"{status} ({where})"
    if kind == "file":
        return f"file {where}" if where.is_file() else f"NOT AVAILABLE: weights file {where} does not exist"
    source = where.get("hf_hub") or where.get("url") or ""
    if _weights_cached(where, cache_dir):
        return f"in the local cache ({source})"
    return f"to download ({source})" if _weights_reachable() else f"NOT AVAILABLE: no network to download {source}"


def download_weights(model: str, pretrained: str | None, cache_dir: str | None = None) -> str:
    """Fetch a backbone's weights into the local caches without building the model (``cirbench run
    --download-only``), and say where they are: an open_clip tag's file, RemoteCLIP's, a transformers CLIP's
    config and weights; nothing to fetch for bundled, random or file weights (a weights file that is not there
    cannot be had either). CheckpointError/CirbenchError, in one line, when they cannot be had."""
    import open_clip

    model_name, pre = _register_config(model), _pretrained_of(model, pretrained)
    kind, where = _weights_source(model, model_name, pre)
    if kind in ("random", "bundled"):
        return weights_status(model, pretrained, cache_dir)
    if kind == "file":
        return f"file {_existing(where)}"
    if kind == "hub":
        return str(where.fetch("RemoteCLIP's weights", option="pretrained"))
    if kind == "transformers":
        from . import hf_clip

        return str(hf_clip.files_of(where)[1])
    source = _tag_source(where, pre, model_name, cache_dir)
    try:
        return str(open_clip.download_pretrained(where, cache_dir=cache_dir))
    except Exception as exc:  # noqa: BLE001 - a moved file, a proxy: one line
        raise CirbenchError(f"cannot download pretrained weights '{pre}' for {model_name} ({source}): "
                            f"{type(exc).__name__}: {one_line(exc)[:160]}") from None


def _preprocess_cfg(clip: Any) -> dict:
    cfg = dict(getattr(clip.visual, "preprocess_cfg", {}) or {})
    cfg.setdefault("size", getattr(clip.visual, "image_size", 224))
    cfg.setdefault("mean", CLIP_MEAN)
    cfg.setdefault("std", CLIP_STD)
    return cfg


def _check_finite_weights(model: Any, what: str) -> None:
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"weights of {what} hold non-finite values (NaN or Inf) in {name}")


OPEN_CLIP_HUB_WEIGHTS = "open_clip_pytorch_model.bin"  # open_clip's HF_WEIGHTS_NAME


def hub_weights_candidates(hf_hub: str) -> tuple[str, list[str]]:
    """The repository of an open_clip tag's ``hf_hub`` entry and the files ``download_pretrained_from_hf`` takes
    from it, in its order: ``org/name/`` names the repository (its ``open_clip_model.safetensors``, else
    ``open_clip_pytorch_model.bin``), ``org/name/file.bin`` a file in it (its ``.safetensors`` twin first)."""
    repo, filename = os.path.split(hf_hub)
    filename = filename or OPEN_CLIP_HUB_WEIGHTS
    if filename == OPEN_CLIP_HUB_WEIGHTS:
        return repo, ["open_clip_model.safetensors", filename]
    if filename.endswith((".bin", ".pth")):
        return repo, [filename[:-4] + ".safetensors", filename]
    return repo, [filename]


def _weights_cached(cfg: dict, cache_dir: str | None) -> bool:
    hub = cfg.get("hf_hub")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache

            repo, names = hub_weights_candidates(hub)
            return any(isinstance(try_to_load_from_cache(repo, name, cache_dir=cache_dir), str) for name in names)
        except Exception:  # noqa: BLE001
            return False
    url = cfg.get("url")
    if url:
        root = Path(cache_dir or os.path.expanduser("~/.cache/clip"))
        return (root / os.path.basename(url)).exists()
    return False


def _load_weights_file(clip: Any, path: Path) -> None:
    """Load a state dict from safetensors (preferred) or a torch file (weights only, no pickled code)."""
    from .checkpoints import read_weights_file

    _load_state(clip, read_weights_file(path), path)


def _load_state(clip: Any, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load ``state`` (read from ``path``) into ``clip`` strictly; CheckpointError naming the first misfits."""
    model_state = clip.state_dict()
    missing = [k for k in model_state if k not in state]
    unexpected = [k for k in state if k not in model_state]
    mismatched = [k for k, v in state.items() if k in model_state and v.shape != model_state[k].shape]
    if not (missing or unexpected or mismatched):
        clip.load_state_dict({k: v.to(model_state[k].dtype) for k, v in state.items()})
    else:
        raise CheckpointError(
            f"weights {path} do not fit this backbone: {len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(mismatched)} mismatched tensors (first: {(missing + unexpected + mismatched)[:3]})"
        )
