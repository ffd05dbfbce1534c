from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedgw.durations import format_duration, parse_duration
from fedgw.errors import InvalidInput


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("60", 60),
        ("60s", 60),
        ("10m", 600),
        ("1h30m", 5400),
        ("250ms", 0.25),
        ("2d", 172800),
        ("1.5s", 1.5),
        (30, 30),
        (0.5, 0.5),
    ],
)
def test_parse(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "ten", "10x", "10m5", "-5s", "m", "1h 30m", "inf", "nan"])
def test_parse_rejects(text: str) -> None:
    with pytest.raises(InvalidInput, match=r"duration"):
        parse_duration(text)


def test_error_says_where() -> None:
    with pytest.raises(InvalidInput, match="at character 3"):
        parse_duration("10x", "--ttl")


@given(st.integers(min_value=1, max_value=10 * 86400))
def test_format_is_parseable(seconds: int) -> None:
    # Two units at most: the reading is within a minute (days) or a second of the value.
    back = parse_duration(format_duration(seconds))
    assert abs(back - seconds) <= (3600 if seconds >= 86400 else 60 if seconds >= 3600 else 0)
