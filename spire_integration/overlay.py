"""An identity source plus trust bundles learnt outside it (fedgw joins, static config),
so that federation works the same over the built-in CA and over SPIRE."""

from __future__ import annotations

from collections.abc import Callable

from spire_integration.bundle import BundleSet, TrustBundle
from spire_integration.errors import IdentityConfigInvalid
from spire_integration.source import BundleStatus, IdentitySource, IdentityStatus, SourceState
from spire_integration.svid import X509Svid


class FederatedIdentity:
    """``inner``'s SVID and bundles, plus bundles of other trust domains set here.

    For a trust domain that ``inner`` also provides (SPIRE federating with it), ``inner``
    wins: the identity provider's view of a domain is not overridden from outside.
    """

    def __init__(self, inner: IdentitySource) -> None:
        self.inner = inner
        self._extra = BundleSet()
        self._state = SourceState()  # our own version and subscribers
        self._unsubscribe: Callable[[], None] | None = None

    @property
    def kind(self) -> str:
        return self.inner.kind

    @property
    def description(self) -> str:
        return self.inner.description

    @property
    def trust_domain(self) -> str:
        return self.inner.trust_domain

    @property
    def version(self) -> int:
        return self._state.version

    def svid(self) -> X509Svid:
        return self.inner.svid()

    def bundles(self) -> BundleSet:
        merged = self.inner.bundles()
        for bundle in self._extra:
            if bundle.trust_domain not in merged:
                merged.replace(bundle)
        return merged

    def own_bundle(self) -> TrustBundle:
        bundle = self.inner.bundles().get(self.trust_domain)
        if bundle is None:
            raise IdentityConfigInvalid(f"{self.description} has no bundle of its own domain")
        return bundle

    def set_bundle(self, bundle: TrustBundle) -> bool:
        """Trust ``bundle`` for its domain (a lower sequence than held is refused);
        return whether anything changed."""
        if bundle.trust_domain == self.trust_domain:
            raise IdentityConfigInvalid(
                f"the bundle of {self.trust_domain!r} comes from {self.description}"
            )
        changed = self._extra.update(bundle)
        if changed:
            self._state.notify()
        return changed

    def remove_bundle(self, trust_domain: str) -> bool:
        removed = self._extra.remove(trust_domain)
        if removed:
            self._state.notify()
        return removed

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        return self._state.subscribe(callback)

    async def wait_for_update(self, version: int) -> int:
        return await self._state.wait_for_update(version)

    def status(self) -> IdentityStatus:
        status = self.inner.status()
        merged = {b.trust_domain: b for b in status.bundles}
        for b in self._extra:
            merged.setdefault(
                b.trust_domain,
                BundleStatus(b.trust_domain, b.sequence, len(b.x509_authorities), b.fingerprint()),
            )
        return IdentityStatus(
            kind=status.kind,
            description=status.description,
            spiffe_id=status.spiffe_id,
            svid_not_after=status.svid_not_after,
            bundles=tuple(merged[d] for d in sorted(merged)),
            error=status.error,
        )

    async def start(self) -> None:
        await self.inner.start()
        self._unsubscribe = self.inner.subscribe(self._state.notify)

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        await self.inner.stop()
