"""The built-in identity source: renewal at half-life, rotation, federated bundles."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fedgw.clock import to_datetime
from spire_integration.builtin_source import BuiltinIdentitySource
from spire_integration.bundle import BundleSet, TrustBundle
from spire_integration.errors import IdentityConfigInvalid, IdentityUnavailable
from spire_integration.source import IdentitySource
from spire_integration.spiffe_id import SpiffeId
from spire_integration.svid import validate_svid
from tests.identity.conftest import FakeClock, Pki


def _source(directory: Path, clock: FakeClock) -> BuiltinIdentitySource:
    return BuiltinIdentitySource(
        "cluster1", directory, clock=clock, svid_ttl=100, ca_ttl=1000, max_sleep=0.05
    )


async def test_start_gives_an_svid_and_the_own_bundle(tmp_path: Path, clock: FakeClock) -> None:
    source = _source(tmp_path, clock)
    with pytest.raises(IdentityUnavailable, match="no X509-SVID yet"):
        source.svid()
    await source.start()
    try:
        checked: IdentitySource = source  # it satisfies the protocol
        svid = checked.svid()
        assert svid.spiffe_id == SpiffeId.for_gateway("cluster1")
        assert source.bundles().domains() == ["cluster1"]
        now = to_datetime(clock.now())
        assert validate_svid(svid.chain, source.bundles(), now) == svid.spiffe_id
        status = source.status()
        assert status.kind == "builtin"
        assert status.spiffe_id == str(svid.spiffe_id)
        assert [b.trust_domain for b in status.bundles] == ["cluster1"]
        assert status.bundles[0].fingerprint == source.own_bundle().fingerprint()
    finally:
        await source.stop()


async def test_svid_is_renewed_at_half_life_and_subscribers_hear_of_it(
    tmp_path: Path, clock: FakeClock
) -> None:
    source = _source(tmp_path, clock)
    await source.start()
    try:
        calls: list[int] = []
        unsubscribe = source.subscribe(lambda: calls.append(source.version))
        first = source.svid()
        clock.advance(40)
        assert await source.refresh() is False
        assert source.svid() == first
        assert calls == []
        version = source.version
        waiter = asyncio.create_task(source.wait_for_update(version))
        clock.advance(15)  # past half of the 100 s life
        # The background task notices within max_sleep.
        assert await asyncio.wait_for(waiter, 5) > version
        assert source.svid() != first
        assert source.svid().not_before > first.not_before
        assert calls
        unsubscribe()
        heard, version = len(calls), source.version
        clock.advance(60)
        assert await source.refresh() is True
        assert source.version > version
        assert len(calls) == heard
    finally:
        await source.stop()


async def test_ca_rotation_reaches_the_bundle(tmp_path: Path, clock: FakeClock) -> None:
    source = _source(tmp_path, clock)
    await source.start()
    try:
        sequences = {source.own_bundle().sequence}
        authorities: set[int] = set()
        for _ in range(60):  # 3000 s: three CA lifetimes
            clock.advance(50)
            await source.refresh()
            bundle = source.own_bundle()
            sequences.add(bundle.sequence)
            authorities.update(c.serial_number for c in bundle.x509_authorities)
            now = to_datetime(clock.now())
            assert validate_svid(source.svid().chain, source.bundles(), now)
        assert len(authorities) >= 4
        assert max(sequences) >= 7
    finally:
        await source.stop()


async def test_federated_bundles(tmp_path: Path, clock: FakeClock, pki: Pki) -> None:
    source = _source(tmp_path, clock)
    await source.start()
    try:
        version = source.version
        c2 = TrustBundle("cluster2", (pki.cluster2.cert,), sequence=5)
        assert source.set_federated_bundle(c2) is True
        assert source.version > version
        assert source.bundles().domains() == ["cluster1", "cluster2"]
        assert source.set_federated_bundle(c2) is False
        rollback = TrustBundle("cluster2", (pki.cluster3.cert,), sequence=4)
        assert source.set_federated_bundle(rollback) is False
        assert source.bundles().get("cluster2") == c2
        with pytest.raises(IdentityConfigInvalid, match="managed by its built-in CA"):
            source.set_federated_bundle(TrustBundle("cluster1", (pki.cluster1.cert,), 99))
        # A snapshot does not change under the caller.
        snapshot: BundleSet = source.bundles()
        assert source.remove_federated_bundle("cluster2") is True
        assert "cluster2" in snapshot
        assert "cluster2" not in source.bundles()
        assert source.remove_federated_bundle("cluster2") is False
    finally:
        await source.stop()


async def test_restart_keeps_the_bundle(tmp_path: Path, clock: FakeClock) -> None:
    source = _source(tmp_path, clock)
    await source.start()
    bundle = source.own_bundle()
    await source.stop()
    again = _source(tmp_path, clock)
    await again.start()
    try:
        assert again.own_bundle() == bundle
    finally:
        await again.stop()


def test_spiffe_id_must_be_in_the_domain(tmp_path: Path, clock: FakeClock) -> None:
    with pytest.raises(IdentityConfigInvalid, match="not in trust domain"):
        BuiltinIdentitySource(
            "cluster1", tmp_path, clock=clock, spiffe_id=SpiffeId.for_gateway("cluster2")
        )
