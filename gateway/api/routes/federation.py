"""The federation API, for peer gateways only (mutual TLS, authorised by SPIFFE ID)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from fedgw import __version__
from gateway.api.authz import PeerGateway
from gateway.api.deps import GatewayDep

router = APIRouter(prefix="/federation/v1", tags=["federation"])


class Pong(BaseModel):
    domain: str
    version: str
    caller: str


@router.get("/ping", summary="Is this peer there, and who does it think I am?")
async def ping(gateway: GatewayDep, peer: PeerGateway) -> Pong:
    return Pong(domain=gateway.settings.domain, version=__version__, caller=str(peer))
