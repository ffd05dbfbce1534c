"""Wires: what the data plane is asked for (tunnels to peers, client and endpoint wires of
connections) and the workload's end of a wire, inside the workload's network namespace."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from fedgw.models import MAX_ROUTES, Workload
from fedgw.names import InvalidName, check_domain
from wireguard.drivers.base import Endpoint, sort_prefixes
from wireguard.errors import InvalidSpec, NamespaceNotFound
from wireguard.keys import PresharedKey, PrivateKey, PublicKey
from wireguard.netns import (
    IFNAMSIZ,
    Address,
    Interface,
    Link,
    Neighbour,
    Network,
    Route,
    Rtnl,
    netns_exists,
)

Role = Literal["client", "endpoint"]
ROLES: tuple[Role, ...] = ("client", "endpoint")
MIN_MTU = 1280  # IPv6's minimum; a wire carries both families


def _check_ifname(name: str, what: str) -> str:
    if not 0 < len(name.encode()) <= IFNAMSIZ or any(c in name for c in "/: \t\n%"):
        raise InvalidSpec(f"{what} {name!r} must be 1 to {IFNAMSIZ} characters, no '/:%'")
    return name


def _check_domain(domain: str) -> str:
    try:
        return check_domain(domain, what="peer domain")
    except InvalidName as exc:
        raise InvalidSpec(str(exc)) from None


def _check_mtu(mtu: int | None) -> None:
    if mtu is not None and not MIN_MTU <= mtu <= 65535:
        raise InvalidSpec(f"MTU {mtu} is not in {MIN_MTU}..65535")


@dataclass(frozen=True, slots=True)
class PeerTunnel:
    """The tunnel to one peer domain: one WireGuard interface on the gateway node with
    one peer on it, the peer domain's gateway."""

    domain: str
    private_key: PrivateKey
    """This gateway's key."""
    public_key: PublicKey | None
    """The peer gateway's key; ``None`` until it is known (it comes with the first
    connection): the interface is then made and listens, with no peer on it, so that the
    first connection does not wait for it to start."""
    endpoint: Endpoint | None = None
    """The peer gateway's public UDP endpoint; ``None`` when it is behind NAT: WireGuard
    then learns it from the peer's packets (the peer keeps its mapping open)."""
    listen_port: int | None = None
    """This side's UDP port; ``None`` lets WireGuard choose."""
    persistent_keepalive: int = 0
    """Seconds between keepalives (set it when this side is behind NAT); 0: off."""
    preshared_key: PresharedKey | None = None
    mtu: int | None = None
    """The tunnel's MTU; ``None``: the data plane's setting, or the underlay MTU minus 80."""

    def __post_init__(self) -> None:
        _check_domain(self.domain)
        _check_mtu(self.mtu)
        if self.public_key == self.private_key.public_key():
            raise InvalidSpec(f"peer {self.domain} has this gateway's own public key")
        if not 0 <= self.persistent_keepalive <= 65535:
            raise InvalidSpec(f"persistent keepalive {self.persistent_keepalive} not in 0..65535")
        if self.listen_port is not None and not 0 < self.listen_port < 65536:
            raise InvalidSpec(f"listen port {self.listen_port} is not in 1..65535")


def _prefixes(values: tuple[Network, ...]) -> tuple[Network, ...]:
    for net in values:
        if not isinstance(net, ipaddress.IPv4Network | ipaddress.IPv6Network):
            raise InvalidSpec(f"route {net!r} is not a network")
    if len(values) > MAX_ROUTES:
        raise InvalidSpec(f"{len(values)} routes; at most {MAX_ROUTES}")
    return sort_prefixes(values)


def _check_pair(own: Interface, other: Interface) -> None:
    if not isinstance(own, ipaddress.IPv4Interface | ipaddress.IPv6Interface) or not isinstance(
        other, ipaddress.IPv4Interface | ipaddress.IPv6Interface
    ):
        raise InvalidSpec("wire addresses must be ipaddress interfaces (address/prefix)")
    if own.version != other.version:
        raise InvalidSpec(f"addresses {own} and {other} are of different families")
    if own.ip == other.ip:
        raise InvalidSpec(f"both ends of the wire have the address {own.ip}")
    if other.ip not in own.network:
        # The workload reaches the other end on-link, through its connected route.
        raise InvalidSpec(f"{other.ip} is not in {own.network}, the network of {own}")


