"""The data plane of one gateway: tunnels to peer domains and wires of connections, set up
incrementally as connections come and go, and reconciled against the kernel at start."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedgw.batches import Batcher
from wireguard import nftables
from wireguard import rtnetlink as nl
from wireguard.drivers.base import (
    InterfaceRef,
    InterfaceSpec,
    PeerSpec,
    WireGuardDriver,
    plan_peer,
    sort_prefixes,
)
from wireguard.errors import (
    DataplaneError,
    InvalidSpec,
    LinkNotFound,
    NetlinkFailed,
    UnknownPeer,
    WireConflict,
)
from wireguard.keys import PublicKey
from wireguard.netns import LINKS_AT_ONCE, Address, Link, Neighbour, Route, Rtnl, Rule, in_netns
from wireguard.nftables import Mark, Nft
from wireguard.routing import (
    Allowed,
    GatewayObject,
    Ledger,
    Naming,
    Policy,
    TableAllocator,
    TableKey,
    TunnelPlan,
    WirePlan,
    check_mark_mask,
    check_prefix,
    describe,
    object_key,
    plan_tunnel,
    plan_wire,
    priority_span,
    wire_table,
)
from wireguard.wires import (
    ROLES,
    ClientWire,
    EndpointWire,
    NamespaceSnapshot,
    PeerTunnel,
    Role,
    Wire,
    configure_workload_end,
    is_our_end,
    repair_workload_end,
    wire_key,
    workload_netns,
)

log = logging.getLogger(__name__)

_DELETING_AT_ONCE = 16
"""Veth pairs deleted side by side when they cannot be deleted as a group (a socket and
a worker thread each)."""
_ATTACH_AT_ONCE = 32
"""Wires attached together at most (:meth:`Dataplane._attach_group`)."""
_DEFAULT_DISABLE_IPV6 = "/proc/sys/net/ipv6/conf/default/disable_ipv6"

WIREGUARD_OVERHEAD = 80
"""IPv6 (40) + UDP (8) + WireGuard (32): what a tunnel takes off the underlay's MTU."""
DEFAULT_UNDERLAY_MTU = 1500
_RESERVED_TABLES = frozenset({0, 253, 254, 255})


class DataplaneSettings(BaseModel):
    """How one gateway runs its data plane."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    netns: str | None = Field(
        None, description="the gateway-node namespace; None: the gateway's own namespace"
    )
    prefix: str = Field(
        "fgw",
        description="start of every interface name fedgw creates (1-6 letters/digits); "
        "gateways sharing a host or a namespace need different prefixes",
    )
    underlay_mtu: int | None = Field(
        None,
        ge=1280 + WIREGUARD_OVERHEAD,
        description="MTU of the underlay; None: that of the route to each peer (else 1500)",
    )
    mtu: int | None = Field(
        None,
        ge=1280,
        le=65535,
        description="MTU of tunnels and workload interfaces; None: underlay MTU minus 80",
    )
    mss_clamping: bool = Field(
        False, description="clamp the TCP MSS of SYNs through the tunnels to the route MTU"
    )
    disable_rp_filter: bool = Field(
        True,
        description="turn the reverse-path filter off in the gateway namespace: it looks "
        "sources up without fedgw's marks, so it cannot see per-peer tables; "
        "WireGuard's allowed IPs and fedgw's nftables source check do it instead",
    )
    ipv6_as_needed: bool = Field(
        False,
        description="links made in the gateway namespace start with IPv6 off (its "
        "default disable_ipv6); fedgw turns it on for its tunnels and for the wires that "
        "carry IPv6. For a namespace where only fedgw makes links: others' would start "
        "without IPv6 too",
    )
    table_base: int = Field(100_000, ge=1, description="first routing table fedgw uses")
    table_count: int = Field(100_000, ge=16, description="how many tables fedgw may use")
    rule_priority: int = Field(
        20_000,
        ge=1,
        description="fedgw's rules take priorities from here (5 plus 2 per 64 tables), "
        "all before the main table's (32766)",
    )
    route_protocol: int = Field(
        147, ge=5, le=255, description="protocol number tagging fedgw's routes and rules"
    )
    mark_mask: int = Field(
        0x1FFFF,
        description="the packet-mark bits fedgw sets on what arrives from its wires and "
        "tunnels (contiguous, enough for table_count tables); nothing else in the gateway "
        "namespace may use them",
    )
    link_group: int = Field(
        0xFED6,
        ge=1,
        le=0xFFFFFFFF,
        description="the link group fedgw moves veth pairs into to delete many at once; "
        "nothing else in the gateway namespace may use it",
    )

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        try:
            return check_prefix(value)
        except InvalidSpec as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _check_tables(self) -> DataplaneSettings:
        if any(t in self.tables for t in _RESERVED_TABLES) or self.tables.stop > 2**32:
            raise ValueError(
                f"tables {self.tables.start}..{self.tables.stop - 1} overlap reserved ones"
            )
        if self.priorities.stop > 32766:
            raise ValueError(
                f"rule priorities {self.priorities.start}..{self.priorities.stop - 1} "
                "must come before the main table's (32766): lower rule_priority or table_count"
            )
        try:
            check_mark_mask(self.mark_mask, self.table_count)
        except InvalidSpec as exc:
            raise ValueError(str(exc)) from None
        return self

    @property
    def tables(self) -> range:
        return range(self.table_base, self.table_base + self.table_count)

    @property
    def priorities(self) -> range:
        return range(self.rule_priority, self.rule_priority + priority_span(self.table_count))


# --- status ----------------------------------------------------------------------------------


class PeerStatus(BaseModel):
    """One tunnel, as ``fedgw status`` shows it."""

    domain: str
    interface: str
    public_key: str | None
    """``None``: the peer's key is not known yet; the interface has no peer."""
    endpoint: str | None
    listen_port: int | None
    mtu: int
    persistent_keepalive: int
    allowed_ips: list[str]
    last_handshake: datetime | None
    rx_bytes: int
    tx_bytes: int
    error: str | None = None


class WireStatus(BaseModel):
    """One wire: which interfaces carry it and what it routes."""

    connection_id: str
    role: Role
    peer: str | None
    gateway_interface: str
    workload: str
    workload_interface: str
    address: str
    other_address: str
    routes: list[str]
    mtu: int
    tables: list[int]


class DataplaneStatus(BaseModel):
    driver: str
    driver_name: str
    netns: str | None
    peers: list[PeerStatus]
    wires: list[WireStatus]


class ReconcileReport(BaseModel):
    """What a reconciliation changed, and what it could not bring about (each wire or
    peer that failed is left out; the rest is applied)."""

    changes: list[str] = Field(default_factory=list)
    failures: list[str] = Field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.changes)


@dataclass(frozen=True, slots=True)
class DesiredState:
    """Everything the data plane should hold, as the gateway builds it from its store."""

    peers: Sequence[PeerTunnel] = ()
    wires: Sequence[Wire] = ()


@dataclass(slots=True)
class _Tunnel:
    peer: PeerTunnel
    plan: TunnelPlan
    mtu: int


