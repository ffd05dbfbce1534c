"""Federation as the gateway runs it: tokens, join (both sides), leave, calls to peers,
and the refresh of peers' bundles at their refresh hint."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from federation.batches import offer_outcomes, send_closes
from federation.client import FederationClient
from federation.errors import AlreadyFederated, PeerUnreachable
from federation.join import build_request, fetch_pinned_bundle, send_join, verify_request
from federation.models import (
    MAX_CLOSES,
    MAX_OFFERS,
    ConnectionGrant,
    ConnectionOffer,
    ConnectionOffers,
    JoinRequest,
    JoinResponse,
    OfferResults,
    PeerInfo,
    PeerRecord,
    TokenCreate,
    TokenCreated,
    parse_answer,
)
from federation.peers import PeerTable
from federation.resolve import DomainResolver
from federation.tokens import FederationToken, TokenInfo, TokenIssuer
from fedgw.batches import Batcher
from fedgw.clock import Clock, to_datetime
from fedgw.errors import FedgwError, InvalidInput
from fedgw.store import Store
from spire_integration import FederatedIdentity, SpiffeId, TrustBundle, client_context
from spire_integration.errors import IdentityError

log = logging.getLogger(__name__)

CLOSE_CALLS = 4
"""Close calls out to one peer at once: a close mostly waits for the peer's kernel to
delete a veth pair (20-30 ms), so the next batch need not wait for the previous one."""


@dataclass(frozen=True)
class FederationSettings:
    domain: str
    url: str | None = None
    """this gateway's federation API, as peers reach it"""
    bundle_url: str | None = None
    """this gateway's bundle endpoint, as peers reach it"""
    bundle_refresh: float = 300.0
    """how often peers' bundles are fetched when their bundle gives no refresh hint"""
    dns_server: tuple[str, int] | None = None
    """DNS server for SRV lookups (the system's resolver when None)"""
    timeout: float = 10.0
    """for each call to a peer"""


