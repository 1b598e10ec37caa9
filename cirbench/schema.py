"""Validating annotation records and result files with pydantic: one-line errors naming the file, the record
and the field.

Dataset plugins describe their record formats as pydantic models (strict types: a number where a name is
expected is an error, not a silent conversion) and call :func:`validate_records`; duplicate query ids are
refused too. Nothing here knows any dataset. :class:`ResultRecord` is the shape of the result files that
``cirbench run`` writes, as the commands that read them need it (:func:`cirbench.results.read_result`), and
:class:`TrainStateRecord` that of the training state a resume applies (:mod:`cirbench.train_state`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from .errors import AnnotationError

M = TypeVar("M", bound=BaseModel)


def _image_name(value: str) -> str:
    if not value or value.strip() != value or "/" in value or "\\" in value or value in (".", "..") or "\x00" in value:
        raise ValueError(f"{value!r} is not an image name (no paths, no surrounding spaces)")
    return value


ImageName = Annotated[str, AfterValidator(_image_name)]


class Record(BaseModel):
    """Base of annotation-record models: strict types, extra fields kept (official files carry more)."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)


def describe(error: ValidationError) -> str:
    """The first problem of a pydantic error as ``field 'a.b.2': message``."""
    first = error.errors()[0]
    loc = ".".join(str(x) for x in first.get("loc", ()))
    # the model's class and pydantic's "Value error, " before a validator's own message are no help to a user
    msg = re.sub(r" or instance of \w+", "", first.get("msg", "invalid")).removeprefix("Value error, ")
    return f"field '{loc}': {msg}" if loc else msg


def validate_records(model: type[M], records: Any, path: Path | str, id_field: str | None = None,
                     required: Sequence[str] = ()) -> list[M]:
    """Validate a JSON list of records against ``model``; ``required`` fields must be present and not null
    (fields a split needs that the model leaves optional, e.g. targets on a visible split)."""
    if not isinstance(records, list):
        raise AnnotationError(f"annotation file {path}: expected a list of records, found {type(records).__name__}")
    out: list[M] = []
    seen: dict[Any, int] = {}
    for i, raw in enumerate(records):
        where = f"annotation file {path}, record {i}"
        if not isinstance(raw, dict):
            raise AnnotationError(f"{where}: not an object")
        if id_field is not None and id_field in raw:
            where += f" ({id_field} {raw[id_field]!r})"
        for name in required:
            if raw.get(name) is None:
                raise AnnotationError(f"{where}: field '{name}' is missing or null")
        try:
            rec = model.model_validate(raw)
        except ValidationError as exc:
            raise AnnotationError(f"{where}: {describe(exc)}") from None
        if id_field is not None:
            key = getattr(rec, id_field)
            if key in seen:
                raise AnnotationError(f"{where}: duplicate {id_field} (also record {seen[key]})")
            seen[key] = i
        out.append(rec)
    return out


def validate_value(model_type: Any, value: Any, path: Path | str, what: str) -> Any:
    """Validate one JSON value (e.g. a split file) against a type; one-line AnnotationError otherwise."""
    from pydantic import TypeAdapter

    try:
        return TypeAdapter(model_type, config=ConfigDict(strict=True)).validate_python(value)
    except ValidationError as exc:
        raise AnnotationError(f"annotation file {path}: {what}: {describe(exc)}") from None


