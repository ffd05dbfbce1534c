"""Connections: a client workload of this domain wired to an endpoint of this domain or
of a peer domain, kept up until closed.

Roles, as this gateway sees a connection:

* ``client``: the client is here, the endpoint in a peer domain. This gateway asks the
  peer for the connection (sending its WireGuard key and endpoint and the prefixes its
  clients must not be given), wires the client, refreshes the lease, and heals: when the
  peer is unreachable, the endpoint gone, or the tunnel silent, the connection goes
  ``down`` with the reason and is requested again with backoff (the same endpoint first).
* ``server``: the endpoint is here, the client in a peer domain. This gateway checks the
  export policy, selects an endpoint (labels, then fewest connections), allocates an
  address pair from its pool, wires the endpoint, and closes the connection when its
  lease runs out or its endpoint goes away.
* ``local``: both are here; no tunnel.

Every connection is stored; a restarted gateway reconciles the data plane from its store.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from federation.errors import BadPeerAnswer, NotExported, PeerUnreachable
from federation.models import (
    MAX_REFRESH,
    ClosedConnections,
    ConnectionGrant,
    ConnectionOffer,
    LeaseGrant,
    LeaseGrants,
    LeaseRefresh,
    OfferError,
    OfferResult,
    OfferResults,
    WireGuardInfo,
    parse_answer,
)
from federation.service import Federation
from fedgw.clock import Clock, to_datetime
from fedgw.errors import Conflict, FedgwError, NotFound, Unavailable
from fedgw.http import status_of
from fedgw.models import (
    Connection,
    ConnectionEnd,
    ConnectionState,
    Endpoint,
    Network,
    Workload,
)
from fedgw.names import LabelKey, LabelValue, Reference, ReferenceField
from fedgw.store import Collection, Store
from gateway.connection_table import ConnectionRecord, ConnectionTable
from gateway.events import Event, EventBus, EventType
from gateway.registry import Registry
from gateway.workloads import WorkloadProbe
from wireguard.dataplane import Dataplane, DataplaneStatus, DesiredState
from wireguard.drivers.base import Endpoint as UdpEndpoint
from wireguard.drivers.userspace import ProcessExit
from wireguard.errors import DataplaneError, PoolExhausted
from wireguard.ipam import Ipam
from wireguard.keys import PrivateKey, PublicKey
from wireguard.wires import ClientWire, EndpointWire, PeerTunnel

log = logging.getLogger(__name__)

_AT_ONCE = 16
"""Connections that supervision, or a peer's departure, handles side by side."""

MAX_BACKOFF = 30.0


class ConnectionRequest(BaseModel):
    """What a workload (or the CLI for it) sends to get connected."""

    model_config = ConfigDict(extra="forbid")

    service: ReferenceField = Field(description="name or name@domain")
    workload: Workload
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict, description="selector")
    exclude: list[Network] = Field(
        default_factory=list, max_length=64, description="prefixes the client already uses"
    )
    interface: str | None = Field(
        None, max_length=15, pattern=r"^[a-zA-Z0-9_.-]+$", description="default: nsm0, nsm1..."
    )


class TunnelRecord(BaseModel):
    """The tunnel to a peer domain as stored: our port, and the peer's key and endpoint."""

    domain: str
    listen_port: int
    remote_key: str | None = None
    remote_endpoint: str | None = None


class ConnectionCounts(BaseModel):
    requested: int = 0
    up: int = 0
    down: int = 0


def new_connection_id() -> str:
    return secrets.token_hex(8)


