"""Reading benchmark and prediction files: JSON from a path, or the already-parsed object."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from emu.errors import SourceError
from emu.evaluate import EvaluationError

JsonInput = str | Path | Mapping[str, Any] | list[Any]


def load_json(source: JsonInput, what: str) -> Any:
    """`source` parsed: a path is read as UTF-8 JSON (SourceError naming `what` when it cannot
    be), anything else is returned as it is (the harness passes objects it built itself)."""
    if not isinstance(source, (str, Path)):
        return source
    path = Path(source)
    if not path.is_file():
        raise SourceError(f"{what} file {path} does not exist")
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{what} file {path} is not valid UTF-8 JSON: {exc}") from None


def describe(source: JsonInput) -> str:
    return str(source) if isinstance(source, (str, Path)) else "<in-memory>"


def require_int(value: Any, where: str) -> int:
    """An id field: a JSON integer (never a bool, float or digit string, which would silently
    fail to match the annotation ids)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise EvaluationError(f"{where} must be an integer, got {value!r}")
    return value


def require_str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise EvaluationError(f"{where} must be a string, got {value!r}")
    return value


def finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise EvaluationError(f"{what} is not finite: {value!r}")
    return value


def id_sample(ids: list[Any], limit: int = 10) -> str:
    """`1, 2, 3 ... (N in all)` for error messages."""
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f" ... ({len(ids)} in all)" if len(ids) > limit else "")
