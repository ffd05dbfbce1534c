"""The SPIRE source against a Workload API server run in the test, speaking the real
gRPC protocol (the definitions the ``spiffe`` package ships), that pushes an update."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc  # type: ignore[import-untyped]
import pytest
from cryptography.hazmat.primitives import serialization
from spiffe._proto import workload_pb2, workload_pb2_grpc

from spire_integration.ca import BuiltinCA
from spire_integration.errors import IdentityConfigInvalid, IdentityUnavailable
from spire_integration.source import IdentitySource
from spire_integration.spiffe_id import SpiffeId
from spire_integration.spire_source import SpireIdentitySource, resolve_socket
from spire_integration.svid import X509Svid
from tests.identity.conftest import Pki

DER = serialization.Encoding.DER


def _response(svid: X509Svid, ca: BuiltinCA, federated: dict[str, bytes]) -> Any:
    return workload_pb2.X509SVIDResponse(
        svids=[
            workload_pb2.X509SVID(
                spiffe_id=str(svid.spiffe_id),
                x509_svid=b"".join(c.public_bytes(DER) for c in svid.chain),
                x509_svid_key=svid.private_key.private_bytes(
                    DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                ),
                bundle=b"".join(c.public_bytes(DER) for c in ca.bundle().x509_authorities),
            )
        ],
        federated_bundles=federated,
    )


class FakeWorkloadApi(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    """Streams the latest X509SVIDResponse to every client, and each new one as it comes."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._latest: Any = None
        self._generation = 0
        self.streams = 0
        self.refused = 0

    def push(self, response: Any) -> None:
        with self._cond:
            self._latest = response
            self._generation += 1
            self._cond.notify_all()

    def FetchX509SVID(self, request: Any, context: Any) -> Iterator[Any]:
        # SPIRE refuses calls without the security header; so do we.
        if ("workload.spiffe.io", "true") not in tuple(context.invocation_metadata()):
            self.refused += 1
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing")
        self.streams += 1
        seen = 0
        while context.is_active():
            with self._cond:
                if self._generation == seen:
                    self._cond.wait(0.05)
                    continue
                seen, response = self._generation, self._latest
            yield response


def start_agent(socket: Path) -> tuple[FakeWorkloadApi, Any]:
    servicer = FakeWorkloadApi()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"unix:{socket}")
    server.start()
    return servicer, server


@pytest.fixture
def workload_api(short_tmp: Path) -> Iterator[tuple[FakeWorkloadApi, Path]]:
    socket = short_tmp / "agent.sock"
    servicer, server = start_agent(socket)
    try:
        yield servicer, socket
    finally:
        server.stop(grace=None).wait(5)


async def test_svid_and_bundles_and_a_pushed_update(
    workload_api: tuple[FakeWorkloadApi, Path], short_tmp: Path, pki: Pki
) -> None:
    api, socket = workload_api
    ca = BuiltinCA("cluster1", short_tmp / "ca")
    first = ca.issue_svid()
    api.push(_response(first, ca, {}))

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
        api.push(_response(second, ca, {"spiffe://cluster2": cluster2}))
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
    api.push(_response(ca.issue_svid(), ca, {}))
    source = SpireIdentitySource(socket)
    await source.start()
    try:
        server.stop(grace=None).wait(5)  # the agent goes away, streams are cut
        await asyncio.sleep(0.2)
        assert source.svid()  # the last SVID stays usable meanwhile
        api, server = start_agent(socket)
        version = source.version
        renewed = ca.issue_svid()
        api.push(_response(renewed, ca, {}))
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
    api.push(_response(ca.issue_svid(), ca, {}))
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
