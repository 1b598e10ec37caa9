"""A tiny dataset plugin used by the tests (registered in-process, never installed)."""

from __future__ import annotations

from cirbench.dataset import Dataset
from cirbench.hookspecs import hookimpl
from cirbench.metrics import hits_matrix, map_at_k, recall_at_k
from cirbench.types import DatasetSpec, EvalSet, ImageRef, OptionSpec, Query


class ToyDataset(Dataset):

    def load(self, split):
        self.check_split(split)
        data = self.read_json(self.data_root / "queries.json")
        images = {n: ImageRef(n, self.data_root / "images" / n) for n in data["gallery"]}
        queries = [Query(q["id"], q["reference"], (q["text"],), tuple(q["targets"]) if split == "val" else ())
                   for q in data["queries"]]
        return [EvalSet("all", list(images.values()), queries, dict(images), exclude_reference=True,
                        hidden_targets=split in self.hidden_splits, topk=10)]

    def metrics(self, evalset, ranking):
        targets = ranking.target_positions([q.targets for q in evalset.queries])
        hits = hits_matrix(ranking.indices, targets)
        out = {f"R@{k}": v for k, v in recall_at_k(hits, (1, 5)).items()}
        out.update({f"mAP@{k}": v for k, v in map_at_k(hits, [len(q.targets) for q in evalset.queries], (5,)).items()})
        return out


class ToyPlugin:
    @hookimpl
    def register_datasets(self, register):
        register(DatasetSpec(name="toy", description="tiny test dataset", factory=ToyDataset,
                             splits=("val", "test"), hidden_splits=("test",),
                             options=(OptionSpec("unused", "an option for tests", "int", 0),)))
