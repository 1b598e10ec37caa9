"""SEARLE-OTI: optimisation-based textual inversion of each reference image (Baldrati et al., ICCV 2023).

No network maps the image to its pseudo-word: for every reference image a pseudo-word ``$`` is optimised so
that "a photo of a $" (one of 24 templates, sampled per step) encodes close to the image, while a phrase
written by GPT-Neo about one of the image's concepts, with the concept replaced by ``$``, stays close to the
original phrase. Transcribed from the official ``src/image_concepts_association.py`` and
``src/oti_inversion.py``:

* concepts: the Open Images V7 class names; each is embedded as the normalised mean of its 24 template
  prompts' normalised text features; an image's concepts are its 250 nearest by cosine, stripped,
  de-duplicated, the first ``--top-k`` (15) kept; concepts any of whose phrases do not contain them are left
  out;
* phrases: SEARLE's released GPT-Neo 2.7B phrases (256 per concept, ``concept_to_phrases.pkl``);
* optimisation, per batch of ``--oti-batch-size`` (32) reference images: pseudo-words drawn from N(0, 0.02),
  AdamW (lr 2e-2, weight decay 0.01), 350 steps of ``(1 * cos + 0.5 * gpt) / 1.5`` where ``cos`` is the mean
  cosine distance between the template's text feature and the raw image feature and ``gpt`` the one between
  the phrase with ``$`` and the phrase itself; an exponential moving average (decay 0.99) of the pseudo-words
  is what is evaluated, in SEARLE's prompt "a photo of $ that {caption}".

The pseudo-words are cached per batch under ``<cache>/oti`` (a stopped run goes on from the last batch done),
keyed by everything that changes them; the concept embeddings under ``<cache>/oti-concepts``. Under torchrun
the ranks share the batches.
"""

from __future__ import annotations

import csv
import io
import json
import random
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from cirbench import distributed as dist_utils
from cirbench.errors import CirbenchError
from cirbench.hub import given_or_pinned
from cirbench.method import QuerySet
from cirbench.methods._shared.textinv import SearleProtocol, encode_with_pseudo_tokens, token_width
from cirbench.safe_unpickle import load_data_pickle
from cirbench.util import (
    TEXT_ENCODING,
    atomic_write_bytes,
    default_cache_dir,
    file_sha256,
    json_hash,
    json_loads,
    making,
    sha256_bytes,
    tensor_bytes,
)

# the concept list at the last commit that changed it (github.com/miccunifi/SEARLE, 2023-07-05), and its sha256
CONCEPTS_COMMIT = "9afa4f3cda218cb74a0bdeb4543ee1b9c28642ae"
CONCEPTS_URL = f"https://raw.githubusercontent.com/miccunifi/SEARLE/{CONCEPTS_COMMIT}/data/oidv7-class-descriptions.csv"
CONCEPTS_SHA256 = "485af96e4f9813d8abcab1126ffcd79e07bb1048ee27f0fb209c62f1da1a3293"
PHRASES_URL = "https://github.com/miccunifi/SEARLE/releases/download/weights/GPTNeo27B.zip"
CONCEPTS_PER_IMAGE = 250  # image_concepts_association.py: the nearest concepts kept per image
# SEARLE's utils.get_templates (the PALAVRA templates)
TEMPLATES = (
    "This is a photo of a {}", "This photo contains a {}", "A photo of a {}", "This is an illustration of a {}",
    "This illustration contains a {}", "An illustrations of a {}", "This is a sketch of a {}",
    "This sketch contains a {}", "A sketch of a {}", "This is a diagram of a {}", "This diagram contains a {}",
    "A diagram of a {}", "A {}", "We see a {}", "{}", "We see a {} in this photo", "We see a {} in this image",
    "We see a {} in this illustration", "We see a {} photo", "We see a {} image", "We see a {} illustration",
    "{} photo", "{} image", "{} illustration",
)
# the optimisation's parameters, and the options (resolved with their defaults by the loop) that set them
PARAM_OPTIONS = {"steps": "oti_steps", "lr": "oti_lr", "weight_decay": "oti_weight_decay",
                 "batch_size": "oti_batch_size", "top_k": "top_k", "lambda_cos": "lambda_cos",
                 "lambda_gpt": "lambda_gpt", "ema_decay": "ema_decay", "seed": "oti_seed"}
