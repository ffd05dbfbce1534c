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
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
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


async def kill_netns_processes(
    names: Sequence[str], rounds: int = 50, interval: float = 0.05
) -> set[int]:
    """SIGKILL whatever runs in the namespaces ``names`` (deleting a namespace does not
    stop it), in rounds, since a dying parent may have started another; the pids killed."""
    killed: set[int] = set()
    for _ in range(rounds):
        pids = netns_pids(names)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed.update(pids)
        await asyncio.sleep(interval)
    return killed


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
    """A link as RTNL describes it, with what identifies a veth end (MAC, peer index)."""

    index: int
    name: str
    kind: str | None
    up: bool
    mtu: int
    master: int | None = None
    mac: str | None = None
    peer_index: int | None = None
    """IFLA_LINK: for a veth, its peer's index (in the peer's namespace)."""


def _link(msg: Any) -> Link:
    info = msg.get("IFLA_LINKINFO")
    return Link(
        index=msg["index"],
        name=msg.get("IFLA_IFNAME"),
        kind=info.get("IFLA_INFO_KIND") if info else None,
        up=bool(msg["flags"] & 1),
        mtu=msg.get("IFLA_MTU"),
        master=msg.get("IFLA_MASTER"),
        mac=msg.get("IFLA_ADDRESS"),
        peer_index=msg.get("IFLA_LINK"),
    )


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
        return [_link(msg) async for msg in await self.ipr.link("dump")]

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


# --- appended for wires and policy routing ---------------------------------------------

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_VERSION = {socket.AF_INET: 4, socket.AF_INET6: 6}
_RULE_ACTIONS = {1: "lookup", 6: "blackhole", 7: "unreachable", 8: "prohibit"}
_ROUTE_KINDS = {1: "unicast", 2: "local", 6: "blackhole", 7: "unreachable", 8: "prohibit"}
RTNH_F_ONLINK = 4
RT_SCOPE_LINK = 253
NUD_PERMANENT = 0x80
IFA_F_NODAD = 0x02


LinkDetails = Link  # the name the data plane uses for links read in full


@dataclass(frozen=True, slots=True)
class Rule:
    """A policy-routing rule; ``protocol`` tags its owner and is not part of equality."""

    priority: int
    family: int
    """4 or 6."""
    table: int = 0
    action: str = "lookup"
    """``lookup`` (in ``table``), ``blackhole``, ``unreachable`` or ``prohibit``."""
    iif: str | None = None
    src: Network | None = None
    protocol: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Route:
    """A route in one table; ``via`` routes are on-link (the next hop needs no
    connected route). ``protocol`` tags its owner and is not part of equality."""

    dst: Network
    table: int = 254
    dev: str | None = None
    via: Address | None = None
    kind: str = "unicast"
    """``unicast``, ``unreachable``, ``blackhole``, ``prohibit`` (``local``, ... when read)."""
    protocol: int = field(default=0, compare=False)

    @property
    def family(self) -> int:
        return self.dst.version


@dataclass(frozen=True, slots=True)
class Neighbour:
    """A static (permanent) neighbour entry: ``address`` on ``dev`` is at ``mac``."""

    dev: str
    address: Address
    mac: str


def _netns_target(netns: str) -> str:
    """A name in /run/netns or a path such as ``/proc/PID/ns/net``, as pyroute2 takes it."""
    return netns if "/" in netns else str(netns_path(netns))


