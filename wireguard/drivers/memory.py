"""A WireGuard driver in memory, for testing the layers above without root or a kernel:
the same semantics and errors as the real drivers, and a log of every change."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import ClassVar

from wireguard.drivers.base import (
    DriverKind,
    InterfaceRef,
    InterfaceSpec,
    InterfaceState,
    PeerState,
    PeerUpdate,
    WireGuardDriver,
    sort_prefixes,
)
from wireguard.errors import LinkNotFound
from wireguard.keys import PrivateKey, PublicKey

_ports = itertools.count(40000)


@dataclass(frozen=True, slots=True)
class Operation:
    """One change the driver made, as it would have reached the kernel: ``op`` is one of
    ``create_interface``, ``configure_interface``, ``remove_interface``, ``write_peer``
    (``detail`` is the :class:`PeerUpdate`), ``remove_peer``."""

    op: str
    iface: InterfaceRef
    detail: object = None


@dataclass
class _Interface:
    spec: InterfaceSpec
    listen_port: int
    fwmark: int
    up: bool = True
    peers: dict[PublicKey, PeerState] = field(default_factory=dict)


class MemoryDriver(WireGuardDriver):
    """Interfaces are keyed by (netns, name) like kernel links; namespaces are not
    checked (there are none). Handshakes happen only when a test says so
    (:meth:`handshake`)."""

    kind: ClassVar[DriverKind] = "memory"

    def __init__(self) -> None:
        super().__init__()
        self._interfaces: dict[InterfaceRef, _Interface] = {}
        self.operations: list[Operation] = []
        self._failures: dict[str, BaseException] = {}

    @property
    def name(self) -> str:
        return "in-memory"

    # --- test hooks ---------------------------------------------------------------------

    def fail_next(self, op: str, error: BaseException) -> None:
        """Make the next ``op`` (an :class:`Operation` name) raise ``error`` instead."""
        self._failures[op] = error

    def handshake(
        self,
        iface: InterfaceRef,
        public_key: PublicKey,
        *,
        at: datetime | None = None,
        rx: int = 0,
        tx: int = 0,
    ) -> None:
        """Pretend ``public_key`` completed a handshake (and moved some bytes)."""
        peer = self._get(iface).peers[public_key]
        self._get(iface).peers[public_key] = replace(
            peer,
            last_handshake=at or datetime.now(UTC),
            rx_bytes=peer.rx_bytes + rx,
            tx_bytes=peer.tx_bytes + tx,
        )

    def clear_operations(self) -> None:
        self.operations.clear()

    # --- internals ------------------------------------------------------------------------

    def _record(self, op: str, iface: InterfaceRef, detail: object = None) -> None:
        failure = self._failures.pop(op, None)
        if failure is not None:
            raise failure
        self.operations.append(Operation(op, iface, detail))

    def _get(self, iface: InterfaceRef) -> _Interface:
        found = self._interfaces.get(iface)
        if found is None:
            raise LinkNotFound(f"WireGuard interface {iface} does not exist")
        return found

    # --- interfaces -------------------------------------------------------------------------

    async def ensure_interface(self, spec: InterfaceSpec) -> InterfaceState:
        ref = spec.ref
        async with self._locked(ref):
            found = self._interfaces.get(ref)
            if found is None:
                self._record("create_interface", ref, spec)
                self._interfaces[ref] = _Interface(
                    spec=spec,
                    listen_port=spec.listen_port or next(_ports),
                    fwmark=spec.fwmark or 0,
                )
            else:
                changed = (
                    found.spec.private_key != spec.private_key
                    or (spec.listen_port is not None and spec.listen_port != found.listen_port)
                    or (spec.fwmark is not None and spec.fwmark != found.fwmark)
                    or spec.mtu != found.spec.mtu
                )
                if changed:
                    self._record("configure_interface", ref, spec)
                    if found.spec.private_key != spec.private_key:
                        _drop_own_key(found, spec.private_key)
                    found.spec = spec
                    if spec.listen_port is not None:
                        found.listen_port = spec.listen_port
                    if spec.fwmark is not None:
                        found.fwmark = spec.fwmark
            return await self.state(ref)

    async def remove_interface(self, iface: InterfaceRef) -> bool:
        async with self._locked(iface):
            if iface not in self._interfaces:
                return False
            self._record("remove_interface", iface)
            del self._interfaces[iface]
        self._forget(iface)
        return True

    async def state(self, iface: InterfaceRef, *, allowed_ips: bool = True) -> InterfaceState:
        found = self._get(iface)
        peers = (found.peers[k] for k in sorted(found.peers))
        return InterfaceState(
            ref=iface,
            public_key=found.spec.private_key.public_key(),
            listen_port=found.listen_port,
            fwmark=found.fwmark,
            peers=tuple(p if allowed_ips else replace(p, allowed_ips=()) for p in peers),
        )

    async def interfaces(self, netns: str | None) -> list[InterfaceRef]:
        return sorted((ref for ref in self._interfaces if ref.netns == netns), key=lambda r: r.name)

    def spec(self, iface: InterfaceRef) -> InterfaceSpec:
        """The spec the interface was last configured with (for assertions)."""
        return self._get(iface).spec

    # --- peers ------------------------------------------------------------------------------

    async def _write_peer(self, iface: InterfaceRef, update: PeerUpdate) -> None:
        found = self._get(iface)
        current = found.peers.get(update.public_key)
        if current is None and not update.create:
            return  # update-only on a vanished peer: WireGuard ignores it as well
        self._record("write_peer", iface, update)
        peer = current or PeerState(
            public_key=update.public_key,
            endpoint=None,
            allowed_ips=(),
            persistent_keepalive=0,
            last_handshake=None,
            rx_bytes=0,
            tx_bytes=0,
        )
        # Kept canonical (sorted, no repeats): states compare equal whatever order the
        # writes came in.
        allowed = sort_prefixes(
            update.allowed_ips
            if update.replace_allowed_ips
            else (*peer.allowed_ips, *update.allowed_ips)
        )
        peer = replace(
            peer,
            endpoint=peer.endpoint if update.endpoint is None else update.endpoint,
            persistent_keepalive=(
                peer.persistent_keepalive
                if update.persistent_keepalive is None
                else update.persistent_keepalive
            ),
            preshared_key=update.preshared_key if update.set_preshared_key else peer.preshared_key,
            allowed_ips=allowed,
        )
        # An allowed prefix belongs to one peer: giving it to this one takes it from others.
        for other_key, other in list(found.peers.items()):
            if other_key != update.public_key and set(other.allowed_ips) & set(allowed):
                found.peers[other_key] = replace(
                    other, allowed_ips=tuple(n for n in other.allowed_ips if n not in allowed)
                )
        found.peers[update.public_key] = peer

    async def _delete_peer(self, iface: InterfaceRef, public_key: PublicKey) -> None:
        found = self._get(iface)
        self._record("remove_peer", iface, public_key)
        found.peers.pop(public_key, None)


def _drop_own_key(found: _Interface, key: PrivateKey) -> None:
    # WireGuard removes a peer whose public key becomes the interface's own.
    found.peers.pop(key.public_key(), None)
