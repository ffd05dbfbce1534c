"""The WireGuard driver interface and its models: what an interface and a peer should be
(specs), what they are (states), and the incremental peer operations every driver shares."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import ClassVar, Literal

from wireguard.errors import InvalidSpec, PeerNotFound
from wireguard.keys import PresharedKey, PrivateKey, PublicKey
from wireguard.netns import IFNAMSIZ

DriverKind = Literal["kernel", "userspace", "memory"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_KEEPALIVE = 65535


def parse_prefix(text: str | Network) -> Network:
    """A prefix in canonical form (host bits cleared, as WireGuard stores it)."""
    if isinstance(text, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return text
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise InvalidSpec(f"{text!r} is not an IP prefix: {exc}") from None


def prefixes(*texts: str | Network) -> tuple[Network, ...]:
    """``prefixes("10.0.0.0/24", "fd00::/64")``: canonical, sorted, without duplicates."""
    return sort_prefixes(parse_prefix(t) for t in texts)


def handshake_time(sec: int, nsec: int) -> datetime:
    """A handshake instant from seconds and nanoseconds, without float rounding."""
    return datetime.fromtimestamp(sec, UTC) + timedelta(microseconds=nsec // 1000)


def sort_prefixes(nets: Iterable[Network]) -> tuple[Network, ...]:
    return tuple(sorted(set(nets), key=lambda n: (n.version, int(n.network_address), n.prefixlen)))


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A peer's UDP endpoint: an IP address (names are resolved by the caller) and a port."""

    host: Address
    port: int

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise InvalidSpec(f"endpoint port {self.port} is not in 1..65535")

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """``"192.0.2.1:51820"`` or ``"[2001:db8::1]:51820"``."""
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            raise InvalidSpec(f"endpoint {text!r} must be HOST:PORT")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise InvalidSpec(f"endpoint {text!r}: write an IPv6 host in brackets, [addr]:port")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise InvalidSpec(
                f"endpoint {text!r}: {host!r} is not an IP address (resolve names first)"
            ) from None
        return cls(address, int(port))

    def __str__(self) -> str:
        if self.host.version == 6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class InterfaceRef:
    """Which interface: its name and the network namespace it lives in (``None``: the
    namespace of the gateway process)."""

    name: str
    netns: str | None = None

    def __post_init__(self) -> None:
        _check_name(self.name)

    def __str__(self) -> str:
        return f"{self.name} (netns {self.netns})" if self.netns else self.name


def _check_name(name: str) -> None:
    if not 0 < len(name.encode()) <= IFNAMSIZ or any(c in name for c in "/: \t\n%"):
        raise InvalidSpec(f"interface name {name!r} must be 1 to {IFNAMSIZ} characters, no '/:%'")


@dataclass(frozen=True, slots=True)
class InterfaceSpec:
    """What a WireGuard interface should be."""

    name: str
    netns: str | None
    private_key: PrivateKey
    listen_port: int | None = None
    """UDP port; ``None`` lets WireGuard choose (and keeps whatever an existing one has)."""
    mtu: int = 1420
    """Underlay MTU minus 80 (IPv6 + UDP + WireGuard overhead)."""
    fwmark: int | None = None
    """Mark for the encrypted packets (policy routing); ``None`` leaves it as it is."""

    def __post_init__(self) -> None:
        _check_name(self.name)
        if self.listen_port is not None and not 0 < self.listen_port < 65536:
            raise InvalidSpec(f"listen port {self.listen_port} is not in 1..65535")
        if not 1280 <= self.mtu <= 65535:
            # 1280 is IPv6's minimum; smaller would break IPv6 through the tunnel.
            raise InvalidSpec(f"MTU {self.mtu} is not in 1280..65535")
        if self.fwmark is not None and not 0 <= self.fwmark < 2**32:
            raise InvalidSpec(f"fwmark {self.fwmark} is not a 32-bit number")

    @property
    def ref(self) -> InterfaceRef:
        return InterfaceRef(self.name, self.netns)


@dataclass(frozen=True, slots=True)
class PeerSpec:
    """What one peer should be. ``endpoint=None`` leaves the endpoint alone (WireGuard
    learns it from the peer's packets, e.g. when the peer is behind NAT)."""

    public_key: PublicKey
    endpoint: Endpoint | None = None
    allowed_ips: tuple[Network, ...] = ()
    persistent_keepalive: int = 0
    """Seconds between keepalives; 0 turns them off."""
    preshared_key: PresharedKey | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.persistent_keepalive <= MAX_KEEPALIVE:
            raise InvalidSpec(f"persistent keepalive {self.persistent_keepalive} not in 0..65535")
        for net in self.allowed_ips:
            if not isinstance(net, ipaddress.IPv4Network | ipaddress.IPv6Network):
                raise InvalidSpec(f"allowed IP {net!r} is not a network (use prefixes())")
        object.__setattr__(self, "allowed_ips", sort_prefixes(self.allowed_ips))


