"""The name[@domain] grammar: valid forms round-trip, invalid ones say what and where."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedgw.names import (
    DOMAIN_MAX,
    InvalidName,
    Reference,
    check_domain,
    check_label_key,
    check_label_value,
    check_name,
)

LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
labels = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
domains = (
    st.lists(labels, min_size=1, max_size=4).map(".".join).filter(lambda d: len(d) <= DOMAIN_MAX)
)


@given(labels)
def test_valid_names_pass(name: str) -> None:
    assert check_name(name) == name


@given(labels, st.one_of(st.none(), domains))
def test_references_round_trip(name: str, domain: str | None) -> None:
    ref = Reference(name, domain)
    assert Reference.parse(str(ref)) == ref


@given(st.text(max_size=300))
def test_parse_never_fails_otherwise(text: str) -> None:
    """Any string either parses into a valid reference or raises InvalidName."""
    try:
        ref = Reference.parse(text)
    except InvalidName as exc:
        assert str(exc)  # noqa: PT017 - a property over all strings, not one expected failure
    else:
        assert LABEL_RE.fullmatch(ref.name)
        assert str(ref) == text


@given(labels, domains)
def test_own_domain_means_local(name: str, domain: str) -> None:
    ref = Reference.parse(f"{name}@{domain}")
    assert ref.local_to(domain) == Reference.parse(name)
    assert ref.is_local(domain)
    assert Reference(name).is_local(domain)
    other = domain + "x" if len(domain) < DOMAIN_MAX else "other"
    assert not ref.is_local(other)
    assert ref.local_to(other) == ref


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("Bad_Name", "'B' at character 1"),
        ("bad_name", "'_' at character 4"),
        ("-vpn", "'-' at character 1"),
        ("vpn-", "'-' at character 4"),
        ("", "empty"),
        ("a" * 64, "64 characters long"),
        ("vpn@Cluster2", "'C' at character 1"),
        ("vpn@cluster2.", "ends with '.'"),
        ("vpn@a..b", "empty label at character 3"),
        ("vpn@a@b", "second '@' at character 6"),
        ("vpn@", "domain is empty"),
        ("vpn@cluster_2", "'_' at character 8"),
    ],
)
def test_invalid_references_say_what_and_where(text: str, fragment: str) -> None:
    with pytest.raises(InvalidName, match=re.escape(fragment)):
        Reference.parse(text)


def test_uppercase_gets_a_hint() -> None:
    with pytest.raises(InvalidName, match="use lowercase"):
        check_name("Vpn")


def test_domain_length_limit() -> None:
    long = ".".join(["a" * 63] * 4)  # 255 characters
    with pytest.raises(InvalidName, match="at most 253"):
        check_domain(long)
    assert check_domain(long[:253].rstrip(".-")) == long[:253].rstrip(".-")


@pytest.mark.parametrize("key", ["zone", "app.kubernetes.io/name", "a_b", "Tier"])
def test_label_keys(key: str) -> None:
    assert check_label_key(key) == key


@pytest.mark.parametrize("key", ["", "/x", "bad key", "-x", "Bad_Prefix/x"])
def test_bad_label_keys(key: str) -> None:
    with pytest.raises(InvalidName):
        check_label_key(key)


def test_label_values() -> None:
    assert check_label_value("") == ""
    assert check_label_value("eu-west_1.a") == "eu-west_1.a"
    with pytest.raises(InvalidName, match="' ' at character 3"):
        check_label_value("eu west")
