"""Records that cross process boundaries: network services, endpoints, workloads and
connections (pydantic v2). One model per use: ``...Registration`` is what a caller
sends, the plain name is what the gateway stores and shows."""

from __future__ import annotations

import enum
import functools
import ipaddress
import string
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Annotated, Any, Literal, Self, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from fedgw.durations import Duration
from fedgw.errors import Conflict, InvalidInput
from fedgw.names import (
    Domain,
    InvalidName,
    LabelKey,
    LabelValue,
    Name,
    ReferenceField,
    check_domain,
)

_T = TypeVar("_T")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_LABELS = 64
MAX_ROUTES = 256
MAX_SERVICES = 64
MAX_EXPORTS = 256
MAX_PID = 4_194_304  # the kernel's PID_MAX_LIMIT on 64-bit


def parse_network(value: Any, what: str = "prefix") -> IPNetwork:
    """A CIDR prefix; host bits set is an error that proposes the network meant."""
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a CIDR string such as '10.60.0.0/16'")
    text = value.strip()
    if "/" not in text:
        raise ValueError(
            f"{what} {value!r} has no prefix length: write it as CIDR, e.g. '{text}/24'"
        )
    try:
        return _network(text)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{what} {value!r} is not a CIDR prefix: {exc}") from None
        raise ValueError(f"{what} {value!r} has host bits set: did you mean '{loose}'?") from None


@functools.lru_cache(maxsize=16384)
def _network(text: str) -> IPNetwork:
    # Interned: many endpoints offer the same routes, and an ipaddress network object
    # costs a few hundred bytes. They are immutable, so sharing them is safe.
    return ipaddress.ip_network(text, strict=True)


Network = Annotated[
    IPNetwork,
    BeforeValidator(parse_network),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "format": "cidr", "examples": ["10.60.0.0/16"]}),
]

_NETNS_CHARS = frozenset(string.ascii_letters + string.digits + "-_.")


def _check_netns(value: str) -> str:
    # `ip netns` names are file names under /run/netns; keep to a safe alphabet.
    if not value or len(value) > 64:
        raise ValueError("network namespace name must be 1 to 64 characters")
    if value in {".", ".."}:
        raise ValueError(f"network namespace name {value!r} is not allowed")
    for i, ch in enumerate(value):
        if ch not in _NETNS_CHARS:
            raise ValueError(
                f"network namespace name {value!r} has {ch!r} at character {i + 1}: "
                "only letters, digits, '-', '_' and '.' are allowed"
            )
    return value


NetnsName = Annotated[str, BeforeValidator(lambda v: _check_netns(v) if isinstance(v, str) else v)]