@dataclass(frozen=True, slots=True)
class ClientWire:
    """The client (NSC) side of a connection: a veth from the gateway node into the
    client's namespace, with the client address, and routes to the endpoint address and
    to the endpoint's prefixes through the gateway."""

    connection_id: str
    peer: str | None
    """The peer domain the endpoint is in; ``None``: the endpoint is in this domain (a
    local connection: its :class:`EndpointWire` must also have ``peer=None``)."""
    workload: Workload
    interface: str
    """The interface's name in the client's namespace (``nsm0``)."""
    address: Interface
    """The client's address (the higher one of the pair), with the pair's prefix."""
    endpoint_address: Interface
    routes: tuple[Network, ...] = ()
    """Prefixes the endpoint offers."""
    mtu: int | None = None
    """``None``: the tunnel's MTU."""

    role: ClassVar[Literal["client"]] = "client"

    def __post_init__(self) -> None:
        _check_wire(self, self.address, self.endpoint_address)
        object.__setattr__(self, "routes", _prefixes(self.routes))

    @property
    def other_address(self) -> Interface:
        return self.endpoint_address


@dataclass(frozen=True, slots=True)
class EndpointWire:
    """The endpoint (NSE) side of a connection: a veth from the gateway node into the
    endpoint's namespace, with the endpoint address; the endpoint's prefixes are routed
    to it for this connection's client only."""

    connection_id: str
    peer: str | None
    """The peer domain the client is in; ``None`` for a local connection."""
    workload: Workload
    interface: str
    address: Interface
    """The endpoint's address (the lower one of the pair), with the pair's prefix."""
    client_address: Interface
    routes: tuple[Network, ...] = ()
    """Prefixes the endpoint offers: routed to it for traffic from this client."""
    mtu: int | None = None

    role: ClassVar[Literal["endpoint"]] = "endpoint"

    def __post_init__(self) -> None:
        _check_wire(self, self.address, self.client_address)
        object.__setattr__(self, "routes", _prefixes(self.routes))

    @property
    def other_address(self) -> Interface:
        return self.client_address


Wire = ClientWire | EndpointWire


def _check_wire(wire: Wire, own: Interface, other: Interface) -> None:
    if not 0 < len(wire.connection_id) <= 64:
        raise InvalidSpec("connection id must be 1 to 64 characters")
    if wire.peer is not None:
        _check_domain(wire.peer)
    _check_ifname(wire.interface, "workload interface name")
    _check_mtu(wire.mtu)
    _check_pair(own, other)


def wire_key(wire: Wire) -> tuple[str, Role]:
    return (wire.connection_id, wire.role)


# --- workload namespaces ---------------------------------------------------------------------


