"""Named network namespaces and async RTNL sessions inside them (pyroute2).

Everything here is idempotent where a reconciler needs it to be (``exist_ok``,
``missing_ok``), and every netlink error leaves as :class:`NetlinkFailed` carrying the
errno and naming the namespace and the object.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import ipaddress
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from wireguard.errors import CommandFailed, LinkNotFound, NamespaceNotFound, NetlinkFailed

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
IFNAMSIZ = 15  # usable characters of an interface name

T = TypeVar("T")
Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def check_ifname(name: str) -> str:
    """Interface names are at most 15 bytes, without '/', ':' or whitespace."""
    if not 0 < len(name.encode()) <= IFNAMSIZ or any(c in name for c in "/: \t\n"):
        raise ValueError(f"interface name {name!r} must be 1 to {IFNAMSIZ} characters, no '/', ':'")
    return name


# --- namespaces ------------------------------------------------------------------------


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def netns_exists(name: str) -> bool:
    return netns_path(name).exists()


def list_netns(prefix: str = "") -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []


async def run(*argv: str, input: bytes | None = None, check: bool = True) -> str:
    """Run a helper program; its failure becomes :class:`CommandFailed` with its stderr."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError:
        raise CommandFailed(f"{argv[0]} is not installed (run `make setup`)") from None
    out, err = await proc.communicate(input)
    if check and proc.returncode != 0:
        message = err.decode(errors="replace").strip() or f"exit status {proc.returncode}"
        raise CommandFailed(f"{' '.join(argv)}: {message}")
    return out.decode(errors="replace")


async def create_netns(name: str) -> bool:
    """Create a named namespace with ``lo`` up; False if it existed already."""
    if netns_exists(name):
        return False
    await run("ip", "netns", "add", name)
    async with Rtnl(name) as rtnl:
        await rtnl.set_link("lo", up=True)
    return True


async def delete_netns(name: str) -> bool:
    """Delete a named namespace; False if there was none. Interfaces inside go with it
    (a veth takes its peer along); processes inside must be stopped first."""
    if not netns_exists(name):
        return False
    await run("ip", "netns", "delete", name)
    return True


def netns_inode(name: str) -> int | None:
    try:
        return netns_path(name).stat().st_ino
    except OSError:
        return None


def netns_pids(names: Sequence[str], proc: Path = Path("/proc")) -> dict[int, str]:
    """Processes living in any of the namespaces ``names``: pid -> namespace name."""
    inodes = {ino: n for n in names if (ino := netns_inode(n)) is not None}
    found: dict[int, str] = {}
    if not inodes:
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            ino = (entry / "ns" / "net").stat().st_ino
            if ino in inodes:
                found[int(entry.name)] = inodes[ino]
    return found


