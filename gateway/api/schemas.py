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


class TunnelInfo(BaseModel):
    domain: str
    interface: str
    public_key: str | None = None
    """The peer gateway's key; ``None`` until the first connection brings it."""
    endpoint: str | None
    last_handshake: datetime | None
    rx_bytes: int
    tx_bytes: int
    allowed_ips: list[str]
    error: str | None = None
    """Why the tunnel is not as it should be (its interface is gone, say)."""


class DataplaneInfo(BaseModel):
    driver: str
    tunnels: list[TunnelInfo]
    wires: int


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
    peers: int = 0
    connections: dict[str, int] = {}
    dataplane: DataplaneInfo | None = None
    dataplane_mode: str = "off"


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