def process_start_ticks(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks after boot (field 22 of
    ``/proc/PID/stat``); with the PID it names one process for good. None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; it ends at the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def workload_netns(workload: Workload) -> str:
    """Where a workload's namespace is: its name, or ``/proc/PID/ns/net``.
    :class:`NamespaceNotFound` if it is gone, or if the PID now names another process."""
    if workload.netns is not None:
        if not netns_exists(workload.netns):
            raise NamespaceNotFound(f"workload namespace {workload.netns!r} does not exist")
        return workload.netns
    assert workload.pid is not None  # the model holds exactly one of them
    ticks = process_start_ticks(workload.pid)
    if ticks is None:
        raise NamespaceNotFound(f"workload process {workload.pid} does not exist")
    if workload.pid_start_ticks is not None and ticks != workload.pid_start_ticks:
        raise NamespaceNotFound(
            f"process {workload.pid} is not the workload any more (it was restarted or "
            "the PID was reused)"
        )
    return f"/proc/{workload.pid}/ns/net"


# --- the workload's end ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkloadEnd:
    """What the workload's end of a wire is: a veth end with its address, a static
    neighbour for the other end's address (the gateway end's MAC: the gateway end has no
    address, see :mod:`wireguard.routing`), and routes through that address."""

    netns: str
    """A name or ``/proc/PID/ns/net``."""
    name: str
    mac: str
    gateway_mac: str
    mtu: int
    address: Interface
    next_hop: Address
    routes: tuple[Network, ...]

    def route(self, dst: Network, protocol: int) -> Route:
        return Route(dst, dev=self.name, via=self.next_hop, protocol=protocol)

    def neighbour(self) -> Neighbour:
        """The other end of the pair, reached at the gateway end's MAC."""
        return Neighbour(self.name, self.next_hop, self.gateway_mac)


async def configure_workload_end(
    rtnl: Rtnl, end: WorkloadEnd, protocol: int, index: int | None = None
) -> None:
    """Give a new workload end (made down, with its MTU) its address, neighbour and
    routes, and bring it up: one batch. ``index``: the end's index, when known."""
    with rtnl.remembering_indexes():
        if index is not None:
            rtnl.remember(end.name, index)
        await rtnl.batch(
            [
                await rtnl.no_ipv6_autoconf_request(end.name),
                await rtnl.link_request(end.name, up=True),
                await rtnl.address_request(end.name, end.address, nodad=True),
                await rtnl.neighbour_request(end.neighbour()),
                *[await rtnl.route_request(end.route(dst, protocol)) for dst in end.routes],
            ]
        )


def is_our_end(link: Link | None, end: WorkloadEnd, gateway_index: int) -> bool:
    """Whether ``link`` is the other end of the gateway's veth ``gateway_index``: a veth
    with the MAC fedgw gave it, pointing back at that index."""
    return (
        link is not None
        and link.kind == "veth"
        and (link.mac or "").lower() == end.mac
        and link.peer_index == gateway_index
    )


@dataclass(frozen=True, slots=True)
class NamespaceSnapshot:
    """A workload namespace as one set of dumps: reconciling many wires of one namespace
    (an endpoint serves hundreds) reads it once, not once per wire."""

    links: dict[str, Link]
    addresses: dict[str, set[Interface]]
    neighbours: dict[str, list[Neighbour]]
    main_routes: list[Route]

    @classmethod
    async def take(cls, rtnl: Rtnl) -> NamespaceSnapshot:
        addresses: dict[str, set[Interface]] = {}
        for name, iface in await rtnl.addresses():
            addresses.setdefault(name, set()).add(iface)
        neighbours: dict[str, list[Neighbour]] = {}
        for neighbour in await rtnl.neighbours():
            neighbours.setdefault(neighbour.dev, []).append(neighbour)
        return cls(
            links={link.name: link for link in await rtnl.link_details()},
            addresses=addresses,
            neighbours=neighbours,
            main_routes=await rtnl.routes(range(254, 255)),
        )


async def repair_workload_end(
    rtnl: Rtnl, end: WorkloadEnd, protocol: int, snapshot: NamespaceSnapshot | None = None
) -> list[str]:
    """Bring an existing workload end back to ``end``; what had to change. Reads come
    from ``snapshot`` when given (taken in this reconciliation), else from the kernel.

    Only what fedgw put there is touched: its address (other global addresses on the
    interface are removed: the interface is fedgw's), its neighbour entry and the routes
    through it that carry fedgw's protocol number.
    """
    changes: list[str] = []
    where = f"{end.name} in {end.netns}"
    snap = snapshot or await NamespaceSnapshot.take(rtnl)
    link = snap.links.get(end.name)
    if link is None:
        return [f"missing {where}"]
    if link.mtu != end.mtu or not link.up:
        await rtnl.set_link(end.name, mtu=end.mtu, up=True)
        changes.append(f"link {where}: mtu {end.mtu}, up")
    have = snap.addresses.get(end.name, set())
    for iface in have:
        if iface != end.address and not iface.ip.is_link_local:
            await rtnl.delete_address(end.name, iface)
            changes.append(f"address {iface} removed from {where}")
    if end.address not in have:
        await rtnl.add_address_nodad(end.name, end.address)
        changes.append(f"address {end.address} on {where}")
    neighbours = snap.neighbours.get(end.name, [])
    if not any(n.address == end.next_hop and n.mac.lower() == end.gateway_mac for n in neighbours):
        await rtnl.set_neighbour(end.neighbour())
        changes.append(f"neighbour {end.next_hop} on {where}")
    want = {end.route(dst, protocol) for dst in end.routes}
    current = {r for r in snap.main_routes if r.dev == end.name and r.protocol == protocol}
    for route in current - want:
        await rtnl.delete_route(route)
        changes.append(f"route {route.dst} removed from {where}")
    for route in sorted(want - current, key=lambda r: str(r.dst)):
        await rtnl.replace_route(route)
        changes.append(f"route {route.dst} via {route.via} on {where}")
    return changes
