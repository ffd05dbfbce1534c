"""The kernel driver: links of kind ``wireguard`` configured through WireGuard's generic
netlink family (pyroute2), in the interface's namespace."""

from __future__ import annotations

import base64
import contextlib
import errno
import logging
import os
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

from pyroute2 import IPRoute, WireGuard
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic.wireguard import AsyncWireGuard

from wireguard.drivers.base import (
    DriverKind,
    Endpoint,
    InterfaceRef,
    InterfaceSpec,
    InterfaceState,
    PeerState,
    PeerUpdate,
    WireGuardDriver,
    handshake_time,
    parse_prefix,
    sort_prefixes,
)
from wireguard.errors import (
    DriverUnavailable,
    InterfaceConflict,
    InvalidKey,
    LinkNotFound,
    NamespaceNotFound,
    NetlinkFailed,
)
from wireguard.keys import PresharedKey, PrivateKey, PublicKey
from wireguard.netns import Rtnl, in_throwaway_netns, netns_exists

log = logging.getLogger(__name__)

_ZERO_KEY_B64 = base64.b64encode(bytes(32)).decode("ascii")
# Allowed IPs per netlink message: `wg` splits large lists too, to stay far below the
# socket buffer and the kernel's message size.
_ALLOWED_IPS_PER_MESSAGE = 500

_support: bool | None = None


async def kernel_supports_wireguard() -> bool:
    """Whether this kernel can create WireGuard links and speaks its netlink family.

    Probed by doing it: create a ``wireguard`` link in a throwaway namespace (loading
    the module if it is loadable) and bind the generic netlink family there. Looking at
    ``/sys/module/wireguard`` would miss a loadable module and a built-in one. Cached
    for the life of the process.
    """
    global _support
    if _support is None:
        try:
            _support = await in_throwaway_netns(_probe)
        except Exception as exc:  # the probe must never take the caller down
            log.info("kernel WireGuard probe failed: %s", exc)
            _support = False
    return _support


def _probe() -> bool:
    with IPRoute() as ipr:
        try:
            ipr.link("add", ifname="fgwprobe0", kind="wireguard")
        except NetlinkError as exc:
            log.debug("kernel refuses wireguard links: %s", os.strerror(exc.code))
            return False
    try:
        with WireGuard() as wg:
            wg.info("fgwprobe0")
    except NetlinkError as exc:
        log.debug("no wireguard generic netlink family: %s", os.strerror(exc.code))
        return False
    return True


