"""Where is the gateway of domain D? The peer table first; else DNS SRV
``_fedgw._tcp.<D>``, but only for a domain whose trust bundle is known (a federated
domain): DNS may say where a gateway is, never whom to trust."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

from federation.errors import PeerUnreachable, UnknownDomain

SRV_SERVICE = "_fedgw._tcp"


@dataclass(frozen=True)
class Resolved:
    domain: str
    url: str
    source: Literal["peer table", "dns srv"]


class DomainResolver:
    """``lookup_peer(domain)`` gives a peer's federation URL if it is in the peer table;
    ``is_federated(domain)`` says whether its trust bundle is known."""

    def __init__(
        self,
        lookup_peer: Callable[[str], str | None],
        is_federated: Callable[[str], bool],
        *,
        nameserver: tuple[str, int] | None = None,
        timeout: float = 3.0,
    ) -> None:
        self._lookup_peer = lookup_peer
        self._is_federated = is_federated
        self._resolver = dns.asyncresolver.Resolver(configure=nameserver is None)
        if nameserver is not None:
            self._resolver.nameservers = [nameserver[0]]
            self._resolver.port = nameserver[1]
        self._resolver.lifetime = timeout

    async def resolve(self, domain: str) -> Resolved:
        url = self._lookup_peer(domain)
        if url is not None:
            return Resolved(domain, url, "peer table")
        if not self._is_federated(domain):
            raise UnknownDomain(
                f"domain {domain!r} is not federated with this gateway "
                f"(join it with a token from its gateway: fedgw join TOKEN)"
            )
        return Resolved(domain, await self._srv(domain), "dns srv")

    async def _srv(self, domain: str) -> str:
        name = f"{SRV_SERVICE}.{domain}"
        try:
            answer = await self._resolver.resolve(name, dns.rdatatype.SRV)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            raise UnknownDomain(
                f"domain {domain!r} is federated but has no gateway address: "
                f"no peer entry and no DNS SRV record {name}"
            ) from None
        except dns.exception.DNSException as exc:
            raise PeerUnreachable(f"DNS lookup of {name} failed: {exc}") from exc
        records = [(r.priority, r.weight, str(r.target).rstrip("."), r.port) for r in answer]
        target, port = _pick(records)
        host = await self._address(target)
        return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"

    async def _address(self, host: str) -> str:
        """The target's address, from the same resolver as the SRV record."""
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            try:
                answer = await self._resolver.resolve(host, rdtype)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except dns.exception.DNSException as exc:
                raise PeerUnreachable(f"DNS lookup of {host} failed: {exc}") from exc
            return str(next(iter(answer)))
        raise UnknownDomain(f"the SRV target {host} of a fedgw gateway has no address")


def _pick(records: list[tuple[int, int, str, int]]) -> tuple[str, int]:
    """RFC 2782: the lowest priority; within it, a random pick weighted by weight."""
    best = min(r[0] for r in records)
    candidates = [r for r in records if r[0] == best]
    total = sum(r[1] for r in candidates)
    if total == 0:
        chosen = random.choice(candidates)  # noqa: S311 - load spreading, not secrecy
    else:
        point = random.uniform(0, total)  # noqa: S311
        for chosen in candidates:
            point -= chosen[1]
            if point <= 0:
                break
    return chosen[2], chosen[3]