# -- result files -------------------------------------------------------------------------------------------
# The sections of a result file that commands read (reproduce, compare, report, leaderboard), each of the type
# cirbench writes; anything else a record holds is kept as it is (extra fields, sections of later versions).
class _Section(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


METRIC_LIMIT = 1e6  # cirbench's metrics are percentages


def _metric_value(value: float) -> float:
    if not math.isnan(value) and abs(value) > METRIC_LIMIT:  # nan: a metric no query counted towards
        raise ValueError(f"{value!r:.40} is no metric value (cirbench's are percentages)")
    return value


# a metric (an int passes as a float, strictly too), or None where the run could not compute it
Number = Annotated[float, AfterValidator(_metric_value)] | None


class _MethodSection(_Section):
    name: str
    options: dict[str, Any] = {}
    plugin_source: dict[str, Any] | None = None


class _DatasetSection(_Section):
    name: str
    split: str | None = None
    options: dict[str, Any] = {}
    data_root: str | None = None
    data_root_given: bool = False
    plugin_source: dict[str, Any] | None = None


class _BackboneSection(_Section):
    model: str | None = None
    pretrained: str | None = None


class _EncodeSection(_Section):
    requested_path: str | None = None
    max_image_pixels: int | None = None


class _RetrievalSection(_Section):
    backend: str | None = None


class _CiSection(_Section):
    replicates: int | None = None


class _PreprocessSection(_Section):
    kind: str | None = None


def _file_name(value: str) -> str:
    if not value or "/" in value or "\\" in value or value in (".", "..") or "\x00" in value:
        raise ValueError(f"{value!r} is not a file name beside the result")
    return value


class _PredictionsSection(_Section):
    file: Annotated[str, AfterValidator(_file_name)] | None = None
    top: int | Literal["all"] | None = None
    rows: int | None = None
    sha256: str | None = None


class _CountsSection(_Section):
    sets: dict[str, dict[str, Any]] = {}


class ResultRecord(_Section):
    """A result file as commands read it: :func:`cirbench.results.read_result` validates against it."""

    schema_version: int
    method: _MethodSection
    dataset: _DatasetSection
    backbone: _BackboneSection
    preprocess: _PreprocessSection | None = None
    precision: str | None = None
    seed: int | None = None
    encode: _EncodeSection | None = None
    retrieval: _RetrievalSection | None = None
    ci: _CiSection | None = None
    predictions: _PredictionsSection | None = None
    counts: _CountsSection | None = None
    metrics: dict[str, Number] = {}
    per_set_metrics: dict[str, dict[str, Number]] | None = None
    metrics_ci: dict[str, Annotated[list[Number], Field(min_length=2, max_length=2)] | None] | None = None
    submissions: list[Any] | None = None
    environment: dict[str, Any] | None = None
    fingerprint: str | None = None
    created: str | None = None


def result_record_problem(record: dict[str, Any]) -> str | None:
    """What is wrong with a result record's sections (``field 'encode.max_image_pixels': ...``), or None."""
    try:
        ResultRecord.model_validate(record)
    except ValidationError as exc:
        return describe(exc)
    return None


# -- training states ----------------------------------------------------------------------------------------
# train_state.json (cirbench.train_state) as a resume applies it: checked whole first, so that an edited or damaged
# file is refused rather than half-applied.
class _Position(_Section):
    step: int = Field(ge=0)
    epoch: int = Field(ge=0)
    epoch_step: int = Field(ge=0)
    skipped: int = Field(0, ge=0)
    unreadable_shards: dict[str, Any] | None = None


class _OptimizerState(_Section):
    param_groups: list[dict[str, Any]]
    state: dict[str, dict[str, Any]]


class _NumpyRng(_Section):
    kind: str
    pos: int
    has_gauss: int
    cached_gaussian: float


class _Rng(_Section):
    python: tuple[int, list[int], float | None]  # random.getstate()
    numpy: _NumpyRng


class TrainStateRecord(_Section):
    """``train_state.json``: what :func:`cirbench.train_state.load_train_state` applies."""

    position: _Position
    optimizer: _OptimizerState
    scheduler: dict[str, Any]
    rng: list[_Rng] = Field(min_length=1)
    grad_scaler: dict[str, Any] | None = None


def train_state_problem(raw: bytes) -> str | None:
    """What is wrong with a ``train_state.json``'s contents (``field 'rng.0.python': ...``), or None. Read as JSON,
    strictly (arrays are tuples there)."""
    try:
        TrainStateRecord.model_validate_json(raw)
    except ValidationError as exc:
        return describe(exc)
    return None