class KernelDriver(WireGuardDriver):
    """WireGuard in the Linux kernel. Interface names are per namespace, as for any link."""

    kind: ClassVar[DriverKind] = "kernel"

    @property
    def name(self) -> str:
        return f"kernel WireGuard (Linux {os.uname().release})"

    async def check(self) -> None:
        if not await kernel_supports_wireguard():
            raise DriverUnavailable(
                "this kernel has no WireGuard (no module, or it cannot be loaded); "
                "use the userspace driver",
                retryable=False,
            )

    # --- netlink sessions ----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _genl(self, iface: InterfaceRef) -> AsyncIterator[AsyncWireGuard]:
        if iface.netns is not None and not netns_exists(iface.netns):
            raise NamespaceNotFound(f"network namespace {iface.netns!r} does not exist")
        # flags=0: never create the namespace as a side effect of opening a socket.
        kwargs: dict[str, Any] = {"netns": iface.netns, "flags": 0} if iface.netns else {}
        try:
            wg = AsyncWireGuard(**kwargs)
        except FileNotFoundError:
            raise NamespaceNotFound(f"network namespace {iface.netns!r} does not exist") from None
        try:
            try:
                await wg.setup_endpoint()  # resolves the "wireguard" family
            except FileNotFoundError:
                raise NamespaceNotFound(f"network namespace {iface.netns!r} is gone") from None
            except NetlinkError as exc:
                raise DriverUnavailable(
                    f"the kernel has no WireGuard netlink family: {os.strerror(exc.code)}",
                    retryable=False,
                ) from exc
            yield wg
        finally:
            wg.close()

    @staticmethod
    def _failed(iface: InterfaceRef, action: str, exc: NetlinkError) -> Exception:
        if exc.code == errno.ENODEV:
            return LinkNotFound(f"WireGuard interface {iface} does not exist")
        return NetlinkFailed(f"{action} on {iface}: {os.strerror(exc.code)}", errno=exc.code)

    async def _read(
        self, iface: InterfaceRef, *, allowed_ips: bool = True
    ) -> tuple[InterfaceState, PrivateKey | None]:
        async with self._genl(iface) as wg:
            try:
                messages = [msg async for msg in await wg.info(iface.name)]
            except NetlinkError as exc:
                raise self._failed(iface, "read", exc) from exc
        return parse_device(iface, messages, allowed_ips=allowed_ips)

    async def _set(self, iface: InterfaceRef, **kwargs: Any) -> None:
        async with self._genl(iface) as wg:
            try:
                await wg.set(iface.name, **kwargs)
            except NetlinkError as exc:
                raise self._failed(iface, "configure", exc) from exc

    # --- interfaces ------------------------------------------------------------------------

    async def ensure_interface(self, spec: InterfaceSpec) -> InterfaceState:
        ref = spec.ref
        async with self._locked(ref):
            async with Rtnl(spec.netns) as rtnl:
                link = await rtnl.link(spec.name)
                if link is None:
                    try:
                        await rtnl.add_wireguard(spec.name)
                    except NetlinkFailed as exc:
                        if exc.errno == errno.EOPNOTSUPP:
                            raise DriverUnavailable(
                                "this kernel has no WireGuard", retryable=False
                            ) from exc
                        raise
                elif link.kind != "wireguard":
                    raise InterfaceConflict(
                        f"{ref} exists as a link of kind {link.kind or 'unknown'}, not wireguard"
                    )
            state, private_key = await self._read(ref)
            # Only what differs: a new key resets every session, a new port rebinds.
            changes: dict[str, Any] = {}
            if private_key != spec.private_key:
                changes["private_key"] = spec.private_key.secret_base64()
            if spec.listen_port is not None and spec.listen_port != state.listen_port:
                changes["listen_port"] = spec.listen_port
            if spec.fwmark is not None and spec.fwmark != state.fwmark:
                changes["fwmark"] = spec.fwmark
            if changes:
                await self._set(ref, **changes)
            async with Rtnl(spec.netns) as rtnl:
                await rtnl.set_link(spec.name, mtu=spec.mtu, up=True)
            return await self.state(ref)

    async def remove_interface(self, iface: InterfaceRef) -> bool:
        async with self._locked(iface), Rtnl(iface.netns) as rtnl:
            link = await rtnl.link(iface.name)
            if link is None or link.kind != "wireguard":
                return False
            removed = await rtnl.delete_link(iface.name)
        self._forget(iface)
        return removed

    async def state(self, iface: InterfaceRef, *, allowed_ips: bool = True) -> InterfaceState:
        return (await self._read(iface, allowed_ips=allowed_ips))[0]

    async def interfaces(self, netns: str | None) -> list[InterfaceRef]:
        async with Rtnl(netns) as rtnl:
            links = await rtnl.links()
        return [InterfaceRef(link.name, netns) for link in links if link.kind == "wireguard"]

    # --- peers ---------------------------------------------------------------------------------

    async def _write_peer(self, iface: InterfaceRef, update: PeerUpdate) -> None:
        for peer in peer_messages(update):
            await self._set(iface, peer=peer)

    async def _delete_peer(self, iface: InterfaceRef, public_key: PublicKey) -> None:
        await self._set(iface, peer={"public_key": public_key.base64(), "remove": True})


def peer_messages(update: PeerUpdate) -> list[dict[str, Any]]:
    """The peer dicts for pyroute2's ``WireGuard.set``: one message for the update, and
    more update-only messages if the allowed IPs do not fit one."""
    allowed = [str(n) for n in update.allowed_ips]
    chunks = [
        allowed[i : i + _ALLOWED_IPS_PER_MESSAGE]
        for i in range(0, len(allowed), _ALLOWED_IPS_PER_MESSAGE)
    ] or [[]]
    first: dict[str, Any] = {"public_key": update.public_key.base64()}
    if not update.create:
        first["update_only"] = True
    if update.set_preshared_key:
        psk = update.preshared_key
        first["preshared_key"] = psk.secret_base64() if psk is not None else _ZERO_KEY_B64
    if update.endpoint is not None:
        # netlink takes the bare address; a scope id would need the ifindex instead.
        first["endpoint_addr"] = str(update.endpoint.host).split("%")[0]
        first["endpoint_port"] = update.endpoint.port
    if update.persistent_keepalive is not None:
        first["persistent_keepalive"] = update.persistent_keepalive
    if update.replace_allowed_ips:
        first["replace_allowed_ips"] = True
    if chunks[0] or update.replace_allowed_ips:
        first["allowed_ips"] = chunks[0]
    rest = [
        {"public_key": update.public_key.base64(), "update_only": True, "allowed_ips": chunk}
        for chunk in chunks[1:]
    ]
    return [first, *rest]


