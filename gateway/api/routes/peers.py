"""Federation on the local API: tokens, join, peers, leave, and what peers export."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status
from pydantic import BaseModel

from federation.models import (
    FederatedEndpoint,
    FederatedService,
    JoinCommand,
    PeerInfo,
    TokenCreate,
    TokenCreated,
    parse_answer,
)
from federation.tokens import TokenInfo
from gateway.api.deps import GatewayDep
from gateway.api.schemas import LeaveResult

router = APIRouter(prefix="/v1", tags=["federation"])


class _ServiceList(BaseModel):
    items: list[FederatedService]


class _EndpointList(BaseModel):
    items: list[FederatedEndpoint]


@router.post("/tokens", summary="Create a federation token", status_code=status.HTTP_201_CREATED)
async def create_token(body: TokenCreate, gateway: GatewayDep) -> TokenCreated:
    return await gateway.federation.create_token(body)


@router.get("/tokens", summary="List tokens (never their secrets)")
async def list_tokens(gateway: GatewayDep) -> list[TokenInfo]:
    return await gateway.federation.list_tokens()


@router.post("/tokens/{token_id}/revoke", summary="Revoke a token")
async def revoke_token(token_id: str, gateway: GatewayDep) -> TokenInfo:
    return await gateway.federation.revoke_token(token_id)


@router.post("/join", summary="Join the domain that issued a token", status_code=201)
async def join(body: JoinCommand, gateway: GatewayDep) -> PeerInfo:
    return await gateway.federation.join(body.token)


@router.get("/peers", summary="Domains this gateway federates with")
async def peers(gateway: GatewayDep) -> list[PeerInfo]:
    table = gateway.federation.peers
    return [table.info(record) for record in table.all()]


@router.delete("/peers/{domain}", summary="Leave a domain: both sides forget each other")
async def leave(domain: str, gateway: GatewayDep) -> LeaveResult:
    info, failure = await gateway.federation.leave(domain)
    return LeaveResult(peer=info, told=failure is None, detail=failure)


@router.get("/peers/{domain}/services", summary="Network services a peer exports to us")
async def peer_services(domain: str, gateway: GatewayDep) -> list[FederatedService]:
    answer = await gateway.federation.call(domain, "GET", "/federation/v1/services")
    return parse_answer(_ServiceList, {"items": answer}, domain).items


@router.get("/peers/{domain}/endpoints", summary="Endpoints of what a peer exports to us")
async def peer_endpoints(
    domain: str,
    gateway: GatewayDep,
    service: Annotated[str | None, Query(description="only this service's endpoints")] = None,
) -> list[FederatedEndpoint]:
    params = {"service": service} if service else None
    answer = await gateway.federation.call(domain, "GET", "/federation/v1/endpoints", params=params)
    return parse_answer(_EndpointList, {"items": answer}, domain).items
