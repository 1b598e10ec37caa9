"""ImageNet-R domain conversion: the official query and target lists, labels, and Recall@K."""

from __future__ import annotations

from pathlib import Path

from cirbench.dataset import Dataset
from cirbench.errors import AnnotationError
from cirbench.metrics import hits_matrix
from cirbench.types import EvalSet, ImageRef, Query
from cirbench.util import TEXT_ENCODING, file_sha256

from . import DOMAINS, KS

LISTS = Path(__file__).resolve().parent / "lists"
#: Pic2Word's lists (github.com/google-research/composed_image_retrieval, data/imgnet/, commit 8c05329, Apache-2.0)
QUERY_LIST, TARGET_LIST = "imgnet_real_query.txt", "imgnet_targets.txt"
OFFICIAL = {QUERY_LIST: (10_000, "cd19c2d76f7fee0c47afba6dfc182c3fd5dbf800c0a80149feca6e0547936d1e"),
            TARGET_LIST: (16_983, "4cc6b22d493b783f2f7fce356276096c0d5ec38be95bd3a3349c8458b8a4a311")}
CLASSES = 1000  # a label is class + 1000 x domain (cartoon 0 ... sculpture 3; real images 6)
PREFIX = "imgnet/"  # the lists' paths start with it; --data-root may be the folder above imgnet/ or imgnet/ itself
EPSILON = 1e-5  # the official recall's denominator guard, kept: it makes a perfect query score 99.999...


def read_list(path: Path) -> list[tuple[str, int]]:
    """``<relative path> <label>`` lines (the official ``ImageList`` format)."""
    try:
        lines = path.read_text(encoding=TEXT_ENCODING).splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"cannot read image list {path}: {exc}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
            raise AnnotationError(f"image list {path}, line {n}: expected '<path> <label>', found {line.strip()!r}")
        out.append((parts[0], int(parts[1])))
    if not out:
        raise AnnotationError(f"image list {path} is empty")
    return out


class ImageNetR(Dataset):
    OFFICIAL_SHA256 = {name: sha for name, (_, sha) in OFFICIAL.items()}
    """Images under ``--data-root`` as the official lists name them: ``imgnet/real/<wnid>/ILSVRC2012_val_*.JPEG``
    (ImageNet val in class folders) and ``imgnet/imagenet-r/<wnid>/<domain>_<n>.jpg`` (ImageNet-R as
    distributed); ``--data-root`` may also be the ``imgnet`` folder itself."""

    def domains(self) -> tuple[str, ...]:
        chosen = self.options.get("domain", "all")
        return DOMAINS if chosen in (None, "all") else (chosen,)

    def _base(self) -> str:
        return "" if (self.data_root / PREFIX).is_dir() or not (self.data_root / "real").is_dir() else PREFIX

    def _ref(self, rel: str, strip: str) -> ImageRef:
        return self.image(rel.removeprefix(PREFIX), rel[len(strip):] if strip and rel.startswith(strip) else rel)

    def annotation_files(self, split: str) -> list[Path]:
        return [LISTS / QUERY_LIST, LISTS / TARGET_LIST]

    def load(self, split: str) -> list[EvalSet]:
        self.check_split(split)
        queries_list, targets_list = read_list(LISTS / QUERY_LIST), read_list(LISTS / TARGET_LIST)
        strip = self._base()
        gallery = [self._ref(rel, strip) for rel, _ in targets_list]
        if len({g.id for g in gallery}) != len(gallery):
            raise AnnotationError(f"image list {LISTS / TARGET_LIST} names an image twice")
        by_label: dict[int, list[str]] = {}
        for g, (_, label) in zip(gallery, targets_list, strict=True):
            by_label.setdefault(label, []).append(g.id)
        refs = [self._ref(rel, strip) for rel, _ in queries_list]
        for (rel, label) in queries_list:
            if label >= CLASSES:
                raise AnnotationError(f"image list {LISTS / QUERY_LIST}: query {rel} has label {label}, not a class "
                                      f"(0-{CLASSES - 1})")
        images = {r.id: r for r in refs}
        lists = {n: file_sha256(LISTS / n) for n in (QUERY_LIST, TARGET_LIST)}
        sets = []
        for domain in self.domains():
            d = DOMAINS.index(domain)
            queries = [Query(id=str(i), reference=ref.id, texts=(f"a {domain} of ",), prompt=f"a {domain} of *",
                             targets=tuple(by_label.get(label + CLASSES * d, ())), category=domain)
                       for i, (ref, (_, label)) in enumerate(zip(refs, queries_list, strict=True))]
            sets.append(EvalSet(domain, list(gallery), queries, dict(images), topk=max(KS),
                                info={"lists": lists}))
        return sets

    def per_query_metrics(self, evalset: EvalSet, ranking) -> dict:
        """Recall@K = relevant images in the top K / (relevant images + 1e-5), x100 (the official formula)."""
        import torch

        targets = ranking.target_positions([q.targets for q in evalset.queries])
        hits = hits_matrix(ranking.indices, targets).double()
        total = torch.tensor([float(len(t)) for t in targets], dtype=torch.float64)
        return {f"R@{k}": hits[:, :k].sum(dim=1) / (total + EPSILON) * 100 for k in KS}
