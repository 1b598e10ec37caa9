"""Domain conversion (FREEDOM's protocol): the official file lists, one evaluation set per domain pair, and the
official ``metrics_calc`` (mAP over the whole ranking, Recall@K, Precision@K)."""

from __future__ import annotations

from pathlib import Path

from cirbench.dataset import Dataset, read_split_lines
from cirbench.errors import AnnotationError, CirbenchError
from cirbench.metrics import hits_matrix, trapezoid_ap_per_query
from cirbench.types import EvalSet, ImageRef, Query

from . import BENCHMARKS

EPSILON = 1e-5  # the official denominators' guard: a perfect query scores 99.999
SOURCE_COMMIT = "5df4bca6f53b365ee2bc06da7b070bcdfdf2b516"  # github.com/NikosEfth/freedom, whose data/ ships the lists
SOURCE_FOLDERS = {"dc-nico": "nico", "dc-ltll": "ltll"}  # the benchmarks whose every list is pinned: fetched
# sha256 of the lists as that commit has them (ImageNet-R's is written by set_dataset.py; mini-DomainNet's database
# list was not at hand)
PINNED_SHA256 = {
    "dc-minidn": {"query_files.csv": "4c6ee96b541d4f5ef6855019f206f746893462f7e4b5d9aa2500cabc5a8dc496"},
    "dc-nico": {"query_files.csv": "95301abc79823077ae96a01b5ead22c536eed95ff97409ba8ceb5d505b9a4191",
                "database_files.csv": "76591323d4b5b638ac25a81e4542d6d60d4e5b455891da42a86998a525b14905"},
    "dc-ltll": {"full_files.csv": "7deb04d632feb03412e30b9214ebfb088dacc08e7a3a2a2b4cdbdd69984a7f03"},
}


def read_rows(path: Path, hint: str) -> list[tuple[str, ...]]:
    """``<image> <domain> <class>`` lines, split on single spaces as the official ``ImageDomainLabels`` does
    (FREEDOM's ``set_dataset.py`` removes the spaces from the image names first); ``hint``: where the data root
    was looked for."""
    return read_split_lines(path, " ", ("image", "domain", "class"), "FREEDOM's data/<benchmark>/ folder holds "
                            f"it; {hint}", required=(0, 1, 2))


class DomainConversion(Dataset):
    """``--data-root`` is the benchmark's folder as FREEDOM's set-up leaves it (``data/nico``: the images and
    the file lists). The lists name images from the folder above it (the official scripts join them to
    ``./data``), so their first component, the folder's name, is dropped."""

    queries_score_apart = True  # mAP over the whole ranking, per query: large sets are scored in parts

    @property
    def benchmark(self) -> tuple[tuple[str, ...], dict[str, str], tuple[int, ...]]:
        if self.name not in BENCHMARKS:
            raise CirbenchError(f"domain conversion has no benchmark {self.name!r}")
        return BENCHMARKS[self.name]

    def annotation_files(self, split: str) -> list[Path]:
        return [self.data_root / f for f in self.benchmark[0]]

    @property
    def OFFICIAL_SHA256(self) -> dict[str, str]:  # type: ignore[override]  # noqa: N802 - every dataset's name
        """The benchmark's lists as FREEDOM's repository ships them (``cirbench data check`` compares them)."""
        return dict(PINNED_SHA256.get(self.name, {}))

    @property
    def OFFICIAL_SOURCES(self) -> dict[str, str]:  # type: ignore[override]  # noqa: N802
        """Where ``cirbench data fetch`` gets the lists (of a benchmark all of whose lists are pinned)."""
        folder = SOURCE_FOLDERS.get(self.name)
        return {f: f"https://raw.githubusercontent.com/NikosEfth/freedom/{SOURCE_COMMIT}/data/{folder}/{f}"
                for f in self.benchmark[0]} if folder else {}

    def load(self, split: str) -> list[EvalSet]:
        self.check_split(split)
        files, renames, ks = self.benchmark
        query_rows = read_rows(self.data_root / files[0], self.root_hint())
        database_rows = query_rows if len(files) == 1 else read_rows(self.data_root / files[-1], self.root_hint())
        locate = self.relative_locator(query_rows[0][0], tuple(renames))
        words = list(renames.values())
        sources, targets = self.chosen("source", words, "domain"), self.chosen("target", words, "domain")
        images: dict[str, ImageRef] = {}
        gallery: list[ImageRef] = []
        positives: dict[tuple[str, str], list[str]] = {}
        for name, domain, label in database_rows:
            if name in images:
                raise AnnotationError(f"annotation file {self.data_root / files[-1]} lists image {name} twice")
            ref = images[name] = self.image(name, locate(name))
            gallery.append(ref)
            positives.setdefault((label, renames.get(domain, domain)), []).append(ref.id)
        for name, _, _ in query_rows:  # ImageNet-R's and LTLL's queries are database images: already there
            if name not in images:
                images[name] = self.image(name, locate(name))
        sets = []
        for source in sources:
            rows = [(i, name, label) for i, (name, domain, label) in enumerate(query_rows)
                    if renames.get(domain, domain) == source]
            if not rows:  # a partial benchmark would average fewer pairs than the papers do
                raise AnnotationError(f"annotation file {self.data_root / files[0]} has no query of domain "
                                      f"{source!r} ({self.name} has {', '.join(words)}); choose domains with "
                                      "--source and --target to evaluate part of the benchmark")
            for target in targets:
                if target == source:
                    continue
                queries = [Query(id=str(i), reference=name, texts=(target,), category=f"{source}->{target}",
                                 targets=tuple(positives.get((label, target), ()))) for i, name, label in rows]
                sets.append(EvalSet(f"{source}->{target}", gallery, queries, images, topk=len(gallery),
                                    info={"source": source, "target": target}))
        if not sets:
            raise CirbenchError(f"{self.name}: --source and --target leave no pair of distinct domains")
        return sets

    def per_query_metrics(self, evalset: EvalSet, ranking) -> dict:
        """The official ``metrics_calc`` per query (x100): AP over the whole ranking; Recall@K the positives in
        the top K over all positives (+1e-5); Precision@K over min(positives, K) (+1e-5)."""
        import torch

        targets = ranking.target_positions([q.targets for q in evalset.queries])
        hits = hits_matrix(ranking.indices, targets)  # bool [Q, whole gallery]: no wider copy of it
        total = torch.tensor([float(len(t)) for t in targets], dtype=torch.float64)
        out = {"mAP": trapezoid_ap_per_query(hits, EPSILON)}
        for k in self.benchmark[2]:
            found = hits[:, :k].sum(dim=1).double()
            out[f"R@{k}"] = found / (total + EPSILON) * 100
            out[f"P@{k}"] = found / (torch.clamp(total, max=k) + EPSILON) * 100
        return out
