"""FashionIQ under the caption-pairs protocol (VAL's and CoSMo's evaluation, which PLI evaluates with).

Its files, ``captions_pairs/fashion_iq-val-cap-<category>.txt``, hold one line per caption,
``<category>/<reference asin>.jpg;<category>/<target asin>.jpg;<caption>``, two lines per reference-target pair
(1,869, 1,944 and 1,877 distinct pairs of dress, shirt and toptee, where the official ``cap.*.val.json`` has
2,017, 2,038 and 1,961 triplets). What the official evaluation (PLI's ``data/fashionIQ.py``,
``FashionIQTestDataset``/``FashionIQTestQueryDataset``, ``evaluators/metric_calculators.py``) does with them:

* every line is a query: line ``2k`` reads "{caption 2k} and {caption 2k+1}", line ``2k+1`` "{caption 2k+1} and
  {caption 2k}" (both orders of each pair's captions), so a query's ``texts`` here are its two captions in that
  order;
* the gallery of a category is the set of images those lines name (references and targets), not the split's;
* a query's own reference image is never retrieved (its similarity is set to the minimum);
* Recall@10 and Recall@50 over all lines, per category, and their mean.
"""

from __future__ import annotations

from pathlib import Path

from cirbench.dataset import read_numbered_lines
from cirbench.errors import AnnotationError
from cirbench.types import EvalSet, ImageRef, Query

from .dataset import KS, FashionIQ

COMMIT = "da9cdb49be4e8fa7c371713b70dd6b6fbf1eaaae"  # github.com/Chen-Junyang-cn/PLI, where the files are public


def _asin(field: str, path: Path, line: int) -> str:
    """``dress/B005X4PL1G.jpg`` -> ``B005X4PL1G`` (the official ``split('/')[-1].split('.')[0]``)."""
    asin = field.strip().split("/")[-1].split(".")[0]
    if not asin:
        raise AnnotationError(f"annotation file {path}: line {line} names no image ({field!r})")
    return asin


class FashionIQPairs(FashionIQ):
    OFFICIAL_SOURCES = {f"captions_pairs/fashion_iq-val-cap-{category}.txt":
                        f"https://raw.githubusercontent.com/Chen-Junyang-cn/PLI/{COMMIT}/data/fashionIQ/captions_pairs/"
                        f"fashion_iq-val-cap-{category}.txt" for category in ("dress", "shirt", "toptee")}
    OFFICIAL_SHA256 = {
        "fashion_iq-val-cap-dress.txt": "89ec409e629d55b3616d4d81a274f2d41b0518eca60aec2622632baab2a8a1e8",
        "fashion_iq-val-cap-shirt.txt": "ce8fd9980c6c3c4557af15bd21f89d3016be725db127fa467442acbe9fb9fb06",
        "fashion_iq-val-cap-toptee.txt": "11c09dee9347be5fdcbad783416c3218ed07abc08772a394e6c61857600e1542",
    }
    """``captions_pairs/fashion_iq-val-cap-<category>.txt`` under ``--data-root`` (``cirbench data fetch
    fashioniq-pairs``), and FashionIQ's images in any of the layouts ``fashioniq`` reads."""

    def annotation_files(self, split: str) -> list[Path]:
        return [self.data_root / "captions_pairs" / f"fashion_iq-{split}-cap-{cat}.txt" for cat in self.categories()]

    def _category(self, split: str, category: str) -> EvalSet:
        path = self.data_root / "captions_pairs" / f"fashion_iq-{split}-cap-{category}.txt"
        lines = read_numbered_lines(path, ";", ("reference", "target", "caption"),
                                    f"{self.root_hint()}; `cirbench data fetch fashioniq-pairs` puts it in place",
                                    required=(0, 1), at_least=True)  # officially split(';'): [0], [1] and [-1]
        rows = [(_asin(f[0], path, n), _asin(f[1], path, n), f[-1].strip()) for n, f in lines]
        if not rows or len(rows) % 2:
            raise AnnotationError(f"annotation file {path} holds {len(rows)} lines: the protocol pairs them (two "
                                  "captions of one reference-target pair each)")
        for k in range(0, len(rows), 2):
            if rows[k][:2] != rows[k + 1][:2]:
                raise AnnotationError(f"annotation file {path}: lines {lines[k][0]} and {lines[k + 1][0]} are not one "
                                      f"pair's captions ({rows[k][0]};{rows[k][1]} against "
                                      f"{rows[k + 1][0]};{rows[k + 1][1]})")
        locate = self._image_locator(category)
        names = sorted({name for ref, target, _ in rows for name in (ref, target)})
        gallery = [ImageRef(n, locate(n), root=self.data_root) for n in names]
        queries = [Query(id=f"{category}-{i}", reference=ref, texts=(caption, rows[i ^ 1][2]), targets=(target,),
                         category=category)
                   for i, (ref, target, caption) in enumerate(rows)]
        return EvalSet(category, gallery, queries, {g.id: g for g in gallery}, exclude_reference=True,
                       topk=max(KS))
