"""Network service endpoints (NSEs) of this domain and their leases."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, status
from pydantic import BaseModel, ConfigDict

from fedgw.durations import Duration
from fedgw.errors import InvalidInput
from fedgw.models import Endpoint, EndpointRegistration
from fedgw.names import InvalidName, check_label_key, check_label_value
from gateway.api.deps import RegistryDep

router = APIRouter(prefix="/v1/endpoints", tags=["endpoints"])


class LeaseRefresh(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ttl: Duration | None = None


def parse_selector(labels: list[str]) -> dict[str, str]:
    """``["k=v", ...]`` as a dict; each key at most once."""
    selector: dict[str, str] = {}
    for item in labels:
        key, eq, value = item.partition("=")
        if not eq:
            raise InvalidInput(f"label selector {item!r} must have the form key=value")
        try:
            check_label_key(key)
            check_label_value(value)
        except InvalidName as exc:
            raise InvalidInput(f"label selector {item!r}: {exc}") from None
        if key in selector and selector[key] != value:
            raise InvalidInput(f"label selector gives {key!r} twice with different values")
        selector[key] = value
    return selector


@router.post(
    "",
    summary="Register or update an endpoint",
    responses={200: {"description": "updated"}, 201: {"description": "registered"}},
    status_code=status.HTTP_201_CREATED,
)
async def register_endpoint(
    body: EndpointRegistration, registry: RegistryDep, response: Response
) -> Endpoint:
    endpoint, created = await registry.register_endpoint(body)
    response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    return endpoint


@router.get("", summary="List endpoints; filter by service and labels")
async def list_endpoints(
    registry: RegistryDep,
    service: Annotated[str | None, Query(description="only endpoints of this service")] = None,
    label: Annotated[list[str], Query(description="key=value; all must match (repeatable)")] = [],  # noqa: B006 - FastAPI copies query defaults
) -> list[Endpoint]:
    return registry.endpoints(service, parse_selector(label))


@router.get("/{name}", summary="One endpoint")
async def get_endpoint(name: str, registry: RegistryDep) -> Endpoint:
    return registry.endpoint(name)


@router.post("/{name}/refresh", summary="Extend an endpoint's lease")
async def refresh_endpoint(
    name: str, registry: RegistryDep, body: LeaseRefresh | None = None
) -> Endpoint:
    return await registry.refresh_endpoint(name, body.ttl if body else None)


@router.delete("/{name}", summary="Delete an endpoint")
async def delete_endpoint(name: str, registry: RegistryDep) -> Endpoint:
    return await registry.delete_endpoint(name)
