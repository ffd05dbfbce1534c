"""The embedded identity source: a :class:`BuiltinCA` in the gateway's state directory,
an SVID renewed at half its life, and the federated bundles the caller hands in."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from fedgw.clock import Clock, SystemClock
from spire_integration.bundle import BundleSet, TrustBundle
from spire_integration.ca import DEFAULT_CA_TTL, DEFAULT_SVID_TTL, BuiltinCA
from spire_integration.errors import IdentityConfigInvalid, IdentityUnavailable
from spire_integration.source import IdentityStatus, SourceState
from spire_integration.spiffe_id import SpiffeId, check_trust_domain
from spire_integration.svid import X509Svid

log = logging.getLogger(__name__)

_MIN_SLEEP = 0.01
_RETRY_AFTER = 1.0


class BuiltinIdentitySource:
    """An :class:`~spire_integration.source.IdentitySource` backed by a built-in CA.

    ``max_sleep`` bounds how long the background task sleeps between checks, so that a
    wall-clock jump (suspend, NTP step) or a test's hand-driven clock is noticed.
    """

    kind = "builtin"

    def __init__(
        self,
        domain: str,
        directory: Path,
        *,
        clock: Clock | None = None,
        svid_ttl: float = DEFAULT_SVID_TTL,
        ca_ttl: float = DEFAULT_CA_TTL,
        spiffe_id: SpiffeId | None = None,
        max_sleep: float = 30.0,
    ) -> None:
        self._domain = check_trust_domain(domain)
        self._spiffe_id = spiffe_id or SpiffeId.for_gateway(domain)
        if not self._spiffe_id.member_of(domain):
            raise IdentityConfigInvalid(
                f"SPIFFE ID {self._spiffe_id} is not in trust domain {domain!r}"
            )
        self._directory = directory
        self._clock: Clock = clock or SystemClock()
        self._svid_ttl = svid_ttl
        self._ca_ttl = ca_ttl
        self._max_sleep = max_sleep
        self._ca: BuiltinCA | None = None
        self._state = SourceState()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    # --- IdentitySource --------------------------------------------------------------

    @property
    def description(self) -> str:
        return f"built-in CA of {self._domain} in {self._directory}"

    @property
    def trust_domain(self) -> str:
        return self._domain

    @property
    def version(self) -> int:
        return self._state.version

    def svid(self) -> X509Svid:
        return self._state.current_svid(self.description)

    def bundles(self) -> BundleSet:
        return self._state.bundles.copy()

    def own_bundle(self) -> TrustBundle:
        """The bundle this domain publishes (its bundle endpoint serves this)."""
        bundle = self._state.bundles.get(self._domain)
        if bundle is None:
            raise IdentityUnavailable(f"{self.description} is not started")
        return bundle

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        return self._state.subscribe(callback)

    async def wait_for_update(self, version: int) -> int:
        return await self._state.wait_for_update(version)

    def status(self) -> IdentityStatus:
        return self._state.status(self.kind, self.description)

    async def start(self) -> None:
        if self._task is not None:
            return
        self._ca = await asyncio.to_thread(
            BuiltinCA,
            self._domain,
            self._directory,
            clock=self._clock,
            ca_ttl=self._ca_ttl,
            svid_ttl=self._svid_ttl,
        )
        await self.refresh()
        self._task = asyncio.create_task(self._run(), name=f"identity-builtin-{self._domain}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # --- federated bundles -----------------------------------------------------------

    def set_federated_bundle(self, bundle: TrustBundle) -> bool:
        """Add or replace the bundle of a federated trust domain (a lower sequence than the
        one held is refused); return whether anything changed."""
        if bundle.trust_domain == self._domain:
            raise IdentityConfigInvalid(
                f"the bundle of {self._domain!r} is managed by its built-in CA and cannot be set"
            )
        changed = self._state.bundles.update(bundle)
        if changed:
            self._state.notify()
        return changed

    def remove_federated_bundle(self, trust_domain: str) -> bool:
        if trust_domain == self._domain:
            raise IdentityConfigInvalid(f"the bundle of {self._domain!r} cannot be removed")
        removed = self._state.bundles.remove(trust_domain)
        if removed:
            self._state.notify()
        return removed

    # --- renewal and rotation --------------------------------------------------------

    async def refresh(self) -> bool:
        """Rotate the CA and renew the SVID if they are due; return whether either changed.
        The background task calls this on time; tests call it after moving their clock."""
        ca = self._ca
        if ca is None:
            raise IdentityUnavailable(f"{self.description} is not started")
        async with self._lock:
            await asyncio.to_thread(ca.maintain)
            svid = self._state.svid
            renew = svid is None or self._clock.now() >= self._renew_at(svid)
            if renew:
                svid = await asyncio.to_thread(ca.issue_svid, self._spiffe_id)
                self._state.svid = svid
                self._state.error = None
            # Compare rather than trust maintain()'s answer: issuing may rotate as well.
            own = ca.bundle()
            bundle_changed = self._state.bundles.get(self._domain) != own
            if bundle_changed:
                self._state.bundles.replace(own)
            if renew or bundle_changed:
                self._state.notify()
            return renew or bundle_changed

    @staticmethod
    def _renew_at(svid: X509Svid) -> float:
        start, end = svid.not_before.timestamp(), svid.not_after.timestamp()
        return start + (end - start) / 2

    def _next_wake(self) -> float:
        assert self._ca is not None
        wake = self._ca.next_event_at()
        if self._state.svid is not None:
            wake = min(wake, self._renew_at(self._state.svid))
        return wake

    async def _run(self) -> None:
        while True:
            delay = min(max(self._next_wake() - self._clock.now(), _MIN_SLEEP), self._max_sleep)
            await asyncio.sleep(delay)
            try:
                await self.refresh()
            except Exception as exc:
                # Keep the current SVID (it is still valid for half its life) and retry.
                self._state.error = str(exc)
                log.exception("identity refresh of %s failed; retrying", self._domain)
                await asyncio.sleep(_RETRY_AFTER)