PLACEHOLDER = "$"
SLOT = f" {PLACEHOLDER} "  # what a template's {} and a phrase's concept become


# -- the concept vocabulary and the phrases ---------------------------------------------------------------
def load_concepts(path: Path) -> list[str]:
    """Concept names: a CSV with a ``DisplayName`` column (Open Images' class descriptions), or a text file
    with one name per line."""
    try:
        text = Path(path).read_text(encoding=TEXT_ENCODING)
    except (OSError, UnicodeDecodeError) as exc:
        raise CirbenchError(f"cannot read the concepts file {path}: {exc}") from None
    if Path(path).suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if "DisplayName" not in (reader.fieldnames or ()):
            raise CirbenchError(f"concepts file {path} has no DisplayName column (Open Images' "
                                "oidv7-class-descriptions.csv has LabelName,DisplayName)")
        names = [row["DisplayName"] or "" for row in reader]
    else:
        names = [line for line in text.splitlines() if line.strip()]
    if not names:
        raise CirbenchError(f"concepts file {path} lists no concept")
    return names


def load_phrases(path: Path) -> dict[str, list[str]]:
    """Phrases per concept: SEARLE's release (``GPTNeo27B.zip``, or the ``concept_to_phrases.pkl`` in it, read
    without running anything from it) or a JSON object ``{concept: [phrase, ...]}``."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".zip":
            with zipfile.ZipFile(path) as archive:
                member = next((n for n in archive.namelist() if n.endswith("concept_to_phrases.pkl")), None)
                if member is None:
                    raise CirbenchError(f"phrases archive {path} holds no concept_to_phrases.pkl")
                data = load_data_pickle(archive.read(member), f"{path}:{member}")
        elif suffix == ".json":
            data = json_loads(path.read_bytes())
        else:
            data = load_data_pickle(path.read_bytes(), str(path))
    except (OSError, zipfile.BadZipFile, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CirbenchError(f"cannot read the phrases file {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(p, str) for p in v) for k, v in data.items()):
        raise CirbenchError(f"phrases file {path} is not a mapping of concept -> list of phrases")
    return data


def usable_concepts(phrases: dict[str, list[str]]) -> set[str]:
    """Concepts whose every phrase contains the concept, so that it can be replaced by ``$`` (the official
    filter; a concept without phrases cannot be used either)."""
    return {k for k, v in phrases.items() if v and all(PLACEHOLDER in p.replace(k, SLOT, 1) for p in v)}


# -- concept association ----------------------------------------------------------------------------------
def concept_embeddings(backbone, names: list[str], batch_concepts: int = 64, progress: bool = True) -> torch.Tensor:
    """``[N, D]``: per concept the normalised mean of its template prompts' normalised text features."""
    unique = list(dict.fromkeys(names))
    rows = []
    for start in tqdm(range(0, len(unique), batch_concepts), desc="OTI: concept embeddings", unit="batch",
                      disable=not progress, leave=False):
        chunk = unique[start : start + batch_concepts]
        prompts = [t.format(f" {name} ") for name in chunk for t in TEMPLATES]
        feats = backbone.encode_text(prompts, batch_size=len(prompts), memoize=False)
        feats = feats.view(len(chunk), len(TEMPLATES), -1)
        rows.append(torch.nn.functional.normalize(feats.mean(dim=1), dim=-1))
    table = torch.cat(rows)
    index = {name: i for i, name in enumerate(unique)}
    return table[[index[n] for n in names]]


def nearest_concepts(image_features: torch.Tensor, embeddings: torch.Tensor, k: int,
                     chunk: int = 1024) -> torch.Tensor:
    """``[N, k]`` the indices of each image's ``k`` nearest concepts by cosine, nearest first (in chunks of
    images: a 100k-image set against 20k concepts never makes the whole similarity matrix)."""
    table = embeddings.T.float()
    out = []
    for start in range(0, image_features.shape[0], chunk):
        rows = torch.nn.functional.normalize(image_features[start : start + chunk].float().to(table.device), dim=-1)
        out.append(torch.topk(rows @ table, min(k, table.shape[1]), dim=-1).indices.cpu())
    return torch.cat(out) if out else torch.empty(0, min(k, table.shape[1]), dtype=torch.long)


