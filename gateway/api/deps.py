"""Dependencies of the route handlers, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from gateway.registry import Registry
from gateway.runtime import Gateway

# async on purpose: FastAPI runs plain functions in a thread pool, one hop per request.


async def get_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


async def get_registry(request: Request) -> Registry:
    gateway: Gateway = request.app.state.gateway
    return gateway.registry


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
