"""Named network namespaces and async RTNL sessions inside them.

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
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

from wireguard import rtnetlink as nl
from wireguard.errors import CommandFailed, LinkNotFound, NamespaceNotFound, NetlinkFailed
from wireguard.rtnetlink import Address as Address
from wireguard.rtnetlink import Interface as Interface
from wireguard.rtnetlink import Link as Link
from wireguard.rtnetlink import Network as Network
from wireguard.rtnetlink import Rule as Rule

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
IFNAMSIZ = 15  # usable characters of an interface name

T = TypeVar("T")

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
    try:
        await run("ip", "netns", "delete", name)
    except CommandFailed:
        if netns_exists(name):
            raise
        return False  # someone else deleted it meanwhile
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


def _on_own_thread(thread_name: str, fn: Callable[[], T]) -> T:
    """``fn()`` on a throwaway thread, so that whatever namespace it moves into goes
    with the thread; its result, or what it raised."""
    result: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target, name=thread_name)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def _in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a throwaway thread that visits the namespace ``name``: only that
    thread moves, no other runs in the namespace by accident, and ``fn`` may block."""
    return _on_own_thread(f"netns-{name}", lambda: _visit(name, fn))


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


def _in_new_netns(fn: Callable[[], T]) -> T:
    """Run ``fn`` on a throwaway thread moved into a new, empty, unnamed namespace."""

    def unshared() -> T:
        if _libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetlinkFailed(f"unshare(CLONE_NEWNET): {os.strerror(err)}", errno=err)
        return fn()

    return _on_own_thread("netns-throwaway", unshared)


async def in_throwaway_netns(fn: Callable[[], T]) -> T:
    """``fn()`` inside a new, empty network namespace that nothing names: it vanishes
    when ``fn``'s thread ends and its sockets are closed, so a probe (can this kernel
    create a link of kind X?) leaves nothing behind, even if the process dies."""
    return await asyncio.to_thread(_in_new_netns, fn)


# --- records ----------------------------------------------------------------------------


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
    metric: int = 0
    """The route's priority; IPv4 only (the kernel gives IPv6 routes one of its own)."""

    @property
    def family(self) -> int:
        return self.dst.version


@dataclass(frozen=True, slots=True)
class Neighbour:
    """A static (permanent) neighbour entry: ``address`` on ``dev`` is at ``mac``."""

    dev: str
    address: Address
    mac: str


# --- RTNL sessions ---------------------------------------------------------------------