@dataclass(frozen=True, slots=True)
class PeerState:
    """One peer as the driver reports it."""

    public_key: PublicKey
    endpoint: Endpoint | None
    allowed_ips: tuple[Network, ...]
    persistent_keepalive: int
    last_handshake: datetime | None
    """UTC; ``None`` before the first handshake."""
    rx_bytes: int
    tx_bytes: int
    preshared_key: PresharedKey | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class InterfaceState:
    """A WireGuard interface as the driver reports it; peers sorted by public key."""

    ref: InterfaceRef
    public_key: PublicKey | None
    listen_port: int
    fwmark: int
    peers: tuple[PeerState, ...]

    def peer(self, public_key: PublicKey) -> PeerState | None:
        return next((p for p in self.peers if p.public_key == public_key), None)


@dataclass(frozen=True, slots=True)
class PeerUpdate:
    """One change to one peer, as it goes to the kernel or to the UAPI socket.

    ``create=False`` means update-only: a peer that vanished meanwhile is not created
    again. ``replace_allowed_ips`` replaces this peer's list (only this peer's) by
    ``allowed_ips``; otherwise ``allowed_ips`` are added. Never touches other peers.
    """

    public_key: PublicKey
    create: bool
    endpoint: Endpoint | None = None
    persistent_keepalive: int | None = None
    set_preshared_key: bool = False
    preshared_key: PresharedKey | None = field(default=None, repr=False)
    replace_allowed_ips: bool = False
    allowed_ips: tuple[Network, ...] = ()


def plan_peer(current: PeerState | None, desired: PeerSpec) -> PeerUpdate | None:
    """The smallest update that turns ``current`` into ``desired``; ``None`` if equal.

    Only differing attributes are sent: re-sending equal values is harmless to the
    session but replacing allowed IPs opens a window in which the peer has none, so a
    list that only grows is added to instead of replaced.
    """
    if current is None:
        return PeerUpdate(
            public_key=desired.public_key,
            create=True,
            endpoint=desired.endpoint,
            persistent_keepalive=desired.persistent_keepalive or None,
            set_preshared_key=desired.preshared_key is not None,
            preshared_key=desired.preshared_key,
            allowed_ips=desired.allowed_ips,
        )
    endpoint = desired.endpoint if desired.endpoint not in (None, current.endpoint) else None
    keepalive = (
        desired.persistent_keepalive
        if desired.persistent_keepalive != current.persistent_keepalive
        else None
    )
    set_psk = desired.preshared_key != current.preshared_key
    have, want = set(current.allowed_ips), set(desired.allowed_ips)
    replace = not have <= want
    allowed = desired.allowed_ips if replace else sort_prefixes(want - have)
    if endpoint is None and keepalive is None and not set_psk and not replace and not allowed:
        return None
    return PeerUpdate(
        public_key=desired.public_key,
        create=False,
        endpoint=endpoint,
        persistent_keepalive=keepalive,
        set_preshared_key=set_psk,
        preshared_key=desired.preshared_key,
        replace_allowed_ips=replace,
        allowed_ips=allowed,
    )


