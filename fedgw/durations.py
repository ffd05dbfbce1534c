"""Durations as people type them (``90s``, ``10m``, ``1h30m``, ``250ms``) and as they
read them back."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import BeforeValidator, WithJsonSchema

from fedgw.errors import InvalidInput

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(text: str | float | int, what: str = "duration") -> float:
    """Seconds in ``text``: a number of seconds, or number+unit parts (``1h30m``)."""
    if isinstance(text, bool):
        raise InvalidInput(f"{what} must be a duration such as '30s' or '10m', not a boolean")
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        raw = text.strip()
        if not raw:
            raise InvalidInput(f"{what} is empty: expected a duration such as '30s' or '10m'")
        try:
            seconds = float(raw)
        except ValueError:
            seconds = _parse_parts(raw, what)
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidInput(f"{what} {text!r} must be a finite, non-negative duration")
    return seconds


def _parse_parts(raw: str, what: str) -> float:
    total = 0.0
    pos = 0
    while pos < len(raw):
        match = _PART.match(raw, pos)
        if match is None:
            number = _NUMBER.match(raw, pos)
            at = number.end() if number else pos
            raise InvalidInput(
                f"{what} {raw!r} is not understood at character {at + 1}: "
                "use a number with a unit, e.g. '500ms', '30s', '10m', '1h30m', '2d'"
            )
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    return total


def format_duration(seconds: float) -> str:
    """Short human form: ``45s``, ``10m``, ``1h5m``, ``2d3h``; sub-second as ``ms``."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds < 60:
        return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s".replace(".0s", "s")
    whole = round(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    shown = [f"{n}{u}" for n, u in parts if n]
    return "".join(shown[:2])


def _validate(value: Any) -> float:
    if isinstance(value, str | int | float):
        try:
            return parse_duration(value)
        except InvalidInput as exc:
            raise ValueError(str(exc)) from None
    raise ValueError("expected a duration: seconds as a number, or a string such as '10m'")


# A duration field for pydantic models and settings: accepts 30, 30.5, "30s", "10m".
Duration = Annotated[
    float,
    BeforeValidator(_validate),
    WithJsonSchema(
        {
            "anyOf": [{"type": "number", "minimum": 0}, {"type": "string"}],
            "description": "seconds, or a duration such as '30s', '10m', '1h30m'",
        }
    ),
]