def _visit(name: str, fn: Callable[[], T]) -> T:
    """``fn()`` run on the calling thread while it visits the namespace ``name``; the
    thread is back home before this returns.

    On the event loop's thread, only for ``fn`` that make sockets or touch a sysctl (a
    socket stays in the namespace it was made in, a sysctl file is that of the namespace
    it was opened in) and cannot block: the loop does not run meanwhile, and
    the gateway's signal handlers only wake it (``loop.add_signal_handler``). A few
    system calls, where a thread of its own (:func:`_in_netns`) costs a creation and
    two hand-offs, which was a tenth of a wire's CPU."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            target = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NamespaceNotFound(f"network namespace {name!r} does not exist") from None
        try:
            # One try for both moves: nothing (not even an exception raised by a signal
            # handler) can come between leaving and the way back. Going "back" when the
            # first move failed is harmless.
            try:
                if _libc.setns(target, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise NetlinkFailed(f"setns({name}): {os.strerror(err)}", errno=err)
                return fn()
            finally:
                if _libc.setns(home, CLONE_NEWNET) != 0:
                    _stranded(name)
        finally:
            os.close(target)
    finally:
        os.close(home)


def _stranded(name: str) -> None:
    """The thread could not go back to its own namespace. Whatever it did next (accept
    connections, make wires) would happen in ``name``: stop the process instead, and
    let its supervisor start it again (its state is in its store)."""
    err = ctypes.get_errno()
    logging.getLogger(__name__).critical(
        "cannot return from network namespace %s: %s; stopping", name, os.strerror(err)
    )
    os._exit(70)  # EX_SOFTWARE


def _open_socket(netns: str | None, protocol: int) -> nl.NetlinkSocket:
    def open_() -> nl.NetlinkSocket:
        return nl.NetlinkSocket.open(protocol)

    return open_() if netns is None else _visit(netns, open_)


class NetlinkSession:
    """A netlink session in one namespace: a name in /run/netns, a path such as
    ``/proc/PID/ns/net`` for a workload known by its process, or ``None`` for the
    namespace this process runs in. Subclasses speak a protocol (:class:`Rtnl`).

    The socket is made by the calling thread on a short visit to the namespace
    (pyroute2 forks a child for that: 7 ms instead of tens of microseconds). Methods
    that take several objects send them in one batch (see :mod:`wireguard.rtnetlink`).
    """

    protocol = socket.NETLINK_ROUTE

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._sock: nl.NetlinkSocket | None = None

    @property
    def where(self) -> str:
        return f"netns {self.netns}" if self.netns else "this namespace"

    async def __aenter__(self) -> Self:
        try:
            self._sock = _open_socket(self.netns, self.protocol)
        except OSError as exc:
            raise NetlinkFailed(
                f"netlink socket in {self.where}: {exc.strerror}", errno=exc.errno or 0
            ) from exc
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # --- requests ---------------------------------------------------------------------

    async def _exchange(self, requests: Sequence[nl.Request]) -> list[nl.Reply]:
        if self._sock is None:
            raise RuntimeError(f"{type(self).__name__} used outside 'async with'")
        try:
            return await self._sock.exchange(requests)
        except OSError as exc:
            raise NetlinkFailed(
                f"netlink in {self.where}: {exc.strerror}", errno=exc.errno or 0
            ) from exc

    def _failed(self, request: nl.Request, reply: nl.Reply) -> NetlinkFailed:
        reason = os.strerror(reply.error)
        if reply.message:
            reason += f" ({reply.message})"
        return NetlinkFailed(f"{request.action} in {self.where}: {reason}", errno=reply.error)

    async def batch(self, requests: Sequence[nl.Request]) -> list[bool]:
        """Send ``requests`` together; for each, True if done, False if it failed with
        an errno it ignores. The first other failure is raised, once all were answered
        (the kernel carries on after a failed request: the caller rolls back)."""
        if not requests:
            return []
        replies = await self._exchange(requests)
        done = []
        failure: NetlinkFailed | None = None
        for request, reply in zip(requests, replies, strict=True):
            done.append(reply.error == 0)
            if reply.error and reply.error not in request.ignore and failure is None:
                failure = self._failed(request, reply)
        if failure is not None:
            raise failure
        return done

    async def _one(self, request: nl.Request) -> bool:
        return (await self.batch([request]))[0]

    async def _get(self, request: nl.Request, *, missing: frozenset[int]) -> list[bytes] | None:
        """The payloads answering a get or dump; None if it failed with an errno of
        ``missing``. A dump that changed while it was read is read again."""
        for _ in range(10):
            (reply,) = await self._exchange([request])
            if reply.error in missing:
                return None
            if reply.error:
                raise self._failed(request, reply)
            if not reply.interrupted:
                return [payload for _, payload in reply.messages]
        raise NetlinkFailed(f"{request.action} in {self.where}: kept changing", errno=errno.EAGAIN)

    async def _dump(self, request: nl.Request) -> list[bytes]:
        return await self._get(request, missing=frozenset()) or []


class Rtnl(NetlinkSession):
    """An RTNL session: ``async with Rtnl("fedgw.cluster1") as rtnl: await
    rtnl.add_veth(...)``."""

    def __init__(self, netns: str | None = None) -> None:
        super().__init__(netns)
        self._indexes: dict[str, int] | None = None

    # --- links -------------------------------------------------------------------------

    @contextlib.contextmanager
    def remembering_indexes(self) -> Iterator[None]:
        """Within the block, look each interface's index up once: a batch of routes and
        neighbours on the same links then costs no extra round trips. Only for blocks
        in which no one else deletes or recreates those links. Nested blocks share the
        outermost one's memory."""
        if self._indexes is not None:
            yield
            return
        self._indexes = {}
        try:
            yield
        finally:
            self._indexes = None

    async def link(self, ifname: str) -> Link | None:
        """The link ``ifname``, or None if there is none."""
        found = await self._get(nl.get_link(ifname), missing=_NO_LINK)
        return nl.parse_link(found[0]) if found else None

    async def find(self, ifname: str) -> int | None:
        if self._indexes is not None and ifname in self._indexes:
            return self._indexes[ifname]
        link = await self.link(ifname)
        if link is None:
            return None
        if self._indexes is not None:
            self._indexes[ifname] = link.index
        return link.index

    async def index(self, ifname: str) -> int:
        index = await self.find(ifname)
        if index is None:
            raise LinkNotFound(f"interface {ifname} does not exist in {self.where}")
        return index

    async def links(self) -> list[Link]:
        return [nl.parse_link(payload) for payload in await self._dump(nl.dump_links())]

    async def _names(self) -> dict[int, str]:
        return {link.index: link.name for link in await self.links()}

    async def link_details(self, ifname: str | None = None) -> list[Link]:
        """Every link, or the one named ``ifname`` (if it exists)."""
        if ifname is None:
            return await self.links()
        link = await self.link(ifname)
        return [link] if link is not None else []

    async def _add_link(self, request: nl.Request, ifname: str, exist_ok: bool) -> bool:
        check_ifname(ifname)
        if exist_ok and await self.find(ifname) is not None:
            return False
        await self._one(request)
        return True

    async def add_bridge(self, ifname: str, *, exist_ok: bool = True) -> bool:
        return await self._add_link(nl.new_link(ifname, "bridge"), ifname, exist_ok)

    async def add_wireguard(self, ifname: str, *, exist_ok: bool = True) -> bool:
        """A kernel WireGuard link; :class:`NetlinkFailed` with EOPNOTSUPP where the
        kernel has no WireGuard. False if ``ifname`` existed already."""
        return await self._add_link(nl.new_link(ifname, "wireguard"), ifname, exist_ok)

    async def add_veth(
        self, ifname: str, peer: str, peer_netns: str | None = None, *, exist_ok: bool = True
    ) -> bool:
        """A veth pair: ``ifname`` here, ``peer`` in ``peer_netns`` (here if None).
        Created directly in place, so neither end ever appears anywhere else."""
        check_ifname(ifname)
        if exist_ok and await self.find(ifname) is not None:
            return False
        await self.add_veth_pair(ifname, peer, peer_netns=peer_netns)
        return True

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
    ) -> Link:
        """A veth pair created in place: ``ifname`` here, ``peer`` in ``peer_netns`` (a name
        or a path such as ``/proc/PID/ns/net``), both with the given MACs and MTU, and
        ``ifname`` up if asked (the kernel takes no flags for the peer). The new link,
        whose ``peer_index`` is the peer's index in its namespace.
        :class:`NetlinkFailed` with EEXIST if either name is taken."""
        check_ifname(ifname)
        check_ifname(peer)
        fd = None
        if peer_netns is not None:
            try:
                fd = os.open(netns_path(peer_netns), os.O_RDONLY)
            except FileNotFoundError:
                raise NamespaceNotFound(
                    f"network namespace {peer_netns!r} does not exist"
                ) from None
        request = nl.new_veth(
            ifname, peer, peer_netns_fd=fd, mac=mac, peer_mac=peer_mac, mtu=mtu, up=up
        )
        try:
            (reply,) = await self._exchange([request])
        finally:
            if fd is not None:
                os.close(fd)
        if reply.error:
            raise self._failed(request, reply)
        echoed = [nl.parse_link(p) for kind, p in reply.messages if kind == nl.RTM_NEWLINK]
        link = echoed[0] if echoed else await self.link(ifname)  # no echo before Linux 6.3
        if link is None:
            raise LinkNotFound(f"veth {ifname} vanished as it was made in {self.where}")
        self.remember(ifname, link.index)
        return link

    def remember(self, ifname: str, index: int) -> None:
        """Within :meth:`remembering_indexes`, what ``ifname``'s index is."""
        if self._indexes is not None:
            self._indexes[ifname] = index

    async def set_link(
        self,
        ifname: str,
        *,
        up: bool | None = None,
        mtu: int | None = None,
        master: str | None = None,
    ) -> None:
        await self._one(await self.link_request(ifname, up=up, mtu=mtu, master=master))

    async def link_request(
        self,
        ifname: str,
        *,
        up: bool | None = None,
        mtu: int | None = None,
        master: str | None = None,
    ) -> nl.Request:
        index = await self.index(ifname)
        master_index = await self.index(master) if master is not None else None
        return nl.set_link(index, ifname, up=up, mtu=mtu, master=master_index)

    def enable_ipv6(self, ifname: str) -> bool:
        """Turn IPv6 on on ``ifname`` (made where links start without it); whether it was
        off. Where the link, or IPv6 itself, is missing, nothing is done."""
        check_ifname(ifname)
        path = Path(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6")

        def write() -> bool:
            try:
                if path.read_text().strip() == "0":
                    return False
                path.write_text("0")
            except FileNotFoundError:
                return False
            return True

        return write() if self.netns is None else _visit(self.netns, write)

    async def no_ipv6_autoconf_request(self, ifname: str) -> nl.Request:
        return nl.no_ipv6_autoconf(await self.index(ifname), ifname)

    async def delete_link(self, ifname: str, *, missing_ok: bool = True) -> bool:
        index = await self.find(ifname)
        if self._indexes is not None:
            self._indexes.pop(ifname, None)
        if index is None:
            if missing_ok:
                return False
            raise LinkNotFound(f"interface {ifname} does not exist in {self.where}")
        request = nl.delete_link(index, ifname)
        return await self._one(replace(request, ignore=_NO_LINK))

    async def delete_links(self, ifnames: Sequence[str], group: int) -> list[bool]:
        """Delete the links ``ifnames`` together; for each, False if it was not there.

        They are moved into link group ``group``, and the group is deleted: the kernel
        waits for its RCU grace periods once for all of them, where deleting them one by
        one waits 15-20 ms for each. Every link already in ``group`` goes too: the group
        must be the caller's alone in this namespace."""
        if self._indexes is not None:
            for ifname in ifnames:
                self._indexes.pop(ifname, None)
        # A link that is not there (ENODEV) counts as gone, and so does an empty group.
        delete = replace(nl.delete_group(group), ignore=_NO_LINK)
        there: list[bool] = []
        for start in range(0, len(ifnames), LINKS_AT_ONCE):
            # One datagram: the kernel carries the requests out in order.
            chunk = ifnames[start : start + LINKS_AT_ONCE]
            moves = [replace(nl.set_group(n, group), ignore=_NO_LINK) for n in chunk]
            there += (await self.batch([*moves, delete]))[:-1]
        return there

    # --- addresses -------------------------------------------------------------------

    async def add_address(self, ifname: str, address: Interface | str) -> bool:
        """Add ``address`` (CIDR) to ``ifname``; False if it was there already."""
        return await self._address(ifname, address, nodad=False)

    async def add_address_nodad(self, ifname: str, address: Interface | str) -> bool:
        """Like :meth:`add_address`, but an IPv6 address is usable at once (no duplicate
        address detection: a point-to-point link has no one to collide with)."""
        return await self._address(ifname, address, nodad=True)

    async def _address(self, ifname: str, address: Interface | str, *, nodad: bool) -> bool:
        return await self._one(await self.address_request(ifname, address, nodad=nodad))

    async def address_request(
        self, ifname: str, address: Interface | str, *, nodad: bool = False
    ) -> nl.Request:
        """Adding ``address``; EEXIST (it is there already) is not a failure."""
        iface = ipaddress.ip_interface(address)
        request = nl.add_address(await self.index(ifname), ifname, iface, nodad=nodad)
        return replace(request, ignore=_EXISTS)

    async def delete_address(self, ifname: str, address: Interface | str) -> bool:
        """False if ``ifname`` did not have ``address``."""
        iface = ipaddress.ip_interface(address)
        request = nl.delete_address(await self.index(ifname), ifname, iface)
        return await self._one(replace(request, ignore=_NO_ADDRESS))

    async def addresses(self, ifname: str | None = None) -> list[tuple[str, Interface]]:
        names = await self._names()
        out: list[tuple[str, Interface]] = []
        for payload in await self._dump(nl.dump_addresses()):
            parsed = nl.parse_address(payload)
            if parsed is None:
                continue
            name = names.get(parsed[0], "?")
            if ifname is None or name == ifname:
                out.append((name, parsed[1]))
        return out

    # --- routes ------------------------------------------------------------------------

    async def add_route(
        self,
        dst: Network | str,
        *,
        via: str | None = None,
        dev: str | None = None,
        table: int | None = None,
    ) -> None:
        """Add or replace the route to ``dst`` ("default" for 0/0)."""
        if dst == "default":
            dst = "::/0" if via is not None and ":" in via else "0.0.0.0/0"
        await self.replace_route(
            Route(
                dst=ipaddress.ip_network(dst),
                table=254 if table is None else table,
                dev=dev,
                via=ipaddress.ip_address(via) if via is not None else None,
            )
        )

    async def _route_spec(self, route: Route) -> nl.RouteSpec:
        return nl.RouteSpec(
            dst=route.dst,
            table=route.table,
            oif=await self.index(route.dev) if route.dev is not None else None,
            via=route.via,
            kind=route.kind,
            protocol=route.protocol,
            metric=route.metric,
        )

    async def replace_route(self, route: Route) -> None:
        """Add ``route`` or replace the route to its destination in its table."""
        await self.replace_routes([route])

    async def replace_routes(self, routes: Iterable[Route]) -> None:
        await self.batch([await self.route_request(r) for r in routes])

    async def route_request(self, route: Route) -> nl.Request:
        return nl.replace_route(await self._route_spec(route))

    async def delete_route(self, route: Route) -> bool:
        """False if there was no such route (or its device is gone, taking it along)."""
        return bool((await self.delete_routes([route]))[0])

    async def delete_routes(self, routes: Iterable[Route]) -> list[bool]:
        """For each route, False if there was none (or its device is gone, taking it)."""
        requests: list[nl.Request | None] = []
        for route in routes:
            try:
                spec = await self._route_spec(route)
            except LinkNotFound:
                requests.append(None)
                continue
            requests.append(replace(nl.delete_route(spec), ignore=_NO_ROUTE))
        done = iter(await self.batch([r for r in requests if r is not None]))
        return [r is not None and next(done) for r in requests]

    async def routes(self, tables: range | None = None) -> list[Route]:
        """The routes of both families whose table is in ``tables`` (all if None)."""
        names = await self._names()
        out = []
        for payload in await self._dump(nl.dump_routes()):
            spec = nl.parse_route(payload)
            if spec is None or (tables is not None and spec.table not in tables):
                continue
            unicast = spec.kind == "unicast"
            out.append(
                Route(
                    dst=spec.dst,
                    table=spec.table,
                    dev=names.get(spec.oif) if spec.oif is not None and unicast else None,
                    via=spec.via,
                    kind=spec.kind,
                    protocol=spec.protocol,
                    metric=spec.metric,
                )
            )
        return out

    async def route_mtu(self, dst: Address | str) -> int | None:
        """The MTU of the interface the route to ``dst`` leaves by; None without a route."""
        found = await self._get(nl.get_route(ipaddress.ip_address(dst)), missing=_NO_PATH)
        spec = nl.parse_route(found[0]) if found else None
        if spec is None or spec.oif is None:
            return None
        link = await self._get(nl.get_link_by_index(spec.oif), missing=_NO_LINK)
        return nl.parse_link(link[0]).mtu if link else None

    # --- rules -------------------------------------------------------------------------

    async def add_rule(self, rule: Rule) -> bool:
        """False if an equal rule existed already."""
        return (await self.add_rules([rule]))[0]

    async def add_rules(self, rules: Iterable[Rule]) -> list[bool]:
        return await self.batch([self.rule_request(r) for r in rules])

    def rule_request(self, rule: Rule) -> nl.Request:
        """Adding ``rule``; EEXIST (an equal rule is there) is not a failure."""
        return replace(nl.add_rule(rule), ignore=_EXISTS)

    async def delete_rule(self, rule: Rule) -> bool:
        """False if there was no such rule."""
        return (await self.delete_rules([rule]))[0]

    async def delete_rules(self, rules: Iterable[Rule]) -> list[bool]:
        return await self.batch([replace(nl.delete_rule(r), ignore=_NO_ENTRY) for r in rules])

    async def rules(self, family: int | None = None) -> list[Rule]:
        """The rules of both families (or of ``family``)."""
        parsed = (nl.parse_rule(payload) for payload in await self._dump(nl.dump_rules()))
        return [r for r in parsed if r is not None and (family is None or r.family == family)]

    # --- neighbours --------------------------------------------------------------------

    async def set_neighbour(self, neighbour: Neighbour) -> None:
        """Add or replace a permanent neighbour entry."""
        await self.set_neighbours([neighbour])

    async def set_neighbours(self, neighbours: Iterable[Neighbour]) -> None:
        await self.batch([await self.neighbour_request(n) for n in neighbours])

    async def neighbour_request(self, neighbour: Neighbour) -> nl.Request:
        index = await self.index(neighbour.dev)
        return nl.set_neighbour(index, neighbour.dev, neighbour.address, neighbour.mac)

    async def delete_neighbour(self, neighbour: Neighbour) -> bool:
        index = await self.find(neighbour.dev)
        if index is None:
            return False
        request = nl.delete_neighbour(index, neighbour.dev, neighbour.address)
        return await self._one(replace(request, ignore=_NO_NEIGHBOUR))

    async def neighbours(self, ifname: str | None = None) -> list[Neighbour]:
        """Permanent neighbour entries (of ``ifname``, or of every link)."""
        names = await self._names()
        out = []
        for payload in await self._dump(nl.dump_neighbours()):
            parsed = nl.parse_neighbour(payload)
            if parsed is None:
                continue
            index, address, mac, state = parsed
            name = names.get(index)
            if not state & nl.NUD_PERMANENT or name is None or mac is None:
                continue
            if ifname is None or name == ifname:
                out.append(Neighbour(name, address, mac))
        return out


_EXISTS = frozenset({errno.EEXIST})
LINKS_AT_ONCE = 128
"""Most links :meth:`Rtnl.delete_links` puts in one datagram. The kernel answers each
request inside the send, and every answer holds about 1 KiB of the socket's receive
buffer (208 KiB by default) until it is read: 400 requests overflowed it (ENOBUFS)."""

_NO_LINK = frozenset({errno.ENODEV})
_NO_ENTRY = frozenset({errno.ENOENT})
_NO_ADDRESS = frozenset({errno.EADDRNOTAVAIL, errno.ENOENT, errno.ENODEV})
_NO_ROUTE = frozenset({errno.ESRCH, errno.ENOENT, errno.ENODEV})
_NO_NEIGHBOUR = frozenset({errno.ENOENT, errno.ENODEV})
_NO_PATH = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ESRCH})