def associate(image_features: torch.Tensor, embeddings: torch.Tensor, names: list[str], top_k: int) -> list[list[str]]:
    """Each image's ``top_k`` concepts: its 250 nearest concept names (cosine), stripped, first occurrences."""
    nearest = nearest_concepts(image_features, embeddings, CONCEPTS_PER_IMAGE).tolist()
    return [list(dict.fromkeys(str(names[i]).strip() for i in row))[:top_k] for row in nearest]


# -- the optimisation -------------------------------------------------------------------------------------
def invert_batch(backbone, image_features: torch.Tensor, phrase_pools: list[list[tuple[str, str]]],
                 params: dict[str, Any], seed: int) -> tuple[torch.Tensor, float]:
    """The EMA pseudo-words ``[B, width]`` of one batch of images, and the last step's loss.

    ``phrase_pools[i]`` lists image i's (concept, phrase) pairs; an image with none is optimised on the
    template loss alone (the official script would stop there with an error)."""
    device = backbone.device
    n = image_features.shape[0]
    draws = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.empty(n, token_width(backbone)).normal_(0.0, 0.02, generator=generator).to(device)
    tokens = torch.nn.Parameter(tokens)
    ema = tokens.detach().clone()
    optimizer = torch.optim.AdamW([tokens], lr=params["lr"], weight_decay=params["weight_decay"])
    scaler = torch.amp.GradScaler(device.type, enabled=backbone.precision == "fp16" and device.type == "cuda")
    images = image_features.to(device).float()
    with_phrases = [i for i, pool in enumerate(phrase_pools) if pool]
    lam_cos, lam_gpt = params["lambda_cos"], params["lambda_gpt"]
    loss = torch.tensor(float("nan"))
    for _ in range(params["steps"]):
        optimizer.zero_grad(set_to_none=True)
        templates = [TEMPLATES[i].format(SLOT) for i in draws.choices(range(len(TEMPLATES)), k=n)]
        picks = [phrase_pools[i][draws.randrange(len(phrase_pools[i]))] for i in with_phrases]
        inverted = [phrase.replace(concept, SLOT, 1) for concept, phrase in picks]
        # the template prompts and the phrases with $ in one pass of the text tower (rows are independent)
        feats = encode_with_pseudo_tokens(backbone, templates + inverted, torch.cat([tokens, tokens[with_phrases]]),
                                          PLACEHOLDER, normalize=False, first_only=True)
        loss = lam_cos * (1 - torch.nn.functional.cosine_similarity(feats[:n], images)).mean()
        if picks:
            original = backbone.encode_text([phrase for _, phrase in picks], batch_size=len(picks), memoize=False)
            loss = loss + lam_gpt * (1 - torch.nn.functional.cosine_similarity(feats[n:], original)).mean()
        loss = loss / (lam_cos + lam_gpt)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad():
            ema.mul_(params["ema_decay"]).add_(tokens.detach(), alpha=1 - params["ema_decay"])
    return ema.cpu(), float(loss.detach())  # the last step's loss: one host sync per batch, not per step


# (option, url, sha256 when known, what): the phrases' release asset could not be read from here to pin its sha256
SOURCES = (("concepts", CONCEPTS_URL, CONCEPTS_SHA256, "SEARLE's concept list"),
           ("phrases", PHRASES_URL, None, "SEARLE's GPT-Neo phrases"))


def source_files(options: dict[str, Any]) -> tuple[Path, Path]:
    """The concepts and phrases files: ``--concepts``/``--phrases``, or SEARLE's, downloaded (once) now, so that
    a missing file or an offline download fails before any image is encoded."""
    concepts, phrases = (given_or_pinned(options.get(option), option, url, sha256, what)
                         for option, url, sha256, what in SOURCES)
    return concepts, phrases


def downloads(options: dict, model: str, pretrained: str) -> list[tuple[str, str]]:
    """What SEARLE-OTI fetches (MethodSpec.downloads): the concept and phrase files not given."""
    return [(what, url) for option, url, _, what in SOURCES if not options.get(option)]


