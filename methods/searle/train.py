"""Training SEARLE's Phi: ``cirbench train --method searle`` (the official ``src/train_phi.py``).

Phi learns to predict, from an image's raw CLIP embedding, the pseudo-word that SEARLE's optimisation-based
textual inversion (OTI, :mod:`.oti`) finds for it. Officially the images are ImageNet-1K's 100k unlabelled
test images; any image corpus works (captions are not needed). Before the first step, three things are made
from the corpus, each cached (under ``$CIRBENCH_CACHE``) so that a stopped run goes on where it stopped and
another training on the same images (other Phi settings, another ``--output``) reuses them:

1. the teacher features: every image's raw CLIP embedding, SEARLE's ``targetpad`` preprocessing, in fp32
   whatever ``--precision`` (the official script's CLIP is cast to fp32), computed once (the official script
   trains on stored features too, without augmentation);
2. the teacher pseudo-words: SEARLE-OTI of every image with the official OTI settings (350 steps, batches of
   32, 15 concepts, lambda_cos 1, lambda_gpt 0.5, EMA 0.99, seed 42; ``--oti-steps``/``--oti-batch-size``
   change the first two); under torchrun the ranks share the batches;
3. each image's ``--top-k-concepts`` (150) nearest Open Images concepts.

Each step then reads only the batch's sample keys (no image is decoded again) and computes, as officially:

* ``distil``: the contrastive loss of SEARLE's ``utils.contrastive_loss`` (PALAVRA's NT-Xent over the 2B
  normalised teacher and predicted pseudo-words, temperature ``--temperature`` 0.25), over the global batch;
* ``gpt``: for each image a concept drawn uniformly among its nearest ones that have usable phrases, and one of
  that concept's GPT-Neo phrases: ``1 - cos`` between the phrase's text feature and that of the phrase with
  every occurrence of the concept replaced by ``$``, the first ``$`` taking the predicted pseudo-word (the
  official CosineEmbeddingLoss with target 1);
* loss = ``--lambda-distil`` (1) x distil + ``--lambda-gpt`` (0.75) x gpt.

Official defaults: batch 256, AdamW lr 1e-4 (weight decay 0.01 on every parameter, torch's betas), 100 epochs,
constant learning rate, Phi dropout 0.5. The official script's per-epoch CIRR validation is the loop's
``--validate cirr:val`` (the best weights kept in ``OUTPUT/best``).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save
from tqdm.auto import tqdm

from cirbench import distributed as dist_utils
from cirbench.backbones import Backbone
from cirbench.corpora import Batch, PairsCorpus, ShardCorpus, collate
from cirbench.errors import CirbenchError
from cirbench.methods._shared.textinv import (
    PhiTrainable,
    encode_with_pseudo_tokens,
    nt_xent,
    placeholder_id,
)
from cirbench.methods.searle import OTI_OPTIONS
from cirbench.methods.searle.oti import (
    PLACEHOLDER,
    SLOT,
    Inversion,
    nearest_concepts,
    oti_params,
    source_files,
)
from cirbench.methods.searle.oti import downloads as oti_downloads
from cirbench.training import TrainConfig
from cirbench.util import atomic_write_bytes, default_cache_dir, json_hash, making

# the official OTI settings (oti_inversion.py's defaults, searle-oti's) that the teacher pass uses
TEACHER_OTI = {o.name: o.default for o in OTI_OPTIONS}
FEATURE_BATCH = 64  # images per batch of the teacher features pass


class Teacher:
    """What the training of Phi distils, made once from the corpus: each image's key, raw CLIP features,
    OTI pseudo-word and nearest concepts."""

    def __init__(self, keys: list[str], features: torch.Tensor, tokens: torch.Tensor, nearest: torch.Tensor,
                 names: list[str], usable: set[str]):
        self.row_of = {k: i for i, k in enumerate(keys)}
        self.features, self.tokens, self.nearest = features, tokens, nearest
        self.names = [n.strip() for n in names]
        self.usable = torch.tensor([n in usable for n in self.names], dtype=torch.bool)

    def candidates(self, row: int) -> list[str]:
        """The image's nearest concepts that have usable phrases, nearest first (repeats kept, as officially)."""
        near = self.nearest[row]
        return [self.names[i] for i in near[self.usable[near]].tolist()]


