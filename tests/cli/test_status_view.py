"""``fedgw status`` as a person reads it: tunnels, including one started ahead of its
first connection and one that is broken (the gateway's answer is made up here)."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

from gateway.api.schemas import DataplaneInfo, GatewayStatus, TunnelInfo
from gateway.cli import app
from gateway.cli._common import CliState
from gateway.client import GatewayClient


def tunnel(domain: str, **over: Any) -> TunnelInfo:
    fields: dict[str, Any] = {
        "domain": domain,
        "interface": f"fgw{domain}",
        "public_key": "k" * 43 + "=",
        "endpoint": "198.18.0.12:51820",
        "last_handshake": None,
        "rx_bytes": 0,
        "tx_bytes": 0,
        "allowed_ips": [],
    }
    return TunnelInfo(**(fields | over))


def test_status_shows_each_tunnel_and_what_is_wrong_with_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    status = GatewayStatus(
        domain="cluster1", version="0", pid=1, started_at="now", uptime_seconds=5,
        socket="/run/fedgw/gateway.sock", state_dir="/var/lib/fedgw", store="sqlite",
        services=0, endpoints=0, workload_bound_endpoints=0, watchers=0, peers=3,
        dataplane=DataplaneInfo(
            driver="userspace",
            wires=0,
            tunnels=[
                tunnel("cluster2"),
                tunnel("cluster3", public_key=None, endpoint=None),
                tunnel("cluster4", error="the peer is missing on the interface"),
            ],
        ),
    )  # fmt: skip

    async def answer(self: GatewayClient) -> GatewayStatus:
        return status

    monkeypatch.setattr(GatewayClient, "status", answer)
    result = CliRunner().invoke(app, ["status"], obj=CliState())
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.output.splitlines() if line}
    assert "198.18.0.12:51820" in rows["cluster2"]
    assert "(no connection yet)" in rows["cluster3"]
    assert "tunnel to cluster4: the peer is missing on the interface" in result.output
    assert "tunnel to cluster2:" not in result.output