class Inversion:
    """SEARLE's OTI over a set of images: the concept table, the phrases, the per-batch optimisation and its
    cache under ``<cache_root>/oti``. ``searle-oti`` evaluates the pseudo-words it makes for reference images;
    the training of SEARLE's Phi distils those it makes for the training images."""

    def __init__(self, backbone, params: dict[str, Any], concepts: Path, phrases: Path, cache_root: Path,
                 progress: bool = True):
        self.backbone, self.params, self.cache_root, self.progress = backbone, params, cache_root, progress
        if params["lambda_cos"] + params["lambda_gpt"] <= 0:
            raise CirbenchError("--lambda-cos plus --lambda-gpt must be above 0")
        self.concept_names = load_concepts(concepts)
        # millions of phrases: read when a batch has to be optimised, not for a set served from the cache
        self.phrases_path = phrases
        self._phrases: tuple[dict[str, list[str]], set[str]] | None = None
        self.sources = {"concepts": {"path": str(concepts), "sha256": file_sha256(concepts)},
                        "phrases": {"path": str(phrases), "sha256": file_sha256(phrases)}}
        self._table: torch.Tensor | None = None  # the concept embeddings, once made or read
        self.concepts_of: dict[str, list[str]] = {}  # image id -> the concepts its phrases came from
        self.stats = {"references": 0, "batches_optimised": 0, "batches_cached": 0, "images_without_phrases": 0,
                      "concepts_listed": len(self.concept_names)}

    def _identity(self) -> dict[str, Any]:
        return {"backbone": self.backbone.identity(), "precision": self.backbone.precision,
                "device": self.backbone.device.type, "concepts": self.sources["concepts"]["sha256"]}

    def embeddings(self) -> torch.Tensor:
        """The concept table: made once per process (every evaluation set uses it), cached on disk."""
        if self._table is None:
            self._table = self._stored_embeddings()
        return self._table

    def _stored_embeddings(self) -> torch.Tensor:
        path = (self.cache_root / "oti-concepts"
                / f"{json_hash({'v': 1, **self._identity(), 'templates': TEMPLATES})}.safetensors")
        with making(path, "OTI: waiting for another process embedding the same concepts"):
            if path.is_file():
                try:
                    return load_file(str(path))["embeddings"].to(self.backbone.device)
                except Exception:  # noqa: BLE001 - a torn or foreign file is made again
                    path.unlink(missing_ok=True)
            table = concept_embeddings(self.backbone, self.concept_names, progress=self.progress)
            atomic_write_bytes(path, save({"embeddings": table.cpu()}))
        return table

    def phrase_data(self) -> tuple[dict[str, list[str]], set[str]]:
        """The phrases per concept and the usable concepts, read on first use."""
        if self._phrases is None:
            phrases = load_phrases(self.phrases_path)
            self._phrases = phrases, usable_concepts(phrases)
            self.stats["concepts_usable"] = len(self._phrases[1])
        return self._phrases

    def _pool(self, concepts: list[str]) -> list[tuple[str, str]]:
        """One image's (concept, phrase) pairs: the phrases of its usable concepts, in their order."""
        phrases = self.phrase_data()[0]
        pool = [(c, phrase) for c in concepts for phrase in phrases[c]]
        self.stats["images_without_phrases"] += not pool
        return pool

    def invert(self, ids: list[str], features: torch.Tensor, only: set[int] | None = None) -> torch.Tensor | None:
        """The EMA pseudo-words ``[N, width]`` of the images ``ids`` with raw CLIP ``features``, optimised in
        batches of ``batch_size`` (each cached as it is done: a stopped run goes on from the last batch done).
        With ``only``, just those batch numbers are optimised (the others only read from the cache: a rank's
        share of the work), and the result is None unless every batch was there."""
        p = self.params
        size = p["batch_size"]
        key = json_hash({"v": 1, **self._identity(), "phrases": self.sources["phrases"]["sha256"],
                         "params": p, "ids": ids, "features": sha256_bytes(tensor_bytes(features.detach().cpu()))})
        folder = self.cache_root / "oti" / key
        concepts: list[list[str]] | None = None  # associated when a batch has to be optimised
        out: list[torch.Tensor] = []
        missing = False
        bar = tqdm(range(0, len(ids), size), desc="OTI: images", unit="batch", disable=not self.progress,
                   leave=False)
        for start in bar:
            index = start // size
            path = folder / f"batch-{index:06d}.safetensors"
            rows = min(size, len(ids) - start)
            with making(path, "OTI: waiting for another process inverting the same images"):
                tokens, used = _load(path, rows)
                if tokens is None and only is not None and index not in only:
                    missing = True
                    continue
                if tokens is None:
                    if concepts is None:
                        concepts = associate(features, self.embeddings(), self.concept_names, p["top_k"])
                    usable = self.phrase_data()[1]
                    used = [[c for c in row if c in usable] for row in concepts[start : start + rows]]
                    pools = [self._pool(row) for row in used]
                    tokens, loss = invert_batch(self.backbone, features[start : start + rows], pools, p,
                                                p["seed"] * 1_000_003 + index)
                    atomic_write_bytes(path, save({"tokens": tokens}, metadata={"concepts": json.dumps(used)}))
                    self.stats["batches_optimised"] += 1
                    bar.set_postfix(loss=f"{loss:.4f}")
                else:
                    self.stats["batches_cached"] += 1
            self.concepts_of.update(zip(ids[start : start + rows], used, strict=True))
            out.append(tokens)
        if missing:
            return None
        self.stats["references"] += len(ids)
        return torch.cat(out) if out else torch.empty(0, token_width(self.backbone))

    def invert_shared(self, ids: list[str], features: torch.Tensor) -> torch.Tensor:
        """:meth:`invert` with the batches shared by the torchrun ranks (every rank calls it with the same
        images): each optimises its own, waits for the others, then reads theirs from the cache. The stats
        then count the batches every rank optimised."""
        world = dist_utils.world_size()
        if world == 1:
            tokens = self.invert(ids, features)
            assert tokens is not None  # every batch is optimised when ``only`` is not given
            return tokens
        batches = -(-len(ids) // self.params["batch_size"])
        before = dict(self.stats)
        self.invert(ids, features, only={i for i in range(batches) if i % world == dist_utils.rank()})
        dist_utils.long_barrier()
        tokens = self.invert(ids, features)  # every batch is in the cache now (one left missing is made here)
        assert tokens is not None
        optimised = sum(dist_utils.all_gather_object(self.stats["batches_optimised"] - before["batches_optimised"]))
        self.stats["batches_optimised"] = before["batches_optimised"] + optimised
        self.stats["batches_cached"] = before["batches_cached"] + batches - optimised
        self.stats["references"] = before["references"] + len(ids)  # the first pass may have counted them too
        return tokens


def oti_params(options: dict[str, Any]) -> dict[str, Any]:
    """The optimisation's parameters from the options named in :data:`PARAM_OPTIONS`."""
    return {param: options[option] for param, option in PARAM_OPTIONS.items()}


class SearleOTI(SearleProtocol):
    """SEARLE's prompt with a pseudo-word optimised for each reference image (see the module docstring)."""

    def __init__(self, backbone, options, dataset=None):
        super().__init__(backbone, options, dataset)
        concepts, phrases = source_files(self.options)
        self.oti = Inversion(backbone, oti_params(self.options), concepts, phrases, default_cache_dir())
        self.params = self.oti.params

    def prepare(self, query_set: QuerySet) -> None:
        self.oti.cache_root = query_set.cache_dir or default_cache_dir()  # the run's --cache-dir
        self.oti.progress = query_set.progress

    def pseudo_words(self, references: torch.Tensor) -> torch.Tensor:
        return references.to(self.backbone.device).float()  # prepare_references made them

    def prepare_references(self, ids: list[str], features: torch.Tensor) -> torch.Tensor:
        return self.oti.invert_shared(ids, features)  # under torchrun the ranks share the batches

    def query_details(self, query) -> dict[str, Any] | None:
        """The concepts whose phrases regularised the query's reference pseudo-word."""
        used = self.oti.concepts_of.get(query.reference)
        return None if used is None else {"concepts": used}

    def info(self) -> dict:
        return {"oti": self.params, **self.oti.sources}

    def summary(self) -> dict:
        return {"oti": dict(self.oti.stats)}


def _load(path: Path, rows: int) -> tuple[torch.Tensor | None, list[list[str]]]:
    """A batch's cached pseudo-words and each image's concepts, or None (absent, torn or of another shape:
    made again)."""
    if not path.is_file():
        return None, []
    try:
        with safe_open(str(path), "pt") as fh:
            tokens = fh.get_tensor("tokens")
            used = json.loads((fh.metadata() or {})["concepts"])
    except Exception:  # noqa: BLE001
        return None, []
    return (tokens, used) if tokens.shape[0] == rows == len(used) else (None, [])
