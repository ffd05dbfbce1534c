"""Network services of this domain."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from fedgw.models import NetworkService, NetworkServiceRegistration
from gateway.api.deps import RegistryDep

router = APIRouter(prefix="/v1/services", tags=["network services"])


@router.post(
    "",
    summary="Register or update a network service",
    responses={200: {"description": "updated"}, 201: {"description": "registered"}},
    status_code=status.HTTP_201_CREATED,
)
async def register_service(
    body: NetworkServiceRegistration, registry: RegistryDep, response: Response
) -> NetworkService:
    service, created = await registry.register_service(body)
    response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    return service


@router.get("", summary="List network services")
async def list_services(registry: RegistryDep) -> list[NetworkService]:
    return registry.services()


@router.get("/{name}", summary="One network service")
async def get_service(name: str, registry: RegistryDep) -> NetworkService:
    return registry.service(name)


@router.delete("/{name}", summary="Delete a network service without endpoints")
async def delete_service(name: str, registry: RegistryDep) -> NetworkService:
    return await registry.delete_service(name)
