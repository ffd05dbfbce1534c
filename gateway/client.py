"""Async client of a gateway's local API (what the CLI and workloads use). Transport
errors and error responses come back as fedgw errors with the gateway's message."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncGenerator
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from pydantic import TypeAdapter

from federation.models import (
    FederatedEndpoint,
    FederatedService,
    PeerInfo,
    TokenCreate,
    TokenCreated,
)
from federation.tokens import TokenInfo
from fedgw.errors import Unavailable
from fedgw.http import error_from_response
from fedgw.models import (
    Connection,
    Endpoint,
    EndpointRegistration,
    NetworkService,
    NetworkServiceRegistration,
)
from gateway.api.schemas import GatewayStatus, IdentityInfo, LeaveResult
from gateway.errors import GatewayUnreachable

_services = TypeAdapter(list[NetworkService])
_connections = TypeAdapter(list[Connection])
_tokens = TypeAdapter(list[TokenInfo])
_peers = TypeAdapter(list[PeerInfo])
_federated_services = TypeAdapter(list[FederatedService])
_federated_endpoints = TypeAdapter(list[FederatedEndpoint])
_endpoints = TypeAdapter(list[Endpoint])


def describe_target(target: str) -> str:
    return target if "://" in target else f"unix:{target}"


class GatewayClient:
    """``async with GatewayClient("/run/fedgw/gateway.sock") as gw: ...``

    ``target`` is a unix socket path (``/path``, ``./path`` or ``unix:///path``) or an
    ``http(s)://`` URL.
    """

    def __init__(self, target: str | Path, *, timeout: float = 10.0) -> None:
        text = str(target)
        if text.startswith("unix://"):
            text = text.removeprefix("unix://")
        self.target = text
        if text.startswith(("http://", "https://")):
            self._http = httpx.AsyncClient(base_url=text, timeout=timeout)
        else:
            transport = httpx.AsyncHTTPTransport(uds=text)
            self._http = httpx.AsyncClient(
                transport=transport, base_url="http://fedgw", timeout=timeout
            )

    async def __aenter__(self) -> GatewayClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    def _unreachable(self, exc: Exception) -> GatewayUnreachable:
        # "[Errno 2] No such file or directory" reads better as "no such file or directory"
        reason = re.sub(r"^\[Errno \d+\] ", "", str(exc) or type(exc).__name__)
        reason = reason[:1].lower() + reason[1:]
        return GatewayUnreachable(
            f"cannot reach the gateway at {describe_target(self.target)}: {reason} "
            "(is `fedgw gateway serve` running? point --gateway or FEDGW_GATEWAY at it)"
        )

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self._http.request(method, path, **kwargs)
        except (httpx.TransportError, OSError) as exc:
            raise self._unreachable(exc) from exc
        if response.status_code >= 400:
            raise error_from_response(response.status_code, response.text)
        return response.json()

    # --- health --------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", "/healthz")
        return result

    async def status(self) -> GatewayStatus:
        return GatewayStatus.model_validate(await self._call("GET", "/v1/status"))

    async def identity(self) -> IdentityInfo:
        return IdentityInfo.model_validate(await self._call("GET", "/v1/identity"))

    async def bundle(self) -> dict[str, Any]:
        """This domain's trust bundle, as the SPIFFE bundle JSON document."""
        result: dict[str, Any] = await self._call("GET", "/v1/bundle")
        return result

    # --- network services ------------------------------------------------------------

    async def register_service(self, reg: NetworkServiceRegistration) -> NetworkService:
        body = await self._call("POST", "/v1/services", json=reg.model_dump(mode="json"))
        return NetworkService.model_validate(body)

    async def services(self) -> list[NetworkService]:
        return _services.validate_python(await self._call("GET", "/v1/services"))

    async def delete_service(self, name: str) -> NetworkService:
        return NetworkService.model_validate(await self._call("DELETE", f"/v1/services/{name}"))

    # --- endpoints ---------------------------------------------------------------------

    async def register_endpoint(self, reg: EndpointRegistration) -> Endpoint:
        body = await self._call(
            "POST", "/v1/endpoints", json=reg.model_dump(mode="json", exclude_none=True)
        )
        return Endpoint.model_validate(body)

    async def endpoints(
        self, service: str | None = None, selector: dict[str, str] | None = None
    ) -> list[Endpoint]:
        params: list[tuple[str, str]] = [("label", f"{k}={v}") for k, v in (selector or {}).items()]
        if service is not None:
            params.append(("service", service))
        return _endpoints.validate_python(await self._call("GET", "/v1/endpoints", params=params))

    async def endpoint(self, name: str) -> Endpoint:
        return Endpoint.model_validate(await self._call("GET", f"/v1/endpoints/{name}"))

    async def refresh_endpoint(self, name: str, ttl: float | None = None) -> Endpoint:
        body = {} if ttl is None else {"ttl": ttl}
        return Endpoint.model_validate(
            await self._call("POST", f"/v1/endpoints/{name}/refresh", json=body)
        )

    async def delete_endpoint(self, name: str) -> Endpoint:
        return Endpoint.model_validate(await self._call("DELETE", f"/v1/endpoints/{name}"))

    # --- federation ----------------------------------------------------------------------

    async def create_token(self, request: TokenCreate) -> TokenCreated:
        body = await self._call("POST", "/v1/tokens", json=request.model_dump(mode="json"))
        return TokenCreated.model_validate(body)

    async def tokens(self) -> list[TokenInfo]:
        return _tokens.validate_python(await self._call("GET", "/v1/tokens"))

    async def revoke_token(self, token_id: str) -> TokenInfo:
        return TokenInfo.model_validate(await self._call("POST", f"/v1/tokens/{token_id}/revoke"))

    async def join(self, token: str) -> PeerInfo:
        return PeerInfo.model_validate(await self._call("POST", "/v1/join", json={"token": token}))

    async def peers(self) -> list[PeerInfo]:
        return _peers.validate_python(await self._call("GET", "/v1/peers"))

    async def leave(self, domain: str) -> LeaveResult:
        return LeaveResult.model_validate(await self._call("DELETE", f"/v1/peers/{domain}"))

    async def peer_services(self, domain: str) -> list[FederatedService]:
        body = await self._call("GET", f"/v1/peers/{domain}/services")
        return _federated_services.validate_python(body)

    async def peer_endpoints(
        self, domain: str, service: str | None = None
    ) -> list[FederatedEndpoint]:
        params = {"service": service} if service else None
        body = await self._call("GET", f"/v1/peers/{domain}/endpoints", params=params)
        return _federated_endpoints.validate_python(body)

    # --- connections ---------------------------------------------------------------------

    async def request(self, request: dict[str, Any]) -> Connection:
        return Connection.model_validate(await self._call("POST", "/v1/connections", json=request))

    async def connections(self) -> list[Connection]:
        return _connections.validate_python(await self._call("GET", "/v1/connections"))

    async def close_connection(self, connection_id: str) -> Connection:
        return Connection.model_validate(
            await self._call("DELETE", f"/v1/connections/{connection_id}")
        )

    # --- events ------------------------------------------------------------------------

    async def events(self, *, snapshot: bool = False) -> AsyncGenerator[dict[str, Any], None]:
        """Lines of the event stream as dicts (events, ``synced``, ``heartbeat``); an
        ``error`` line is raised as :class:`Unavailable` (watch again)."""
        params = {"snapshot": "true"} if snapshot else {}
        try:
            async with self._http.stream(
                "GET", "/v1/events", params=params, timeout=httpx.Timeout(10.0, read=None)
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise error_from_response(response.status_code, response.text)
                async for line in response.aiter_lines():
                    if not line:
                        continue
                    item: dict[str, Any] = json.loads(line)
                    if item.get("type") == "error":
                        raise Unavailable(str(item.get("detail")), retryable=True)
                    yield item
        except (httpx.TransportError, OSError) as exc:
            raise self._unreachable(exc) from exc
