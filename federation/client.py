"""Calls to peer gateways over mutual TLS.

One httpx client per peer domain, whose TLS context trusts only that domain's bundle
and accepts only ``spiffe://<domain>/fedgw/gateway`` on the other end (that check
replaces the host name check); it presents this gateway's current SVID and follows
rotation by itself. Transport failures become :class:`PeerUnreachable`; error answers
become the fedgw error they stand for, with the peer's message.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import httpx

from federation.errors import BadPeerAnswer, PeerUnreachable
from fedgw.http import error_from_response
from spire_integration import IdentitySource, PeerClientContext, SpiffeId
from spire_integration.errors import IdentityError


class FederationClient:
    def __init__(self, identity: IdentitySource, *, timeout: float = 10.0) -> None:
        self._identity = identity
        self._timeout = timeout
        self._clients: dict[str, httpx.AsyncClient] = {}

    def _client(self, domain: str) -> httpx.AsyncClient:
        client = self._clients.get(domain)
        if client is None:
            context = PeerClientContext(self._identity, domain, SpiffeId.for_gateway(domain))
            client = httpx.AsyncClient(verify=context, timeout=self._timeout)
            self._clients[domain] = client
        return client

    async def request(
        self,
        domain: str,
        url: str,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Any = None,
    ) -> Any:
        """``method path`` on the federation API of ``domain`` at ``url``; the JSON answer.

        Every call of the federation API is idempotent, so one that failed in transport
        (a kept-alive connection the peer had just closed, a reset under load) is tried
        once more on a fresh connection before it counts as a failure.
        """
        for attempt in (1, 2):
            try:
                response = await self._client(domain).request(
                    method, url.rstrip("/") + path, json=json, params=params
                )
                break
            except httpx.TimeoutException as exc:
                raise PeerUnreachable(f"{domain} at {url}: {_reason(exc)}") from exc
            except httpx.TransportError as exc:
                if attempt == 2 or _is_verification(exc):
                    raise PeerUnreachable(f"{domain} at {url}: {_reason(exc)}") from exc
                await asyncio.sleep(0.1)
            except httpx.HTTPError as exc:
                raise PeerUnreachable(f"{domain} at {url}: {_reason(exc)}") from exc
            except IdentityError as exc:  # no bundle for the domain, no SVID yet
                raise PeerUnreachable(f"{domain} at {url}: {exc}") from exc
        if response.status_code >= 400:
            raise error_from_response(response.status_code, response.text, source=domain)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise BadPeerAnswer(f"{domain} at {url} answered with something not JSON") from None

    async def forget(self, domain: str) -> None:
        """Drop the connections to ``domain`` (it left, or its bundle changed for good)."""
        client = self._clients.pop(domain, None)
        if client is not None:
            await client.aclose()

    async def close(self) -> None:
        for domain in list(self._clients):
            await self.forget(domain)


def _is_verification(exc: BaseException) -> bool:
    """A TLS verification failure: trying again cannot help."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _reason(exc: BaseException) -> str:
    """The most telling cause: a TLS verification failure says more than "connect error"."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"TLS verification failed: {seen.verify_message or seen}"
        if isinstance(seen, ssl.SSLError):
            return f"TLS failed: {seen.reason or seen}"
        seen = seen.__cause__ or seen.__context__
    return str(exc) or type(exc).__name__