def _listing(corpus: PairsCorpus | ShardCorpus) -> list[Any]:
    """What identifies the corpus's images for the features cache: each local file's name, size and mtime."""
    def stat(path: str) -> list[Any]:
        try:
            st = os.stat(path)
            return [path, st.st_size, st.st_mtime_ns]
        except OSError:
            return [path, None, None]

    if isinstance(corpus, ShardCorpus):
        return [stat(u) if "://" not in u else [u] for u in corpus.urls]
    return [[corpus.key(i), *stat(str(row[0]))[1:]] for i, row in enumerate(corpus.rows)]


class SearleTrainable(PhiTrainable):
    """Phi distilled from OTI pseudo-words with GPT-phrase regularisation (see the module docstring)."""

    name = "searle"
    preprocess_kind = "targetpad"
    needs_images = False  # the images are read once, by the teacher pass (prepare); steps read the keys
    needs_captions = False
    defaults = {"lr": 1e-4, "weight_decay": 0.01, "batch_size": 256, "epochs": 100, "warmup_steps": 0,
                "schedule": "constant"}

    @classmethod
    def downloads(cls, options: dict[str, Any], model: str, pretrained: str) -> list[tuple[str, str]]:
        return oti_downloads(options, model, pretrained)  # the concept and phrase files source_files fetches

    def __init__(self, backbone: Backbone, options: dict[str, Any]):
        super().__init__(backbone, options)
        self.concepts_path, self.phrases_path = source_files(options)  # fails now when offline
        self.oti_params = oti_params({**TEACHER_OTI, **{k: options[k] for k in ("oti_steps", "oti_batch_size")
                                                        if k in options}})
        self.teacher: Teacher | None = None
        self.phrases: dict[str, list[str]] = {}  # the phrases per concept, read by prepare
        self.placeholder = placeholder_id(backbone, PLACEHOLDER)
        self.teacher_info: dict[str, Any] = {}

    # -- before the first step ----------------------------------------------------------------------------
    def prepare(self, corpus: PairsCorpus | ShardCorpus, cfg: TrainConfig) -> None:
        progress = cfg.progress and dist_utils.is_main()
        cache = default_cache_dir()
        keys, features, unreadable = self._features(corpus, cfg, cache, progress)
        if not keys:
            raise CirbenchError(f"corpus {corpus.source}: no image could be read for SEARLE's teacher pass")
        inversion = Inversion(self.backbone, self.oti_params, self.concepts_path, self.phrases_path, cache, progress)
        tokens = inversion.invert_shared(keys, features)  # under torchrun the ranks share the batches
        nearest = nearest_concepts(features, inversion.embeddings(), int(self.options.get("top_k_concepts", 150)))
        phrases, usable = inversion.phrase_data()
        self.phrases = phrases
        self.teacher = Teacher(keys, features, tokens, nearest, inversion.concept_names, usable)
        self.teacher_info = {"images": len(keys), "unreadable_images": unreadable, "oti": self.oti_params,
                             **inversion.sources}
        if progress:
            tqdm.write(f"searle teacher: {len(keys):,} images inverted ({inversion.stats['batches_optimised']} "
                       f"batches optimised, {inversion.stats['batches_cached']} from the cache)"
                       + (f"; {unreadable} unreadable images left out" if unreadable else ""))

    def _features(self, corpus, cfg: TrainConfig, cache: Path, progress: bool) -> tuple[list[str], torch.Tensor, int]:
        """Every readable image's key and raw CLIP features (sorted by key), cached; and the unreadable count."""
        pre = self.backbone.preprocessor(self.preprocess_kind)
        # v3: corpus files other than JPEGs are read by PIL in their own mode (before, decoded to RGB tensors first)
        key = json_hash({"v": 3, "backbone": self.backbone.identity(), "device": self.backbone.device.type,
                         "preprocess": pre.identity(), "source": str(corpus.source), "listing": _listing(corpus)})
        path = cache / "searle-teacher" / f"{key}.safetensors"
        loaded = None
        if dist_utils.all_gather_object(path.is_file())[0]:  # rank 0 decides whether to read it
            try:
                with safe_open(str(path), "pt") as fh:
                    meta = fh.metadata() or {}
                    loaded = json.loads(meta["keys"]), fh.get_tensor("features"), int(meta["unreadable"])
            except Exception:  # noqa: BLE001 - torn or foreign: made again
                loaded = None
        # every rank uses the file, or every rank makes the features again (the encoding below is collective)
        if all(dist_utils.all_gather_object(loaded is not None)):
            assert loaded is not None
            return loaded
        images = corpus.with_images(pre)
        if isinstance(images, PairsCorpus):  # ShardCorpus splits its shards by rank itself
            images = torch.utils.data.Subset(images, dist_utils.shard(list(range(len(images)))))
        loader = torch.utils.data.DataLoader(images, batch_size=FEATURE_BATCH, collate_fn=collate,
                                             num_workers=cfg.workers)
        keys: list[str] = []
        rows: list[torch.Tensor] = []
        unreadable = 0
        for batch in tqdm(loader, desc="searle teacher: image features", unit="batch", disable=not progress,
                          leave=False):
            unreadable += batch.skipped
            if len(batch):
                keys.extend(batch.keys)
                with torch.no_grad():  # fp32, no autocast: the official extract_image_features (a .float() CLIP)
                    rows.append(self.backbone.model.encode_image(batch.pixels.to(self.backbone.device)).float().cpu())
        local = torch.cat(rows) if rows else torch.empty(0, self.backbone.embed_dim)
        if dist_utils.is_distributed():  # the rows through the backend's own collective, the keys as objects
            local = local.to(dist_utils.collective_device())
        parts = [part.cpu() for part in dist_utils.all_gather_rows(local)]
        listed = dist_utils.all_gather_object((keys, unreadable))
        order: dict[str, torch.Tensor] = {}
        for (part_keys, _), part_rows in zip(listed, parts, strict=True):
            for k, row in zip(part_keys, part_rows, strict=True):
                order.setdefault(k, row)  # a CSV may list one image twice: one row for it
        keys = sorted(order)
        features = torch.stack([order[k] for k in keys]) if keys else torch.empty(0, self.backbone.embed_dim)
        unreadable = sum(n for _, n in listed)
        if dist_utils.is_main() and keys:
            with making(path):
                atomic_write_bytes(path, save({"features": features.contiguous()},
                                              metadata={"keys": json.dumps(keys), "unreadable": str(unreadable)}))
        return keys, features, unreadable

    # -- a step -------------------------------------------------------------------------------------------
    def training_step(self, batch: Batch):
        if self.teacher is None:
            raise RuntimeError("SearleTrainable.prepare must run before the first step")
        t, device = self.teacher, self.backbone.device
        rows = [t.row_of[k] for k in batch.keys if k in t.row_of]  # an image the teacher could not read: left out
        if not rows:
            raise CirbenchError("a training batch holds no image of SEARLE's teacher pass (was the corpus changed?)")
        estimated = self.net(t.features[rows].to(device))
        lam_distil = float(self.options.get("lambda_distil", 1.0))
        lam_gpt = float(self.options.get("lambda_gpt", 0.75))
        distil = nt_xent(t.tokens[rows].to(device), estimated, float(self.options.get("temperature", 0.25)))
        gpt = torch.zeros((), device=device)
        # as officially: first a concept for every image, then a phrase for each (the order of the draws)
        picks = [(i, random.choice(c)) for i, c in enumerate(t.candidates(row) for row in rows) if c]
        used = [i for i, _ in picks]
        phrases = [random.choice(self.phrases[concept]) for _, concept in picks]
        inverted = [phrase.replace(concept, SLOT) for (_, concept), phrase in zip(picks, phrases, strict=True)]
        if used:  # a phrase whose $ the text context cut off cannot carry the pseudo-word: left out
            kept = (self.backbone.tokenize(inverted) == self.placeholder).any(dim=1).tolist()
            used = [u for u, ok in zip(used, kept, strict=True) if ok]
            phrases = [p for p, ok in zip(phrases, kept, strict=True) if ok]
            inverted = [p for p, ok in zip(inverted, kept, strict=True) if ok]
        if used:
            original = self.backbone.encode_text(phrases, batch_size=len(phrases), memoize=False)
            pseudo = encode_with_pseudo_tokens(self.backbone, inverted, estimated[used], PLACEHOLDER,
                                               normalize=False, first_only=True)
            gpt = (1 - F.cosine_similarity(pseudo.float(), original.float())).mean()
        loss = lam_distil * distil + lam_gpt * gpt
        return loss, {"distil": float(distil.detach()), "gpt": float(gpt.detach())}

    def checkpoint_config(self):
        return {**super().checkpoint_config(), "teacher": self.teacher_info}
