"""What a peer sends is checked before anything is installed or stored: grants, join
requests and answers that do not fit are refused with a clear error, never a 500."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from federation.errors import BadPeerAnswer
from federation.join import build_request, verify_request
from federation.models import ConnectionGrant, JoinRequest, WireGuardInfo, parse_answer
from federation.tokens import TokenIssuer
from fedgw.clock import ManualClock
from fedgw.errors import InvalidInput
from gateway.store.memory import MemoryStore
from spire_integration import BuiltinCA
from wireguard.keys import PrivateKey

KEY = str(PrivateKey.generate().public_key())


def grant(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "c1",
        "endpoint": "e1",
        "endpoint_address": "172.16.1.2/31",
        "client_address": "172.16.1.3/31",
        "routes": ["10.60.0.0/16"],
        "wireguard": {"public_key": KEY, "endpoint": "198.18.0.12:51820"},
        "expires_at": "2030-01-01T00:00:00Z",
    }
    body.update(over)
    return body


def test_a_proper_grant_parses() -> None:
    assert parse_answer(ConnectionGrant, grant(), "cluster2").endpoint == "e1"


@pytest.mark.parametrize(
    ("over", "fragment"),
    [
        ({"client_address": "172.16.1.9/31"}, "not a pair"),
        ({"client_address": "172.16.1.2/31"}, "not a pair"),
        ({"endpoint_address": "172.16.0.0/16", "client_address": "172.16.0.1/16"}, "too large"),
        ({"client_address": "nonsense"}, "addresses of the pair"),
        ({"wireguard": {"public_key": "x" * 44}}, "wireguard.public_key"),
        ({"wireguard": {"public_key": KEY, "endpoint": "gw.example:51820"}}, "not an IP address"),
        ({"routes": ["10.0.0.1/8"]}, "host bits set"),
    ],
)
def test_bad_grants_are_bad_peer_answers(over: dict[str, Any], fragment: str) -> None:
    with pytest.raises(BadPeerAnswer, match=fragment) as info:
        parse_answer(ConnectionGrant, grant(**over), "cluster2")
    assert str(info.value).startswith("cluster2 answered something unusable")


def test_wireguard_info_behind_nat_has_no_endpoint() -> None:
    assert WireGuardInfo(public_key=KEY).endpoint is None


def test_join_request_refuses_a_nan_timestamp_and_http_urls(tmp_path: Path) -> None:
    ca = BuiltinCA("cluster1", tmp_path / "ca")
    req = build_request(
        "cluster2", ca.issue_svid(), token_id="t", secret="s" * 43, domain="cluster1",
        url="https://198.18.0.11:8443", bundle_url=None, bundle=ca.bundle(), now=time.time(),
    )  # fmt: skip
    data = json.loads(req.model_dump_json())
    with pytest.raises(ValidationError, match="finite"):
        JoinRequest.model_validate({**data, "timestamp": math.nan})
    with pytest.raises(ValidationError, match="not an https URL"):
        JoinRequest.model_validate({**data, "url": "http://198.18.0.11:8443"})


def test_a_deeply_nested_bundle_is_invalid_input(tmp_path: Path) -> None:
    ca = BuiltinCA("cluster1", tmp_path / "ca")
    req = build_request(
        "cluster2", ca.issue_svid(), token_id="t", secret="s" * 43, domain="cluster1",
        url=None, bundle_url=None, bundle=ca.bundle(), now=time.time(),
    )  # fmt: skip
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(InvalidInput, match="not readable"):
        verify_request("cluster2", req.model_copy(update={"bundle": deep}), time.time())


async def test_a_claimed_use_can_be_refunded() -> None:
    tokens = TokenIssuer(MemoryStore(), ManualClock())
    token, _ = await tokens.create(
        domain="cluster2", urls=["https://a:1"], bundle_urls=["https://a:2"], pins=["sha256:00"]
    )
    await tokens.claim(token.id, token.secret, "cluster1")
    await tokens.refund(token.id, "cluster1")
    (info,) = await tokens.list()
    assert (info.uses_left, info.used_by, info.state) == (1, [], "active")
    await tokens.refund(token.id, "cluster1")  # nothing left to refund: no change
    assert (await tokens.list())[0].uses_left == 1
