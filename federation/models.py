"""Records of federation that cross process boundaries: peers, join messages, and what
a domain shows its peers of its registry."""

from __future__ import annotations

import ipaddress
from datetime import datetime
from typing import Annotated, Literal, Self, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from federation.errors import BadPeerAnswer
from fedgw.durations import Duration
from fedgw.errors import FedgwError
from fedgw.models import Network, describe_validation_errors
from fedgw.names import Domain, LabelKey, LabelValue, Name

M = TypeVar("M", bound=BaseModel)

PeerState = Literal["active", "unreachable"]


def _https(value: str) -> str:
    if not value.startswith("https://"):
        raise ValueError(f"{value!r} is not an https URL")
    return value


HttpsUrl = Annotated[str, Field(max_length=512), AfterValidator(_https)]


def parse_answer(model: type[M], data: object, source: str) -> M:
    """A peer's answer as ``model``, or :class:`BadPeerAnswer` saying what is wrong."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        detail = describe_validation_errors(exc.errors())
        raise BadPeerAnswer(f"{source} answered something unusable: {detail}") from None


class PeerRecord(BaseModel):
    """A domain this gateway federates with, as stored."""

    domain: Domain
    url: str | None = Field(None, description="its federation API")
    bundle_url: str | None = Field(None, description="its bundle endpoint")
    bundle: str = Field(description="its trust bundle, SPIFFE format")
    joined_at: datetime
    joined_via: str = Field(description="how the federation was made")
    last_bundle_refresh: datetime | None = None
    last_contact: datetime | None = None
    state: PeerState = "active"
    last_error: str | None = None


class PeerInfo(BaseModel):
    """What ``fedgw peers`` shows of a peer."""

    domain: str
    url: str | None
    bundle_url: str | None
    bundle_fingerprint: str
    bundle_sequence: int
    joined_at: datetime
    joined_via: str
    last_bundle_refresh: datetime | None
    last_contact: datetime | None
    state: PeerState
    last_error: str | None


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ttl: Duration = Field(600.0, description="how long the token may be used (max 1d)")
    uses: int = Field(1, ge=1, le=1000)
    description: str = Field("", max_length=200)


class TokenCreated(BaseModel):
    """The token line is shown once, here, and never again."""

    token: str
    id: str
    expires_at: datetime
    uses: int


class JoinCommand(BaseModel):
    """Local API: join the domain that issued ``token``."""

    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=1, max_length=4096)


class JoinRequest(BaseModel):
    """What a joining gateway sends to the issuer's bundle endpoint.

    ``svid`` (PEM chain) and ``proof`` (a signature by the SVID's key over the other
    fields, see :func:`federation.join.proof_message`) show that the joiner holds an SVID
    of ``domain`` that ``bundle`` verifies.
    """

    model_config = ConfigDict(extra="forbid")

    token_id: str = Field(max_length=64)
    secret: str = Field(max_length=256)
    domain: Domain
    url: HttpsUrl | None = None
    bundle_url: HttpsUrl | None = None
    bundle: str = Field(max_length=65536)
    svid: str = Field(max_length=65536)
    timestamp: float = Field(allow_inf_nan=False)
    proof: str = Field(max_length=2048)


class JoinResponse(BaseModel):
    domain: Domain
    url: HttpsUrl | None
    bundle_url: HttpsUrl | None
    bundle: str = Field(max_length=65536)


class FederatedService(BaseModel):
    """A network service as its domain shows it to a peer it is exported to."""

    name: Name
    payload: str
    domain: Domain


class FederatedEndpoint(BaseModel):
    """An endpoint as its domain shows it to a peer: no workload, no pool."""

    name: Name
    services: list[Name]
    labels: dict[LabelKey, LabelValue]
    routes: list[Network]
    domain: Domain


# --- connections between domains ---------------------------------------------------------

ConnectionId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9-]*$")]


class WireGuardInfo(BaseModel):
    """One side's tunnel: its public key, and its UDP endpoint if the other side can
    reach it (``None`` behind NAT: it keeps the path open with keepalives)."""

    model_config = ConfigDict(extra="forbid")

    public_key: str = Field(min_length=44, max_length=44)
    endpoint: str | None = Field(None, max_length=64, description="IP:PORT")

    # wireguard's parsers are imported when used: they pull in netlink and crypto
    # modules that the CLI, which imports these models too, has no use for.

    @field_validator("public_key")
    @classmethod
    def _key(cls, value: str) -> str:
        from wireguard.keys import PublicKey

        try:
            PublicKey.from_base64(value)
        except FedgwError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None:
            from wireguard.drivers.base import Endpoint

            try:
                Endpoint.parse(value)
            except FedgwError as exc:
                raise ValueError(str(exc)) from None
        return value


class ConnectionOffer(BaseModel):
    """A client's gateway asks a serving gateway for a connection."""

    model_config = ConfigDict(extra="forbid")

    id: ConnectionId
    service: Name
    selector: dict[LabelKey, LabelValue] = Field(default_factory=dict)
    prefer: Name | None = Field(None, description="the endpoint to try first (healing)")
    exclude: list[Network] = Field(
        default_factory=list, max_length=64, description="prefixes used on the client's side"
    )
    wireguard: WireGuardInfo


