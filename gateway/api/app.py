"""The local API app factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from fedgw import __version__
from gateway.api.errors import install_error_handlers
from gateway.api.limits import BodyLimit
from gateway.api.routes import (
    connections,
    endpoints,
    events,
    federation,
    health,
    identity,
    peers,
    services,
)
from gateway.runtime import Gateway
from gateway.settings import GatewaySettings


def create_app(settings: GatewaySettings, gateway: Gateway | None = None) -> FastAPI:
    """The local API for workloads of this domain.

    With ``gateway`` given, the app serves it and leaves its life cycle to the caller
    (the process runs several apps over one gateway); without, the app's lifespan
    starts and stops a gateway of its own built from ``settings``.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if gateway is not None:
            yield
            return
        async with Gateway(settings) as own:
            app.state.gateway = own
            yield

    app = FastAPI(
        title="fedgw local API",
        version=__version__,
        summary=f"Network services, endpoints and events of domain {settings.domain}",
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    # Routes are tried in order: connections, the busiest, first.
    for module in (connections, health, services, endpoints, events, identity, peers):
        app.include_router(module.router)
    return app


def create_health_app(gateway: Gateway) -> FastAPI:
    """Plain-HTTP ``/healthz`` for probes (Kubernetes, the lab) on a TCP port; it tells
    only that the gateway serves and its domain."""
    app = FastAPI(title="fedgw health", version=__version__, openapi_url=None, docs_url=None)
    app.state.gateway = gateway
    install_error_handlers(app)
    app.include_router(health.probe_router)
    return app


def create_federation_app(gateway: Gateway) -> FastAPI:
    """The federation API for peer gateways: served only over mutual TLS, every route
    authorised by the caller's SPIFFE ID."""
    app = FastAPI(
        title="fedgw federation API",
        version=__version__,
        summary=f"What domain {gateway.settings.domain} offers its peers",
    )
    app.state.gateway = gateway
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=gateway.settings.max_body_bytes)
    app.include_router(federation.router)
    app.include_router(health.probe_router)
    return app


def create_bundle_app(gateway: Gateway) -> FastAPI:
    """The bundle endpoint (SPIFFE ``https_spiffe`` profile): the domain's trust bundle
    to anyone, over TLS with the gateway's SVID and without client certificates."""
    app = FastAPI(title="fedgw bundle endpoint", version=__version__, docs_url=None, redoc_url=None)
    app.state.gateway = gateway
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=gateway.settings.max_body_bytes)
    app.include_router(identity.bundle_router)
    app.include_router(federation.join_router)
    return app
