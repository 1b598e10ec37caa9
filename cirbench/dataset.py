"""The base class of a dataset plugin: what the queries, gallery, metrics and submission files are.

A dataset plugin subclasses :class:`Dataset` and registers a :class:`~cirbench.types.DatasetSpec`
whose ``factory`` points at the subclass. The evaluation loop calls, in order:

1. ``load(split)`` -> a list of :class:`~cirbench.types.EvalSet` (one per gallery; FashionIQ has three);
2. ``per_query_metrics(evalset, ranking)`` -> ``{metric name: per-query values}`` for sets with visible
   targets (``metrics`` averages them; confidence intervals are bootstrapped from them);
3. ``aggregate({set name: metrics})`` -> the metrics of the whole split (default: the single set's
   metrics, or every set's metrics prefixed with its name plus their mean);
4. ``write_submission(evalset, ranking, out_dir, stem)`` for hidden-target sets -> files written.

``score_file(split, path, extra)`` lets ``cirbench score`` score rankings made by any other code.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .errors import AnnotationError, CirbenchError
from .images import check_inside
from .types import SAVED_TOP, EvalSet, ImageRef
from .util import TEXT_ENCODING, json_loads


def read_split_lines(path: Path, separator: str, fields: tuple[str, ...], where: str,
                     required: tuple[int, ...] = (), at_least: bool = False) -> list[tuple[str, ...]]:
    """Lines of ``len(fields)`` values split on ``separator`` exactly as official loaders split them (no header,
    no quoting), blank lines skipped; AnnotationError naming the file and line for another count of values (fewer,
    with ``at_least``: an official loader that only indexes the first ones), or an empty value at a ``required``
    position, for an empty file, and for a missing one (``where`` says where the file comes from)."""
    return [parts for _, parts in read_numbered_lines(path, separator, fields, where, required, at_least)]


def read_numbered_lines(path: Path, separator: str, fields: tuple[str, ...], where: str,
                        required: tuple[int, ...] = (), at_least: bool = False) -> list[tuple[int, tuple[str, ...]]]:
    """:func:`read_split_lines` with each line's number in the file (from 1), for errors found later."""
    try:
        lines = Path(path).read_text(encoding=TEXT_ENCODING).splitlines()
    except FileNotFoundError:
        raise AnnotationError(f"annotation file {path} is missing ({where})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"cannot read annotation file {path}: {exc}") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = tuple(line.strip().split(separator))
        if (len(parts) < len(fields) if at_least else len(parts) != len(fields)) or any(not parts[i] for i in required):
            shape = separator.join(fields) if separator != " " else " ".join(f"<{f}>" for f in fields)
            shape += separator + "..." if at_least else ""
            raise AnnotationError(f"annotation file {path}, line {n}: expected '{shape}', found {line.strip()[:80]!r}")
        rows.append((n, parts))
    if not rows:
        raise AnnotationError(f"annotation file {path} is empty")
    return rows


class Dataset:
    """Base class for dataset plugins (see the module docstring).

    The dataset's name, splits and hidden splits come from its registered
    :class:`~cirbench.types.DatasetSpec` (bound by the loop when it builds the dataset): declare them once,
    on the spec.
    """

    spec: Any = None
    #: sha256 of the official annotation files, by file name (``cirbench data check`` compares them)
    OFFICIAL_SHA256: dict[str, str] = {}
    #: each query's :meth:`per_query_metrics` depend on its own ranking alone (no statistic across queries): the
    #: loop may then rank and score a set whose ranking is too large to hold at once (the whole gallery for many
    #: queries) in parts of its queries, with the same numbers; ``cirbench check --dataset`` verifies it
    queries_score_apart: bool = False
    #: keys of a query's ``extra`` that tell its answer (CIRCO's ``target_img_id``): the metrics read them, methods
    #: never see them (the loop drops them, with the targets, from the queries a method is given);
    #: ``cirbench check --dataset`` refuses an undeclared key whose value names a query's target
    target_extras: tuple[str, ...] = ()

    def bind_spec(self, spec: Any) -> None:
        self.spec = spec

    @property
    def name(self) -> str:
        return self.spec.name if self.spec is not None else type(self).__name__.lower()

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.spec.splits) if self.spec is not None else ()

    @property
    def hidden_splits(self) -> tuple[str, ...]:
        return tuple(self.spec.hidden_splits) if self.spec is not None else ()

    def __init__(self, data_root: Path | str | None, options: dict[str, Any] | None = None):
        #: whether the user (or the spec's default) named a data root; datasets that generate their data
        #: (shapes) use their own cache folder otherwise
        self.data_root_given = data_root is not None
        self.data_root = Path(data_root if data_root is not None else ".").expanduser()
        self.options = dict(options or {})

    def refuse_inconsistent(self, split: str, evalsets: list[EvalSet]) -> None:
        """AnnotationError naming the first set that cannot be scored as :meth:`load` built it
        (:meth:`EvalSet.inconsistency`: an image twice in a gallery, two queries of one id, a reference that is no
        image, a candidate outside the gallery)."""
        for es in evalsets:
            problem = es.inconsistency()
            if problem is not None:
                plugin = getattr(self.spec, "plugin", "")
                loader = f"the loader of plugin '{plugin}'" if plugin else "its loader"
                raise AnnotationError(f"{self.name}/{split}, set '{es.name}': {problem}; its annotation files or "
                                      f"{loader} are wrong (cirbench check --dataset {self.name}), nothing was scored")

    # -- to implement --------------------------------------------------------------------------------
    def load(self, split: str) -> list[EvalSet]:
        raise NotImplementedError

    def per_query_metrics(self, evalset: EvalSet, ranking: Any) -> dict[str, Any]:
        """``{metric: tensor[Q]}``: each metric's value for every query (x100; ``nan`` where a metric does not
        count a query). Implement this (the reported metrics are their means, and the loop bootstraps
        confidence intervals from them), or override :meth:`metrics` directly (then no intervals)."""
        raise NotImplementedError

    def metrics(self, evalset: EvalSet, ranking: Any) -> dict[str, float]:
        """``{metric: value}`` for one evaluation set (default: the means of :meth:`per_query_metrics`)."""
        from .metrics import means

        return means(self.per_query_metrics(evalset, ranking))

    # -- sensible defaults ---------------------------------------------------------------------------
    def aggregate(self, per_set: dict[str, dict[str, float]]) -> dict[str, float]:
        """Combine per-set metrics: one set -> its metrics; several -> prefixed metrics plus the mean."""
        if len(per_set) == 1:
            return dict(next(iter(per_set.values())))
        out: dict[str, float] = {}
        names = list(per_set)
        for set_name, metrics in per_set.items():
            for metric, value in metrics.items():
                out[f"{set_name}/{metric}"] = value
        common = set.intersection(*(set(m) for m in per_set.values())) if per_set else set()
        for metric in sorted(common):
            out[f"avg/{metric}"] = sum(per_set[n][metric] for n in names) / len(names)
        return out

    def annotation_files(self, split: str) -> list[Path]:
        """The annotation files ``load(split)`` reads: their checksums go into every result file (and
        ``cirbench data check`` compares them with the official ones)."""
        return []

    def write_submission(self, evalset: EvalSet, ranking: Any, out_dir: Path, stem: str) -> list[Path]:
        """Write test-server files for a hidden-target set; datasets without a server write nothing."""
        return []

    def score_file(self, split: str, path: Path, extra: dict[str, Path] | None = None) -> dict[str, float]:
        """Score a ranking file made elsewhere (official submission format or per-query rankings).

        The default, for benchmarks without a submission format of their own, scores a ``*.predictions.jsonl``
        file (rows with ``set``, ``query`` and ``top``, as ``cirbench run`` writes them; ``set`` may be left out
        where the split has one set) by :meth:`score_predictions_by_set`: each ranking holds ids of the query's
        gallery (its ``candidates`` in a set of per-query galleries), never its reference where the protocol
        removes it, and as many as the set ranks (``EvalSet.topk``, or all there are)."""
        self.check_split(split)
        if split in self.hidden_splits:
            raise CirbenchError(f"{self.name}/{split} has hidden targets: there is nothing to score a file against")
        return self.score_predictions_by_set(split, path, label=self.name, unit="set", min_length=None,
                                             allowed_name="an image of the query's gallery")

    # -- scoring rankings made elsewhere ---------------------------------------------------------------
    @staticmethod
    def check_ranked(query_id: str, ids: Any, source: Path | str, *, min_length: int = 0, max_length: int | None = None,
                     reference: str | None = None, allowed: set[str] | None = None,
                     allowed_name: str = "an image of the split's gallery", what: str = "ranking",
                     short_hint: str = "") -> list[str]:
        """Validate one query's ranked ids from a file made elsewhere, as the official scorers would: a list,
        no duplicates (the CIRCO evaluator refuses them), at least ``min_length`` entries (and at most
        ``max_length``: a test server takes lists of one length), never the query's ``reference`` (CIRR), only ids
        from ``allowed`` (``allowed_name`` says what they are). AnnotationError with a one-line reason otherwise
        (``short_hint`` follows the reason a list is too short)."""
        where = f"{source}, query {query_id}"
        if not isinstance(ids, list):
            raise AnnotationError(f"{where}: the {what} is a {type(ids).__name__}, not a list of ids")
        ids = [str(x) for x in ids]
        if len(set(ids)) != len(ids):
            dup = next(x for i, x in enumerate(ids) if x in ids[:i])
            raise AnnotationError(f"{where}: '{dup}' appears twice in the {what} (the official scorer refuses "
                                  "duplicate predictions)")
        if len(ids) < min_length or (max_length is not None and len(ids) > max_length):
            need = (f"the test server takes exactly {max_length}" if min_length == max_length else
                    f"at least {min_length} are needed" if len(ids) < min_length else
                    f"the test server takes at most {max_length}")
            raise AnnotationError(f"{where}: the {what} has {len(ids)} ids, {need}"
                                  + (short_hint if len(ids) < min_length else ""))
        if reference is not None and reference in ids:
            raise AnnotationError(f"{where}: the {what} contains the reference image {reference}, which the "
                                  "protocol removes from every ranking")
        if allowed is not None:
            unknown = next((x for x in ids if x not in allowed), None)
            if unknown is not None:
                raise AnnotationError(f"{where}: '{unknown}' in the {what} is not {allowed_name}")
        return ids

    @staticmethod
    def query_pools(evalset: EvalSet) -> Callable[[str], set[str]]:
        """What each query of ``evalset`` ranks, by query id: its ``candidates`` where each query has a gallery of
        its own (``query_galleries``), else the set's gallery."""
        gallery = set(evalset.gallery_ids)
        own = {q.id: set(q.candidates) for q in evalset.queries if evalset.query_galleries and q.candidates}
        return lambda qid: own.get(qid, gallery)

    def score_predictions_by_set(self, split: str, path: Path, *, label: str, unit: str, min_length: int | None,
                                 allowed: Any = None, allowed_name: str = "an image of the split's gallery",
                                 whole: bool = False) -> dict[str, float]:
        """Score a ``*.predictions.jsonl`` file (rows with ``set``, ``query`` and ``top``) set by set, for datasets
        without an official submission format: every set of the split must have rankings (``unit`` names a set
        in the error; rows without ``set`` serve a split of one set), each checked by :meth:`check_ranked` against
        ``allowed(evalset)(query id)`` (default :meth:`query_pools`; never holding the query's reference in a set
        that removes it), at least ``min_length`` ids long (None: as many as the set ranks, ``EvalSet.topk``, or
        all there are; ``whole``: all of the query's pool, for metrics that read every positive's rank), and
        the sets' metrics combined by :meth:`aggregate`. ``label`` is the dataset's name in the error for other
        files."""
        if not str(path).endswith(".jsonl"):
            raise CirbenchError(f"{label} has no official submission format: score a per-query ranking file "
                                "(*.predictions.jsonl rows with set, query and top)")
        rows = self.read_predictions(path)
        per_set = {}
        evalsets = self.load(split)
        self.refuse_inconsistent(split, evalsets)
        for evalset in evalsets:
            ranked = rows.get(evalset.name, rows.get("") if len(evalsets) == 1 else None)
            if ranked is None:
                hint = " (a run over part of the benchmark: give score the dataset options it ran with)" \
                    if len(evalsets) > 1 else ""
                raise AnnotationError(f"{path} has no rankings for {unit} {evalset.name}{hint}")
            allowed_for, queries = (allowed or self.query_pools)(evalset), {q.id: q for q in evalset.queries}
            checked = {}
            for qid, ids in ranked.items():
                pool = allowed_for(qid)
                reference = queries[qid].reference if evalset.exclude_reference and qid in queries else None
                available = len(pool) - (reference in pool)
                need = available if whole else min_length if min_length is not None else \
                    min(evalset.topk, available)
                checked[qid] = self.check_ranked(qid, ids, path, min_length=need, allowed=pool,
                                                 allowed_name=allowed_name, reference=reference,
                                                 short_hint=f" (`cirbench run` keeps each query's top {SAVED_TOP} in "
                                                 "its predictions: run it with --save-top all)"
                                                 if need > SAVED_TOP else "")
            per_set[evalset.name] = self.metrics(evalset, self.ranking_from_ids(evalset, checked, source=path))
        return self.aggregate(per_set)

    @staticmethod
    def check_query_ids(evalset: EvalSet, query_ids: Iterable[str], source: Path | str | None = None) -> None:
        """Every query of ``evalset`` has a ranking among ``query_ids`` and no other query does; AnnotationError
        naming ``source`` and the first few offenders otherwise."""
        where = f" in {source}" if source else ""
        given = set(query_ids)
        missing = [q.id for q in evalset.queries if q.id not in given]
        if missing:
            raise AnnotationError(f"{len(missing)} of {len(evalset.queries)} queries have no ranking{where} "
                                  f"(first: {missing[:3]})")
        extra = sorted(given - {q.id for q in evalset.queries})
        if extra:
            raise AnnotationError(f"{len(extra)} rankings{where} are for queries this split does not have "
                                  f"(first: {extra[:3]})")

    def ranking_from_ids(self, evalset: EvalSet, ranked: dict[str, list[str]],
                         subsets: dict[str, list[str]] | None = None, source: Path | None = None):
        """A :class:`~cirbench.retrieval.Ranking` from ranked image ids per query id, so that files made by
        other code are scored by the very same ``metrics`` as live runs. Every query must be present;
        ids outside the gallery are kept (they can never be relevant) so ranks stay where the file put them.
        """
        import torch

        from .retrieval import Ranking

        self.check_query_ids(evalset, ranked, source)
        gallery_ids = list(evalset.gallery_ids)
        position = {g: i for i, g in enumerate(gallery_ids)}
        width = max((len(ranked[q.id]) for q in evalset.queries), default=0)
        indices = torch.full((len(evalset.queries), width), -1, dtype=torch.long)
        for qi, q in enumerate(evalset.queries):
            row = []
            for image_id in ranked[q.id]:
                if image_id not in position:
                    position[image_id] = len(gallery_ids)
                    gallery_ids.append(image_id)
                row.append(position[image_id])
            indices[qi, : len(row)] = torch.tensor(row, dtype=torch.long)
        candidate_order = None
        if subsets is not None:
            candidate_order = [list(subsets.get(q.id, [])) for q in evalset.queries]
        return Ranking([q.id for q in evalset.queries], gallery_ids, indices, torch.zeros(indices.shape),
                       candidate_order)

    @staticmethod
    def read_predictions(path: Path) -> dict[str, dict[str, list[str]]]:
        """Read a per-query ranking file (``*.predictions.jsonl`` as ``cirbench run`` writes it:
        one JSON object per line with ``query``, ``top`` (ranked ids) and optionally ``set`` and
        ``subset``). Returns ``{set name or "": {query id: ids}}`` and subsets under key ``"subset:"+set``."""
        out: dict[str, dict[str, list[str]]] = {}
        try:
            lines = Path(path).read_text(encoding=TEXT_ENCODING).splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise AnnotationError(f"cannot read ranking file {path}: {exc}") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json_loads(line)
            except json.JSONDecodeError as exc:
                raise AnnotationError(f"ranking file {path}, line {n}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict) or "query" not in row or "top" not in row:
                raise AnnotationError(f"ranking file {path}, line {n}: not a ranking row (needs 'query' and 'top')")
            if not isinstance(row["top"], list) or ("subset" in row and not isinstance(row["subset"], list)):
                raise AnnotationError(f"ranking file {path}, line {n}: 'top' and 'subset' must be lists of ids")
            set_name, query = str(row.get("set", "")), str(row["query"])
            rows = out.setdefault(set_name, {})
            if query in rows:
                raise AnnotationError(f"ranking file {path}, line {n}: query {query} is ranked twice")
            rows[query] = list(row["top"])
            if "subset" in row:
                out.setdefault("subset:" + set_name, {})[query] = list(row["subset"])
        return out

    # -- helpers for subclasses ----------------------------------------------------------------------
    def image(self, image_id: str, relative: str | Path) -> ImageRef:
        """An :class:`ImageRef` for a file named relative to the data root: a name that leaves the root
        (``..``, an absolute path, a folder linked elsewhere) is refused here, a file that is a link leading
        outside it when it is read."""
        return ImageRef(image_id, check_inside(self.data_root, relative), root=self.data_root)

    def relative_locator(self, first: str, own: tuple[str, ...] = ()) -> Callable[[str], str]:
        """For annotation files that name images from the folder above the data root (official scripts that join
        them to ``./data``, so that their first component is the dataset folder's own name): a function from
        such a name to one relative to the data root. Decided on the ``first`` name: kept when the file is there
        as written, its first component dropped when it is there without it; when neither is there (yet: the
        missing-image check names what it looked for), dropped unless it is one of the dataset's ``own``
        folders."""
        from pathlib import PurePosixPath

        parts = PurePosixPath(first).parts
        if (self.data_root / first).exists():
            strip = False
        elif len(parts) > 1 and (self.data_root / PurePosixPath(*parts[1:])).exists():
            strip = True
        else:
            strip = len(parts) > 1 and parts[0] not in own

        def locate(name: str) -> str:
            named = PurePosixPath(name).parts
            return PurePosixPath(*named[1:]).as_posix() if strip and len(named) > 1 else name

        return locate

    def folder(self, relative: str | Path) -> Path:
        """A folder under the data root, checked once (for datasets that list many files in one folder)."""
        return check_inside(self.data_root, Path(relative) / "_").parent

    def check_split(self, split: str) -> None:
        """UnknownNameError for a split the dataset's spec does not declare."""
        if self.spec is not None:
            self.spec.resolve_split(split)

    def chosen(self, option: str, valid: list[str] | tuple[str, ...], what: str) -> list[str]:
        """The values a comma-separated option names, or all of ``valid`` for ``all`` (the default); CirbenchError
        naming the valid ones for another (``what`` says what a value is: a domain, an attribute)."""
        given = str(self.options.get(option) or "all")
        if given == "all":
            return list(valid)
        chosen = list(dict.fromkeys(w.strip() for w in given.split(",") if w.strip()))
        unknown = [w for w in chosen if w not in valid]
        if unknown or not chosen:
            raise CirbenchError(f"--{option}: {self.name} has no {what} {(unknown or [given])[0]!r}; valid: "
                                f"{', '.join(valid)}, all")
        return chosen

    def root_hint(self) -> str:
        """What to check when the data is not found: the data root given, or that none was."""
        if self.data_root_given:
            return f"is --data-root {self.data_root} right?"
        return (f"no --data-root was given, so it was looked for in {self.data_root.resolve()}: pass the dataset's "
                "folder")

    def read_json(self, path: Path, what: str = "annotation file") -> Any:
        """Read a JSON file (``what`` names it in errors: an annotation file, a ranking file); AnnotationError
        naming the file if it is missing or malformed."""
        path = Path(path)
        if not path.is_file():
            hint = f" ({self.root_hint()})" if what == "annotation file" else ""
            raise AnnotationError(f"{what} {path} is missing{hint}")
        try:
            return json_loads(path.read_bytes())
        except json.JSONDecodeError as exc:
            raise AnnotationError(f"{what} {path} is malformed or truncated: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise AnnotationError(f"cannot read {what} {path}: {exc}") from None

    def require_fields(self, record: Any, fields: tuple[str, ...], path: Path, index: int) -> None:
        if not isinstance(record, dict):
            raise AnnotationError(f"annotation file {path}: record {index} is not an object")
        missing = [f for f in fields if f not in record]
        if missing:
            raise AnnotationError(f"annotation file {path}: record {index} lacks field(s) {', '.join(missing)}")


def prefixed_with_mean(per_set: dict[str, dict[str, float]]) -> dict[str, float]:
    """Every set's metrics prefixed with its name (``task/R@1``), even for one set; with several, each metric's
    mean over them as ``avg/`` (the sets of such a benchmark report the same metrics)."""
    out = {f"{name}/{m}": v for name, metrics in per_set.items() for m, v in metrics.items()}
    if len(per_set) > 1:
        for m in next(iter(per_set.values())):
            out[f"avg/{m}"] = sum(metrics[m] for metrics in per_set.values()) / len(per_set)
    return out


def annotation_checksums(dataset: Dataset, split: str) -> dict[str, str]:
    """``{file: sha256}`` of the annotation files a split reads (named relative to the data root when inside
    it, a folder linked into it included; else by their absolute path); ``"missing"`` for a file that is not
    there."""
    from .util import file_sha256

    out = {}
    for path in map(Path, dataset.annotation_files(split)):
        root = dataset.data_root.absolute()
        for inside, under in ((path.absolute(), root), (path.resolve(), root.resolve())):
            if inside.is_relative_to(under):
                name = inside.relative_to(under).as_posix()
                break
        else:
            name = str(path.resolve())
        out[name] = file_sha256(path) if path.is_file() else "missing"
    return out
