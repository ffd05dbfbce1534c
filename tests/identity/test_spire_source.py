"""The SPIRE source against a Workload API server run in the test, speaking the real
gRPC protocol (the definitions the ``spiffe`` package ships), that pushes an update."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from spire_integration.ca import BuiltinCA
from spire_integration.errors import IdentityConfigInvalid, IdentityUnavailable
from spire_integration.source import IdentitySource
from spire_integration.spiffe_id import SpiffeId
from spire_integration.spire_source import SpireIdentitySource, resolve_socket
from tests.identity.conftest import FakeWorkloadApi, Pki, start_agent, svid_response

DER = serialization.Encoding.DER


async def test_svid_and_bundles_and_a_pushed_update(
    workload_api: tuple[FakeWorkloadApi, Path], short_tmp: Path, pki: Pki
) -> None:
    api, socket = workload_api
    ca = BuiltinCA("cluster1", short_tmp / "ca")
    first = ca.issue_svid()
    api.push(svid_response(first, ca, {}))

    source = SpireIdentitySource(socket, first_update_timeout=10)
    await source.start()
    try:
        checked: IdentitySource = source  # it satisfies the protocol
        assert checked.kind == "spire"
        assert source.svid() == first
        assert source.svid().spiffe_id == SpiffeId.for_gateway("cluster1")
        assert source.trust_domain == "cluster1"
        own = source.bundles().get("cluster1")
        assert own is not None
        assert set(own.x509_authorities) == set(ca.bundle().x509_authorities)
        assert source.bundles().domains() == ["cluster1"]
        assert source.status().kind == "spire"
        assert source.status().error is None

        # SPIRE rotates the SVID and starts federating with cluster2, mid-run.
        heard: list[int] = []
        source.subscribe(lambda: heard.append(source.version))
        version = source.version
        second = ca.issue_svid()
        cluster2 = pki.cluster2.cert.public_bytes(DER)
        api.push(svid_response(second, ca, {"spiffe://cluster2": cluster2}))
        await asyncio.wait_for(source.wait_for_update(version), 10)
        assert source.svid() == second != first
        assert source.bundles().domains() == ["cluster1", "cluster2"]
        c2 = source.bundles().get("cluster2")
        assert c2 is not None
        assert c2.x509_authorities == (pki.cluster2.cert,)
        assert heard
        assert api.streams == 1
        assert api.refused == 0
    finally:
        await source.stop()


async def test_agent_restart_is_survived(short_tmp: Path) -> None:
    socket = short_tmp / "agent.sock"
    ca = BuiltinCA("cluster1", short_tmp / "ca")
    api, server = start_agent(socket)
    api.push(svid_response(ca.issue_svid(), ca, {}))
    source = SpireIdentitySource(socket)
    await source.start()
    try:
        server.stop(grace=None).wait(5)  # the agent goes away, streams are cut
        await asyncio.sleep(0.2)
        assert source.svid()  # the last SVID stays usable meanwhile
        api, server = start_agent(socket)
        version = source.version
        renewed = ca.issue_svid()
        api.push(svid_response(renewed, ca, {}))
        await asyncio.wait_for(source.wait_for_update(version), 15)
        assert source.svid() == renewed
        assert source.status().error is None
    finally:
        await source.stop()
        server.stop(grace=None).wait(5)


async def test_socket_argument_wins_over_the_environment(
    workload_api: tuple[FakeWorkloadApi, Path], short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api, socket = workload_api
    ca = BuiltinCA("cluster1", short_tmp / "ca")
    api.push(svid_response(ca.issue_svid(), ca, {}))
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", f"unix://{short_tmp}/nothing.sock")
    source = SpireIdentitySource(f"unix://{socket}")
    await source.start()
    try:
        assert source.svid().spiffe_id == SpiffeId.for_gateway("cluster1")
    finally:
        await source.stop()
    # Without an argument, the environment names the socket (which does not exist here).
    with pytest.raises(IdentityUnavailable, match=r"nothing.sock does not exist"):
        await SpireIdentitySource().start()
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", str(socket))
    from_env = SpireIdentitySource()
    await from_env.start()
    try:
        assert from_env.description == f"SPIRE Workload API at unix:{socket}"
    finally:
        await from_env.stop()


async def test_no_answer_is_unavailable(short_tmp: Path) -> None:
    silent = short_tmp / "silent.sock"
    silent.touch()  # exists, but nobody listens
    source = SpireIdentitySource(silent, first_update_timeout=0.5)
    with pytest.raises(IdentityUnavailable, match="no X509-SVID from the SPIRE Workload API"):
        await source.start()


def test_socket_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPIFFE_ENDPOINT_SOCKET", raising=False)
    with pytest.raises(IdentityConfigInvalid, match="set SPIFFE_ENDPOINT_SOCKET"):
        resolve_socket(None)
    assert resolve_socket("/run/spire/agent.sock") == "unix:/run/spire/agent.sock"
    assert resolve_socket("unix:///run/a.sock") == "unix:///run/a.sock"
    with pytest.raises(IdentityConfigInvalid, match="absolute path or a unix: URI"):
        resolve_socket("relative.sock")
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", "unix:/from/env.sock")
    assert resolve_socket(None) == "unix:/from/env.sock"
    assert resolve_socket("/explicit.sock") == "unix:/explicit.sock"
