"""Importing generations that papers published with their code into the generation cache.

* **CIReVL** (``--preload mods`` files): ``{"base_caption": [...], "instruction": [...],
  "modified_captions": [...]}``, three lists in the order of the dataset's queries (one file per FashionIQ
  category). Positions are matched to queries and every instruction is checked against the query's.
* **LDRE / SEIZE** (their ``CIRCO/annotations/test.json`` and ``CIRR/cirr/captions/cap.rc2.test1.json``): the
  official annotation records with added fields, by default ``multi_caption_opt`` (the BLIP-2 captions) and
  ``multi_gpt-3.5_opt`` (the GPT-3.5 rewrites, one per caption); records are matched by ``id`` (CIRCO) or
  ``pairid`` (CIRR), else by position, and their modification text is checked against the query's.
  ``--import-fields CAPTIONS,REWRITES`` picks other fields (e.g. ``blip2_caption,gpt-3.5-turbo``).

Imported texts are recorded under the run's captioner and language-model ids and a name-only prompt
(``--prompt name:ID``), with ``source: import:<file>``; a replay run then reproduces them exactly. When a
file gives one image different captions in different queries, the image keeps its first caption and every
query keeps its own published rewrite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cirbench.errors import CirbenchError
from cirbench.generation import IMPORTED, GenerationCache
from cirbench.method import QuerySet
from cirbench.util import read_json_file

from .prompts import instruction_of, join_instruction

DEFAULT_FIELDS = ("multi_caption_opt", "multi_gpt-3.5_opt")
INSTRUCTION_FIELDS = ("relative_caption", "caption", "captions")
ID_FIELDS = ("id", "pairid")


class _Mismatch(Exception):
    pass


def _texts(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise CirbenchError(f"--import-generations: {where} is not a text or a list of texts")


def _cirevl_rows(data: dict, qs: QuerySet, path: Path) -> list[tuple[int, list[str], list[str]]]:
    lists = [data.get(k) for k in ("base_caption", "instruction", "modified_captions")]
    if not all(isinstance(v, list) for v in lists) or len({len(v) for v in lists if v is not None}) != 1:
        raise CirbenchError(f"--import-generations: {path} is not a CIReVL file (three lists of equal length: "
                            "base_caption, instruction, modified_captions)")
    base, instructions, modified = (v or [] for v in lists)
    if len(base) != len(qs.queries):
        raise _Mismatch(f"{len(base)} entries for {len(qs.queries)} queries")
    for i, q in enumerate(qs.queries):
        if str(instructions[i]).strip() != instruction_of(q).strip():
            raise _Mismatch(f"entry {i}'s instruction {str(instructions[i])[:40]!r} is not query {q.id}'s")
    return [(i, _texts(base[i], f"{path} base_caption[{i}]"), _texts(modified[i], f"{path} modified_captions[{i}]"))
            for i in range(len(base))]


def _ldre_rows(data: list, qs: QuerySet, path: Path, fields: tuple[str, str]) -> list[tuple[int, list[str], list[str]]]:
    id_field = next((f for f in ID_FIELDS if isinstance(data[0], dict) and f in data[0]), None)
    position = {q.id: i for i, q in enumerate(qs.queries)}
    if id_field is None and len(data) != len(qs.queries):
        raise _Mismatch(f"{len(data)} records without ids for {len(qs.queries)} queries")
    rows = []
    for n, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise CirbenchError(f"--import-generations: {path} record {n} is not an object")
        qi = position.get(str(rec.get(id_field))) if id_field else n
        if qi is None:
            raise _Mismatch(f"record {n} ({id_field} {rec.get(id_field)}) is not a query of this set")
        q = qs.queries[qi]
        text = next((rec[f] for f in INSTRUCTION_FIELDS if f in rec), None)
        if text is not None:
            given = join_instruction(_texts(text, f"{path} record {n}'s modification text"))
            if given.strip() != instruction_of(q).strip():
                raise _Mismatch(f"record {n}'s modification text {given[:40]!r} is not query {q.id}'s")
        missing = [f for f in fields if f not in rec]
        if missing:
            raise CirbenchError(f"--import-generations: {path} record {n} has no field {missing[0]!r} (pick the "
                                "fields with --import-fields CAPTIONS,REWRITES)")
        rows.append((qi, _texts(rec[fields[0]], f"{path} record {n} {fields[0]}"),
                     _texts(rec[fields[1]], f"{path} record {n} {fields[1]}")))
    return rows


def import_generations(paths: list[Path], qs: QuerySet, image_sha: dict[str, str], method, cache: GenerationCache
                       ) -> int:
    """Record the generations of the first file in ``paths`` that matches this query set; returns how many
    queries were imported. CirbenchError when no file matches (with the reason for the first)."""
    raw = str(method.options.get("import_fields") or "")
    fields = tuple(f.strip() for f in raw.split(",")) if raw else DEFAULT_FIELDS
    if len(fields) != 2 or not all(fields):
        raise CirbenchError("--import-fields takes CAPTIONS,REWRITES (two field names)")
    reasons = []
    for path in paths:
        data = read_json_file(path, "--import-generations")
        try:
            if isinstance(data, dict) and "modified_captions" in data:
                rows = _cirevl_rows(data, qs, path)
            elif isinstance(data, list) and data and isinstance(data[0], dict):
                rows = _ldre_rows(data, qs, path, fields)
            else:
                raise CirbenchError(f"--import-generations: {path} is neither a CIReVL file nor LDRE/SEIZE records")
        except _Mismatch as exc:
            reasons.append(f"{path.name}: {exc}")
            continue
        _record(rows, qs, image_sha, method, cache, f"{IMPORTED}{path.name}")
        return len(rows)
    raise CirbenchError(f"--import-generations: no file matches the {len(qs.queries)} queries of "
                        f"{qs.dataset}/{qs.split} set {qs.name} ({reasons[0]})")


def _record(rows, qs: QuerySet, image_sha: dict[str, str], method, cache: GenerationCache, source: str) -> None:
    """Record every row's captions and rewrites, all at once (one write), or none when a row is short."""
    items: list[tuple[dict, list[str]]] = []
    for qi, captions, rewrites in rows:
        q = qs.queries[qi]
        if len(captions) < method.n or len(rewrites) < method.n:
            raise CirbenchError(f"--import-generations: query {q.id} has {len(captions)} captions and {len(rewrites)} "
                                f"rewrites; this run uses --captions {method.n}")
        captions, rewrites = captions[: method.n], rewrites[: method.n]
        instruction = instruction_of(q)
        # every query's own captions (LDRE/SEIZE caption each query apart): its rewrites go with these
        items.append((method.query_caption_key(image_sha[q.reference], q), captions))
        items += [(method.rewrite_key(caption, instruction), [rewrite])
                  for caption, rewrite in zip(captions, rewrites, strict=True)]
    cache.put_many(items, source, count_as="imported")
