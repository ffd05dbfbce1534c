"""Connections on the local API: request, list, close."""

from __future__ import annotations

from fastapi import APIRouter, status

from fedgw.models import Connection
from gateway.api.deps import GatewayDep
from gateway.connections import ConnectionRequest

router = APIRouter(prefix="/v1/connections", tags=["connections"])


@router.post(
    "",
    summary="Connect a workload to a network service (name or name@domain)",
    status_code=status.HTTP_201_CREATED,
)
async def request_connection(body: ConnectionRequest, gateway: GatewayDep) -> Connection:
    return (await gateway.connections.request(body)).connection


@router.get("", summary="Connections of this gateway")
async def list_connections(gateway: GatewayDep) -> list[Connection]:
    return [record.connection for record in gateway.connections.all()]


@router.get("/{connection_id}", summary="One connection")
async def get_connection(connection_id: str, gateway: GatewayDep) -> Connection:
    return gateway.connections.get(connection_id).connection


@router.delete("/{connection_id}", summary="Close a connection (both sides)")
async def close_connection(connection_id: str, gateway: GatewayDep) -> Connection:
    return (await gateway.connections.close(connection_id)).connection
