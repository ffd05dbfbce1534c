"""The identity-source interface the gateway depends on (its SVID, the bundles it trusts,
change notification), and the bookkeeping both sources share."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from spire_integration.bundle import BundleSet
from spire_integration.errors import IdentityUnavailable
from spire_integration.svid import X509Svid

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BundleStatus:
    trust_domain: str
    sequence: int
    authorities: int
    fingerprint: str


@dataclass(frozen=True, slots=True)
class IdentityStatus:
    """What ``fedgw status`` shows about the identity."""

    kind: str
    description: str
    spiffe_id: str | None
    svid_not_after: datetime | None
    bundles: tuple[BundleStatus, ...]
    error: str | None


class IdentitySource(Protocol):
    """Where the gateway's X509-SVID and trust bundles come from.

    ``svid()`` and ``bundles()`` are cheap snapshots (call them per connection);
    ``version`` grows by one or more on every change of either, and subscribers are called
    on the event loop after each change (e.g. to rebuild TLS contexts).
    """

    @property
    def kind(self) -> str:
        """``builtin`` or ``spire``."""
        ...

    @property
    def description(self) -> str:
        """One line for status output: where the identity comes from."""
        ...

    @property
    def trust_domain(self) -> str: ...

    @property
    def version(self) -> int: ...

    def svid(self) -> X509Svid: ...

    def bundles(self) -> BundleSet: ...

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` after every change; return a function that unsubscribes."""
        ...

    async def wait_for_update(self, version: int) -> int:
        """Wait until ``self.version`` exceeds ``version``; return the new version."""
        ...

    def status(self) -> IdentityStatus: ...

    async def start(self) -> None:
        """Obtain the first SVID and bundles (raise if impossible), then keep them fresh."""
        ...

    async def stop(self) -> None: ...


class SourceState:
    """The current SVID and bundles of a source, with versioning and subscribers. Its
    methods run on the event loop thread only."""

    def __init__(self) -> None:
        self.svid: X509Svid | None = None
        self.bundles = BundleSet()
        self.version = 0
        self.error: str | None = None
        self._subscribers: list[Callable[[], None]] = []
        self._changed = asyncio.Event()

    def current_svid(self, what: str) -> X509Svid:
        if self.svid is None:
            raise IdentityUnavailable(f"{what} has no X509-SVID yet: {self.error or 'not started'}")
        return self.svid

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def notify(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()
        for callback in list(self._subscribers):
            try:
                callback()
            except Exception:
                # One broken subscriber must not keep the others on a stale identity.
                log.exception("identity subscriber %r failed", callback)

    async def wait_for_update(self, version: int) -> int:
        while self.version <= version:
            await self._changed.wait()
        return self.version

    def status(self, kind: str, description: str) -> IdentityStatus:
        return IdentityStatus(
            kind=kind,
            description=description,
            spiffe_id=str(self.svid.spiffe_id) if self.svid else None,
            svid_not_after=self.svid.not_after if self.svid else None,
            bundles=tuple(
                BundleStatus(b.trust_domain, b.sequence, len(b.x509_authorities), b.fingerprint())
                for b in self.bundles
            ),
            error=self.error,
        )