class ConnectionManager:
    """All connections of one gateway, and the loop that keeps them as they should be."""

    CONNECTIONS = "connections"
    TUNNELS = "tunnels"

    def __init__(
        self,
        *,
        domain: str,
        store: Store,
        registry: Registry,
        federation: Federation,
        bus: EventBus,
        clock: Clock,
        probe: WorkloadProbe,
        dataplane: Callable[[], Awaitable[Dataplane]] | None,
        private_key: PrivateKey | None,
        advertise: str | None,
        wireguard_port: int,
        behind_nat: bool,
        keepalive: float,
        lease: float,
        handshake_timeout: float,
        exclude: list[Network],
    ) -> None:
        self.domain = domain
        self._records = Collection(store, self.CONNECTIONS, ConnectionRecord)
        self._tunnel_records = Collection(store, self.TUNNELS, TunnelRecord)
        self._registry = registry
        self._federation = federation
        self._bus = bus
        self._clock = clock
        self._probe = probe
        self._make_dataplane = dataplane
        self._dataplane: Dataplane | None = None
        self._dataplane_lock = asyncio.Lock()
        self._reconciling: asyncio.Task[None] | None = None
        self._prepare_failed = False
        self._tunnels_failed: set[str] = set()  # peers whose early tunnel could not start
        self._key = private_key
        self._advertise = advertise
        self._port_base = wireguard_port
        self._behind_nat = behind_nat
        self._keepalive = int(keepalive)
        self._lease = lease
        self._handshake_timeout = handshake_timeout
        self._exclude = exclude
        self.ipam = Ipam(store)
        self._connections = ConnectionTable()
        self._tunnels: dict[str, TunnelRecord] = {}
        # A lock per connection, alive while someone holds or awaits it.
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._retry_at: dict[str, float] = {}
        self._backoff: dict[str, float] = {}
        self._refresh_at: dict[str, float] = {}  # per peer: when its leases are refreshed
        self._notifications: set[asyncio.Task[None]] = set()
        self._repair = False
        self._counters: dict[str, tuple[int, int]] = {}
        self._ensured: dict[str, PeerTunnel] = {}  # tunnels as last applied
        # And per peer, around making sure of its tunnel.
        self._tunnel_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        self._silence_checked = 0.0
        self._refresh_retry = 1.0

    # --- life cycle ----------------------------------------------------------------------

    async def load(self) -> None:
        """Read the store and bring the data plane to it (adopting what is in place)."""
        grace = to_datetime(self._clock.now() + self._lease)
        for record in await self._records.all():
            c = record.connection
            if record.role == "server" and c.expires_at < grace:
                # Clients could not refresh while this gateway was down: give them a lease
                # from now (the store learns it at their next refresh).
                record = record.model_copy(
                    update={"connection": c.model_copy(update={"expires_at": grace})}
                )
            self._connections.put(record)
            if record.role == "client" and record.peer is not None:
                # When to refresh is kept in memory: without this, a restarted gateway
                # would let the peer's leases run out, and its connections would heal
                # onto new addresses.
                self._schedule_refresh(record.peer, c.expires_at.timestamp())
        # Addresses claimed for a connection that never got stored: the gateway stopped
        # while making it (see _track).
        for owner in sorted(await self.ipam.owners()):
            if self._connections.get(owner) is None:
                await self.ipam.release(owner)
                log.info("released the addresses of unfinished connection %s", owner)
        for tunnel in await self._tunnel_records.all():
            self._tunnels[tunnel.domain] = tunnel
        if self._make_dataplane is not None and (self._connections or self._tunnels):
            # In the background: the kernel still holds the wires (traffic flows), so the
            # gateway serves at once; data-plane work waits for this to finish.
            self._reconciling = asyncio.get_running_loop().create_task(
                self._reconcile_on_start(), name="fedgw-reconcile"
            )
        log.info("connections loaded: %d", len(self._connections))

    async def _reconcile_on_start(self) -> None:
        t0 = self._clock.now()
        dataplane = await self._open_dataplane()
        desired = self._desired()
        report = await dataplane.reconcile(desired)
        self._ensured = {peer.domain: peer for peer in desired.peers}
        for change in report.changes:
            log.info("data plane reconciled: %s", change)
        for failure in report.failures:
            log.warning("data plane could not reconcile: %s", failure)
        log.info(
            "data plane reconciled with %d connection(s) in %.1fs",
            len(self._connections),
            self._clock.now() - t0,
        )

    async def _ensure_dataplane(self) -> Dataplane:
        """The data plane, once the start-up reconciliation is done. It is opened when
        first needed or ahead of that (see :meth:`_prepare_dataplane`): a gateway that
        has nothing to connect never touches the network of its namespace."""
        if self._reconciling is not None:
            task = self._reconciling
            try:
                await asyncio.shield(task)
            except Exception:
                log.exception("start-up reconciliation failed; going on without it")
            if self._reconciling is task:
                self._reconciling = None
        return await self._open_dataplane()

    async def _open_dataplane(self) -> Dataplane:
        if self._make_dataplane is None or self._key is None:
            raise Unavailable(
                "this gateway has no data plane (it runs with --dataplane off)", retryable=False
            )
        async with self._dataplane_lock:  # concurrent first requests make one, not several
            if self._dataplane is None:
                dataplane = await self._make_dataplane()
                await dataplane.open()
                self._dataplane = dataplane
        return self._dataplane

    async def shutdown(self) -> None:
        """Close the data plane's session; tunnels and wires stay for the next start."""
        if self._reconciling is not None:
            self._reconciling.cancel()
            await asyncio.gather(self._reconciling, return_exceptions=True)
            self._reconciling = None
        for task in list(self._notifications):
            task.cancel()
        await asyncio.gather(*self._notifications, return_exceptions=True)
        if self._dataplane is not None:
            await self._dataplane.close()
            self._dataplane = None

    def _desired(self) -> DesiredState:
        peers = []
        for domain in self._tunnels:
            try:
                tunnel = self._peer_tunnel(domain)
            except FedgwError as exc:
                log.error("tunnel to %s is unusable and left out: %s", domain, exc)
                continue
            if tunnel is not None:
                peers.append(tunnel)
        wires: list[ClientWire | EndpointWire] = []
        for record in self._connections.values():
            wires.extend(self._wires_of(record))
        return DesiredState(peers=peers, wires=wires)

    # --- queries -------------------------------------------------------------------------

    async def dataplane_status(self) -> DataplaneStatus | None:
        """Driver, tunnels and wires, if the data plane has been started."""
        if self._dataplane is None:
            return None
        return await self._dataplane.state()

    def get(self, connection_id: str) -> ConnectionRecord:
        record = self._connections.get(connection_id)
        if record is None:
            raise NotFound(f"no connection {connection_id!r}")
        return record

    def all(self) -> list[ConnectionRecord]:
        return sorted(self._connections.values(), key=lambda r: r.connection.created_at)

    def counts(self) -> ConnectionCounts:
        counted = Counter(r.connection.state.value for r in self._connections.values())
        return ConnectionCounts(**{k: v for k, v in counted.items() if k != "closed"})

    def _lock(self, connection_id: str) -> asyncio.Lock:
        return _lock_in(self._locks, connection_id)

    @contextlib.asynccontextmanager
    async def _holding(self, connection_id: str) -> AsyncIterator[ConnectionRecord | None]:
        """The connection's lock, and its record as it is once the lock is held: whoever
        waited may find it changed, or closed (None)."""
        async with self._lock(connection_id):
            yield self._connections.get(connection_id)

    # --- tunnels ---------------------------------------------------------------------------

    async def _tunnel(self, domain: str) -> TunnelRecord:
        """Our side of the tunnel to ``domain``: a UDP port of our own, kept."""
        tunnel = self._tunnels.get(domain)
        if tunnel is None:
            used = {t.listen_port for t in self._tunnels.values()}
            port = next(p for p in range(self._port_base, 65536) if p not in used)
            tunnel = TunnelRecord(domain=domain, listen_port=port)
            self._tunnels[domain] = tunnel  # taken before any await: ports stay unique
            await self._tunnel_records.put(domain, tunnel)
        return tunnel

    def _our_wireguard(self, tunnel: TunnelRecord) -> WireGuardInfo:
        assert self._key is not None
        endpoint = None
        if not self._behind_nat and self._advertise is not None:
            endpoint = f"{self._advertise}:{tunnel.listen_port}"
        return WireGuardInfo(public_key=str(self._key.public_key()), endpoint=endpoint)

    def _peer_tunnel(self, domain: str) -> PeerTunnel | None:
        tunnel = self._tunnels.get(domain)
        if tunnel is None or self._key is None:
            return None
        # Keepalives whenever the other side may not be able to reach us first.
        keepalive = self._keepalive if (self._behind_nat or self._advertise is None) else 0
        return PeerTunnel(
            domain=domain,
            private_key=self._key,
            public_key=PublicKey.from_base64(tunnel.remote_key) if tunnel.remote_key else None,
            endpoint=UdpEndpoint.parse(tunnel.remote_endpoint) if tunnel.remote_endpoint else None,
            listen_port=tunnel.listen_port,
            persistent_keepalive=keepalive,
        )

    async def _connect_tunnel(self, domain: str, theirs: WireGuardInfo) -> None:
        """Configure the tunnel to ``domain`` with the other side's key and endpoint."""
        tunnel = await self._tunnel(domain)
        if theirs.endpoint is None and theirs.public_key == tunnel.remote_key:
            # The peer is behind NAT: keep the endpoint WireGuard learnt from it.
            updated = tunnel
        else:
            updated = tunnel.model_copy(
                update={"remote_key": theirs.public_key, "remote_endpoint": theirs.endpoint}
            )
        if updated != tunnel:
            self._tunnels[domain] = updated
            await self._tunnel_records.put(domain, updated)
        dataplane = await self._ensure_dataplane()
        # Every connection passes here; the tunnel changes rarely, and making sure of it
        # means reading the whole namespace. The first of a burst does it, the others
        # wait for it and find it done.
        async with _lock_in(self._tunnel_locks, domain):
            await self._ensure_tunnel(dataplane, domain)

    async def _ensure_tunnel(self, dataplane: Dataplane, domain: str) -> None:
        """Make the data plane's tunnel to ``domain`` what its record says, unless it is
        so already. Under the tunnel's lock."""
        peer = self._peer_tunnel(domain)
        assert peer is not None
        if self._ensured.get(domain) != peer:
            await dataplane.ensure_peer(peer)
            self._ensured[domain] = peer

    async def drop_peer(self, domain: str) -> None:
        """A peer left: close its connections and remove the tunnel."""
        limit = asyncio.Semaphore(_AT_ONCE)

        async def close(cid: str) -> None:
            async with limit, self._holding(cid) as record:
                if record is not None:
                    await self._close(record, f"{domain} is no longer a peer", tell_peer=False)

        # Side by side: most of a close is the kernel deleting the wire's veth pair.
        await asyncio.gather(
            *(close(r.connection.id) for r in self._connections.values() if r.peer == domain)
        )
        # Under the tunnel's lock: a connection making sure of the tunnel finishes first.
        async with _lock_in(self._tunnel_locks, domain):
            self._ensured.pop(domain, None)
            self._tunnels_failed.discard(domain)
            if self._tunnels.pop(domain, None) is not None:
                await self._tunnel_records.delete(domain)
                if self._dataplane is not None:
                    await self._dataplane.remove_peer(domain)

    # --- wires -----------------------------------------------------------------------------

    def _wires_of(self, record: ConnectionRecord) -> list[ClientWire | EndpointWire]:
        c = record.connection
        if (
            c.state is ConnectionState.CLOSED
            or c.client.address is None
            or c.server.address is None
        ):
            return []
        client_address = ipaddress.ip_interface(c.client.address)
        endpoint_address = ipaddress.ip_interface(c.server.address)
        wires: list[ClientWire | EndpointWire] = []
        if record.role in ("client", "local"):
            assert c.client.workload is not None
            assert c.client.interface is not None
            wires.append(
                ClientWire(
                    connection_id=c.id,
                    peer=record.peer,
                    workload=c.client.workload,
                    interface=c.client.interface,
                    address=client_address,
                    endpoint_address=endpoint_address,
                    routes=tuple(c.routes),
                )
            )
        if record.role in ("server", "local"):
            assert c.server.workload is not None
            assert record.endpoint_interface is not None
            wires.append(
                EndpointWire(
                    connection_id=c.id,
                    peer=record.peer,
                    workload=c.server.workload,
                    interface=record.endpoint_interface,
                    address=endpoint_address,
                    client_address=client_address,
                    routes=tuple(c.routes),
                )
            )
        return wires

    async def _wire(self, record: ConnectionRecord) -> None:
        dataplane = await self._ensure_dataplane()
        for wire in self._wires_of(record):
            if isinstance(wire, ClientWire):
                await dataplane.attach_client(wire)
            else:
                await dataplane.attach_endpoint(wire)

    async def _unwire(self, connection_id: str) -> None:
        if self._dataplane is not None:
            await self._dataplane.detach(connection_id)

    # --- records and events ------------------------------------------------------------------

    async def _save(self, record: ConnectionRecord, event: EventType | None = None) -> None:
        # In memory first, before the store is awaited: a concurrent request must see the
        # interface names this one has taken.
        self._connections.put(record)
        await self._records.put(record.connection.id, record)
        if event is not None:
            self._publish(event, record.connection)

    def _track(self, record: ConnectionRecord) -> None:
        """A connection being made: known in memory (its interface names are taken, it is
        listed and reconciled) but not stored until it is up. A restart before that loses
        only a request no one was answered: reconciliation removes its wires, :meth:`load`
        its address claim, and the peer's side runs out with its lease. Saving it sooner
        would put a store commit on every connection's path, on both gateways."""
        self._connections.put(record)
        self._publish(EventType.ADDED, record.connection)

    def _publish(self, type_: EventType, connection: Connection) -> None:
        self._bus.publish(
            Event(
                seq=self._bus.next_seq(),
                type=type_,
                kind="connection",
                name=connection.id,
                object=connection,
                reason=connection.reason,
                time=to_datetime(self._clock.now()),
            )
        )

    async def _move(
        self, record: ConnectionRecord, state: ConnectionState, reason: str
    ) -> ConnectionRecord:
        now = to_datetime(self._clock.now())
        if record.connection.state is state and record.connection.reason == reason:
            return record
        if record.connection.state is state:
            moved = record.connection.model_copy(update={"reason": reason, "updated_at": now})
        else:
            moved = record.connection.moved_to(state, reason, now)
        updated = record.model_copy(update={"connection": moved})
        await self._save(updated, EventType.UPDATED)
        log.info("connection %s %s: %s", moved.id, state.value, reason)
        return updated

    # --- client side -------------------------------------------------------------------------

    async def request(self, request: ConnectionRequest) -> ConnectionRecord:
        """Connect a workload to ``request.service``; returns once it is up, or raises."""
        await self._ensure_dataplane()  # first: a clear error if there is none
        # A stat under /run/netns or a read of /proc: kernel memory, never a disk; a
        # thread would cost more than the call.
        workload = self._probe.identify(request.workload)
        reference = request.service.local_to(self.domain)
        interface = request.interface or self._connections.free_interface(workload)
        now = to_datetime(self._clock.now())
        connection = Connection(
            id=new_connection_id(),
            service=reference,
            client=ConnectionEnd(domain=self.domain, workload=workload, interface=interface),
            server=ConnectionEnd(domain=reference.domain or self.domain),
            path=[self.domain] if reference.domain is None else [self.domain, reference.domain],
            state=ConnectionState.REQUESTED,
            reason="requested",
            created_at=now,
            updated_at=now,
            expires_at=now,
        )
        record = ConnectionRecord(
            connection=connection,
            role="local" if reference.domain is None else "client",
            peer=reference.domain,
            selector=dict(request.labels),
            exclude=[*self._exclude, *request.exclude],
        )
        async with self._lock(connection.id):
            self._track(record)
            try:
                if record.role == "local":
                    record = await self._connect_local(record, prefer=None)
                else:
                    record = await self._connect_remote(record, prefer=None)
            except BaseException as exc:
                # A request that fails leaves nothing behind: no record, no wire, no lease.
                await self._close(record, f"request failed: {exc}", tell_peer=True)
                raise
        return record

    async def _connect_remote(
        self, record: ConnectionRecord, prefer: str | None
    ) -> ConnectionRecord:
        c = record.connection
        peer = record.peer
        assert peer is not None
        # An unknown domain fails here, before a tunnel or a port is set aside for it.
        await self._federation.resolver.resolve(peer)
        tunnel = await self._tunnel(peer)
        offer = ConnectionOffer(
            id=c.id,
            service=c.service.name,
            selector=record.selector,
            prefer=prefer,
            exclude=record.exclude,
            wireguard=self._our_wireguard(tunnel),
        )
        grant = self._check_grant(record, await self._federation.offer(peer, offer))
        await self._connect_tunnel(peer, grant.wireguard)
        previous = (c.client.address, c.server.address)
        updated_connection = c.model_copy(
            update={
                "client": c.client.model_copy(update={"address": grant.client_address}),
                "server": c.server.model_copy(
                    update={"endpoint": grant.endpoint, "address": grant.endpoint_address}
                ),
                "routes": grant.routes,
                "expires_at": grant.expires_at,
            }
        )
        record = record.model_copy(update={"connection": updated_connection})
        if previous != (grant.client_address, grant.endpoint_address) and previous[0] is not None:
            await self._unwire(c.id)  # healed onto other addresses: re-wire the client
        await self._wire(record)
        self._schedule_refresh(peer, grant.expires_at.timestamp())
        return await self._move(record, ConnectionState.UP, f"wired to {grant.endpoint}@{peer}")

    @staticmethod
    def _check_grant(record: ConnectionRecord, grant: ConnectionGrant) -> ConnectionGrant:
        """A grant is installed in the client's namespace: it must be for this connection
        and stay off the prefixes this side uses."""
        if grant.id != record.connection.id:
            raise BadPeerAnswer(f"{record.peer} answered for connection {grant.id}")
        pair = ipaddress.ip_interface(grant.client_address).network
        for prefix in [pair, *grant.routes]:
            for excluded in record.exclude:
                if prefix.version == excluded.version and prefix.overlaps(excluded):
                    raise BadPeerAnswer(
                        f"{record.peer} offered {prefix}, which overlaps {excluded} in use here"
                    )
        return grant

    def _schedule_refresh(self, peer: str, expires: float) -> None:
        """Refresh the leases granted by ``peer`` at a third of what is left of the
        shortest, unless a refresh is due sooner already."""
        now = self._clock.now()
        at = now + max((expires - now) / 3, 0.2)
        self._refresh_at[peer] = min(self._refresh_at.get(peer, at), at)

    async def _refresh_peer(self, peer: str, now: float) -> None:
        """Extend the leases of all our connections to ``peer``, a few hundred per call.
        What it no longer has goes down and heals; when it cannot be reached, the
        connections stay up while their leases last (the data plane does not need it)."""
        self._refresh_at.pop(peer, None)
        ids = self._up_clients(peer)
        for start in range(0, len(ids), MAX_REFRESH):
            chunk = ids[start : start + MAX_REFRESH]
            try:
                answer = await self._federation.call(
                    peer,
                    "POST",
                    "/federation/v1/connections/refresh",
                    json=LeaseRefresh(ids=chunk).model_dump(mode="json"),
                )
                grants = parse_answer(LeaseGrants, answer, peer)
            except PeerUnreachable as exc:
                log.info("lease refresh at %s failed, retrying: %s", peer, exc)
                self._refresh_at[peer] = now + self._refresh_retry
                expiring = [
                    cid
                    for cid in chunk
                    if (r := self._connections.get(cid)) is not None
                    and r.connection.expires_at.timestamp() - now <= 2 * self._refresh_retry
                ]
                await self._down(expiring, f"lease refresh failed: {exc}")
                continue
            except FedgwError as exc:
                await self._down(chunk, f"lease refresh failed: {exc}")
                continue
            # Together: their store writes then go in one transaction, not one each.
            await asyncio.gather(*(self._extended(peer, grant) for grant in grants.leases))
            await self._down(
                [cid for cid in grants.unknown if cid in chunk],
                f"{peer} no longer has the connection (endpoint gone or lease lost)",
            )
        if peer not in self._refresh_at and self._up_clients(peer):
            # None was extended (each was busy): whatever is still up is tried again soon.
            self._refresh_at[peer] = now + self._refresh_retry

    def _up_clients(self, peer: str) -> list[str]:
        """Our connections to ``peer`` that are up."""
        return [
            r.connection.id
            for r in self._connections.values()
            if r.role == "client" and r.peer == peer and r.connection.state is ConnectionState.UP
        ]

    async def _extended(self, peer: str, grant: LeaseGrant) -> None:
        lock = self._lock(grant.id)
        if lock.locked():
            return  # being healed or closed: that settles its lease
        async with self._holding(grant.id) as record:
            if record is None or record.role != "client" or record.peer != peer:
                return
            c = record.connection
            record = record.model_copy(
                update={"connection": c.model_copy(update={"expires_at": grant.expires_at})}
            )
            await self._save(record)
            self._schedule_refresh(peer, grant.expires_at.timestamp())

    async def _down(self, ids: list[str], reason: str) -> None:
        """Client connections that lost their lease: down now, healed at the next tick."""
        for cid in ids:
            async with self._holding(cid) as record:
                if record is not None and record.connection.state is ConnectionState.UP:
                    await self._move(record, ConnectionState.DOWN, reason)
                    self._retry_at[cid] = 0.0

    async def close(self, connection_id: str) -> ConnectionRecord:
        async with self._holding(connection_id) as record:
            if record is None:
                raise NotFound(f"no connection {connection_id!r}")
            return await self._close(record, "closed by request", tell_peer=True)

    async def _close(
        self, record: ConnectionRecord, reason: str, *, tell_peer: bool
    ) -> ConnectionRecord:
        c = record.connection
        peer = record.peer if tell_peer and record.role == "client" else None

        async def tell() -> None:
            if peer is not None:
                with contextlib.suppress(FedgwError):  # its lease runs out if it cannot hear us
                    await self._federation.close_connection(peer, c.id)

        # Both sides at once: each mostly waits for its kernel to delete a veth pair.
        for result in await asyncio.gather(self._unwire(c.id), tell(), return_exceptions=True):
            if isinstance(result, DataplaneError):
                # The wires are out of the data plane's model before any kernel step, and
                # the peer may have closed its side already: the close goes on, and what
                # the kernel kept goes with the repair on the next tick.
                log.warning("closing connection %s: %s; repairing the data plane", c.id, result)
                self._repair = True
            elif isinstance(result, BaseException):
                raise result
        if record.role in ("server", "local"):
            await self.ipam.release(c.id)
        if tell_peer and record.role == "server" and record.peer is not None:
            # The client heals at once instead of at its next lease refresh; if it cannot
            # be told, that refresh finds out.
            self._notify_closed(record.peer, c.id, reason)
        closed = c
        if c.state.can_become(ConnectionState.CLOSED):
            closed = c.moved_to(ConnectionState.CLOSED, reason, to_datetime(self._clock.now()))
        await self._records.delete(c.id)
        self._connections.pop(c.id)
        for table in (self._retry_at, self._backoff):
            table.pop(c.id, None)
        self._publish(EventType.DELETED, closed)
        log.info("connection %s closed: %s", c.id, reason)
        return record.model_copy(update={"connection": closed})

    # --- local connections ---------------------------------------------------------------------

    def _candidates(
        self, service: str, selector: dict[str, str], prefer: str | None
    ) -> list[Endpoint]:
        """Endpoints that can serve: matching labels, with a pool and a workload to wire;
        the preferred one first, then those with the fewest connections."""
        usable = [
            ep for ep in self._registry.endpoints(service, selector) if ep.pool and ep.workload
        ]
        load = self._connections.load
        return sorted(usable, key=lambda ep: (ep.name != prefer, load(ep.name), ep.name))

    async def _allocate(
        self,
        connection_id: str,
        service: str,
        selector: dict[str, str],
        prefer: str | None,
        exclude: list[Network],
    ) -> tuple[
        Endpoint,
        ipaddress.IPv4Interface | ipaddress.IPv6Interface,
        ipaddress.IPv4Interface | ipaddress.IPv6Interface,
    ]:
        candidates = self._candidates(service, selector, prefer)
        if not candidates:
            shown = ",".join(f"{k}={v}" for k, v in selector.items()) or "any labels"
            raise NotFound(
                f"no endpoint of network service {service!r} can serve ({shown}): none "
                "registered with a pool and a netns or pid"
            )
        exhausted = []
        for endpoint in candidates:
            assert endpoint.pool is not None
            try:
                pair = await self.ipam.allocate(endpoint.pool, connection_id, exclude=exclude)
            except PoolExhausted as exc:
                exhausted.append(str(exc))
                continue
            return endpoint, pair.endpoint_address, pair.client_address
        raise PoolExhausted("; ".join(exhausted))

    async def _connect_local(
        self, record: ConnectionRecord, prefer: str | None
    ) -> ConnectionRecord:
        c = record.connection
        await self.ipam.release(c.id)
        endpoint, endpoint_address, client_address = await self._allocate(
            c.id, c.service.name, record.selector, prefer, record.exclude
        )
        assert endpoint.workload is not None
        updated = c.model_copy(
            update={
                "client": c.client.model_copy(update={"address": str(client_address)}),
                "server": c.server.model_copy(
                    update={
                        "endpoint": endpoint.name,
                        "workload": endpoint.workload,
                        "address": str(endpoint_address),
                    }
                ),
                "routes": endpoint.routes,
            }
        )
        interface = self._connections.free_interface(endpoint.workload, skip=c.id)
        record = record.model_copy(
            update={
                "connection": updated,
                "endpoint_interface": interface,
                "pool": endpoint.pool,
            }
        )
        self._connections.put(record)  # takes the endpoint interface name at once
        await self._unwire(c.id)
        await self._wire(record)
        return await self._move(record, ConnectionState.UP, f"wired to {endpoint.name}")

    # --- server side ---------------------------------------------------------------------------

    async def serve_offers(self, caller: str, offers: list[ConnectionOffer]) -> OfferResults:
        """Offers from a peer's clients, served together; each answered on its own."""

        async def one(offer: ConnectionOffer) -> OfferResult:
            try:
                return OfferResult(id=offer.id, grant=await self.serve(caller, offer))
            except FedgwError as exc:
                status = status_of(exc)
                if status == 500:
                    log.error("unmapped error serving %s: %s", offer.id, exc, exc_info=exc)
                error = OfferError(
                    status=status, error=exc.code, detail=str(exc), retryable=exc.retryable
                )
                return OfferResult(id=offer.id, error=error)

        return OfferResults(results=list(await asyncio.gather(*(one(o) for o in offers))))

    async def serve(self, caller: str, offer: ConnectionOffer) -> ConnectionGrant:
        """A peer's client asks for a connection to one of our endpoints."""
        service = self._registry.service(offer.service)
        if not service.exported_to(caller):
            raise NotExported(f"network service {offer.service!r} is not exported to {caller}")
        async with self._holding(offer.id) as existing:
            if existing is not None:
                # The client asks again for a connection it has (it healed, or retried).
                if existing.role != "server" or existing.peer != caller:
                    raise Conflict(f"connection id {offer.id} is taken")
                await self._connect_tunnel(caller, offer.wireguard)
                return await self._grant(await self._extend(existing))
            endpoint, endpoint_address, client_address = await self._allocate(
                offer.id, offer.service, dict(offer.selector), offer.prefer, list(offer.exclude)
            )
            assert endpoint.workload is not None
            now = self._clock.now()
            connection = Connection(
                id=offer.id,
                service=Reference(offer.service, self.domain),
                client=ConnectionEnd(domain=caller, address=str(client_address)),
                server=ConnectionEnd(
                    domain=self.domain,
                    endpoint=endpoint.name,
                    workload=endpoint.workload,
                    address=str(endpoint_address),
                ),
                routes=endpoint.routes,
                path=[caller, self.domain],
                state=ConnectionState.REQUESTED,
                reason=f"requested by {caller}",
                created_at=to_datetime(now),
                updated_at=to_datetime(now),
                expires_at=to_datetime(now + self._lease),
            )
            record = ConnectionRecord(
                connection=connection,
                role="server",
                peer=caller,
                selector=dict(offer.selector),
                exclude=list(offer.exclude),
                endpoint_interface=self._connections.free_interface(endpoint.workload),
                pool=endpoint.pool,
            )
            self._track(record)
            try:
                await self._connect_tunnel(caller, offer.wireguard)
                await self._wire(record)
            except BaseException as exc:
                await self._close(record, f"wiring failed: {exc}", tell_peer=False)
                raise
            record = await self._move(record, ConnectionState.UP, f"endpoint {endpoint.name} wired")
            return await self._grant(record)

    async def _grant(self, record: ConnectionRecord) -> ConnectionGrant:
        c = record.connection
        assert record.peer is not None
        assert c.server.endpoint
        assert c.server.address
        assert c.client.address
        tunnel = await self._tunnel(record.peer)
        return ConnectionGrant(
            id=c.id,
            endpoint=c.server.endpoint,
            endpoint_address=c.server.address,
            client_address=c.client.address,
            routes=c.routes,
            wireguard=self._our_wireguard(tunnel),
            expires_at=c.expires_at,
        )

    async def _extend(self, record: ConnectionRecord) -> ConnectionRecord:
        expires = to_datetime(self._clock.now() + self._lease)
        updated = record.model_copy(
            update={"connection": record.connection.model_copy(update={"expires_at": expires})}
        )
        await self._save(updated)
        return updated

    async def serve_refresh(self, caller: str, ids: list[str]) -> LeaseGrants:
        """A peer's gateway extends the leases of its connections here."""
        expires = to_datetime(self._clock.now() + self._lease)
        grants = LeaseGrants(leases=[])
        for cid in dict.fromkeys(ids):
            async with self._holding(cid) as record:
                if record is None or record.role != "server" or record.peer != caller:
                    grants.unknown.append(cid)
                    continue
                c = record.connection
                # In memory only: a restarted gateway gives every lease a fresh term.
                self._connections.put(
                    record.model_copy(
                        update={"connection": c.model_copy(update={"expires_at": expires})}
                    )
                )
                grants.leases.append(LeaseGrant(id=cid, expires_at=expires))
        return grants

    async def serve_close(self, caller: str, connection_id: str) -> None:
        async with self._holding(connection_id) as record:
            record = self._served(caller, connection_id, record)
            await self._close(record, f"closed by {caller}", tell_peer=False)

    async def serve_closes(self, caller: str, ids: list[str]) -> ClosedConnections:
        """Close the caller's connections ``ids``, side by side (each mostly waits for
        the kernel to delete a veth pair)."""
        answer = ClosedConnections(closed=[], unknown=[])

        async def one(cid: str) -> None:
            try:
                await self.serve_close(caller, cid)
            except NotFound:
                answer.unknown.append(cid)
            else:
                answer.closed.append(cid)

        await asyncio.gather(*(one(cid) for cid in dict.fromkeys(ids)))
        return answer

    def _notify_closed(self, peer: str, connection_id: str, reason: str) -> None:
        async def notify() -> None:
            try:
                await self._federation.call(
                    peer,
                    "POST",
                    f"/federation/v1/connections/{connection_id}/closed",
                    json={"reason": reason},
                )
            except FedgwError as exc:
                log.info("could not tell %s that %s closed: %s", peer, connection_id, exc)

        task = asyncio.get_running_loop().create_task(notify(), name=f"notify-{connection_id}")
        self._notifications.add(task)
        task.add_done_callback(self._notifications.discard)

    async def peer_closed(self, caller: str, connection_id: str, reason: str) -> None:
        """The serving gateway closed one of our client connections: heal it now."""
        async with self._holding(connection_id) as record:
            if record is None or record.role != "client" or record.peer != caller:
                raise NotFound(f"no connection {connection_id!r} to {caller} here")
            await self._move(record, ConnectionState.DOWN, f"{caller} closed it: {reason}")
            self._retry_at[connection_id] = 0.0

    @staticmethod
    def _served(
        caller: str, connection_id: str, record: ConnectionRecord | None
    ) -> ConnectionRecord:
        if record is None or record.role != "server" or record.peer != caller:
            raise NotFound(f"no connection {connection_id!r} of {caller} here")
        return record

    # --- keeping connections as they should be --------------------------------------------------

    async def supervise(self, interval: float = 0.5) -> None:
        """Until cancelled: expire served leases, refresh and heal client connections,
        close those whose client workload or endpoint went away."""
        while True:
            try:
                await self.tick()
            except Exception:
                log.exception("connection supervision failed; retrying")
            await asyncio.sleep(interval)

    def daemon_exited(self, event: ProcessExit) -> None:
        """A wireguard-go daemon died: its interface comes back on the next tick."""
        log.warning("WireGuard daemon of %s exited (%s)", event.iface.name, event.describe())
        self._repair = True

    async def tick(self) -> None:
        if self._reconciling is not None and not self._reconciling.done():
            return  # the start-up reconciliation comes first
        await self._prepare_dataplane()
        if self._dataplane is not None:
            await self._prepare_tunnels(self._dataplane)
        if self._repair and self._dataplane is not None:
            self._repair = False
            desired = self._desired()
            report = await self._dataplane.reconcile(desired)
            self._ensured = {peer.domain: peer for peer in desired.peers}
            for change in report.changes:
                log.info("data plane repaired: %s", change)
            for failure in report.failures:
                log.warning("data plane could not repair: %s", failure)
        now = self._clock.now()
        silent: set[str] = set()
        if now - self._silence_checked >= 5.0:  # reading tunnel counters is not free
            self._silence_checked = now
            silent = await self._silent_tunnels()
        # Each client workload once, however many connections it has.
        workloads = self._connections.client_workloads()

        def probe() -> set[str]:
            return {cid for w, ids in workloads if not self._probe.alive(w) for cid in ids}

        gone = await asyncio.to_thread(probe) if workloads else set()
        # Only connections with something to do get a task: at thousands of connections,
        # a task and a lock each, twice a second, would cost more than the work.
        due = [
            r.connection.id
            for r in self._connections.values()
            if r.connection.id in gone or self._step(r, now, silent) is not None
        ]
        # Each connection on its own, a few at a time: a peer that does not answer
        # delays only its own connections, not the refreshes of the others.
        limit = asyncio.Semaphore(_AT_ONCE)

        async def one(cid: str) -> None:
            lock = self._lock(cid)
            if lock.locked():
                return  # being requested, healed or closed right now: next tick
            async with limit, self._holding(cid) as record:
                if record is None:
                    return
                try:
                    if cid in gone:
                        workload = record.connection.client.workload
                        reason = f"client workload gone: {workload}"
                        await self._close(record, reason, tell_peer=True)
                    else:
                        await self._check(record, now, silent)
                except Exception:
                    log.exception("supervising connection %s failed; next tick retries", cid)

        refreshes = [p for p, at in self._refresh_at.items() if at <= now]
        await asyncio.gather(
            *(one(cid) for cid in due), *(self._refresh_peer(p, now) for p in refreshes)
        )

    async def _prepare_dataplane(self) -> None:
        """Open the data plane before the first connection needs it, once this gateway
        may be asked for one: it has a peer, or an endpoint to wire. Opening it (finding
        the WireGuard driver, writing fedgw's nftables table) takes tens of milliseconds,
        which the first connections would otherwise wait for."""
        if self._dataplane is not None or self._make_dataplane is None or self._key is None:
            return
        if self._prepare_failed:
            return  # requests still try, and get the reason
        if not self._federation.peers.all() and not self._registry.count_endpoints()[1]:
            return
        try:
            await self._open_dataplane()
        except Exception as exc:
            self._prepare_failed = True
            log.warning("cannot open the data plane yet (each request tries again): %s", exc)

    async def _prepare_tunnels(self, dataplane: Dataplane) -> None:
        """Start the tunnel to each peer before its first connection, with no peer on it:
        the other side's key comes with that connection. Starting a WireGuard interface
        (a wireguard-go process) takes 10-60 ms, which the first connections would wait
        for twice, the serving side's and then the client's."""
        for record in self._federation.peers.all():
            domain = record.domain
            if domain in self._ensured or domain in self._tunnels_failed:
                continue
            async with _lock_in(self._tunnel_locks, domain):
                # A connection may have made it meanwhile, or the peer left.
                if domain in self._ensured or self._federation.peers.get(domain) is None:
                    continue
                await self._tunnel(domain)
                try:
                    await self._ensure_tunnel(dataplane, domain)
                except FedgwError as exc:
                    # Not retried here: the first connection tries again, and says why.
                    self._tunnels_failed.add(domain)
                    log.warning("cannot start the tunnel to %s yet: %s", domain, exc)

    async def _silent_tunnels(self) -> set[str]:
        """Peers whose tunnel stopped passing traffic: we keep sending (tx grows) but
        nothing comes back (rx does not) and the last handshake is older than the
        timeout. An idle tunnel sends nothing and shakes no hands: it is not silent."""
        if self._dataplane is None:
            return set()
        try:
            peers = await self._dataplane.peers(allowed_ips=False)
        except FedgwError:
            return set()
        now = self._clock.now()
        silent = set()
        counters = {}
        for peer in peers:
            counters[peer.domain] = (peer.rx_bytes, peer.tx_bytes)
            rx0, tx0 = self._counters.get(peer.domain, (peer.rx_bytes, peer.tx_bytes))
            last = peer.last_handshake.timestamp() if peer.last_handshake else None
            stale = last is None or now - last > self._handshake_timeout
            if stale and peer.tx_bytes > tx0 and peer.rx_bytes == rx0:
                silent.add(peer.domain)
        self._counters = counters
        return silent

    def _step(
        self, record: ConnectionRecord, now: float, silent: set[str]
    ) -> tuple[Literal["close", "heal"], str] | None:
        """What supervision has to do with a connection now, and why; None: nothing."""
        c = record.connection
        if record.role == "server":
            if c.expires_at.timestamp() <= now:
                return "close", "lease expired"
            if self._endpoint_gone(c.server.endpoint):
                return "close", f"endpoint {c.server.endpoint} is gone"
            return None
        if record.role == "local":
            if self._endpoint_gone(c.server.endpoint):
                return "heal", f"endpoint {c.server.endpoint} is gone"
            if c.state is not ConnectionState.UP:
                return "heal", c.reason or "down"
            return None
        # client
        if c.state is ConnectionState.UP:
            if record.peer in silent:
                return "heal", f"the tunnel to {record.peer} has been silent too long"
            return None
        if self._retry_at.get(c.id, 0.0) <= now:
            return "heal", c.reason or "down"
        return None

    async def _check(self, record: ConnectionRecord, now: float, silent: set[str]) -> None:
        step = self._step(record, now, silent)
        if step is None:
            return
        action, reason = step
        if action == "close":
            await self._close(record, reason, tell_peer=True)
        else:
            await self._heal(record, reason)

    def _endpoint_gone(self, name: str | None) -> bool:
        """Whether the endpoint ``name`` of this domain is no longer registered."""
        return name is not None and not self._registry.has_endpoint(name)

    async def _heal(self, record: ConnectionRecord, reason: str) -> None:
        """Down with ``reason``, then request again: the same endpoint first."""
        c = record.connection
        if c.state is not ConnectionState.DOWN:
            record = await self._move(record, ConnectionState.DOWN, reason)
        prefer = c.server.endpoint
        try:
            if record.role == "local":
                await self._connect_local(record, prefer)
            else:
                await self._connect_remote(record, prefer)
        except Exception as exc:
            if not isinstance(exc, FedgwError | OSError):
                log.exception("healing connection %s failed unexpectedly", c.id)
            delay = min(self._backoff.get(c.id, 0.25) * 2, MAX_BACKOFF)
            self._backoff[c.id] = delay
            self._retry_at[c.id] = self._clock.now() + delay
            if isinstance(exc, NotExported | PeerUnreachable | NotFound):
                detail = str(exc)
            else:
                detail = f"{type(exc).__name__}: {exc}"
            await self._move(
                record, ConnectionState.DOWN, f"{reason}; retrying in {delay:.1f}s ({detail})"
            )
            return
        self._backoff.pop(c.id, None)
        self._retry_at.pop(c.id, None)


def _lock_in(locks: weakref.WeakValueDictionary[str, asyncio.Lock], key: str) -> asyncio.Lock:
    """The lock of ``key`` in ``locks``: made when first asked for, alive while someone
    holds or awaits it."""
    lock = locks.get(key)
    if lock is None:
        lock = asyncio.Lock()
        locks[key] = lock
    return lock


async def load_or_create_key(path: Path) -> PrivateKey:
    """This gateway's WireGuard key: kept in the state dir, mode 0600."""
    from wireguard.keys import load_private_key, save_private_key

    if await asyncio.to_thread(path.exists):
        return await asyncio.to_thread(load_private_key, path)
    key = PrivateKey.generate()
    await asyncio.to_thread(save_private_key, key, path)
    return key