class WireGuardDriver(ABC):
    """One way of running WireGuard interfaces (kernel, userspace, in memory).

    Peer operations are incremental: each one reads the interface, computes the change
    of exactly one peer (:func:`plan_peer`) and applies only that, so adding or removing
    a peer or an allowed prefix never resets the sessions of the others. Operations on
    one interface are serialised within a driver instance.
    """

    kind: ClassVar[DriverKind]

    def __init__(self) -> None:
        self._locks: dict[InterfaceRef, asyncio.Lock] = {}

    @property
    def name(self) -> str:
        """What runs the interfaces, for ``fedgw status`` (e.g. ``wireguard-go 0.0.2022``)."""
        return self.kind

    # --- interfaces (driver specific) ---------------------------------------------------

    @abstractmethod
    async def ensure_interface(self, spec: InterfaceSpec) -> InterfaceState:
        """Create the interface or bring an existing one to ``spec`` (key, port, fwmark,
        MTU, up); its peers are left as they are."""

    @abstractmethod
    async def remove_interface(self, iface: InterfaceRef) -> bool:
        """Delete the interface (and stop what runs it); False if there was none."""

    @abstractmethod
    async def state(self, iface: InterfaceRef, *, allowed_ips: bool = True) -> InterfaceState:
        """The interface and its peers; :class:`LinkNotFound` if it does not exist.

        ``allowed_ips=False`` leaves every peer's ``allowed_ips`` empty instead of
        parsing them, for a caller that wants handshakes and counters: the list grows
        with every connection, and parsing it costs more than reading it.
        """

    @abstractmethod
    async def interfaces(self, netns: str | None) -> list[InterfaceRef]:
        """The WireGuard interfaces of this driver's kind in ``netns``."""

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to do by default
        """Stop background work. Interfaces stay up (a restarted gateway adopts them)."""

    # --- the primitives a driver implements ------------------------------------------

    @abstractmethod
    async def _write_peer(self, iface: InterfaceRef, update: PeerUpdate) -> None:
        """Apply one peer update."""

    @abstractmethod
    async def _delete_peer(self, iface: InterfaceRef, public_key: PublicKey) -> None:
        """Remove one peer."""

    # --- incremental peer operations (shared) -----------------------------------------

    @contextlib.asynccontextmanager
    async def _locked(self, iface: InterfaceRef) -> AsyncIterator[None]:
        lock = self._locks.setdefault(iface, asyncio.Lock())
        async with lock:
            yield

    def _forget(self, iface: InterfaceRef) -> None:
        self._locks.pop(iface, None)

    async def _peer(self, iface: InterfaceRef, public_key: PublicKey) -> PeerState:
        peer = (await self.state(iface)).peer(public_key)
        if peer is None:
            raise PeerNotFound(f"{iface} has no peer {public_key}")
        return peer

    async def set_peer(self, iface: InterfaceRef, peer: PeerSpec) -> None:
        """Create the peer or bring it to ``peer``; no other peer is touched."""
        async with self._locked(iface):
            state = await self.state(iface)
            if peer.public_key == state.public_key:
                raise InvalidSpec(f"{iface}: a peer cannot have the interface's own public key")
            update = plan_peer(state.peer(peer.public_key), peer)
            if update is not None:
                await self._write_peer(iface, update)

    async def remove_peer(self, iface: InterfaceRef, public_key: PublicKey) -> bool:
        """Remove one peer; False if it was not there."""
        async with self._locked(iface):
            if (await self.state(iface)).peer(public_key) is None:
                return False
            await self._delete_peer(iface, public_key)
            return True

    async def add_allowed_ips(
        self,
        iface: InterfaceRef,
        public_key: PublicKey,
        nets: Iterable[Network],
        *,
        known_new: bool = False,
    ) -> bool:
        """Add prefixes to one peer (taking them from any other peer that had exactly
        them, as WireGuard does); :class:`PeerNotFound` if there is no such peer.
        False if it had them all already.

        ``known_new``: the caller knows the peer exists and lacks these prefixes (it keeps
        its own ledger), so the interface's state is not read first: that read grows with
        every allowed IP and would make each new connection slower than the last.
        """
        if known_new:
            new = sort_prefixes(set(nets))
            if not new:
                return False
            async with self._locked(iface):
                await self._write_peer(iface, PeerUpdate(public_key, create=False, allowed_ips=new))
            return True
        async with self._locked(iface):
            peer = await self._peer(iface, public_key)
            new = sort_prefixes(set(nets) - set(peer.allowed_ips))
            if not new:
                return False
            await self._write_peer(iface, PeerUpdate(public_key, create=False, allowed_ips=new))
            return True

    async def replace_allowed_ips(
        self, iface: InterfaceRef, public_key: PublicKey, nets: Iterable[Network]
    ) -> None:
        """Make ``nets`` the peer's whole list of allowed IPs, without reading the
        interface first: for a caller that keeps the list itself, as reading and parsing
        thousands of prefixes would cost far more than writing them. A peer that is not
        there is not created. ``nets`` go as given, unsorted: WireGuard keeps them in a
        trie, where order and repeats change nothing, and sorting thousands of them
        would cost a third of the write."""
        update = PeerUpdate(
            public_key, create=False, replace_allowed_ips=True, allowed_ips=tuple(nets)
        )
        async with self._locked(iface):
            await self._write_peer(iface, update)

    async def remove_allowed_ips(
        self, iface: InterfaceRef, public_key: PublicKey, nets: Iterable[Network]
    ) -> bool:
        """Remove prefixes from one peer; False if it had none of them or does not exist.

        WireGuard has no "remove one allowed IP" (before Linux 6.16), so the peer's list
        is replaced by the remaining prefixes, for this peer only. That does not touch
        its keys or session: the handshake and the counters stay.
        """
        async with self._locked(iface):
            peer = (await self.state(iface)).peer(public_key)
            if peer is None:
                return False
            gone = set(nets)
            remaining = tuple(n for n in peer.allowed_ips if n not in gone)
            if len(remaining) == len(peer.allowed_ips):
                return False
            await self._write_peer(
                iface,
                PeerUpdate(
                    public_key, create=False, replace_allowed_ips=True, allowed_ips=remaining
                ),
            )
            return True
