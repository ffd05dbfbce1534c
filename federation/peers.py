"""The peer table: the domains this gateway federates with, stored, and their trust
bundles handed to the identity so that TLS trusts them (and stops when they go)."""

from __future__ import annotations

import asyncio
import logging

from federation.errors import AlreadyFederated, UnknownDomain
from federation.models import PeerInfo, PeerRecord
from fedgw.clock import Clock, to_datetime
from fedgw.store import ABSENT, Collection, Store, StoreConflict
from spire_integration import FederatedIdentity, TrustBundle
from spire_integration.errors import IdentityError

log = logging.getLogger(__name__)


CONTACT_SAVED_EVERY = 60.0
"""Seconds a peer's last successful contact may be ahead of the stored one."""


class PeerTable:
    KIND = "peers"

    def __init__(self, store: Store, identity: FederatedIdentity, clock: Clock) -> None:
        self._records = Collection(store, self.KIND, PeerRecord)
        self._identity = identity
        self._clock = clock
        self._peers: dict[str, PeerRecord] = {}
        self._saved_contact: dict[str, float] = {}  # when a contact was last stored
        self.changed = asyncio.Event()
        """Set when a peer is added or removed (the bundle refresher waits on it)."""

    async def load(self) -> None:
        for record in await self._records.all():
            self._peers[record.domain] = record
            try:
                self._identity.set_bundle(TrustBundle.parse(record.domain, record.bundle))
            except IdentityError as exc:
                # Keep the record (nothing is dropped); calls to that peer will fail.
                log.error("stored bundle of peer %s is unusable: %s", record.domain, exc)

    def get(self, domain: str) -> PeerRecord | None:
        return self._peers.get(domain)

    def require(self, domain: str) -> PeerRecord:
        peer = self._peers.get(domain)
        if peer is None:
            raise UnknownDomain(f"{domain!r} is not a peer of this gateway")
        return peer

    def url(self, domain: str) -> str | None:
        peer = self._peers.get(domain)
        return peer.url if peer else None

    def all(self) -> list[PeerRecord]:
        return [self._peers[d] for d in sorted(self._peers)]

    def info(self, record: PeerRecord) -> PeerInfo:
        bundle = self._identity.bundles().get(record.domain)
        return PeerInfo(
            domain=record.domain,
            url=record.url,
            bundle_url=record.bundle_url,
            bundle_fingerprint=bundle.fingerprint() if bundle else "-",
            bundle_sequence=bundle.sequence if bundle else 0,
            joined_at=record.joined_at,
            joined_via=record.joined_via,
            last_bundle_refresh=record.last_bundle_refresh,
            last_contact=record.last_contact,
            state=record.state,
            last_error=record.last_error,
        )

    async def add(self, record: PeerRecord, bundle: TrustBundle) -> None:
        """A new peer; its bundle is trusted from now on."""
        if record.domain in self._peers:
            raise AlreadyFederated(f"already federated with {record.domain}")
        try:
            await self._records.put(record.domain, record, expect=ABSENT)
        except StoreConflict:
            raise AlreadyFederated(f"already federated with {record.domain}") from None
        self._peers[record.domain] = record
        self._identity.set_bundle(bundle)
        self.changed.set()

    async def update(self, record: PeerRecord) -> bool:
        """Store a changed record of a peer; False (nothing written) if it is no longer a
        peer: an update that raced a leave must not bring it back."""
        if record.domain not in self._peers:
            return False
        self._peers[record.domain] = record
        await self._records.put(record.domain, record)
        return True

    async def set_bundle(self, domain: str, bundle: TrustBundle) -> bool:
        """A refreshed bundle of a peer; False (and nothing stored) if it is not newer."""
        record = self.require(domain)
        if not self._identity.set_bundle(bundle):
            return False
        await self.update(record.model_copy(update={"bundle": bundle.to_json()}))
        return True

    async def remove(self, domain: str) -> PeerRecord:
        record = self.require(domain)
        await self._records.delete(domain)
        del self._peers[domain]
        self._saved_contact.pop(domain, None)
        self._identity.remove_bundle(domain)
        self.changed.set()
        return record

    async def contacted(self, domain: str, error: str | None = None) -> None:
        """Record the outcome of a call to ``domain``.

        A change of state is stored at once. A later contact in the same state is only
        shown (``fedgw peers``) and stored every :data:`CONTACT_SAVED_EVERY` seconds:
        each call to a peer ends here, connection offers included, and a store commit
        of the whole record (its bundle with it) would sit on their path."""
        record = self._peers.get(domain)
        if record is None:
            return
        now = self._clock.now()
        if error is None:
            update = {"last_contact": to_datetime(now), "state": "active", "last_error": None}
        else:
            update = {"state": "unreachable", "last_error": error}
        changed = record.model_copy(update=update)
        if changed == record:
            return
        same_state = (changed.state, changed.last_error) == (record.state, record.last_error)
        saved = self._saved_contact.get(domain, float("-inf"))
        if same_state and now - saved < CONTACT_SAVED_EVERY:
            self._peers[domain] = changed
            return
        self._saved_contact[domain] = now
        await self.update(changed)