class Federation:
    def __init__(
        self,
        settings: FederationSettings,
        store: Store,
        identity: FederatedIdentity,
        client: FederationClient,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self.identity = identity
        self.client = client
        self.clock = clock
        self.tokens = TokenIssuer(store, clock)
        self.peers = PeerTable(store, identity, clock)
        self.offers = Batcher(self._send_offers, MAX_OFFERS)
        self.closes = Batcher(self._send_closes, MAX_CLOSES, calls=CLOSE_CALLS)
        self.peer_removed: list[Callable[[str], Awaitable[None]]] = []
        """Called with the domain after a peer is forgotten (its connections close)."""
        self.resolver = DomainResolver(
            self.peers.url,
            lambda domain: domain in identity.bundles(),
            nameserver=settings.dns_server,
            timeout=settings.timeout,
        )

    async def load(self) -> None:
        await self.peers.load()

    # --- tokens --------------------------------------------------------------------------

    async def create_token(self, request: TokenCreate) -> TokenCreated:
        s = self.settings
        if s.url is None or s.bundle_url is None:
            raise InvalidInput(
                "this gateway cannot issue tokens: it needs a federation API (--listen), a "
                "bundle endpoint (--bundle-listen) and an address peers reach it at "
                "(--advertise, when those listen on a wildcard address)"
            )
        token, info = await self.tokens.create(
            domain=s.domain,
            urls=[s.url],
            bundle_urls=[s.bundle_url],
            pins=sorted(self.identity.own_bundle().pins()),
            ttl=request.ttl,
            uses=request.uses,
            description=request.description,
        )
        log.info("token %s created (%s, %d use(s))", token.id, info.expires_at, info.uses)
        return TokenCreated(
            token=token.encode(), id=token.id, expires_at=info.expires_at, uses=info.uses
        )

    async def list_tokens(self) -> list[TokenInfo]:
        return await self.tokens.list()

    async def revoke_token(self, token_id: str) -> TokenInfo:
        info = await self.tokens.revoke(token_id)
        log.info("token %s revoked", token_id)
        return info

    # --- join --------------------------------------------------------------------------

    async def join(self, token_text: str) -> PeerInfo:
        """Join the domain that issued the token (this side is the joiner)."""
        token = FederationToken.parse(token_text)
        s = self.settings
        if token.domain == s.domain:
            raise InvalidInput(f"this token was issued by {s.domain} itself")
        existing = self.peers.get(token.domain)
        if existing is not None:
            raise AlreadyFederated(
                f"already federated with {token.domain} (since {existing.joined_at:%Y-%m-%d %H:%M} "
                f"UTC); to join again, `fedgw leave {token.domain}` first"
            )
        log.info("joining %s with token %s", token.domain, token.id)
        bundle = await fetch_pinned_bundle(
            token.domain, token.bundle_urls[0], token.pins, http_timeout=s.timeout
        )
        request = build_request(
            token.domain,
            self.identity.svid(),
            token_id=token.id,
            secret=token.secret,
            domain=s.domain,
            url=s.url,
            bundle_url=s.bundle_url,
            bundle=self.identity.own_bundle(),
            now=self.clock.now(),
        )
        answer = await send_join(
            token.domain, token.bundle_urls[0], bundle, request, http_timeout=s.timeout
        )
        if answer.domain != token.domain:
            raise PeerUnreachable(
                f"{token.bundle_urls[0]} answered as {answer.domain}, not {token.domain}"
            )
        bundle = self._newer(bundle, answer)
        now = to_datetime(self.clock.now())
        record = PeerRecord(
            domain=token.domain,
            url=answer.url or token.urls[0],
            bundle_url=answer.bundle_url or token.bundle_urls[0],
            bundle=bundle.to_json(),
            joined_at=now,
            joined_via=f"we joined with token {token.id}",
            last_bundle_refresh=now,
            last_contact=now,
        )
        await self.peers.add(record, bundle)
        log.info("joined %s; it is a peer now", token.domain)
        return self.peers.info(record)

    @staticmethod
    def _newer(pinned: TrustBundle, answer: JoinResponse) -> TrustBundle:
        """The issuer's bundle from its answer if that is newer and keeps a pinned root."""
        try:
            answered = TrustBundle.parse(answer.domain, answer.bundle)
        except IdentityError:
            return pinned
        keeps_root = bool(answered.pins() & pinned.pins())
        return answered if keeps_root and answered.sequence > pinned.sequence else pinned

    async def accept_join(self, request: JoinRequest) -> JoinResponse:
        """A domain joins this one (this side issued the token)."""
        s = self.settings
        bundle = verify_request(s.domain, request, self.clock.now())
        via = f"joined us with token {request.token_id}"
        existing = self.peers.get(request.domain)
        if existing is not None:
            same_bundle = existing.bundle and bundle.fingerprint() == _fingerprint(existing)
            if existing.joined_via == via and same_bundle:
                return self._join_answer()  # the joiner retries after a lost answer
            raise AlreadyFederated(
                f"{request.domain} is already federated with {s.domain}; "
                f"it must `fedgw leave {s.domain}` on both sides first"
            )
        await self.tokens.claim(request.token_id, request.secret, request.domain)
        try:
            return await self._add_joiner(request, bundle, via)
        except AlreadyFederated:
            # Another join of the same domain won meanwhile: this one used nothing.
            await self.tokens.refund(request.token_id, request.domain)
            raise

    async def _add_joiner(
        self, request: JoinRequest, bundle: TrustBundle, via: str
    ) -> JoinResponse:
        now = to_datetime(self.clock.now())
        record = PeerRecord(
            domain=request.domain,
            url=request.url,
            bundle_url=request.bundle_url,
            bundle=bundle.to_json(),
            joined_at=now,
            joined_via=via,
            last_bundle_refresh=now,
        )
        await self.peers.add(record, bundle)
        log.info("%s joined with token %s", request.domain, request.token_id)
        return self._join_answer()

    def _join_answer(self) -> JoinResponse:
        s = self.settings
        return JoinResponse(
            domain=s.domain,
            url=s.url,
            bundle_url=s.bundle_url,
            bundle=self.identity.own_bundle().to_json(),
        )

    # --- leave ---------------------------------------------------------------------------

    async def leave(self, domain: str) -> tuple[PeerInfo, str | None]:
        """Forget ``domain``, after telling it to forget us; the second value says why it
        could not be told, if it could not."""
        record = self.peers.require(domain)
        info = self.peers.info(record)
        told: str | None = None
        try:
            await self.call(domain, "DELETE", f"/federation/v1/peers/{self.settings.domain}")
        except FedgwError as exc:
            told = str(exc)
            log.warning("leaving %s without telling it: %s", domain, exc)
        await self._forget(domain)
        return info, told

    async def peer_left(self, domain: str) -> None:
        """``domain`` tells us it leaves (over mTLS, authenticated as its gateway)."""
        await self._forget(domain)

    async def _forget(self, domain: str) -> None:
        await self.peers.remove(domain)
        await self.client.forget(domain)
        for hook in self.peer_removed:
            await hook(domain)
        log.info("no longer federated with %s", domain)

    # --- calls ---------------------------------------------------------------------------

    async def offer(self, domain: str, offer: ConnectionOffer) -> ConnectionGrant:
        """Ask ``domain`` for a connection (batched with other offers to it, see
        :mod:`federation.batches`); its grant, or the error it refused the offer with."""
        return await self.offers.submit(domain, offer)

    async def _send_offers(
        self, domain: str, offers: list[ConnectionOffer]
    ) -> list[ConnectionGrant | Exception]:
        body = ConnectionOffers(offers=offers).model_dump(mode="json")
        answer = await self.call(domain, "POST", "/federation/v1/connections", json=body)
        return offer_outcomes(domain, offers, parse_answer(OfferResults, answer, domain))

    async def close_connection(self, domain: str, connection_id: str) -> None:
        """Tell ``domain`` that its side of a client's connection closes (batched with
        other closes to it); NotFound if it has no such connection."""
        await self.closes.submit(domain, connection_id)

    async def _send_closes(self, domain: str, ids: list[str]) -> list[Exception | None]:
        return await send_closes(self.call, domain, ids)

    async def call(self, domain: str, method: str, path: str, **kwargs: Any) -> Any:
        """A call to ``domain``'s federation API (resolved through the peer table or DNS)."""
        resolved = await self.resolver.resolve(domain)
        try:
            result = await self.client.request(domain, resolved.url, method, path, **kwargs)
        except PeerUnreachable as exc:
            await self.peers.contacted(domain, str(exc))
            raise
        await self.peers.contacted(domain)
        return result

    # --- bundle refresh --------------------------------------------------------------------

    async def refresh_bundle(self, domain: str) -> bool:
        """Fetch ``domain``'s bundle from its bundle endpoint over TLS verified by the
        bundle we hold (the https_spiffe profile); keep ours if that fails."""
        record = self.peers.require(domain)
        current = self.identity.bundles().get(domain)
        if record.bundle_url is None or current is None:
            return False
        context = client_context(None, current, SpiffeId.for_gateway(domain))
        try:
            async with httpx.AsyncClient(verify=context, timeout=self.settings.timeout) as http:
                response = await http.get(record.bundle_url.rstrip("/") + "/")
            response.raise_for_status()
            fetched = TrustBundle.parse(domain, response.content)
        except (httpx.HTTPError, IdentityError) as exc:
            error = f"bundle refresh from {record.bundle_url} failed: {exc}"
            current_record = self.peers.get(domain)  # it may have left meanwhile
            if current_record is not None:
                await self.peers.update(current_record.model_copy(update={"last_error": error}))
            log.warning("%s (keeping the last good bundle)", error)
            return False
        if self.peers.get(domain) is None:
            return False  # it left while we fetched
        changed = await self.peers.set_bundle(domain, fetched)
        record = self.peers.require(domain)
        await self.peers.update(
            record.model_copy(
                update={"last_bundle_refresh": to_datetime(self.clock.now()), "last_error": None}
            )
        )
        if changed:
            log.info("bundle of %s refreshed (sequence %d)", domain, fetched.sequence)
        return changed

    def _refresh_interval(self, domain: str) -> float:
        bundle = self.identity.bundles().get(domain)
        hint = bundle.refresh_hint if bundle is not None else None
        return float(hint) if hint else self.settings.bundle_refresh

    async def run(self) -> None:
        """Refresh each peer's bundle at its refresh hint, until cancelled. A new peer is
        scheduled at once: a peer whose CA rotates must be followed from the start."""
        due: dict[str, float] = {}
        while True:
            self.peers.changed.clear()
            now = self.clock.now()
            current = {record.domain for record in self.peers.all()}
            for domain in current - due.keys():
                due[domain] = now + self._refresh_interval(domain)
            for domain in due.keys() - current:
                del due[domain]
            for domain, at in sorted(due.items(), key=lambda item: item[1]):
                if at > now:
                    continue
                try:
                    await self.refresh_bundle(domain)
                except Exception:
                    log.exception("bundle refresh of %s failed", domain)
                due[domain] = self.clock.now() + self._refresh_interval(domain)
            wait = min(due.values(), default=now + self.settings.bundle_refresh) - self.clock.now()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.peers.changed.wait(), max(wait, 0.01))


def _fingerprint(record: PeerRecord) -> str:
    try:
        return TrustBundle.parse(record.domain, record.bundle).fingerprint()
    except IdentityError:
        return ""