class Model(BaseModel):
    """Base of fedgw's records: unknown fields are errors, not silently dropped."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Workload(Model):
    """Where a workload lives: a named network namespace or a process (its netns)."""

    netns: NetnsName | None = Field(None, description="name of a network namespace in /run/netns")
    pid: int | None = Field(None, ge=1, le=MAX_PID, description="a process whose netns is used")
    pid_start_ticks: int | None = Field(
        None,
        description="start time of the process (set by the gateway) so a reused PID "
        "is not taken for the workload",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.netns is None) == (self.pid is None):
            raise ValueError("a workload is either a netns or a pid, exactly one of them")
        return self

    def __str__(self) -> str:
        return f"netns {self.netns}" if self.netns is not None else f"pid {self.pid}"


def _unique(values: list[_T], what: str) -> list[_T]:
    seen: set[_T] = set()
    for v in values:
        if v in seen:
            raise ValueError(f"{what} {v} is listed twice")
        seen.add(v)
    return values


ExportTarget = Annotated[str, Field(description="a peer domain, or '*' for every peer")]


class NetworkServiceRegistration(Model):
    """What a caller sends to register (or update) a network service."""

    name: Name
    payload: Literal["IP"] = Field("IP", description="what the service carries: IP packets")
    export: list[ExportTarget] = Field(
        default_factory=list,
        max_length=MAX_EXPORTS,
        description="peer domains that may see and request the service; '*' for all",
    )

    @field_validator("export")
    @classmethod
    def _check_export(cls, value: list[str]) -> list[str]:
        for target in value:
            if target == "*":
                continue
            try:
                check_domain(target, what="export domain")
            except InvalidName as exc:
                raise ValueError(str(exc)) from None
        return sorted(_unique(value, "export domain"))


class NetworkService(NetworkServiceRegistration):
    """A network service as the registry holds it."""

    created_at: datetime
    updated_at: datetime

    def exported_to(self, domain: str) -> bool:
        return "*" in self.export or domain in self.export


class EndpointRegistration(Model):
    """What an endpoint (NSE) sends to register itself."""

    name: Name
    services: list[Name] = Field(min_length=1, max_length=MAX_SERVICES)
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=MAX_LABELS)
    pool: Network | None = Field(None, description="CIDR the endpoint hands addresses out from")
    routes: list[Network] = Field(default_factory=list, max_length=MAX_ROUTES)
    workload: Workload | None = Field(
        None,
        description="netns or pid the gateway watches to keep the lease alive; "
        "without one the endpoint must refresh its lease itself",
    )
    ttl: Duration | None = Field(None, description="lease length; the gateway default if unset")

    @field_validator("services")
    @classmethod
    def _services_unique(cls, value: list[str]) -> list[str]:
        return _unique(value, "service")

    @field_validator("routes")
    @classmethod
    def _routes_unique(cls, value: list[IPNetwork]) -> list[IPNetwork]:
        return _unique(value, "route")

    @field_validator("pool")
    @classmethod
    def _pool_holds_a_pair(cls, value: IPNetwork | None) -> IPNetwork | None:
        # Connections take point-to-point address pairs from the pool.
        if value is not None and value.num_addresses < 2:
            raise ValueError(f"pool {value} is too small: it must hold at least 2 addresses")
        return value


class Endpoint(EndpointRegistration):
    """An endpoint as the registry holds it, with its lease."""

    ttl: float = Field(description="lease length in seconds")
    registered_at: datetime
    expires_at: datetime

    def matches(self, service: str, selector: dict[str, str]) -> bool:
        return service in self.services and all(
            self.labels.get(k) == v for k, v in selector.items()
        )


class ConnectionState(enum.StrEnum):
    """Life of a connection; ``closed`` is final."""

    REQUESTED = "requested"
    UP = "up"
    DOWN = "down"
    CLOSED = "closed"

    def can_become(self, other: ConnectionState) -> bool:
        return other in _TRANSITIONS[self]


_TRANSITIONS: dict[ConnectionState, frozenset[ConnectionState]] = {
    ConnectionState.REQUESTED: frozenset(
        {ConnectionState.UP, ConnectionState.DOWN, ConnectionState.CLOSED}
    ),
    ConnectionState.UP: frozenset({ConnectionState.DOWN, ConnectionState.CLOSED}),
    ConnectionState.DOWN: frozenset(
        {ConnectionState.REQUESTED, ConnectionState.UP, ConnectionState.CLOSED}
    ),
    ConnectionState.CLOSED: frozenset(),
}


class ConnectionEnd(Model):
    """One end of a wire: where it lives and the address it was given."""

    domain: Domain
    workload: Workload | None = None
    endpoint: Name | None = Field(None, description="the endpoint's name, on the serving end")
    interface: str | None = Field(None, max_length=15)
    address: str | None = Field(None, description="interface address in CIDR form")


class Connection(Model):
    """One client (NSC) to endpoint (NSE) wire."""

    id: str = Field(min_length=1, max_length=64)
    service: ReferenceField
    client: ConnectionEnd
    server: ConnectionEnd
    routes: list[Network] = Field(default_factory=list, max_length=MAX_ROUTES)
    path: list[Domain] = Field(default_factory=list, description="domains of the gateways crossed")
    state: ConnectionState = ConnectionState.REQUESTED
    reason: str | None = Field(None, description="why the connection is in its state")
    created_at: datetime
    updated_at: datetime
    expires_at: datetime

    def moved_to(self, state: ConnectionState, reason: str, at: datetime) -> Connection:
        """This connection in ``state``; refuses a transition the life cycle forbids."""
        if not self.state.can_become(state):
            raise Conflict(f"connection {self.id} cannot go from {self.state} to {state}")
        return self.model_copy(update={"state": state, "reason": reason, "updated_at": at})


M = TypeVar("M", bound=BaseModel)


def describe_validation_errors(errors: Iterable[Mapping[str, Any]]) -> str:
    """One line naming each offending field and what is wrong with it (pydantic's
    error list as ``ValidationError.errors()`` gives it)."""
    parts = []
    for err in errors:
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        last = str(err["loc"][-1]) if err["loc"] else ""
        parts.append(msg if not loc or msg.startswith(last) else f"{loc}: {msg}")
    return "; ".join(parts)


def validated(model: type[M], data: dict[str, Any]) -> M:
    """``model`` built from ``data``, or :class:`InvalidInput` saying what is wrong."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(describe_validation_errors(exc.errors())) from None
