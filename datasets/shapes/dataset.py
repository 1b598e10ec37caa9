"""The ``shapes`` dataset: generation on first use (atomic, deterministic), splits, metrics."""

from __future__ import annotations

import csv
import io
import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cirbench.dataset import Dataset
from cirbench.errors import CirbenchError
from cirbench.metrics import ap_per_query, hits_matrix, recall_per_query
from cirbench.types import EvalSet, ImageRef, Query
from cirbench.util import default_cache_dir, json_object_file, making, replace_folder

from . import CORPUS_OPTIONS, QUERY_SPLIT_OPTIONS
from . import generator as G

FORMAT_VERSION = "v1"
COMPLETE = ".complete"  # written last: a folder without it is regenerated, never trusted
SPLIT_SALT = {"val": 1, "test": 2, "train": 3}
MAP_KS = (5, 10, 25)
RECALL_KS = (1, 5, 10)


class Shapes(Dataset):
    """Generated CIR benchmark; ``val``/``test`` are query splits, ``train`` an image-caption corpus."""

    target_extras = ("target_attributes",)  # the answer, spelled out: for the report, never for a method

    def __init__(self, data_root: Path | str | None, options: dict[str, Any] | None = None):
        super().__init__(data_root, options)
        if not self.data_root_given:  # generated into the cache, and read (and its files named) from there
            seed = self.options.get("generator_seed", 0)
            self.data_root = default_cache_dir() / "shapes" / f"{FORMAT_VERSION}-seed{seed}"

    def _rng(self, split: str, *parts: object) -> random.Random:
        return random.Random("-".join(map(str, (self.options.get("generator_seed", 0), SPLIT_SALT[split], *parts))))

    # -- generation ------------------------------------------------------------------------------------
    def _made_from(self, split: str) -> dict[str, tuple[int, int]]:
        """``{option: (value, default)}`` of the options ``split`` is generated from (besides the seed, which
        names the folder above it)."""
        defaults = CORPUS_OPTIONS if split == "train" else QUERY_SPLIT_OPTIONS
        return {k: (int(self.options.get(k, default)), default) for k, default in defaults.items()}

    def split_folder(self, split: str) -> Path:
        """``<folder>/<split>``, or ``<folder>/<split>-queries100-instances1`` for options other than the
        defaults, so that data generated with other options is never served under these."""
        made = self._made_from(split)
        return self.data_root / (split + "".join(f"-{k.replace('_', '')}{v}" for k, (v, default) in made.items()
                                               if v != default))

    def _is_complete(self, target: Path, split: str) -> bool:
        """The folder was generated to the end, by this format, from these options."""
        stamp = json_object_file(target / COMPLETE)
        if stamp is None or not isinstance(stored := stamp.get("options"), dict):
            return False
        seed = int(self.options.get("generator_seed", 0))
        return (stamp.get("version") == FORMAT_VERSION
                and stored.get("generator_seed", 0) == seed
                and all(stored.get(k) == v for k, (v, _) in self._made_from(split).items()))

    def ensure(self, split: str) -> Path:
        """Generate ``split`` into its folder unless it holds a complete generation from the same options
        (a stale or partial one is made again); return the folder."""
        target = self.split_folder(split)
        if self._is_complete(target, split):
            return target
        # one maker at a time: a second process (another torchrun rank, a parallel job on the same cache) waits
        # and then finds the folder complete, instead of deleting it under the first one's readers
        target.parent.mkdir(parents=True, exist_ok=True)
        with making(target):
            if self._is_complete(target, split):
                return target
            tmp = Path(tempfile.mkdtemp(prefix=f".{split}-", dir=target.parent))
            try:
                (self._write_corpus if split == "train" else self._write_queries)(split, tmp)
                (tmp / COMPLETE).write_text(json.dumps({"version": FORMAT_VERSION, "options": self.options}))
                replace_folder(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return target

    def _save(self, img, path: Path) -> None:
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=False)
        path.write_bytes(buf.getvalue())

    def _write_queries(self, split: str, out: Path) -> None:
        (out / "images").mkdir()
        gallery: list[dict[str, Any]] = []
        for combo in G.all_combinations():
            for inst in range(int(self.options.get("instances", 3))):
                name = f"{combo.key()}-{inst}"
                self._save(G.render(combo, self._rng(split, name)), out / "images" / f"{name}.png")
                gallery.append({"id": name, "attributes": combo.__dict__})
        rng = self._rng(split, "queries")
        by_key: dict[str, list[str]] = {}
        for g in gallery:
            by_key.setdefault(G.Attributes(**g["attributes"]).key(), []).append(g["id"])
        queries = []
        for qi in range(int(self.options.get("queries", 400))):
            ref = rng.choice(gallery)
            ref_attrs = G.Attributes(**ref["attributes"])
            target, text = G.make_query(ref_attrs, rng)
            queries.append({"id": f"{split}-{qi}", "reference": ref["id"], "text": text,
                            "targets": by_key[target.key()], "reference_attributes": ref_attrs.__dict__,
                            "target_attributes": target.__dict__})
        (out / "gallery.json").write_text(json.dumps(gallery))
        (out / "queries.json").write_text(json.dumps(queries, indent=0))

    def _write_corpus(self, split: str, out: Path) -> None:
        (out / "images").mkdir()
        rng = self._rng(split, "corpus")
        combos = G.all_combinations()
        rows = []
        for i in range(int(self.options.get("train_size", 5000))):
            attrs = rng.choice(combos)
            name = f"images/train-{i:06d}.png"
            self._save(G.render(attrs, rng), out / name)
            subject, attribute = G.subject_attribute(attrs)
            rows.append({"image": name, "caption": G.caption(attrs, rng), "subject": subject, "attribute": attribute})
        with open(out / "train.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["image", "caption", "subject", "attribute"])
            writer.writeheader()
            writer.writerows(rows)

    def prepare(self, progress: bool = True) -> str:
        """Generate every split now (``cirbench data prepare shapes``): val and test queries, and the train
        corpus that ``cirbench train`` reads (``train/train.csv``)."""
        folders = [self.ensure(split) for split in self.splits]
        return "shapes: " + ", ".join(str(f) for f in folders) + f" (training corpus: {self.corpus_path()})"

    # -- the Dataset API -------------------------------------------------------------------------------
    def corpus_path(self) -> Path:
        """The training corpus CSV (image, caption, subject, attribute), generated if needed."""
        return self.ensure("train") / "train.csv"

    def annotation_files(self, split: str) -> list[Path]:
        """The generated files a split is read from (their checksums go into result files)."""
        folder = self.split_folder(split)
        return [folder / "train.csv"] if split == "train" else [folder / "gallery.json", folder / "queries.json"]

    def load(self, split: str) -> list[EvalSet]:
        self.check_split(split)
        if split == "train":
            raise CirbenchError(f"shapes/train is a training corpus, not a query split: use it with "
                                f"`cirbench train --corpus {self.corpus_path()}`")
        folder = self.ensure(split)
        gallery = [ImageRef(g["id"], folder / "images" / f"{g['id']}.png", root=folder)
                   for g in self.read_json(folder / "gallery.json")]
        queries = [Query(q["id"], q["reference"], (q["text"],), tuple(q["targets"]),
                         extra={"reference_attributes": q["reference_attributes"],
                                "target_attributes": q["target_attributes"]})
                   for q in self.read_json(folder / "queries.json")]
        return [EvalSet(split, gallery, queries, {g.id: g for g in gallery}, exclude_reference=True,
                        topk=max(MAP_KS + RECALL_KS))]

    def score_file(self, split: str, path: Path, extra: dict[str, Path] | None = None) -> dict[str, float]:
        """Score per-query rankings (``*.predictions.jsonl``): at least 25 unique gallery ids per query, the
        query's reference excluded (the protocol removes it)."""
        (evalset,) = self.load(split)
        if not str(path).endswith(".jsonl"):
            raise CirbenchError("shapes scores per-query ranking files (*.predictions.jsonl rows with query and top)")
        rows = self.read_predictions(path)
        ranked = rows.get(evalset.name) or rows.get("", {})
        by_id, gallery = {q.id: q for q in evalset.queries}, set(evalset.gallery_ids)
        ranked = {qid: self.check_ranked(qid, ids, path, min_length=max(MAP_KS + RECALL_KS), allowed=gallery,
                                         reference=by_id[qid].reference if qid in by_id else None)
                  for qid, ids in ranked.items()}
        return self.metrics(evalset, self.ranking_from_ids(evalset, ranked, source=path))

    def per_query_metrics(self, evalset: EvalSet, ranking) -> dict:
        targets = ranking.target_positions([q.targets for q in evalset.queries])
        hits = hits_matrix(ranking.indices, targets)
        out = {f"mAP@{k}": v for k, v in ap_per_query(hits, [len(q.targets) for q in evalset.queries], MAP_KS).items()}
        out.update({f"R@{k}": v for k, v in recall_per_query(hits, RECALL_KS).items()})
        return out