@dataclass(slots=True)
class _Model:
    """What the data plane holds: the desired objects and the table numbers."""

    tables: TableAllocator
    ledger: Ledger = field(default_factory=Ledger)
    tunnels: dict[str, _Tunnel] = field(default_factory=dict)
    wires: dict[tuple[str, Role], WirePlan] = field(default_factory=dict)
    veths: dict[str, tuple[str, Role]] = field(default_factory=dict)
    """Which wire has which gateway-side veth name."""

    def add_wire(self, plan: WirePlan) -> None:
        key = wire_key(plan.wire)
        self.wires[key] = plan
        self.veths[plan.veth] = key

    def remove_wire(self, plan: WirePlan) -> None:
        del self.wires[wire_key(plan.wire)]
        self.veths.pop(plan.veth, None)

    def connection_wires(self, connection_id: str) -> list[WirePlan]:
        found = (self.wires.get((connection_id, role)) for role in ROLES)
        return [plan for plan in found if plan is not None]

    def table_in_use(self, key: TableKey) -> bool:
        kind, name = key
        if kind == "peer":
            return name in self.tunnels
        return bool(self.connection_wires(name))


@dataclass(slots=True, eq=False)
class _Attach:
    """A wire to attach, as queued with others, and what became of it."""

    wire: Wire
    taken: bool = False
    """In a group: attached or failed in it, even if its caller stops waiting."""
    plan: WirePlan | None = None
    """Once this request attached it (not when it was there already)."""
    settled: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(slots=True, eq=False)
class _Planned:
    """A wire of a group, planned and counted into the ledger."""

    index: int
    """The wire's place among the group's requests."""
    plan: WirePlan
    assigned: list[TableKey]
    new: list[GatewayObject]