class ThreadedRtnl(Rtnl):
    """An RTNL session whose socket is made on a thread inside the namespace, instead of
    in a forked child as pyroute2 does (about 2 ms instead of 7 per session, which adds
    up when every wire touches a workload namespace). ``netns`` may also be a path, as
    ``/proc/PID/ns/net`` for a workload known by its process."""

    def __init__(self, netns: str | None = None) -> None:
        super().__init__(netns)
        self._indexes: dict[str, int] | None = None

    @contextlib.contextmanager
    def remembering_indexes(self) -> Iterator[None]:
        """Within the block, look each interface's index up once: a batch of routes and
        neighbours on the same links then costs no extra round trips. Only for blocks
        in which no one else deletes or recreates those links."""
        self._indexes = {}
        try:
            yield
        finally:
            self._indexes = None

    async def find(self, ifname: str) -> int | None:
        if self._indexes is not None and ifname in self._indexes:
            return self._indexes[ifname]
        index = await super().find(ifname)
        if self._indexes is not None and index is not None:
            self._indexes[ifname] = index
        return index

    async def delete_link(self, ifname: str, *, missing_ok: bool = True) -> bool:
        if self._indexes is not None:
            self._indexes.pop(ifname, None)
        return await super().delete_link(ifname, missing_ok=missing_ok)

    async def __aenter__(self) -> ThreadedRtnl:
        if self.netns is None:
            await super().__aenter__()
            return self
        if not netns_exists(self.netns):
            raise NamespaceNotFound(f"network namespace {self.netns!r} does not exist")

        def make() -> socket.socket:
            return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, socket.NETLINK_ROUTE)

        try:
            sock = await in_netns(self.netns, make)
        except FileNotFoundError:
            raise NamespaceNotFound(f"network namespace {self.netns!r} does not exist") from None
        except OSError as exc:
            raise NetlinkFailed(
                f"netlink socket in {self.where}: {exc.strerror}", errno=exc.errno or 0
            ) from exc
        try:
            self._ipr = AsyncIPRoute(fileno=sock.detach())
            await self._ipr.setup_endpoint()
        except BaseException:
            if self._ipr is not None:
                self._ipr.close()
                self._ipr = None
            raise
        return self

    # links

    async def link_details(self, ifname: str | None = None) -> list[LinkDetails]:
        """Every link (or the one named ``ifname``, if it exists) with MAC and peer index."""
        spec: dict[str, Any] = {} if ifname is None else {"ifname": ifname}
        try:
            answer = await self.ipr.link("dump" if ifname is None else "get", **spec)
            # "get" answers a list, "dump" an async iterator.
            msgs = list(answer) if isinstance(answer, list) else [m async for m in answer]
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return []
            raise self._failed(f"read link {ifname or ''}", exc) from exc
        return [_link(msg) for msg in msgs]

    async def add_veth_pair(
        self,
        ifname: str,
        peer: str,
        *,
        peer_netns: str | None = None,
        mac: str | None = None,
        peer_mac: str | None = None,
        mtu: int | None = None,
        up: bool = False,
    ) -> None:
        """A veth pair created in place: ``ifname`` here, ``peer`` in ``peer_netns`` (a name
        or a path such as ``/proc/PID/ns/net``), both with the given MACs and MTU, and
        ``ifname`` up if asked (the kernel takes no flags for the peer).
        :class:`NetlinkFailed` with EEXIST if either name is taken."""
        check_ifname(ifname)
        check_ifname(peer)
        peer_spec: dict[str, Any] = {"ifname": peer}
        spec: dict[str, Any] = {"ifname": ifname, "kind": "veth"}
        if peer_netns is not None:
            if not netns_exists(peer_netns):
                raise NamespaceNotFound(f"network namespace {peer_netns!r} does not exist")
            peer_spec["net_ns_fd"] = _netns_target(peer_netns)
        if mac is not None:
            spec["address"] = mac
        if peer_mac is not None:
            peer_spec["address"] = peer_mac
        if mtu is not None:
            spec["mtu"] = mtu
            peer_spec["mtu"] = mtu
        if up:
            spec["state"] = "up"
        await self._call(
            f"add veth {ifname} (peer {peer})", self.ipr.link("add", peer=peer_spec, **spec)
        )

    # addresses

    async def add_address_nodad(self, ifname: str, address: Interface | str) -> bool:
        """Like :meth:`add_address`, but an IPv6 address is usable at once (no duplicate
        address detection: a point-to-point link has no one to collide with)."""
        iface = ipaddress.ip_interface(address)
        index = await self.index(ifname)
        done = await self._call(
            f"add address {iface} to {ifname}",
            self.ipr.addr(
                "add",
                index=index,
                address=str(iface.ip),
                prefixlen=iface.network.prefixlen,
                flags=IFA_F_NODAD if iface.version == 6 else 0,
            ),
            ignore=frozenset({errno.EEXIST}),
        )
        return done is not None

    async def delete_address(self, ifname: str, address: Interface | str) -> bool:
        """False if ``ifname`` did not have ``address``."""
        iface = ipaddress.ip_interface(address)
        index = await self.index(ifname)
        done = await self._call(
            f"delete address {iface} from {ifname}",
            self.ipr.addr(
                "del", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen
            ),
            ignore=frozenset({errno.EADDRNOTAVAIL, errno.ENOENT}),
        )
        return done is not None

    # rules

    def _rule_spec(self, rule: Rule) -> dict[str, Any]:
        spec: dict[str, Any] = {"family": _AF[rule.family], "priority": rule.priority}
        if rule.action == "lookup":
            spec["table"] = rule.table
        else:
            spec["action"] = rule.action
        if rule.iif is not None:
            spec["iifname"] = rule.iif
        if rule.src is not None:
            spec["src"] = str(rule.src.network_address)
            spec["src_len"] = rule.src.prefixlen
        if rule.protocol:
            spec["protocol"] = rule.protocol
        return spec

    async def add_rule(self, rule: Rule) -> bool:
        """False if an equal rule existed already."""
        done = await self._call(
            f"add rule {rule}",
            self.ipr.rule("add", **self._rule_spec(rule)),
            ignore=frozenset({errno.EEXIST}),
        )
        return done is not None

    async def delete_rule(self, rule: Rule) -> bool:
        """False if there was no such rule."""
        done = await self._call(
            f"delete rule {rule}",
            self.ipr.rule("del", **self._rule_spec(rule)),
            ignore=frozenset({errno.ENOENT}),
        )
        return done is not None

    async def rules(self, family: int | None = None) -> list[Rule]:
        """The rules of both families (or of ``family``)."""
        out = []
        async for msg in await self.ipr.rule("dump"):
            version = _VERSION.get(msg["family"])
            if version is None or (family is not None and version != family):
                continue
            src = msg.get("FRA_SRC")
            out.append(
                Rule(
                    priority=msg.get("FRA_PRIORITY") or 0,
                    family=version,
                    table=msg.get("FRA_TABLE") or msg["table"],
                    action=_RULE_ACTIONS.get(msg["action"], str(msg["action"])),
                    iif=msg.get("FRA_IIFNAME"),
                    src=ipaddress.ip_network(f"{src}/{msg['src_len']}") if src else None,
                    protocol=msg.get("FRA_PROTOCOL") or 0,
                )
            )
        return out

    # routes

    async def _route_spec(self, route: Route) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "dst": str(route.dst),
            "family": _AF[route.family],
            "table": route.table,
        }
        if route.kind != "unicast":
            spec["type"] = route.kind
        if route.dev is not None:
            spec["oif"] = await self.index(route.dev)
        if route.via is not None:
            spec["gateway"] = str(route.via)
            spec["flags"] = RTNH_F_ONLINK
        elif route.dev is not None:
            spec["scope"] = RT_SCOPE_LINK
        if route.protocol:
            spec["proto"] = route.protocol
        return spec

    async def replace_route(self, route: Route) -> None:
        """Add ``route`` or replace the route to its destination in its table."""
        await self._call(
            f"route {route.dst} in table {route.table}",
            self.ipr.route("replace", **await self._route_spec(route)),
        )

    async def delete_route(self, route: Route) -> bool:
        """False if there was no such route (or its device is gone, taking it along)."""
        try:
            spec = await self._route_spec(route)
        except LinkNotFound:
            return False
        done = await self._call(
            f"delete route {route.dst} from table {route.table}",
            self.ipr.route("del", **spec),
            ignore=frozenset({errno.ESRCH, errno.ENOENT, errno.ENODEV}),
        )
        return done is not None

    async def routes(self, tables: range | None = None) -> list[Route]:
        """The routes of both families whose table is in ``tables`` (all if None)."""
        names = {link.index: link.name for link in await self.links()}
        out = []
        async for msg in await self.ipr.route("dump"):
            version = _VERSION.get(msg["family"])
            table = msg.get("RTA_TABLE") or msg["table"]
            if version is None or (tables is not None and table not in tables):
                continue
            kind = _ROUTE_KINDS.get(msg["type"], str(msg["type"]))
            dst = msg.get("RTA_DST") or ("0.0.0.0" if version == 4 else "::")
            gateway = msg.get("RTA_GATEWAY")
            oif = msg.get("RTA_OIF")
            out.append(
                Route(
                    dst=ipaddress.ip_network(f"{dst}/{msg['dst_len']}"),
                    table=table,
                    dev=names.get(oif) if oif is not None and kind == "unicast" else None,
                    via=ipaddress.ip_address(gateway) if gateway else None,
                    kind=kind,
                    protocol=msg["proto"],
                )
            )
        return out

    async def route_mtu(self, dst: Address | str) -> int | None:
        """The MTU of the interface the route to ``dst`` leaves by; None without a route."""
        try:
            # "get" answers a list, where "dump" answers an async iterator.
            msgs = list(await self.ipr.route("get", dst=str(dst)))
        except NetlinkError as exc:
            if exc.code in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ESRCH):
                return None
            raise self._failed(f"route to {dst}", exc) from exc
        oif = msgs[0].get("RTA_OIF") if msgs else None
        if oif is None:
            return None
        links = {link.index: link for link in await self.links()}
        link = links.get(oif)
        return link.mtu if link is not None else None

    # neighbours

    async def set_neighbour(self, neighbour: Neighbour) -> None:
        """Add or replace a permanent neighbour entry."""
        index = await self.index(neighbour.dev)
        await self._call(
            f"neighbour {neighbour.address} on {neighbour.dev}",
            self.ipr.neigh(
                "replace",
                ifindex=index,
                dst=str(neighbour.address),
                lladdr=neighbour.mac,
                state=NUD_PERMANENT,
            ),
        )

    async def delete_neighbour(self, neighbour: Neighbour) -> bool:
        index = await self.find(neighbour.dev)
        if index is None:
            return False
        done = await self._call(
            f"delete neighbour {neighbour.address} on {neighbour.dev}",
            self.ipr.neigh("del", ifindex=index, dst=str(neighbour.address)),
            ignore=frozenset({errno.ENOENT, errno.ENODEV}),
        )
        return done is not None

    async def neighbours(self, ifname: str | None = None) -> list[Neighbour]:
        """Permanent neighbour entries (of ``ifname``, or of every link)."""
        names = {link.index: link.name for link in await self.links()}
        out = []
        async for msg in await self.ipr.neigh("dump"):
            name = names.get(msg["ifindex"])
            mac = msg.get("NDA_LLADDR")
            if not msg["state"] & NUD_PERMANENT or name is None or mac is None:
                continue
            if ifname is None or name == ifname:
                out.append(Neighbour(name, ipaddress.ip_address(msg.get("NDA_DST")), mac))
        return out
