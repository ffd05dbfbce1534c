"""The join request's proof: the joiner must hold an SVID of its gateway under the
bundle it sends, and sign this very request for this very issuer, recently."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from federation.join import build_request, verify_request
from federation.models import JoinRequest
from fedgw.errors import InvalidInput, PermissionDenied
from spire_integration import BuiltinCA, SpiffeId


@pytest.fixture
def joiner(tmp_path: Path) -> BuiltinCA:
    return BuiltinCA("cluster1", tmp_path / "ca1")


def request(ca: BuiltinCA, issuer: str = "cluster2", **over: object) -> JoinRequest:
    kw: dict[str, object] = {
        "token_id": "abc",
        "secret": "s" * 43,
        "domain": "cluster1",
        "url": "https://198.18.0.11:8443",
        "bundle_url": "https://198.18.0.11:8444",
        "bundle": ca.bundle(),
        "now": time.time(),
    }
    kw.update(over)
    return build_request(issuer, ca.issue_svid(), **kw)  # type: ignore[arg-type]


def test_a_proper_request_verifies(joiner: BuiltinCA) -> None:
    bundle = verify_request("cluster2", request(joiner), time.time())
    assert bundle == joiner.bundle()


def test_a_request_for_another_issuer_does_not(joiner: BuiltinCA) -> None:
    with pytest.raises(PermissionDenied, match="proof does not verify"):
        verify_request("cluster3", request(joiner, issuer="cluster2"), time.time())


@pytest.mark.parametrize("field", ["url", "bundle_url", "token_id", "secret"])
def test_any_changed_field_breaks_the_proof(joiner: BuiltinCA, field: str) -> None:
    changed = request(joiner).model_copy(
        update={field: "https://evil:1" if "url" in field else "x" * 43}
    )
    with pytest.raises(PermissionDenied, match="proof does not verify"):
        verify_request("cluster2", changed, time.time())


def test_stale_requests_are_refused(joiner: BuiltinCA) -> None:
    with pytest.raises(PermissionDenied, match="more than 5 minutes off"):
        verify_request("cluster2", request(joiner), time.time() + 301)


def test_an_svid_not_of_the_joiners_gateway(joiner: BuiltinCA, tmp_path: Path) -> None:
    workload = joiner.issue_svid(SpiffeId.parse("spiffe://cluster1/workload/x"))
    req = build_request(
        "cluster2", workload, token_id="abc", secret="s" * 43, domain="cluster1",
        url=None, bundle_url=None, bundle=joiner.bundle(), now=time.time(),
    )  # fmt: skip
    with pytest.raises(PermissionDenied, match="not the gateway of cluster1"):
        verify_request("cluster2", req, time.time())
    other = BuiltinCA("cluster9", tmp_path / "ca9")
    with pytest.raises(PermissionDenied, match="does not check out"):
        # claims cluster1, but the SVID comes from cluster9's CA
        verify_request("cluster2", request(other, bundle=joiner.bundle()), time.time())


def test_garbage_is_invalid_input(joiner: BuiltinCA) -> None:
    with pytest.raises(InvalidInput, match="not readable"):
        verify_request("cluster2", request(joiner).model_copy(update={"bundle": "{}"}), time.time())
    with pytest.raises(InvalidInput, match="cannot join itself"):
        verify_request("cluster1", request(joiner), time.time())
