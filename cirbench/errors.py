"""Errors that the CLI turns into a one-line message and a non-zero exit, never a traceback."""

from __future__ import annotations


class CirbenchError(Exception):
    """A user-facing error: bad input, missing files, unknown names, offline downloads.

    ``exit_code`` is what the CLI exits with (2 for bad input, as click does for usage errors).
    """

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UnknownNameError(CirbenchError):
    """An unknown method, dataset, split, option or backbone name."""

    def __init__(self, kind: str, name: str, valid: list[str] | tuple[str, ...]):
        import difflib

        valid_list = ", ".join(sorted(valid)) or "(none)"
        close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        super().__init__(f"unknown {kind} '{name}'{hint}; valid: {valid_list}")
        self.kind = kind
        self.name = name
        self.valid = list(valid)


class AnnotationError(CirbenchError):
    """A missing, malformed or truncated annotation file."""


class ImageError(CirbenchError):
    """A missing or corrupt image, or an image path that escapes the data root."""


class CheckpointError(CirbenchError):
    """A checkpoint that does not exist, is corrupt, or does not fit the chosen backbone/method."""


class PluginError(CirbenchError):
    """A plugin that failed to load or registered a duplicate name (raised only in strict mode)."""


class CirbenchWarning(UserWarning):
    """Something the run worked around (a dropped cache shard, a plugin that did not load): the command line
    shows it as one ``warning: ...`` line (:func:`show_warnings_as_lines`)."""


def show_warnings_as_lines() -> None:
    """Show :class:`CirbenchWarning` as one ``warning: <message>`` line on stderr, not Python's two lines with a
    source path, and under torchrun on rank 0 only: every rank reads the same cache and plugins, so the other
    ranks would repeat it word for word. Other warnings (torch's, a library's) keep Python's format. Only the
    text is changed (``warnings.formatwarning``): filters and recorders (``catch_warnings``, ``pytest.warns``)
    see every warning as before."""
    import warnings

    default = warnings.formatwarning
    if getattr(default, "cirbench", False):
        return

    def format_warning(message, category, filename, lineno, line=None):
        if not issubclass(category, CirbenchWarning):
            return default(message, category, filename, lineno, line)
        from .util import one_line, speaks

        return f"warning: {one_line(str(message))}\n" if speaks() else ""

    format_warning.cirbench = True  # type: ignore[attr-defined]
    warnings.formatwarning = format_warning


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says the host or a GPU ran out of memory (``MemoryError``, torch's ``OutOfMemoryError``, the
    CPU allocator's refusal), also when a DataLoader worker raised it. Known without importing torch."""
    if isinstance(exc, MemoryError) or any(c.__name__ == "OutOfMemoryError" for c in type(exc).__mro__):
        return True
    origin = reader_process_origin(exc)
    text = str(exc)
    return (origin is not None and origin[0] in {"MemoryError", "OutOfMemoryError"}) or (
        isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "CUDA out of memory" in text))


def reader_process_origin(exc: BaseException) -> tuple[str, str] | None:
    """``(type name, message)`` of the exception a DataLoader worker raised, read from the one torch re-raises
    for it in the main process ("Caught ValueError in DataLoader worker process 0. Original Traceback ...", a
    RuntimeError when the original cannot be rebuilt from one string); None for any other exception."""
    text = str(exc)
    if not text.startswith("Caught ") or "Original Traceback" not in text:
        return None
    last = [line.strip() for line in text.splitlines() if line.strip()][-1]
    qualified, _, message = last.partition(": ")
    return qualified.rsplit(".", 1)[-1], message


def from_reader_process(exc: BaseException) -> CirbenchError | None:
    """The cirbench error that a DataLoader worker raised (see :func:`reader_process_origin`); None for any
    other exception."""
    origin = reader_process_origin(exc)
    if origin is None:
        return None
    name, message = origin
    known: dict[str, type[CirbenchError]] = {}
    todo: list[type[CirbenchError]] = [CirbenchError]
    while todo:
        cls = todo.pop()
        known[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    found = known.get(name)
    return None if found is None or not message else CirbenchError(message, exit_code=found.exit_code)