class ConnectionGrant(BaseModel):
    """The serving gateway's answer: the endpoint side is wired."""

    id: ConnectionId
    endpoint: Name
    endpoint_address: str
    client_address: str
    routes: list[Network] = Field(max_length=256)
    wireguard: WireGuardInfo
    expires_at: datetime

    @model_validator(mode="after")
    def _pair(self) -> Self:
        # A point-to-point pair: two different addresses of one small network.
        try:
            endpoint = ipaddress.ip_interface(self.endpoint_address)
            client = ipaddress.ip_interface(self.client_address)
        except ValueError as exc:
            raise ValueError(f"addresses of the pair: {exc}") from None
        if endpoint.network != client.network or endpoint.ip == client.ip:
            raise ValueError(f"{endpoint} and {client} are not a pair of one network")
        if endpoint.network.num_addresses > 4:
            raise ValueError(f"the pair's network {endpoint.network} is too large")
        return self


MAX_OFFERS = 64
"""Offers one call carries: those that queued while the previous call to the peer was out."""


class ConnectionOffers(BaseModel):
    """Offers for connections, answered each on its own (one call for a burst of them:
    a call's own cost, TLS and HTTP on both sides, is a third of a connection's)."""

    model_config = ConfigDict(extra="forbid")

    offers: list[ConnectionOffer] = Field(min_length=1, max_length=MAX_OFFERS)


class OfferError(BaseModel):
    """Why one offer was refused, as an error response would say it."""

    status: int = Field(ge=400, le=599)
    error: str
    detail: str
    retryable: bool = False


class OfferResult(BaseModel):
    id: ConnectionId
    grant: ConnectionGrant | None = None
    error: OfferError | None = None

    @model_validator(mode="after")
    def _one(self) -> Self:
        if (self.grant is None) == (self.error is None):
            raise ValueError("a result holds either a grant or an error")
        if self.grant is not None and self.grant.id != self.id:
            raise ValueError(f"the grant for {self.id} is for {self.grant.id}")
        return self


class OfferResults(BaseModel):
    results: list[OfferResult] = Field(max_length=MAX_OFFERS)


class LeaseGrant(BaseModel):
    id: ConnectionId
    expires_at: datetime


MAX_REFRESH = 500
"""Connections whose leases one refresh call extends (their ids fit in 40 KB)."""


class LeaseRefresh(BaseModel):
    """A client's gateway extends the leases of its connections to the called domain,
    all in one call (one call per connection would cost as much as setting them up)."""

    model_config = ConfigDict(extra="forbid")

    ids: list[ConnectionId] = Field(min_length=1, max_length=MAX_REFRESH)


MAX_CLOSES = 64
"""Connections one close call ends: those that queued while the previous call was out."""


class ConnectionCloses(BaseModel):
    """A client's gateway closes connections to the called domain (one call for a burst
    of closes, as for offers)."""

    model_config = ConfigDict(extra="forbid")

    ids: list[ConnectionId] = Field(min_length=1, max_length=MAX_CLOSES)


class ClosedConnections(BaseModel):
    closed: list[ConnectionId] = Field(max_length=MAX_CLOSES)
    unknown: list[ConnectionId] = Field(
        default_factory=list,
        max_length=MAX_CLOSES,
        description="ids the serving gateway has no connection of yours for",
    )


class LeaseGrants(BaseModel):
    leases: list[LeaseGrant]
    unknown: list[ConnectionId] = Field(
        default_factory=list, description="ids the serving gateway has no connection of yours for"
    )