class Dataplane:
    """Tunnels and wires of one gateway, in its gateway-node namespace.

    Use it as ``async with Dataplane(settings, driver) as dp``. Operations are serialised;
    each one changes only the objects it needs (a wire's veth, rules and routes, and its
    peer's allowed IPs, incrementally), so adding or removing a connection never resets
    the session of a tunnel. A failed operation is rolled back. :meth:`reconcile` brings
    the kernel to a whole desired state, removing what fedgw owns and nobody wants.
    """

    def __init__(self, settings: DataplaneSettings, driver: WireGuardDriver) -> None:
        self.settings = settings
        self.driver = driver
        self.naming = Naming(settings.prefix, settings.netns or _own_netns())
        self.policy = Policy(
            settings.rule_priority, settings.route_protocol, settings.tables, settings.mark_mask
        )
        self._model = _Model(TableAllocator(settings.tables))
        self._lock = asyncio.Lock()
        self._rtnl: Rtnl | None = None
        self._nft: Nft | None = None
        # Tunnel interfaces' indexes, for the routes of every wire through them; dropped
        # whenever a tunnel may have been remade, and after any failed attach.
        self._tunnel_indexes: dict[str, int] = {}
        # Veth pairs being deleted after their wire let go of the lock (by name): an
        # attach that wants one of those names waits until it is free.
        self._dying: dict[str, asyncio.Event] = {}
        # Their deletion: whatever is waiting while a deletion runs goes in the next one.
        self._deletions: Batcher[str, None] = Batcher(self._delete_pairs, LINKS_AT_ONCE)
        # Wires to attach: those asked for while a group is being attached go in the next.
        self._attaches: Batcher[_Attach, WireStatus] = Batcher(self._attach_group, _ATTACH_AT_ONCE)
        self._deleting = asyncio.Semaphore(_DELETING_AT_ONCE)
        self._group_failed = False  # told the operator once
        # Peers whose list of allowed IPs is to be rewritten once the lock is free (see
        # _rewrite_allowed_soon), and the tasks doing it.
        self._rewrites: dict[str, asyncio.Future[None]] = {}
        self._rewriting: set[asyncio.Task[None]] = set()
        # Whether links start without IPv6 in the gateway namespace (ipv6_as_needed, or
        # its administrator): fedgw's own that carry IPv6 then need it turned on.
        self._born_without_ipv6 = False

    # --- life cycle ---------------------------------------------------------------------

    async def open(self) -> None:
        """Open the netlink sessions of the gateway namespace and prepare it (forwarding,
        reverse-path filter, fedgw's nftables table)."""
        if self._rtnl is None:
            rtnl = Rtnl(self.settings.netns)
            await rtnl.__aenter__()
            self._rtnl = rtnl
        if self._nft is None:
            nft = Nft(self.settings.netns, self.settings.prefix)
            await nft.__aenter__()
            self._nft = nft
        async with self._lock:
            await self._prepare()

    async def close(self) -> None:
        """Close the sessions; tunnels and wires stay (a restarted gateway adopts them)."""
        await self._attaches.wait()
        await asyncio.gather(*self._rewriting, return_exceptions=True)
        await self._deletions.wait()
        for session in (self._rtnl, self._nft):
            if session is not None:
                await session.__aexit__(None, None, None)
        self._rtnl = self._nft = None

    async def __aenter__(self) -> Dataplane:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def rtnl(self) -> Rtnl:
        if self._rtnl is None:
            raise RuntimeError("Dataplane used before open()")
        return self._rtnl

    @property
    def nft(self) -> Nft:
        if self._nft is None:
            raise RuntimeError("Dataplane used before open()")
        return self._nft

    def _ref(self, ifname: str) -> InterfaceRef:
        return InterfaceRef(ifname, self.settings.netns)

    async def _sysctls(self, wanted: dict[str, str]) -> tuple[list[str], bool]:
        """Set sysctls of the gateway namespace (those missing there, IPv6 being off, are
        left alone): what changed, and whether links start without IPv6."""

        def sync() -> tuple[list[str], bool]:
            changes = []
            for key, value in wanted.items():
                path = Path("/proc/sys", *key.split("."))
                with contextlib.suppress(FileNotFoundError):
                    if path.read_text().strip() != value:
                        path.write_text(value)
                        changes.append(f"sysctl {key}={value}")
            try:
                born_without = Path(_DEFAULT_DISABLE_IPV6).read_text().strip() == "1"
            except FileNotFoundError:
                born_without = False  # no IPv6 at all: nothing to turn on
            return changes, born_without

        if self.settings.netns is None:
            return await asyncio.to_thread(sync)
        return await in_netns(self.settings.netns, sync)

    async def _prepare(self) -> list[str]:
        wanted = {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"}
        if self.settings.disable_rp_filter:
            wanted |= {"net.ipv4.conf.all.rp_filter": "0", "net.ipv4.conf.default.rp_filter": "0"}
        if self.settings.ipv6_as_needed:
            # Up with IPv6 on, even with no address, a link costs the kernel work that
            # grows with the links already there: a multicast route added by walking the
            # list of all of them, and a walk of every IPv6 route at each carrier change,
            # both under the lock all netlink changes share; and MLD reports.
            wanted["net.ipv6.conf.default.disable_ipv6"] = "1"
        changes, self._born_without_ipv6 = await self._sysctls(wanted)
        # Written every time, in one transaction that keeps the maps' elements: cheaper
        # than comparing, and it repairs whatever else changed the chains.
        netns, naming = self.settings.netns, self.naming
        clamp = naming.tunnel_pattern() if self.settings.mss_clamping else None
        script = nftables.ruleset(naming.prefix, naming.patterns(), clamp_tunnels=clamp)
        await nftables.apply_ruleset(netns, script)
        return changes

    # --- tunnels ------------------------------------------------------------------------

    async def _tunnel_mtu(self, peer: PeerTunnel) -> int:
        if peer.mtu is not None:
            return peer.mtu
        if self.settings.mtu is not None:
            return self.settings.mtu
        underlay = self.settings.underlay_mtu
        if underlay is None and peer.endpoint is not None:
            underlay = await self.rtnl.route_mtu(peer.endpoint.host)
        return max((underlay or DEFAULT_UNDERLAY_MTU) - WIREGUARD_OVERHEAD, 1280)

    def _interface_spec(self, tunnel: _Tunnel) -> InterfaceSpec:
        return InterfaceSpec(
            name=tunnel.plan.interface,
            netns=self.settings.netns,
            private_key=tunnel.peer.private_key,
            listen_port=tunnel.peer.listen_port,
            mtu=tunnel.mtu,
        )

    def _peer_spec(self, peer: PeerTunnel, key: PublicKey, ledger: Ledger) -> PeerSpec:
        return PeerSpec(
            public_key=key,
            endpoint=peer.endpoint,
            allowed_ips=ledger.allowed(peer.domain),
            persistent_keepalive=peer.persistent_keepalive,
            preshared_key=peer.preshared_key,
        )

    async def _sync_interface(self, tunnel: _Tunnel) -> list[str]:
        """Create or adopt the tunnel's WireGuard interface and bring it to ``tunnel``
        (key, port, MTU); its peers are left alone. What changed."""
        ref = self._ref(tunnel.plan.interface)
        before = None
        with contextlib.suppress(DataplaneError):
            before = await self.driver.state(ref)
        state = await self.driver.ensure_interface(self._interface_spec(tunnel))
        # A tunnel carries whatever its wires do; it is one link per peer.
        ipv6_on = self._born_without_ipv6 and self.rtnl.enable_ipv6(ref.name)
        if before is None:
            return [f"tunnel {ref.name} to {tunnel.peer.domain}"]
        if ipv6_on:
            return [f"tunnel {ref.name}: IPv6 on"]
        if (before.public_key, before.listen_port) != (state.public_key, state.listen_port):
            return [f"tunnel {ref.name} reconfigured"]
        return []

    async def _sync_allowed(self, tunnel: _Tunnel, ledger: Ledger) -> list[str]:
        """Bring the tunnel's one peer to ``tunnel`` with exactly the allowed IPs of the
        ledger (only what differs is written: the session stays); remove other peers (all
        of them while the peer's key is unknown)."""
        ref = self._ref(tunnel.plan.interface)
        state = await self.driver.state(ref)
        key = tunnel.peer.public_key
        changes = []
        if key is not None:
            desired = self._peer_spec(tunnel.peer, key, ledger)
            if plan_peer(state.peer(key), desired) is not None:
                await self.driver.set_peer(ref, desired)
                changes.append(f"peer {tunnel.peer.domain} on {ref.name}")
        for other in state.peers:
            if other.public_key != key:
                await self.driver.remove_peer(ref, other.public_key)
                changes.append(f"stale peer {other.public_key} removed from {ref.name}")
        return changes

    async def _restore_routes(self, dev: str) -> None:
        """Put back the routes through ``dev`` that the kernel dropped with an earlier
        incarnation of it (a wireguard-go that died took its TUN device along)."""
        want = {o for o in self._model.ledger if isinstance(o, Route) and o.dev == dev}
        if not want:
            return
        have = set(await self.rtnl.routes(self.settings.tables))
        for route in want - have:
            await self.rtnl.replace_route(route)

    async def ensure_peer(self, peer: PeerTunnel) -> PeerStatus:
        """Create or update the tunnel to ``peer.domain``: its WireGuard interface, its one
        peer (with the allowed IPs of the wires through it), its table and rules. A
        changed remote key replaces the peer; a changed local key resets the session.
        Without a remote key, the interface is made with no peer: ready for the first
        connection, which brings the key, but no wire can go through it until then."""
        async with self._lock:
            self._tunnel_indexes.clear()
            model = self._model
            _check_port(peer, model)
            old = model.tunnels.get(peer.domain)
            if peer.public_key is None and any(
                p.wire.peer == peer.domain for p in model.wires.values()
            ):
                raise WireConflict(f"the tunnel to {peer.domain} carries wires: it needs its peer")
            key: TableKey = ("peer", peer.domain)
            table = model.tables.assign(key)
            plan = plan_tunnel(peer.domain, self.naming, self.policy, table)
            tunnel = _Tunnel(peer, plan, await self._tunnel_mtu(peer))
            new: list[GatewayObject] = []
            if old is None:
                model.ledger.check(plan.objects, f"peer {peer.domain}")
                new = model.ledger.acquire(plan.objects)
            try:
                remade = await self._sync_interface(tunnel)
                await self._sync_allowed(tunnel, model.ledger)
                await self._apply(new)
            except BaseException:
                if old is None:
                    await self._shielded(self._remove(model.ledger.release(plan.objects)))
                    with contextlib.suppress(DataplaneError):
                        await self.driver.remove_interface(self._ref(plan.interface))
                    model.tables.release(key)
                raise
            model.tunnels[peer.domain] = tunnel
            if remade and old is not None:
                await self._restore_routes(plan.interface)
            return await self._peer_status(tunnel)

    async def remove_peer(self, domain: str) -> list[str]:
        """Remove the tunnel to ``domain`` and every wire through it; the ids of the
        connections whose wires went with it."""
        async with self._lock:
            self._tunnel_indexes.clear()
            model = self._model
            # Out of the model first: the wires' allowed IPs need not be taken off an
            # interface that is about to go.
            tunnel = model.tunnels.pop(domain, None)
            plans = [p for p in model.wires.values() if p.wire.peer == domain]
            for plan in plans:
                await self._unwire(plan)
            veths = [plan.veth for plan in plans]
            gone = self._dying_now(veths)
            try:
                if tunnel is not None:
                    await self._remove(model.ledger.release(tunnel.plan.objects))
                    await self.driver.remove_interface(self._ref(tunnel.plan.interface))
                model.tables.release(("peer", domain))
            except BaseException:
                await self._shielded(self._delete_veths(veths, gone))
                raise
        # The wires' pairs go after the lock is let go, as in detach().
        await self._shielded(self._delete_veths(veths, gone))
        return sorted({p.wire.connection_id for p in plans})

    # --- wires ------------------------------------------------------------------------------

    async def attach_client(self, wire: ClientWire) -> WireStatus:
        """Wire a client (NSC) into its connection. Idempotent; a changed wire replaces
        the old one."""
        return await self._attach(wire)

    async def attach_endpoint(self, wire: EndpointWire) -> WireStatus:
        """Wire an endpoint (NSE) into its connection. Idempotent; a changed wire
        replaces the old one."""
        return await self._attach(wire)

    async def detach(self, connection_id: str) -> bool:
        """Remove the wires of a connection (both ends, if it is local); False if it had
        none. Nothing else is touched: shared routes and allowed IPs stay while others
        need them.

        The path is closed under the lock; the veth pairs are deleted after it is let
        go. The kernel takes 15-20 ms to delete a link (it waits for RCU grace periods):
        other wires need not wait for that, and pairs closed meanwhile are deleted
        together, in one wait."""
        rewrites: list[asyncio.Future[None]] = []
        async with self._lock:
            plans = self._model.connection_wires(connection_id)
            for plan in plans:
                await self._unwire(plan, rewrites)
            veths = [plan.veth for plan in plans]
            gone = self._dying_now(veths)
        await self._shielded(self._finish_detach(veths, gone, rewrites))
        return bool(plans)

    async def _finish_detach(
        self, veths: list[str], gone: asyncio.Event, rewrites: list[asyncio.Future[None]]
    ) -> None:
        results = await asyncio.gather(
            self._delete_veths(veths, gone), *rewrites, return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def _dying_now(self, veths: list[str]) -> asyncio.Event:
        """Mark ``veths`` as being deleted (under the lock, before it is let go); the
        event is set once they are gone."""
        gone = asyncio.Event()
        for veth in veths:
            self._dying[veth] = gone
        return gone

    async def _delete_veths(self, veths: list[str], gone: asyncio.Event) -> None:
        """Delete veth pairs marked by :meth:`_dying_now`, together with those that
        others delete meanwhile."""
        try:
            for failure in await self._delete_together(veths):
                if failure is not None:
                    raise failure
        finally:
            for veth in veths:
                if self._dying.get(veth) is gone:
                    del self._dying[veth]
            gone.set()

    async def _delete_together(self, veths: Iterable[str]) -> list[BaseException | None]:
        """Delete veth pairs in a batch (see :meth:`_delete_pairs`); for each, None or
        what it failed with."""
        key = self.settings.netns or ""
        return await asyncio.gather(
            *(self._deletions.submit(key, veth) for veth in veths), return_exceptions=True
        )

    async def _delete_pairs(self, _: str, veths: list[str]) -> list[Exception | None]:
        """Delete veth pairs as one link group (:meth:`Rtnl.delete_links`): the kernel
        waits for RCU grace periods (15-20 ms) once for the group, not once for each.
        On a netlink session of its own, which that wait holds up; the next batch
        gathers meanwhile."""
        group = self.settings.link_group
        try:
            async with Rtnl(self.settings.netns) as rtnl:
                await rtnl.delete_links(veths, group)
            return [None] * len(veths)
        except DataplaneError as exc:
            # Something in the group that has no way to be deleted (EOPNOTSUPP), say.
            if not self._group_failed:
                self._group_failed = True
                log.warning(
                    "cannot delete link group %d (%s): is it used by something else? "
                    "Veth pairs are deleted one by one; give fedgw a group of its own",
                    group,
                    exc,
                )

        async def delete(veth: str) -> None:
            async with self._deleting, Rtnl(self.settings.netns) as rtnl:
                await rtnl.delete_link(veth)

        results = await asyncio.gather(*(delete(v) for v in veths), return_exceptions=True)
        outcomes: list[Exception | None] = []
        for result in results:
            if isinstance(result, DataplaneError) or result is None:
                outcomes.append(result)
            else:
                raise result
        return outcomes

    def _wire_mtu(self, wire: Wire, model: _Model) -> int:
        if wire.mtu is not None:
            return wire.mtu
        if wire.peer is not None:
            return model.tunnels[wire.peer].mtu
        if self.settings.mtu is not None:
            return self.settings.mtu
        underlay = self.settings.underlay_mtu or DEFAULT_UNDERLAY_MTU
        return max(underlay - WIREGUARD_OVERHEAD, 1280)

    def _plan(self, wire: Wire, model: _Model) -> tuple[WirePlan, list[TableKey]]:
        """Plan ``wire`` against ``model`` (assigning its tables); the tables newly
        assigned, to release if the wire does not come about."""
        if wire.peer is not None:
            tunnel = model.tunnels.get(wire.peer)
            if tunnel is None:
                raise UnknownPeer(f"no tunnel to peer {wire.peer} (ensure_peer first)")
            if tunnel.peer.public_key is None:
                raise UnknownPeer(f"the tunnel to {wire.peer} has no peer yet (its key)")
        netns = workload_netns(wire.workload)
        key = wire_table(wire)
        assigned: list[TableKey] = [key] if model.tables.get(key) is None else []
        model.tables.assign(key)
        try:
            plan = plan_wire(
                wire,
                naming=self.naming,
                policy=self.policy,
                tables=model.tables,
                workload_netns=netns,
                mtu=self._wire_mtu(wire, model),
            )
            what = f"connection {wire.connection_id} ({wire.role})"
            if model.veths.get(plan.veth, wire_key(wire)) != wire_key(wire):
                raise WireConflict(f"{what}: interface name {plan.veth} is taken")
            model.ledger.check(plan.objects, what)
        except BaseException:
            for key in assigned:
                model.tables.release(key)
            raise
        return plan, assigned

    async def _attach(self, wire: Wire) -> WireStatus:
        job = _Attach(wire)
        try:
            return await self._attaches.submit("", job)
        except asyncio.CancelledError:
            # Its group carries on without the caller: a cancelled attach leaves
            # nothing behind, so the wire comes off again.
            await self._shielded(self._abandon(job))
            raise

    async def _abandon(self, job: _Attach) -> None:
        if not job.taken:
            return  # still queued: the batcher drops a request whose caller left
        await job.settled.wait()
        if job.plan is None:
            return
        async with self._lock:
            if self._model.wires.get(wire_key(job.wire)) is job.plan:
                await self._detach(job.plan)

    async def _attach_group(self, _: str, jobs: list[_Attach]) -> list[WireStatus | Exception]:
        """Attach the wires asked for while the previous group was being attached, in
        one hold of the lock: their veth pairs made side by side, then for all of them
        one netlink batch, one WireGuard write per peer, one batch of rules and one
        nftables transaction. Each of those has a fixed cost, and so do the changes of
        routes and links themselves: wireguard-go wakes up for every burst of them in
        its namespace, for 30-100 µs of CPU each time here. If a joint step fails, the
        group is undone and each wire tried alone: one wire's failure stays its own."""
        for job in jobs:  # before the first await: the batcher took them all
            job.taken = True
        try:
            async with self._lock:
                return await self._attach_together(jobs)
        finally:
            for job in jobs:
                job.settled.set()

    async def _attach_together(self, jobs: list[_Attach]) -> list[WireStatus | Exception]:
        model = self._model
        results: list[WireStatus | Exception | None] = [None] * len(jobs)
        planned: list[_Planned] = []  # every wire planned, failed or not
        group: list[_Planned] = []  # those still on their way
        alone: list[int] = []  # each tried after, as a group of one
        keys: set[tuple[str, Role]] = set()
        try:
            for i, job in enumerate(jobs):
                key = wire_key(job.wire)
                if key in keys:
                    alone.append(i)  # the same wire again: after the first
                    continue
                keys.add(key)
                existing = model.wires.get(key)
                if existing is not None and existing.wire == job.wire:
                    results[i] = self._wire_status(existing, model)
                    continue
                try:
                    if existing is not None:
                        await self._detach(existing)
                    plan, assigned = self._plan(job.wire, model)
                except Exception as exc:
                    results[i] = exc
                    continue
                p = _Planned(i, plan, assigned, model.ledger.acquire(plan.objects))
                planned.append(p)
                group.append(p)
            with self.rtnl.remembering_indexes():
                failed: list[_Planned] = []
                for p in group:
                    try:
                        await self._remember_tunnel(p.plan.wire)
                    except Exception as exc:
                        results[p.index] = exc
                        failed.append(p)
                await self._shielded(self._undo_wires(failed, group))
                made = await asyncio.gather(
                    *(self._create_veth(p.plan) for p in group), return_exceptions=True
                )
                for p, failure in zip(group, made, strict=True):
                    if isinstance(failure, Exception):
                        results[p.index] = failure
                    elif failure is not None:
                        raise failure
                failed = [p for p, failure in zip(group, made, strict=True) if failure]
                await self._shielded(self._undo_wires(failed, group))
                if group:
                    # What the wires brought that is new and still wanted: a failed
                    # wire's shares belong to the others now.
                    objects = [o for p in planned for o in p.new if model.ledger.holds(o)]
                    try:
                        await self._apply(objects, bring_up=[p.plan for p in group])
                    except Exception as exc:
                        self._tunnel_indexes.clear()
                        if len(group) == 1:
                            results[group[0].index] = exc
                        else:
                            alone = [p.index for p in group] + alone
                        await self._shielded(self._undo_wires(list(group), group))
        except BaseException:
            self._tunnel_indexes.clear()
            await self._shielded(self._undo_wires(list(group), group))
            raise
        for p in group:
            model.add_wire(p.plan)
            jobs[p.index].plan = p.plan
            results[p.index] = self._wire_status(p.plan, model)
        for i in alone:
            [results[i]] = await self._attach_together([jobs[i]])
        done = [r for r in results if r is not None]
        assert len(done) == len(jobs), "every wire of a group has an outcome"
        return done

    async def _undo_wires(self, undo: list[_Planned], group: list[_Planned]) -> None:
        """Undo wires of a group that were planned, and maybe made, but not added to
        the model; they leave ``group``. A table one of them assigned stays while a
        wire left in the group looks traffic up in it."""
        if not undo:
            return
        model = self._model
        for p in undo:
            group.remove(p)
        gone = [o for p in reversed(undo) for o in model.ledger.release(p.plan.objects)]
        try:
            await self._remove(gone)
        except DataplaneError as exc:
            log.warning("rolling back %d wires left something: %s", len(undo), exc)
        veths = [p.plan.veth for p in undo]
        for veth, failure in zip(veths, await self._delete_together(veths), strict=True):
            if failure is not None:
                log.warning("rolling back %s left its veth pair: %s", veth, failure)
        for p in undo:
            for key in p.assigned:
                heir = next((q for q in group if q.plan.table == key), None)
                if heir is not None:
                    heir.assigned.append(key)
                else:
                    model.tables.release(key)

    async def _remember_tunnel(self, wire: Wire) -> None:
        if wire.peer is None:
            return
        name = self._model.tunnels[wire.peer].plan.interface
        index = self._tunnel_indexes.get(name)
        if index is None:
            index = self._tunnel_indexes[name] = await self.rtnl.index(name)
        self.rtnl.remember(name, index)

    @staticmethod
    async def _shielded(coro: Coroutine[object, object, object]) -> None:
        # A rollback must finish even when the operation was cancelled.
        await asyncio.shield(coro)

    def _ipv6_at_gateway_end(self, plan: WirePlan) -> bool:
        return plan.ipv6 or not self._born_without_ipv6

    def _turn_ipv6_on(self, plan: WirePlan) -> bool:
        """IPv6 on at the wire's gateway end if it carries IPv6 where links start
        without it; whether it was off."""
        return plan.ipv6 and self._born_without_ipv6 and self.rtnl.enable_ipv6(plan.veth)

    async def _create_veth(self, plan: WirePlan) -> None:
        """The wire's veth pair, both ends down, the workload's end configured and up;
        the gateway's end is brought up by :meth:`_apply`. The workload's end has IPv6
        as its namespace gives it; the gateway's, only if the wire carries IPv6 where
        links start without it."""
        end = plan.workload_end
        if (dying := self._dying.get(plan.veth)) is not None:
            await dying.wait()  # the same wire, detached a moment ago
        for attempt in (1, 2):
            try:
                link = await self.rtnl.add_veth_pair(
                    plan.veth,
                    end.name,
                    peer_netns=end.netns,
                    mac=plan.mac,
                    peer_mac=end.mac,
                    mtu=plan.mtu,
                )
                break
            except NetlinkFailed as exc:
                if exc.errno != errno.EEXIST:
                    raise
                # Left behind by a gateway that died between creating and recording it?
                if attempt == 1 and await self.rtnl.delete_link(plan.veth):
                    continue
                raise WireConflict(
                    f"connection {plan.wire.connection_id}: an interface {end.name} exists "
                    f"in {end.netns} already"
                ) from exc
        try:
            self._turn_ipv6_on(plan)
            async with Rtnl(end.netns) as rtnl:
                await configure_workload_end(rtnl, end, self.policy.protocol, link.peer_index)
        except BaseException:
            await self._shielded(self.rtnl.delete_link(plan.veth))
            raise

    async def _detach(self, plan: WirePlan) -> None:
        await self._unwire(plan)
        await self.rtnl.delete_link(plan.veth)

    async def _unwire(
        self, plan: WirePlan, rewrites: list[asyncio.Future[None]] | None = None
    ) -> None:
        """Everything of a wire but its veth pair, which takes the routes and neighbours
        on it along when it goes: removing them one by one would only cost time.
        ``rewrites``: take the allowed IPs off their peers later (see
        :meth:`_rewrite_allowed_soon`), adding the writes to wait for."""
        # Out of the model first: if the kernel refuses a step, what is left is not
        # wanted any more, and the next reconciliation removes it.
        model = self._model
        gone = model.ledger.release(plan.objects)
        model.remove_wire(plan)
        if not model.table_in_use(plan.table):
            model.tables.release(plan.table)
        await self._remove((o for o in gone if not _on_link(o, plan.veth)), rewrites)

    def _rewrite_allowed_soon(self, domain: str) -> asyncio.Future[None]:
        """Rewrite the peer's allowed IPs from the ledger as soon as the lock is free.

        WireGuard removes allowed IPs only by replacing a peer's whole list, one prefix
        per connection. Wires closed one after another (the lock is fair: they queue
        ahead of this write) share a single write instead of one each; until it is made,
        the peer may still send from the removed prefixes, which lead nowhere any more.
        Written under the lock, from the ledger as it is then: a wire attached meanwhile
        keeps its prefixes."""
        pending = self._rewrites.get(domain)
        if pending is None:
            pending = self._rewrites[domain] = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(self._rewrite_allowed(domain, pending))
            self._rewriting.add(task)
            task.add_done_callback(self._rewriting.discard)
        return pending

    async def _rewrite_allowed(self, domain: str, done: asyncio.Future[None]) -> None:
        try:
            async with self._lock:
                # Removals from here on need a write of their own.
                if self._rewrites.get(domain) is done:
                    del self._rewrites[domain]
                await self._write_allowed(domain)
        except asyncio.CancelledError:
            done.cancel()
            raise
        except Exception as exc:
            done.set_exception(exc)
        else:
            done.set_result(None)
        finally:
            # Cancelled or failed before it got the lock: the next removal starts anew.
            if self._rewrites.get(domain) is done:
                del self._rewrites[domain]

    # --- gateway objects --------------------------------------------------------------------

    async def _apply(
        self, objects: Iterable[GatewayObject], *, bring_up: Sequence[WirePlan] = ()
    ) -> None:
        """Create objects in an order that opens the path last: the links ``bring_up``
        (new wires' gateway ends), neighbours and routes, then allowed IPs, then the
        rules that lead traffic to them, then the marks that select those rules. Two
        batches, a WireGuard update per peer and an nftables transaction."""
        objs = list(objects)
        rtnl = self.rtnl
        with rtnl.remembering_indexes():
            first = [r for plan in bring_up for r in await self._up_requests(plan)]
            first += [await rtnl.neighbour_request(n) for n in objs if isinstance(n, Neighbour)]
            first += [await rtnl.route_request(r) for r in objs if isinstance(r, Route)]
            await rtnl.batch(first)
        await self._allowed(objs, add=True)
        await rtnl.batch([rtnl.rule_request(r) for r in objs if isinstance(r, Rule)])
        await self.nft.add(m for m in objs if isinstance(m, Mark))

    async def _up_requests(self, plan: WirePlan) -> list[nl.Request]:
        """Bringing a new wire's gateway end up, with no IPv6 autoconfiguration (where
        it has IPv6 at all: the request is a change of the link that all listeners in the
        namespace hear of, wireguard-go's too)."""
        up = await self.rtnl.link_request(plan.veth, up=True)
        if not self._ipv6_at_gateway_end(plan):
            return [up]
        return [await self.rtnl.no_ipv6_autoconf_request(plan.veth), up]

    async def _remove(
        self,
        objects: Iterable[GatewayObject],
        rewrites: list[asyncio.Future[None]] | None = None,
    ) -> None:
        """Remove objects, closing the path first (marks, rules), then what it led to.
        ``rewrites``: as for :meth:`_unwire`."""
        objs = list(objects)
        await self.nft.delete(m for m in objs if isinstance(m, Mark))
        await self.rtnl.delete_rules([o for o in objs if isinstance(o, Rule)])
        if rewrites is None:
            await self._allowed(objs, add=False)
        else:
            domains = {o.domain for o in objs if isinstance(o, Allowed)}
            rewrites += [self._rewrite_allowed_soon(d) for d in sorted(domains)]
        await self.rtnl.delete_routes([o for o in objs if isinstance(o, Route)])
        for n in (o for o in objs if isinstance(o, Neighbour)):
            await self.rtnl.delete_neighbour(n)

    async def _allowed(self, objs: list[GatewayObject], *, add: bool) -> None:
        by_domain: dict[str, list[Allowed]] = {}
        for o in objs:
            if isinstance(o, Allowed):
                by_domain.setdefault(o.domain, []).append(o)
        for domain, allowed in by_domain.items():
            if not add:
                await self._write_allowed(domain)
                continue
            peer = self._peer_on(domain)
            if peer is None:
                continue  # the tunnel is being set up or removed; it syncs its own list
            # The ledger counts references: these prefixes are new to the peer.
            nets = [a.prefix for a in allowed]
            await self.driver.add_allowed_ips(*peer, nets, known_new=True)

    def _peer_on(self, domain: str) -> tuple[InterfaceRef, PublicKey] | None:
        """The interface and the key of the peer ``domain``, if both are known."""
        tunnel = self._model.tunnels.get(domain)
        if tunnel is None or tunnel.peer.public_key is None:
            return None
        return self._ref(tunnel.plan.interface), tunnel.peer.public_key

    async def _write_allowed(self, domain: str) -> None:
        """Give the peer exactly the allowed IPs the ledger holds for it (WireGuard
        removes them only by replacing the list). The interface is not read first: that
        read grows with every connection and would slow each close."""
        peer = self._peer_on(domain)
        if peer is None:
            return  # the tunnel is being set up or removed; it syncs its own list
        with contextlib.suppress(LinkNotFound):
            await self.driver.replace_allowed_ips(*peer, self._model.ledger.allowed(domain))

    # --- status -----------------------------------------------------------------------------

    async def _peer_status(self, tunnel: _Tunnel, *, allowed_ips: bool = True) -> PeerStatus:
        ref = self._ref(tunnel.plan.interface)
        peer = tunnel.peer
        status = PeerStatus(
            domain=peer.domain,
            interface=ref.name,
            public_key=str(peer.public_key) if peer.public_key else None,
            endpoint=str(peer.endpoint) if peer.endpoint else None,
            listen_port=peer.listen_port,
            mtu=tunnel.mtu,
            persistent_keepalive=peer.persistent_keepalive,
            allowed_ips=[],  # what the interface has; what it should have if unreadable
            last_handshake=None,
            rx_bytes=0,
            tx_bytes=0,
        )
        try:
            state = await self.driver.state(ref, allowed_ips=allowed_ips)
        except DataplaneError as exc:
            return self._peer_error(status, str(exc), allowed_ips=allowed_ips)
        if peer.public_key is None:
            return status.model_copy(update={"listen_port": state.listen_port})
        found = state.peer(peer.public_key)
        if found is None:
            error = "the peer is missing on the interface"
            return self._peer_error(status, error, allowed_ips=allowed_ips)
        return status.model_copy(
            update={
                "listen_port": state.listen_port,
                "endpoint": str(found.endpoint) if found.endpoint else None,
                "allowed_ips": [str(n) for n in found.allowed_ips],
                "last_handshake": found.last_handshake,
                "rx_bytes": found.rx_bytes,
                "tx_bytes": found.tx_bytes,
            }
        )

    def _peer_error(self, status: PeerStatus, error: str, *, allowed_ips: bool) -> PeerStatus:
        """``status`` with ``error`` and (if asked for) the allowed IPs the interface
        should have, in the interface's order: formatted only here, as there are
        thousands of them with many connections."""
        if not allowed_ips:
            return status.model_copy(update={"error": error})
        allowed = [str(n) for n in sort_prefixes(self._model.ledger.allowed(status.domain))]
        return status.model_copy(update={"error": error, "allowed_ips": allowed})

    def _wire_status(self, plan: WirePlan, model: _Model) -> WireStatus:
        wire = plan.wire
        return WireStatus(
            connection_id=wire.connection_id,
            role=wire.role,
            peer=wire.peer,
            gateway_interface=plan.veth,
            workload=str(wire.workload),
            workload_interface=wire.interface,
            address=str(wire.address),
            other_address=str(wire.other_address),
            routes=[str(r) for r in wire.routes],
            mtu=plan.mtu,
            tables=[t] if (t := model.tables.get(plan.table)) is not None else [],
        )

    async def peers(self, *, allowed_ips: bool = True) -> list[PeerStatus]:
        """Each tunnel: its peer, handshake and counters. ``allowed_ips=False`` leaves
        the peers' allowed IPs out (empty), for callers after the counters: there is
        one per connection, and reading them would hold up the wiring."""
        async with self._lock:
            return await self._peers(allowed_ips=allowed_ips)

    async def _peers(self, *, allowed_ips: bool = True) -> list[PeerStatus]:
        tunnels = sorted(self._model.tunnels.items())
        return [await self._peer_status(t, allowed_ips=allowed_ips) for _, t in tunnels]

    async def state(self) -> DataplaneStatus:
        """The driver, each tunnel (handshake, counters) and each wire."""
        async with self._lock:
            model = self._model
            peers = await self._peers()
            wires = [self._wire_status(p, model) for _, p in sorted(model.wires.items())]
        return DataplaneStatus(
            driver=self.driver.kind,
            driver_name=self.driver.name,
            netns=self.settings.netns,
            peers=peers,
            wires=wires,
        )

    # --- reconciliation ---------------------------------------------------------------------

    async def reconcile(self, desired: DesiredState) -> ReconcileReport:
        """Make the kernel hold exactly ``desired``: create what is missing, repair what
        differs, remove every fedgw object nobody wants (interfaces with fedgw's prefix
        and their wireguard-go daemons, rules in its priority range, routes in its
        tables, its nftables table). What already matches is adopted untouched, sessions
        included, so this is also how a restarted gateway starts."""
        async with self._lock:
            self._tunnel_indexes.clear()
            report = ReconcileReport()
            report.changes += await self._prepare()
            return await _Reconciliation(self, desired, report).run()

    async def purge(self) -> ReconcileReport:
        """Remove everything fedgw owns in the gateway namespace (tunnels and their
        daemons, wires, rules, routes, the nftables table); sysctls stay as they are."""
        report = await self.reconcile(DesiredState())
        async with self._lock:
            if await nftables.remove_table(self.settings.netns, self.settings.prefix):
                report.changes.append(
                    f"nftables table {nftables.table_name(self.settings.prefix)} removed"
                )
        return report


def _own_netns() -> str:
    """What tells this process's namespace apart from others on the host, for names that
    must be unique on the host: gateways of a lab share the host, each in a namespace."""
    return f"inode {os.stat('/proc/self/ns/net').st_ino}"


def _check_port(peer: PeerTunnel, model: _Model) -> None:
    """Each tunnel is an interface of its own, with a UDP port of its own."""
    for domain, tunnel in model.tunnels.items():
        port = tunnel.peer.listen_port
        if domain != peer.domain and port is not None and port == peer.listen_port:
            raise WireConflict(f"peer {peer.domain}: UDP port {port} is taken by peer {domain}")


def _on_link(obj: GatewayObject, ifname: str) -> bool:
    return (isinstance(obj, Route) and obj.dev == ifname) or (
        isinstance(obj, Neighbour) and obj.dev == ifname
    )


class _Reconciliation:
    """One run of :meth:`Dataplane.reconcile`: observe, plan, apply, remove."""

    def __init__(self, dp: Dataplane, desired: DesiredState, report: ReconcileReport) -> None:
        self.dp = dp
        self.desired = desired
        self.report = report
        self.model = _Model(TableAllocator(dp.settings.tables))
        self.settings = dp.settings
        self.naming = dp.naming

    def fail(self, what: str, exc: Exception) -> None:
        log.warning("reconcile: %s: %s", what, exc)
        self.report.failures.append(f"{what}: {exc}")

    def change(self, what: str) -> None:
        log.info("reconcile: %s", what)
        self.report.changes.append(what)

    async def run(self) -> ReconcileReport:
        dp, rtnl = self.dp, self.dp.rtnl
        links = {
            link.name: link
            for link in await rtnl.link_details()
            if self.naming.kind_of(link.name) is not None
        }
        rules = [r for r in await rtnl.rules() if self._owned_rule(r)]
        marks = await dp.nft.marks()
        running = [
            ref
            for ref in await dp.driver.interfaces(self.settings.netns)
            if self.naming.kind_of(ref.name) == "tunnel"
        ]
        self._adopt_tables(marks)
        await self._plan_tunnels()
        self._plan_wires()
        await self._wires(links)
        # Read only now: a veth or TUN device made again above took its routes and
        # neighbour entries along.
        routes = await rtnl.routes(self.settings.tables)
        neighbours = [n for n in await rtnl.neighbours() if self.naming.kind_of(n.dev)]
        await self._objects(set(rules), set(routes), set(neighbours), set(marks))
        for tunnel in self.model.tunnels.values():
            try:
                for change in await dp._sync_allowed(tunnel, self.model.ledger):
                    self.change(change)
            except DataplaneError as exc:
                self.fail(f"peer {tunnel.peer.domain}", exc)
        await self._remove_stale(links, running)
        dp._model = self.model
        return self.report

    def _owned_rule(self, rule: Rule) -> bool:
        if rule.priority not in self.settings.priorities:
            return False
        return rule.action != "lookup" or rule.table in self.settings.tables

    def _adopt_tables(self, marks: list[Mark]) -> None:
        """Keep the table numbers the kernel's marks already select for desired keys."""
        keys: dict[tuple[str, Address | None], TableKey] = {
            (self.naming.tunnel(p.domain), None): ("peer", p.domain) for p in self.desired.peers
        }
        for w in self.desired.wires:
            key: TableKey = wire_table(w)
            if key[0] == "connection":
                keys[self.naming.veth(w.connection_id, w.role), None] = key
                if isinstance(w, EndpointWire) and w.peer is not None:
                    # What comes from a peer's tunnel from a client's address belongs
                    # to the endpoint wire of that client.
                    keys[self.naming.tunnel(w.peer), w.client_address.ip] = key
        for mark in marks:
            found = keys.get((mark.iif, mark.src))
            table = self.dp.policy.table_of(mark.mark)
            if found is not None and table is not None:
                self.model.tables.adopt(found, table)

    async def _plan_tunnels(self) -> None:
        model = self.model
        for peer in self.desired.peers:
            key: TableKey = ("peer", peer.domain)
            try:
                if peer.domain in model.tunnels:
                    raise WireConflict(f"peer {peer.domain} is listed twice")
                _check_port(peer, model)
                plan = plan_tunnel(
                    peer.domain, self.naming, self.dp.policy, model.tables.assign(key)
                )
                mtu = await self.dp._tunnel_mtu(peer)
                model.ledger.check(plan.objects, f"peer {peer.domain}")
            except DataplaneError as exc:
                self.fail(f"peer {peer.domain}", exc)
                continue
            model.ledger.acquire(plan.objects)
            tunnel = _Tunnel(peer, plan, mtu)
            try:
                for change in await self.dp._sync_interface(tunnel):
                    self.change(change)
            except DataplaneError as exc:
                model.ledger.release(plan.objects)
                model.tables.release(key)
                self.fail(f"peer {peer.domain}", exc)
                continue
            model.tunnels[peer.domain] = tunnel

    def _plan_wires(self) -> None:
        model = self.model
        for wire in self.desired.wires:
            what = f"connection {wire.connection_id} ({wire.role})"
            try:
                if wire_key(wire) in model.wires:
                    raise WireConflict(f"{what} is listed twice")
                plan, _ = self.dp._plan(wire, model)
            except DataplaneError as exc:
                self.fail(what, exc)
                continue
            model.ledger.acquire(plan.objects)
            model.add_wire(plan)

    def _drop_wire(self, plan: WirePlan) -> None:
        model = self.model
        model.ledger.release(plan.objects)
        model.remove_wire(plan)
        if not model.table_in_use(plan.table):
            model.tables.release(plan.table)

    async def _wires(self, links: dict[str, Link]) -> None:
        # Grouped by workload namespace: one session and one snapshot per namespace.
        by_netns: dict[str, list[WirePlan]] = {}
        for plan in list(self.model.wires.values()):
            by_netns.setdefault(plan.workload_end.netns, []).append(plan)
        for netns, plans in by_netns.items():
            await self._wires_in(netns, plans, links)

    async def _wires_in(self, netns: str, plans: list[WirePlan], links: dict[str, Link]) -> None:
        rtnl = self.dp.rtnl
        protocol = self.dp.policy.protocol
        session: Rtnl | None = None
        snapshot: NamespaceSnapshot | None = None
        try:
            for plan in plans:
                what = f"connection {plan.wire.connection_id} ({plan.wire.role})"
                end = plan.workload_end
                link = links.get(plan.veth)
                try:
                    # Not a pair on its way out: one being deleted, or one a gateway
                    # moved into the link group to delete and then stopped (the next
                    # deletion of the group would take it along). Made anew instead.
                    ours = (
                        link is not None
                        and link.kind == "veth"
                        and (link.mac or "").lower() == plan.mac
                        and link.group != self.settings.link_group
                        and plan.veth not in self.dp._dying
                    )
                    if ours and link is not None:
                        if session is None:
                            session = Rtnl(netns)
                            await session.__aenter__()
                        if snapshot is None:
                            snapshot = await NamespaceSnapshot.take(session)
                        ours = is_our_end(snapshot.links.get(end.name), end, link.index)
                        if ours:
                            if link.mtu != plan.mtu or not link.up:
                                await rtnl.set_link(plan.veth, mtu=plan.mtu, up=True)
                                self.change(f"link {plan.veth}: mtu {plan.mtu}, up")
                            if self.dp._turn_ipv6_on(plan):
                                self.change(f"link {plan.veth}: IPv6 on")
                            for change in await repair_workload_end(
                                session, end, protocol, snapshot
                            ):
                                self.change(change)
                    if not ours:
                        await self.dp._create_veth(plan)
                        await rtnl.batch(await self.dp._up_requests(plan))
                        self.change(f"wire {plan.veth} <-> {end.name} in {end.netns}")
                except DataplaneError as exc:
                    self.fail(what, exc)
                    self._drop_wire(plan)
        finally:
            if session is not None:
                await session.__aexit__(None, None, None)

    async def _objects(
        self, rules: set[Rule], routes: set[Route], neighbours: set[Neighbour], marks: set[Mark]
    ) -> None:
        want = list(self.model.ledger)
        rtnl = self.dp.rtnl
        add_neighbours = [o for o in want if isinstance(o, Neighbour) and o not in neighbours]
        add_routes = [o for o in want if isinstance(o, Route) and o not in routes]
        add_rules = [o for o in want if isinstance(o, Rule) and o not in rules]
        wanted = set(want)
        adds: list[GatewayObject] = [*add_neighbours, *add_routes, *add_rules]
        for obj in adds:
            try:
                if isinstance(obj, Neighbour):
                    await rtnl.set_neighbour(obj)
                elif isinstance(obj, Route):
                    await rtnl.replace_route(obj)
                elif isinstance(obj, Rule):
                    await rtnl.add_rule(obj)
                self.change(describe(obj))
            except DataplaneError as exc:
                self.fail(describe(obj), exc)
        # Marks last: they open the paths. A mark that differs is removed first (the
        # kernel does not overwrite a map element's value).
        keys = {object_key(o) for o in want}
        differing = [m for m in marks if m not in wanted and object_key(m) in keys]
        await self._marks(differing, add=False)
        await self._marks([m for m in want if isinstance(m, Mark) and m not in marks], add=True)
        # Remove in the reverse order: marks and rules first, so no packet meets a
        # half-removed path. A route or neighbour entry that differed was overwritten
        # above ("replace"); rules are never replaced, so a differing one is stale.
        await self._marks([m for m in marks if object_key(m) not in keys], add=False)
        # Stale gotos go first: when the rule a goto lands on is deleted, the kernel
        # lands it on the next rule of that priority, which in a newer layout may be a
        # blackhole; without the goto, packets only walk further. Then the others, from
        # the last priority to the first: the kernel appends a new rule after the old
        # ones of its priority, so a stale rule (a guard of an older layout) can sit in
        # front of wanted ones; the stale rules of lower priority still take traffic
        # past it, and must outlive it.
        stale_rules = sorted(
            (r for r in rules if r not in wanted),
            key=lambda r: (r.action != "goto", -r.priority),
        )
        stale: list[GatewayObject] = [*stale_rules]
        # A route replaces the one of its table and destination only if their metrics
        # agree; one with another metric (an older layout's) stays beside it.
        metrics = {object_key(o): o.metric for o in want if isinstance(o, Route)}
        stale += [r for r in routes if r.kind != "local" and metrics.get(object_key(r)) != r.metric]
        stale += [n for n in neighbours if object_key(n) not in keys]
        for obj in stale:
            try:
                if isinstance(obj, Rule):
                    await rtnl.delete_rule(obj)
                elif isinstance(obj, Route):
                    await rtnl.delete_route(obj)
                elif isinstance(obj, Neighbour):
                    await rtnl.delete_neighbour(obj)
                self.change(f"{describe(obj)} removed")
            except DataplaneError as exc:
                self.fail(f"{describe(obj)} removal", exc)

    async def _marks(self, marks: list[Mark], *, add: bool) -> None:
        # One transaction each way: the maps are hashed, so thousands cost milliseconds.
        if not marks:
            return
        what = f"{len(marks)} marks" if len(marks) > 1 else describe(marks[0])
        try:
            if add:
                await self.dp.nft.add(marks)
            else:
                await self.dp.nft.delete(marks)
        except DataplaneError as exc:
            self.fail(f"{what}{'' if add else ' removal'}", exc)
            return
        for mark in marks:
            self.change(describe(mark) if add else f"{describe(mark)} removed")

    async def _remove_stale(self, links: dict[str, Link], running: list[InterfaceRef]) -> None:
        dp = self.dp
        # A pair being deleted is on its way out already.
        wanted_veths = {p.veth for p in self.model.wires.values()} | set(dp._dying)
        wanted_tunnels = {t.plan.interface for t in self.model.tunnels.values()}
        stale = [n for n in links if self.naming.kind_of(n) == "veth" and n not in wanted_veths]
        for name, failure in zip(stale, await dp._delete_together(stale), strict=True):
            if isinstance(failure, DataplaneError):
                self.fail(f"removing {name}", failure)
            elif failure is not None:
                raise failure
            else:
                self.change(f"stale wire {name} removed")
        for name in links:
            if self.naming.kind_of(name) != "tunnel" or name in wanted_tunnels:
                continue
            try:
                if not await dp.driver.remove_interface(dp._ref(name)):
                    await dp.rtnl.delete_link(name)
                self.change(f"stale tunnel {name} removed")
            except DataplaneError as exc:
                self.fail(f"removing {name}", exc)
        for ref in running:
            if ref.name not in wanted_tunnels and ref.name not in links:
                try:
                    await dp.driver.remove_interface(ref)
                    self.change(f"stale tunnel {ref.name} removed")
                except DataplaneError as exc:
                    self.fail(f"removing {ref.name}", exc)