def _in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a throwaway thread that has entered the namespace ``name``.

    A network namespace is a per-thread attribute, so only that thread moves; it ends
    with ``fn`` and no other thread ever runs in the namespace by accident.
    """
    result: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(netns_path(name), os.O_RDONLY)
        except FileNotFoundError:
            failure.append(NamespaceNotFound(f"network namespace {name!r} does not exist"))
            return
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                failure.append(NetlinkFailed(f"setns({name}): {os.strerror(err)}", errno=err))
                return
            result.append(fn())
        except BaseException as exc:
            failure.append(exc)
        finally:
            os.close(fd)

    thread = threading.Thread(target=target, name=f"netns-{name}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


async def in_netns(name: str, fn: Callable[[], T]) -> T:
    """``fn()`` run inside the namespace ``name`` (on its own thread)."""
    return await asyncio.to_thread(_in_netns, name, fn)


async def set_sysctl(netns: str, key: str, value: str) -> None:
    """Write a per-namespace sysctl such as ``net.ipv4.ip_forward``."""
    path = Path("/proc/sys", *key.split("."))
    await in_netns(netns, lambda: path.write_text(value))


async def get_sysctl(netns: str, key: str) -> str:
    path = Path("/proc/sys", *key.split("."))
    return await in_netns(netns, lambda: path.read_text().strip())


# --- RTNL sessions ---------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    kind: str | None
    up: bool
    mtu: int
    master: int | None


class Rtnl:
    """An RTNL session in one namespace (``None``: the namespace this process runs in).

    ``async with Rtnl("fedgw.cluster1") as rtnl: await rtnl.add_veth(...)``
    """

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._ipr: AsyncIPRoute | None = None

    @property
    def where(self) -> str:
        return f"netns {self.netns}" if self.netns else "this namespace"

    async def __aenter__(self) -> Rtnl:
        if self.netns is not None and not netns_exists(self.netns):
            raise NamespaceNotFound(f"network namespace {self.netns!r} does not exist")
        # flags=0: never create the namespace as a side effect of opening a session.
        kwargs: dict[str, Any] = {"netns": self.netns, "flags": 0} if self.netns else {}
        try:
            self._ipr = AsyncIPRoute(**kwargs)
            await self._ipr.setup_endpoint()
        except FileNotFoundError:
            raise NamespaceNotFound(f"network namespace {self.netns!r} does not exist") from None
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    @property
    def ipr(self) -> AsyncIPRoute:
        if self._ipr is None:
            raise RuntimeError("Rtnl used outside 'async with'")
        return self._ipr

    def _failed(self, action: str, exc: NetlinkError) -> NetlinkFailed:
        return NetlinkFailed(f"{action} in {self.where}: {os.strerror(exc.code)}", errno=exc.code)

    async def _call(self, action: str, coro: Any, *, ignore: frozenset[int] = frozenset()) -> Any:
        try:
            return await coro
        except NetlinkError as exc:
            if exc.code in ignore:
                return None
            raise self._failed(action, exc) from exc

    # links

    async def find(self, ifname: str) -> int | None:
        indexes = await self._call(f"look up {ifname}", self.ipr.link_lookup(ifname=ifname))
        return indexes[0] if indexes else None

    async def index(self, ifname: str) -> int:
        index = await self.find(ifname)
        if index is None:
            raise LinkNotFound(f"interface {ifname} does not exist in {self.where}")
        return index

    async def links(self) -> list[Link]:
        out = []
        async for msg in await self.ipr.link("dump"):
            info = msg.get("IFLA_LINKINFO")
            out.append(
                Link(
                    index=msg["index"],
                    name=msg.get("IFLA_IFNAME"),
                    kind=info.get("IFLA_INFO_KIND") if info else None,
                    up=bool(msg["flags"] & 1),
                    mtu=msg.get("IFLA_MTU"),
                    master=msg.get("IFLA_MASTER"),
                )
            )
        return out

    async def add_veth(
        self, ifname: str, peer: str, peer_netns: str | None = None, *, exist_ok: bool = True
    ) -> bool:
        """A veth pair: ``ifname`` here, ``peer`` in ``peer_netns`` (here if None).
        Created directly in place, so neither end ever appears anywhere else."""
        check_ifname(ifname)
        check_ifname(peer)
        if exist_ok and await self.find(ifname) is not None:
            return False
        peer_spec: dict[str, Any] = {"ifname": peer}
        if peer_netns is not None:
            if not netns_exists(peer_netns):
                raise NamespaceNotFound(f"network namespace {peer_netns!r} does not exist")
            peer_spec["net_ns_fd"] = peer_netns
        await self._call(
            f"add veth {ifname} (peer {peer})",
            self.ipr.link("add", ifname=ifname, kind="veth", peer=peer_spec),
        )
        return True

    async def add_bridge(self, ifname: str, *, exist_ok: bool = True) -> bool:
        check_ifname(ifname)
        if exist_ok and await self.find(ifname) is not None:
            return False
        await self._call(f"add bridge {ifname}", self.ipr.link("add", ifname=ifname, kind="bridge"))
        return True

    async def set_link(
        self,
        ifname: str,
        *,
        up: bool | None = None,
        mtu: int | None = None,
        master: str | None = None,
    ) -> None:
        index = await self.index(ifname)
        spec: dict[str, Any] = {}
        if mtu is not None:
            spec["mtu"] = mtu
        if master is not None:
            spec["master"] = await self.index(master)
        if up is not None:
            spec["state"] = "up" if up else "down"
        if spec:
            await self._call(f"set {ifname}", self.ipr.link("set", index=index, **spec))

    async def delete_link(self, ifname: str, *, missing_ok: bool = True) -> bool:
        index = await self.find(ifname)
        if index is None:
            if missing_ok:
                return False
            raise LinkNotFound(f"interface {ifname} does not exist in {self.where}")
        await self._call(
            f"delete {ifname}", self.ipr.link("del", index=index), ignore=frozenset({errno.ENODEV})
        )
        return True

    # addresses and routes

    async def add_address(self, ifname: str, address: Interface | str) -> bool:
        """Add ``address`` (CIDR) to ``ifname``; False if it was there already."""
        iface = ipaddress.ip_interface(address)
        index = await self.index(ifname)
        done = await self._call(
            f"add address {iface} to {ifname}",
            self.ipr.addr(
                "add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen
            ),
            ignore=frozenset({errno.EEXIST}),
        )
        return done is not None

    async def addresses(self, ifname: str | None = None) -> list[tuple[str, Interface]]:
        names = {link.index: link.name for link in await self.links()}
        out: list[tuple[str, Interface]] = []
        async for msg in await self.ipr.addr("dump"):
            name = names.get(msg["index"], "?")
            if ifname is None or name == ifname:
                out.append(
                    (name, ipaddress.ip_interface(f"{msg.get('IFA_ADDRESS')}/{msg['prefixlen']}"))
                )
        return out

    async def add_route(
        self,
        dst: Network | str,
        *,
        via: str | None = None,
        dev: str | None = None,
        table: int | None = None,
    ) -> None:
        """Add or replace the route to ``dst`` ("default" for 0/0)."""
        spec: dict[str, Any] = {"dst": str(dst)}
        if via is not None:
            spec["gateway"] = via
        if dev is not None:
            spec["oif"] = await self.index(dev)
        if table is not None:
            spec["table"] = table
        await self._call(f"route {dst}", self.ipr.route("replace", **spec))

    # appended for the WireGuard drivers

    async def link(self, ifname: str) -> Link | None:
        """The link ``ifname`` (with its kind), or None if there is none."""
        return next((link for link in await self.links() if link.name == ifname), None)

    async def add_wireguard(self, ifname: str, *, exist_ok: bool = True) -> bool:
        """A kernel WireGuard link; :class:`NetlinkFailed` with EOPNOTSUPP where the
        kernel has no WireGuard. False if ``ifname`` existed already."""
        check_ifname(ifname)
        if exist_ok and await self.find(ifname) is not None:
            return False
        await self._call(
            f"add wireguard {ifname}", self.ipr.link("add", ifname=ifname, kind="wireguard")
        )
        return True


def _in_new_netns(fn: Callable[[], T]) -> T:
    """Run ``fn`` on a throwaway thread moved into a new, empty, unnamed namespace."""
    result: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            if _libc.unshare(CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                failure.append(
                    NetlinkFailed(f"unshare(CLONE_NEWNET): {os.strerror(err)}", errno=err)
                )
                return
            result.append(fn())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target, name="netns-throwaway")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


async def in_throwaway_netns(fn: Callable[[], T]) -> T:
    """``fn()`` inside a new, empty network namespace that nothing names: it vanishes
    when ``fn``'s thread ends and its sockets are closed, so a probe (can this kernel
    create a link of kind X?) leaves nothing behind, even if the process dies."""
    return await asyncio.to_thread(_in_new_netns, fn)
