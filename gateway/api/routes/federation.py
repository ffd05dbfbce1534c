"""The federation API, for peer gateways only (mutual TLS, authorised by SPIFFE ID)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, status
from pydantic import BaseModel, Field

from federation.models import (
    ClosedConnections,
    ConnectionCloses,
    ConnectionOffers,
    FederatedEndpoint,
    FederatedService,
    JoinRequest,
    JoinResponse,
    LeaseGrants,
    LeaseRefresh,
    OfferResults,
)
from fedgw import __version__
from fedgw.errors import PermissionDenied
from gateway.api.authz import PeerGateway
from gateway.api.deps import GatewayDep, RegistryDep

router = APIRouter(prefix="/federation/v1", tags=["federation"])


class Pong(BaseModel):
    domain: str
    version: str
    caller: str


@router.get("/ping", summary="Is this peer there, and who does it think I am?")
async def ping(gateway: GatewayDep, peer: PeerGateway) -> Pong:
    return Pong(domain=gateway.settings.domain, version=__version__, caller=str(peer))


@router.get("/services", summary="Network services exported to the caller's domain")
async def exported_services(
    gateway: GatewayDep, registry: RegistryDep, peer: PeerGateway
) -> list[FederatedService]:
    domain = peer.trust_domain
    return [
        FederatedService(name=s.name, payload=s.payload, domain=gateway.settings.domain)
        for s in registry.services()
        if s.exported_to(domain)
    ]


@router.get("/endpoints", summary="Endpoints of the services exported to the caller")
async def exported_endpoints(
    gateway: GatewayDep,
    registry: RegistryDep,
    peer: PeerGateway,
    service: Annotated[str | None, Query(description="only this service's endpoints")] = None,
) -> list[FederatedEndpoint]:
    domain = peer.trust_domain
    exported = {s.name for s in registry.services() if s.exported_to(domain)}
    if service is not None:
        exported &= {service}
    out = []
    for ep in registry.endpoints(service):
        visible = [s for s in ep.services if s in exported]
        if visible:
            out.append(
                FederatedEndpoint(
                    name=ep.name,
                    services=visible,
                    labels=ep.labels,
                    routes=ep.routes,
                    domain=gateway.settings.domain,
                )
            )
    return out


@router.delete(
    "/peers/{domain}",
    summary="The caller leaves: this gateway forgets it",
    status_code=status.HTTP_204_NO_CONTENT,
)
async def peer_leaves(domain: str, gateway: GatewayDep, peer: PeerGateway) -> Response:
    if peer.trust_domain != domain:
        raise PermissionDenied(f"{peer} may not end the federation of {domain}")
    await gateway.federation.peer_left(domain)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/connections", summary="Clients of the caller's domain ask for connections")
async def offer_connections(
    offers: ConnectionOffers, gateway: GatewayDep, peer: PeerGateway
) -> OfferResults:
    """Each offer is answered on its own: a grant, or the error that refused it."""
    return await gateway.connections.serve_offers(peer.trust_domain, offers.offers)


@router.post("/connections/refresh", summary="Extend the leases of the caller's connections")
async def refresh_connections(
    refresh: LeaseRefresh, gateway: GatewayDep, peer: PeerGateway
) -> LeaseGrants:
    return await gateway.connections.serve_refresh(peer.trust_domain, refresh.ids)


@router.post("/connections/close", summary="The client closes connections")
async def close_connections(
    closes: ConnectionCloses, gateway: GatewayDep, peer: PeerGateway
) -> ClosedConnections:
    return await gateway.connections.serve_closes(peer.trust_domain, closes.ids)


@router.delete(
    "/connections/{connection_id}",
    summary="The client closes its connection",
    status_code=status.HTTP_204_NO_CONTENT,
)
async def close_connection(connection_id: str, gateway: GatewayDep, peer: PeerGateway) -> Response:
    await gateway.connections.serve_close(peer.trust_domain, connection_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


class ClosedNotice(BaseModel):
    reason: str = Field(max_length=1000)


@router.post(
    "/connections/{connection_id}/closed",
    summary="The serving gateway closed one of the caller's connections",
    status_code=status.HTTP_204_NO_CONTENT,
)
async def connection_closed(
    connection_id: str, notice: ClosedNotice, gateway: GatewayDep, peer: PeerGateway
) -> Response:
    await gateway.connections.peer_closed(peer.trust_domain, connection_id, notice.reason)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


join_router = APIRouter(tags=["bundle endpoint"])


@join_router.post("/join", summary="Join this domain with a token it issued")
async def accept_join(body: JoinRequest, gateway: GatewayDep) -> JoinResponse:
    return await gateway.federation.accept_join(body)
