"""Who may call the federation API: every request carries the SPIFFE ID its TLS
handshake verified; routes allow peer gateways, or an explicit allow-list of SPIFFE IDs
and trust domains. A refusal is a 403 whose body says who was refused and why."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from fedgw.errors import PermissionDenied
from gateway.api.deps import GatewayDep
from spire_integration import SpiffeId
from spire_integration.asgi import STATE_KEY

GATEWAY_PATH = "/fedgw/gateway"


def caller(request: Request) -> SpiffeId:
    spiffe_id = getattr(request.state, STATE_KEY, None)
    if not isinstance(spiffe_id, SpiffeId):
        raise PermissionDenied("this API needs a client certificate (an X509-SVID)")
    return spiffe_id


@dataclass(frozen=True)
class Allow:
    """An allow-list: exact SPIFFE IDs, whole trust domains, and/or the gateways of the
    domains this gateway federates with (``peer_gateways``).

    Federated means: this gateway holds the domain's trust bundle, whether from a join,
    static config or SPIRE's own federation. Trusting a domain's bundle is the decision
    to federate with it; SPIRE-federated domains have no fedgw peer entry, yet their
    gateways are peers all the same.
    """

    ids: frozenset[str] = field(default_factory=frozenset)
    domains: frozenset[str] = field(default_factory=frozenset)
    peer_gateways: bool = False

    def check(self, spiffe_id: SpiffeId, own_domain: str, federated: set[str]) -> None:
        if str(spiffe_id) in self.ids or spiffe_id.trust_domain in self.domains:
            return
        if self.peer_gateways:
            td = spiffe_id.trust_domain
            if td == own_domain:
                raise PermissionDenied(f"{spiffe_id} is of this gateway's own domain, not a peer")
            if td not in federated:
                raise PermissionDenied(
                    f"{spiffe_id}: domain {td!r} is not federated with {own_domain}"
                )
            if spiffe_id.path == GATEWAY_PATH:
                return
            raise PermissionDenied(
                f"{spiffe_id} is not a fedgw gateway: only peer gateways "
                f"(spiffe://<domain>{GATEWAY_PATH}) may call this route"
            )
        raise PermissionDenied(f"{spiffe_id} is not allowed to call this route")


def require(allow: Allow) -> Callable[[Request, GatewayDep], Awaitable[SpiffeId]]:
    """A dependency that admits callers on ``allow`` and gives their SPIFFE ID."""

    async def dependency(request: Request, gateway: GatewayDep) -> SpiffeId:
        spiffe_id = caller(request)
        federated = set(gateway.identity.bundles().domains())
        allow.check(spiffe_id, gateway.settings.domain, federated)
        return spiffe_id

    return dependency


PEER_GATEWAYS = Allow(peer_gateways=True)
PeerGateway = Annotated[SpiffeId, Depends(require(PEER_GATEWAYS))]