@dataclass
class _PeerBuilder:
    public_key: PublicKey
    endpoint: Endpoint | None = None
    keepalive: int = 0
    handshake: datetime | None = None
    rx: int = 0
    tx: int = 0
    psk: PresharedKey | None = None
    allowed: list[str] = field(default_factory=list)


def _key(value: Any) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


def parse_device(
    iface: InterfaceRef, messages: Iterable[Any], *, allowed_ips: bool = True
) -> tuple[InterfaceState, PrivateKey | None]:
    """Merge the messages of a device dump: the kernel splits long peer lists (and one
    peer's long allowed-IP list) over several messages, repeating the peer's key."""
    private_key: PrivateKey | None = None
    listen_port = fwmark = 0
    peers: dict[PublicKey, _PeerBuilder] = {}
    try:
        for msg in messages:
            if (raw := msg.get_attr("WGDEVICE_A_PRIVATE_KEY")) is not None:
                text = _key(raw)
                private_key = None if text == _ZERO_KEY_B64 else PrivateKey.from_base64(text)
            if (port := msg.get_attr("WGDEVICE_A_LISTEN_PORT")) is not None:
                listen_port = port
            if (mark := msg.get_attr("WGDEVICE_A_FWMARK")) is not None:
                fwmark = mark
            for attrs in msg.get_attr("WGDEVICE_A_PEERS") or ():
                _merge_peer(peers, attrs, allowed_ips=allowed_ips)
    except InvalidKey as exc:
        raise NetlinkFailed(f"device dump of {iface}: {exc}", errno=errno.EPROTO) from None
    state = InterfaceState(
        ref=iface,
        public_key=private_key.public_key() if private_key is not None else None,
        listen_port=listen_port,
        fwmark=fwmark,
        peers=tuple(
            PeerState(
                public_key=b.public_key,
                endpoint=b.endpoint,
                allowed_ips=sort_prefixes(parse_prefix(a) for a in b.allowed),
                persistent_keepalive=b.keepalive,
                last_handshake=b.handshake,
                rx_bytes=b.rx,
                tx_bytes=b.tx,
                preshared_key=b.psk,
            )
            for _, b in sorted(peers.items())
        ),
    )
    return state, private_key


def _merge_peer(
    peers: dict[PublicKey, _PeerBuilder], attrs: Any, *, allowed_ips: bool = True
) -> None:
    key = PublicKey.from_base64(_key(attrs.get_attr("WGPEER_A_PUBLIC_KEY")))
    peer = peers.setdefault(key, _PeerBuilder(key))
    if (psk := attrs.get_attr("WGPEER_A_PRESHARED_KEY")) is not None:
        text = _key(psk)
        peer.psk = None if text == _ZERO_KEY_B64 else PresharedKey.from_base64(text)
    if (endpoint := attrs.get_attr("WGPEER_A_ENDPOINT")) is not None:
        peer.endpoint = Endpoint.parse(
            f"[{endpoint['addr']}]:{endpoint['port']}"
            if ":" in endpoint["addr"]
            else f"{endpoint['addr']}:{endpoint['port']}"
        )
    if (keepalive := attrs.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL")) is not None:
        peer.keepalive = keepalive
    if (hs := attrs.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")) is not None and hs["tv_sec"]:
        peer.handshake = handshake_time(hs["tv_sec"], hs["tv_nsec"])
    if (rx := attrs.get_attr("WGPEER_A_RX_BYTES")) is not None:
        peer.rx = rx
    if (tx := attrs.get_attr("WGPEER_A_TX_BYTES")) is not None:
        peer.tx = tx
    for allowed in (attrs.get_attr("WGPEER_A_ALLOWEDIPS") if allowed_ips else None) or ():
        if allowed.get("addr"):
            peer.allowed.append(allowed["addr"])
