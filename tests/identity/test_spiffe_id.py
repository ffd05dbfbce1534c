"""SPIFFE ID grammar: what parses, what is refused and how the refusal reads."""

from __future__ import annotations

import pytest

from fedgw.errors import InvalidInput
from spire_integration.errors import InvalidSpiffeId
from spire_integration.spiffe_id import SpiffeId, check_trust_domain


@pytest.mark.parametrize(
    ("text", "domain", "path"),
    [
        ("spiffe://cluster1/fedgw/gateway", "cluster1", "/fedgw/gateway"),
        ("spiffe://cluster1", "cluster1", ""),
        (
            "spiffe://a.b-c_d.example/ns/Prod/sa/Web_1.2-x",
            "a.b-c_d.example",
            "/ns/Prod/sa/Web_1.2-x",
        ),
        ("spiffe://x/..a/.b/c..", "x", "/..a/.b/c.."),
    ],
)
def test_valid_ids_parse_and_print_back(text: str, domain: str, path: str) -> None:
    spiffe_id = SpiffeId.parse(text)
    assert (spiffe_id.trust_domain, spiffe_id.path) == (domain, path)
    assert str(spiffe_id) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("https://cluster1/x", "has scheme 'https'"),
        ("SPIFFE://cluster1/x", "has scheme 'SPIFFE'"),
        ("cluster1/x", "has no scheme"),
        ("spiffe:///x", "has no trust domain"),
        ("spiffe://Cluster1/x", "'C' at character 10 in its trust domain"),
        ("spiffe://cluster1:443/x", "a port is not allowed"),
        ("spiffe://user@cluster1/x", "user info is not allowed"),
        ("spiffe://cluster1?q=1", "a query is not allowed"),
        ("spiffe://cluster1/x#frag", "'#' at character 20"),
        ("spiffe://cluster1/x?q", "'?' at character 20"),
        ("spiffe://cluster1/", "ends with '/'"),
        ("spiffe://cluster1/a//b", "empty path segment at character 21"),
        ("spiffe://cluster1/a/./b", "path segment '.' at character 21"),
        ("spiffe://cluster1/a/../b", "path segment '..' at character 21"),
        ("spiffe://cluster1/a%20b", "'%' at character 20"),
        ("spiffe://cluster1/a b", "' ' at character 20"),
        ("spiffe://" + "a" * 256 + "/x", "at most 255"),
        ("spiffe://cluster1/" + "a" * 2048, "at most 2048"),
    ],
)
def test_invalid_ids_say_what_and_where(text: str, message: str) -> None:
    with pytest.raises(InvalidSpiffeId) as info:
        SpiffeId.parse(text)
    assert message in str(info.value)
    assert isinstance(info.value, InvalidInput)
    assert info.value.code == "invalid_spiffe_id"


def test_for_gateway_and_trust_domain_id() -> None:
    assert (
        str(SpiffeId.for_gateway("cluster1.example")) == "spiffe://cluster1.example/fedgw/gateway"
    )
    assert str(SpiffeId.of_trust_domain("cluster1")) == "spiffe://cluster1"
    assert SpiffeId.for_gateway("c1").member_of("c1")
    assert not SpiffeId.for_gateway("c1").member_of("c2")


def test_constructor_checks_like_parse() -> None:
    with pytest.raises(InvalidSpiffeId, match="must start with '/'"):
        SpiffeId("cluster1", "fedgw")
    with pytest.raises(InvalidSpiffeId, match=r"uppercase|lowercase"):
        SpiffeId.for_gateway("Cluster1")
    with pytest.raises(InvalidSpiffeId, match="empty path segment"):
        SpiffeId("cluster1", "/a//b")


def test_check_trust_domain() -> None:
    assert check_trust_domain("cluster_1.example") == "cluster_1.example"
    with pytest.raises(InvalidSpiffeId, match="empty"):
        check_trust_domain("")
    with pytest.raises(InvalidSpiffeId, match="'/' at character 2"):
        check_trust_domain("a/b")


def test_ids_are_values() -> None:
    assert SpiffeId.parse("spiffe://c1/a") == SpiffeId("c1", "/a")
    assert len({SpiffeId.parse("spiffe://c1/a"), SpiffeId("c1", "/a")}) == 1
