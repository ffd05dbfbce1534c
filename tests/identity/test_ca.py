"""The built-in CA: issuance, rotation without a gap, persistence across restarts."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509

from fedgw.clock import to_datetime
from spire_integration.bundle import BundleSet, TrustBundle
from spire_integration.ca import BUNDLE_FILE, STATE_FILE, BuiltinCA
from spire_integration.errors import CaStateInvalid, IdentityConfigInvalid, InvalidSpiffeId
from spire_integration.spiffe_id import SpiffeId
from spire_integration.svid import X509Svid, validate_svid
from tests.identity.conftest import FakeClock

CA_TTL = 1000.0
SVID_TTL = 100.0


def _ca(directory: Path, clock: FakeClock, **kwargs: float) -> BuiltinCA:
    return BuiltinCA(
        "cluster1",
        directory,
        clock=clock,
        ca_ttl=kwargs.get("ca_ttl", CA_TTL),
        svid_ttl=kwargs.get("svid_ttl", SVID_TTL),
    )


def _valid(svid: X509Svid, bundle: TrustBundle, clock: FakeClock) -> SpiffeId:
    return validate_svid(svid.chain, BundleSet([bundle]), to_datetime(clock.now()))


def test_new_ca_issues_gateway_svids(tmp_path: Path, clock: FakeClock) -> None:
    ca = _ca(tmp_path / "ca", clock)
    bundle = ca.bundle()
    assert bundle.sequence == 1
    assert len(bundle.x509_authorities) == 1
    assert bundle.refresh_hint is not None
    assert bundle.refresh_hint >= 1
    svid = ca.issue_svid()
    assert _valid(svid, bundle, clock) == SpiffeId.for_gateway("cluster1")
    life = svid.not_after.timestamp() - clock.now()
    assert SVID_TTL - 1 <= life <= SVID_TTL
    other = ca.issue_svid(SpiffeId.parse("spiffe://cluster1/ns/web"), ttl=30)
    assert str(other.spiffe_id) == "spiffe://cluster1/ns/web"
    assert other.not_after.timestamp() - clock.now() <= 30
    root = bundle.x509_authorities[0]
    constraints = root.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca
    with pytest.raises(InvalidSpiffeId, match="signs only its own trust domain"):
        ca.issue_svid(SpiffeId.for_gateway("cluster2"))
    with pytest.raises(InvalidSpiffeId, match="needs a path"):
        ca.issue_svid(SpiffeId.of_trust_domain("cluster1"))


def test_files_and_modes(tmp_path: Path, clock: FakeClock) -> None:
    directory = tmp_path / "state" / "identity"
    ca = _ca(directory, clock)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    keys = list(directory.glob("ca-*.key"))
    assert len(keys) == 1
    assert stat.S_IMODE(keys[0].stat().st_mode) == 0o600
    assert stat.S_IMODE((directory / STATE_FILE).stat().st_mode) == 0o600
    published = TrustBundle.parse("cluster1", (directory / BUNDLE_FILE).read_text())
    assert published == ca.bundle()


def _times(cert: x509.Certificate) -> tuple[float, float]:
    start = cert.not_valid_before_utc.timestamp()
    return start, cert.not_valid_after_utc.timestamp() - start


def test_rotation_timeline(tmp_path: Path, clock: FakeClock) -> None:
    ca = _ca(tmp_path, clock)
    first = ca.active_authority
    start, life = _times(first)
    clock.advance(start + life / 2 - clock.now() - 1)
    assert ca.maintain() is False
    assert ca.bundle().sequence == 1

    clock.advance(1)  # half life: the next CA is published, not used
    assert ca.maintain() is True
    bundle = ca.bundle()
    assert bundle.sequence == 2
    assert len(bundle.x509_authorities) == 2
    assert ca.active_authority == first
    (second,) = [a for a in bundle.x509_authorities if a != first]

    clock.advance(life / 4 - 1)  # just before three quarters: still the first CA signs
    old_svid = ca.issue_svid()
    assert old_svid.leaf.issuer == first.subject
    clock.advance(1)  # three quarters: the next CA signs
    assert ca.maintain() is True
    assert ca.active_authority == second
    assert ca.bundle().sequence == 3
    new_svid = ca.issue_svid()
    assert new_svid.leaf.issuer == second.subject
    # The old CA stays while the SVID it signed lives ...
    assert ca.bundle().x509_authorities == (first, second)
    assert _valid(old_svid, ca.bundle(), clock)
    clock.advance(old_svid.not_after.timestamp() - clock.now() - 0.5)
    assert ca.maintain() is False
    # ... and leaves when it has expired.
    clock.advance(1)
    assert ca.maintain() is True
    assert ca.bundle().x509_authorities == (second,)
    assert ca.bundle().sequence == 4
    assert _valid(new_svid, ca.bundle(), clock)


def test_activation_leaves_room_for_a_full_svid(tmp_path: Path, clock: FakeClock) -> None:
    """With a long SVID TTL the next CA activates before 3/4 of the life, so no SVID is
    ever cut short by the end of its CA."""
    ca = _ca(tmp_path, clock, ca_ttl=300, svid_ttl=100)
    issuers = set()
    for _ in range(100):
        clock.advance(7)
        svid = ca.issue_svid()
        issuer = next(a for a in ca.bundle().x509_authorities if a.subject == svid.leaf.issuer)
        issuers.add(issuer.serial_number)
        # X.509 times are whole seconds, hence the 1 s of slack.
        assert svid.not_after.timestamp() - clock.now() > 100 - 1
        assert svid.not_after <= issuer.not_valid_after_utc
    assert len(issuers) >= 3


def test_every_svid_validates_until_it_expires_through_many_rotations(
    tmp_path: Path, clock: FakeClock
) -> None:
    """A peer that fetches the bundle at every step never sees a live SVID fail, and every
    CA but the first was published a quarter of its life before it signed anything."""
    ca = _ca(tmp_path, clock)
    first_seen: dict[int, float] = {}
    first_authority = ca.active_authority.serial_number
    live: list[X509Svid] = []
    for _ in range(600):  # 6000 s: six CA lifetimes
        clock.advance(10)
        ca.maintain()
        bundle = ca.bundle()
        assert len(bundle.x509_authorities) <= 3
        for authority in bundle.x509_authorities:
            first_seen.setdefault(authority.serial_number, clock.now())
        if not live or clock.now() >= live[-1].not_before.timestamp() + SVID_TTL / 2:
            svid = ca.issue_svid()
            issuer = next(a for a in bundle.x509_authorities if a.subject == svid.leaf.issuer)
            if issuer.serial_number != first_authority:
                assert clock.now() - first_seen[issuer.serial_number] >= CA_TTL / 4 - 10
            live.append(svid)
        live = [s for s in live if s.not_after.timestamp() > clock.now()]
        for svid in live:
            assert _valid(svid, bundle, clock) == SpiffeId.for_gateway("cluster1")
    assert len(first_seen) >= 10
    assert ca.bundle().sequence >= 20


def test_restart_continues_the_same_ca_and_bundle(tmp_path: Path, clock: FakeClock) -> None:
    ca = _ca(tmp_path, clock)
    start, life = _times(ca.active_authority)
    clock.advance(start + 0.75 * life - clock.now() - 5)
    ca.maintain()
    svid = ca.issue_svid()  # the last SVID of the first CA
    before = ca.bundle()
    assert len(before.x509_authorities) == 2

    again = _ca(tmp_path, clock)
    assert again.bundle() == before
    assert again.active_authority == ca.active_authority
    assert _valid(svid, again.bundle(), clock)
    clock.advance(10)
    assert again.maintain() is True  # activation of the next CA
    assert again.bundle().sequence == before.sequence + 1
    # The restarted CA remembers what the old one signed: the old CA stays until then.
    assert svid.leaf.issuer in [a.subject for a in again.bundle().x509_authorities]
    assert _valid(svid, again.bundle(), clock)
    clock.advance(svid.not_after.timestamp() - clock.now() + 1)
    again.maintain()
    assert svid.leaf.issuer not in [a.subject for a in again.bundle().x509_authorities]
    # Retired keys are deleted from the directory.
    assert len(list(tmp_path.glob("ca-*.key"))) == len(again.bundle().x509_authorities) == 1


def test_restart_after_a_long_downtime_starts_a_fresh_ca(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    ca = _ca(tmp_path, clock)
    old = ca.bundle()
    clock.advance(10 * CA_TTL)
    with caplog.at_level(logging.INFO):
        again = _ca(tmp_path, clock)
    bundle = again.bundle()
    assert bundle.sequence > old.sequence
    assert len(bundle.x509_authorities) == 1
    assert bundle.x509_authorities[0] not in old.x509_authorities
    assert _valid(again.issue_svid(), bundle, clock)


def test_key_readable_by_others_is_refused(tmp_path: Path, clock: FakeClock) -> None:
    _ca(tmp_path, clock)
    (key,) = tmp_path.glob("ca-*.key")
    os.chmod(key, 0o644)
    with pytest.raises(CaStateInvalid, match=r"has mode 0644; .*chmod 600"):
        _ca(tmp_path, clock)


def test_state_of_another_domain_is_refused(tmp_path: Path, clock: FakeClock) -> None:
    _ca(tmp_path, clock)
    with pytest.raises(CaStateInvalid, match="belongs to trust domain 'cluster1', not 'cluster2'"):
        BuiltinCA("cluster2", tmp_path, clock=clock)


@pytest.mark.parametrize(
    "content", ["not json", "[]", '{"format": 1}', '{"format": 2, "trust_domain": "cluster1"}']
)
def test_corrupt_state_is_refused(tmp_path: Path, clock: FakeClock, content: str) -> None:
    _ca(tmp_path, clock)
    (tmp_path / STATE_FILE).write_text(content)
    with pytest.raises(CaStateInvalid):
        _ca(tmp_path, clock)


def test_missing_key_file_is_refused(tmp_path: Path, clock: FakeClock) -> None:
    _ca(tmp_path, clock)
    state = json.loads((tmp_path / STATE_FILE).read_text())
    (tmp_path / f"ca-{state['authorities'][0]['id']}.key").unlink()
    with pytest.raises(CaStateInvalid, match="cannot be read"):
        _ca(tmp_path, clock)


def test_ttls_must_allow_rotation(tmp_path: Path, clock: FakeClock) -> None:
    with pytest.raises(IdentityConfigInvalid, match="at least three times the SVID TTL"):
        _ca(tmp_path, clock, ca_ttl=200, svid_ttl=100)
    with pytest.raises(IdentityConfigInvalid, match="too short"):
        _ca(tmp_path, clock, svid_ttl=0.5)
