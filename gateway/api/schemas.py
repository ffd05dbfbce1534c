"""Response bodies of the local API that are not registry records. Kept apart from the
app so that clients import them without importing the server."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from federation.models import PeerInfo


class Health(BaseModel):
    status: str
    domain: str
    version: str


class GatewayStatus(BaseModel):
    domain: str
    version: str
    pid: int
    started_at: str
    uptime_seconds: float
    socket: str
    state_dir: str
    store: str
    services: int
    endpoints: int
    workload_bound_endpoints: int
    watchers: int


class BundleInfo(BaseModel):
    trust_domain: str
    sequence: int
    authorities: int
    fingerprint: str


class IdentityInfo(BaseModel):
    spiffe_id: str | None
    source: str
    description: str
    svid_expires_at: datetime | None
    error: str | None
    bundles: list[BundleInfo]


class LeaveResult(BaseModel):
    """The peer forgotten; ``told`` says whether it heard of it (``detail``: why not)."""

    peer: PeerInfo
    told: bool
    detail: str | None
