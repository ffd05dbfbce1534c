"""A gateway whose identity comes from SPIRE (the test's Workload API server): it
serves the federation API with that SVID, and refuses an SVID of another domain."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.errors import SettingsError
from spire_integration.ca import BuiltinCA
from tests.conftest import free_port, gateway_settings, start_gateway
from tests.federation.test_mtls_gateway import federating_gateway, url
from tests.identity.conftest import FakeWorkloadApi, svid_response


async def test_gateway_on_spire_talks_to_a_builtin_peer(
    workload_api: tuple[FakeWorkloadApi, Path], short_tmp: Path
) -> None:
    api, socket = workload_api
    spire_ca = BuiltinCA("cluster1", short_tmp / "spire-ca")  # plays the SPIRE server's CA
    api.push(svid_response(spire_ca.issue_svid(), spire_ca, {}))
    await asyncio.to_thread((short_tmp / "c1").mkdir)
    settings = gateway_settings(
        short_tmp / "c1",
        "cluster1",
        identity="spire",
        spire_socket=str(socket),
        listen=("127.0.0.1", free_port()),
    )
    gw1 = await start_gateway(settings)
    gw2 = await federating_gateway(short_tmp / "c2", "cluster2")
    try:
        info = await gw1.client.identity()
        assert info.source == "spire"
        assert info.spiffe_id == "spiffe://cluster1/fedgw/gateway"
        gw1.gateway.identity.set_bundle(gw2.gateway.identity.own_bundle())
        gw2.gateway.identity.set_bundle(gw1.gateway.identity.own_bundle())
        pong = await gw2.gateway.federation.client.request(
            "cluster1", url(gw1), "GET", "/federation/v1/ping"
        )
        assert pong["caller"] == "spiffe://cluster2/fedgw/gateway"
    finally:
        for gw in (gw1, gw2):
            await gw.client.close()
            await gw.stop()


async def test_spire_identity_of_another_domain_is_refused(
    workload_api: tuple[FakeWorkloadApi, Path], short_tmp: Path
) -> None:
    api, socket = workload_api
    other = BuiltinCA("cluster9", short_tmp / "other-ca")
    api.push(svid_response(other.issue_svid(), other, {}))
    settings = gateway_settings(short_tmp, "cluster1", identity="spire", spire_socket=str(socket))
    with pytest.raises(
        SettingsError, match="trust domain 'cluster9', but this gateway's domain is 'cluster1'"
    ):
        await start_gateway(settings)
