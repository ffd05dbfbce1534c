"""Records refuse what they cannot hold, and say why."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from fedgw.errors import Conflict, InvalidInput
from fedgw.models import (
    Connection,
    ConnectionEnd,
    ConnectionState,
    EndpointRegistration,
    NetworkServiceRegistration,
    validated,
)
from fedgw.names import Reference


def reg(**over: Any) -> EndpointRegistration:
    return validated(EndpointRegistration, {"name": "e1", "services": ["vpn"], **over})


def test_endpoint_defaults() -> None:
    ep = reg()
    assert ep.labels == {}
    assert ep.routes == []
    assert ep.pool is None
    assert ep.workload is None


@pytest.mark.parametrize(
    ("over", "fragment"),
    [
        ({"pool": "172.16.1.5/24"}, "did you mean '172.16.1.0/24'"),
        ({"pool": "172.16.1.0"}, "no prefix length"),
        ({"pool": "10.0.0.1/32"}, "at least 2 addresses"),
        ({"pool": "nonsense/8"}, "not a CIDR prefix"),
        ({"routes": ["10.0.0.0/8", "10.0.0.0/8"]}, "listed twice"),
        ({"services": []}, "at least 1 item"),
        ({"services": ["vpn", "vpn"]}, "listed twice"),
        ({"workload": {"netns": "a", "pid": 3}}, "exactly one"),
        ({"workload": {}}, "exactly one"),
        ({"workload": {"netns": "../etc"}}, "'/' at character 3"),
        ({"workload": {"pid": 0}}, "greater than or equal to 1"),
        ({"labels": {"bad key": "x"}}, "' ' at character 4"),
        ({"name": "Bad_Name"}, "'B' at character 1"),
        ({"ttl": "soon"}, "not understood"),
        ({"colour": "blue"}, "colour: Extra inputs are not permitted"),
    ],
)
def test_endpoint_rejects(over: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidInput, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        reg(**over)


def test_ipv6_pool_and_ttl_forms() -> None:
    ep = reg(pool="fd00:1::/64", routes=["fd00:2::/48"], ttl="10m")
    assert str(ep.pool) == "fd00:1::/64"
    assert ep.ttl == 600


def test_export_list_is_sorted_and_checked() -> None:
    ns = validated(NetworkServiceRegistration, {"name": "vpn", "export": ["b.x", "a.x"]})
    assert ns.export == ["a.x", "b.x"]
    with pytest.raises(InvalidInput, match=r"export domain 'A\.x'"):
        validated(NetworkServiceRegistration, {"name": "vpn", "export": ["A.x"]})
    with pytest.raises(InvalidInput, match="listed twice"):
        validated(NetworkServiceRegistration, {"name": "vpn", "export": ["a", "a"]})


def test_connection_life_cycle() -> None:
    now = datetime.now(UTC)
    conn = Connection(
        id="c1",
        service=Reference.parse("vpn@cluster2"),
        client=ConnectionEnd(domain="cluster1"),
        server=ConnectionEnd(domain="cluster2", endpoint="e1"),
        created_at=now,
        updated_at=now,
        expires_at=now,
    )
    assert conn.model_dump(mode="json")["service"] == "vpn@cluster2"
    assert Connection.model_validate_json(conn.model_dump_json()) == conn
    up = conn.moved_to(ConnectionState.UP, "both ends configured", now)
    down = up.moved_to(ConnectionState.DOWN, "peer unreachable", now)
    closed = down.moved_to(ConnectionState.CLOSED, "closed by client", now)
    with pytest.raises(Conflict, match="cannot go from closed to up"):
        closed.moved_to(ConnectionState.UP, "x", now)
    with pytest.raises(Conflict):
        up.moved_to(ConnectionState.REQUESTED, "x", now)
