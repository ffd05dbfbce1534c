"""Liveness and status."""

from __future__ import annotations

from fastapi import APIRouter

from fedgw import __version__
from gateway.api.deps import GatewayDep
from gateway.api.schemas import GatewayStatus, Health

router = APIRouter(tags=["health"])
probe_router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Is the gateway serving?")
@probe_router.get("/healthz", summary="Is the gateway serving?")
async def health(gateway: GatewayDep) -> Health:
    return Health(status="ok", domain=gateway.settings.domain, version=__version__)


@router.get("/v1/status", summary="What the gateway is and holds")
async def status(gateway: GatewayDep) -> GatewayStatus:
    return await gateway.status()
