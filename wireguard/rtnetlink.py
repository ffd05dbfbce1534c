"""A small rtnetlink client: messages packed with :mod:`struct`, sent in batches.

pyroute2 builds every message out of generic Python objects; a request costs it about
half a millisecond of CPU, and a wire takes twenty of them. The data plane needs a
handful of message types only (links, addresses, routes, rules, neighbours), so they
are packed and parsed here directly, and the requests of one step are sent in one
``send``: the kernel runs them in order and answers each with its own acknowledgement.
rtnetlink handles requests in the sender's system call, so the answers are waiting by
the time ``send`` returns: they are read at once, and a batch costs no pass of the event
loop.

Only wire formats live here; :mod:`wireguard.netns` turns them into sessions with
names, errors and records.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import socket
import struct
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# netlink(7)
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_ECHO = 0x1, 0x4, 0x8
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
NLM_F_ACK_TLVS = 0x200  # on an error message: extended-ack attributes follow
NLMSGERR_ATTR_MSG = 1
SOL_NETLINK, NETLINK_CAP_ACK, NETLINK_EXT_ACK = 270, 10, 11

# rtnetlink(7)
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_SETLINK = 16, 17, 18, 19
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE = 32, 33, 34

IFF_UP = 0x1
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINK, IFLA_MASTER = 1, 3, 4, 5, 10
IFLA_LINKINFO, IFLA_EXT_MASK, IFLA_NET_NS_FD, IFLA_AF_SPEC = 18, 29, 28, 26
IFLA_NUM_TX_QUEUES, IFLA_NUM_RX_QUEUES = 31, 32
IFLA_GROUP = 27
IFLA_INET6_ADDR_GEN_MODE, IN6_ADDR_GEN_MODE_NONE = 8, 1
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
VETH_INFO_PEER = 1
RTEXT_FILTER_SKIP_STATS = 1 << 3  # dumps without the (large) counters

IFA_ADDRESS, IFA_LOCAL = 1, 2
IFA_F_NODAD = 0x02

RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_TABLE = 1, 4, 5, 6, 15
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_SCOPE_NOWHERE = 0, 253, 255
RT_TABLE_COMPAT = 252  # rtm_table when the table id needs RTA_TABLE's 32 bits
RTNH_F_ONLINK = 4
ROUTE_TYPES = {"unicast": 1, "local": 2, "blackhole": 6, "unreachable": 7, "prohibit": 8}
ROUTE_KINDS = {v: k for k, v in ROUTE_TYPES.items()}

FRA_SRC, FRA_IIFNAME, FRA_GOTO, FRA_PRIORITY, FRA_TABLE, FRA_PROTOCOL = 2, 3, 4, 6, 15, 21
FRA_FWMARK, FRA_FWMASK = 10, 16
FIB_RULE_INVERT = 0x2
RULE_ACTIONS = {"lookup": 1, "goto": 2, "nop": 3, "blackhole": 6, "unreachable": 7, "prohibit": 8}
RULE_NAMES = {v: k for k, v in RULE_ACTIONS.items()}

NDA_DST, NDA_LLADDR = 1, 2
NUD_PERMANENT = 0x80

AF = {4: socket.AF_INET, 6: socket.AF_INET6}
VERSION = {socket.AF_INET: 4, socket.AF_INET6: 6}

HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, port id
ATTR = struct.Struct("=HH")  # nlattr: length, type
IFINFO = struct.Struct("=BxHiII")  # family, type, index, flags, change
IFADDR = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, index
RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst/src len, tos, table, protocol, scope, type, flags
FIBRULE = RTMSG  # family, dst/src len, tos, table, 2 reserved, action, flags: the same layout
NDMSG = struct.Struct("=BxxxiHBB")  # family, index, state, flags, type
U32 = struct.Struct("=I")
I32 = struct.Struct("=i")


def _align(n: int) -> int:
    return (n + 3) & ~3


# --- attributes --------------------------------------------------------------------------


def attr(kind: int, data: bytes) -> bytes:
    length = ATTR.size + len(data)
    return ATTR.pack(length, kind) + data + bytes(_align(length) - length)


def attr_u32(kind: int, value: int) -> bytes:
    return attr(kind, U32.pack(value))


def attr_str(kind: int, value: str) -> bytes:
    return attr(kind, value.encode() + b"\0")


def attr_addr(kind: int, address: Address) -> bytes:
    return attr(kind, address.packed)


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def iter_attrs(data: bytes, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of the attributes from ``offset`` on, in order, flag bits removed;
    a truncated attribute ends them."""
    end = len(data)
    while offset + ATTR.size <= end:
        length, kind = ATTR.unpack_from(data, offset)
        if length < ATTR.size or offset + length > end:
            return
        yield kind & 0x3FFF, data[offset + ATTR.size : offset + length]
        offset += _align(length)


def parse_attrs(data: bytes, offset: int = 0) -> dict[int, bytes]:
    """The attributes from ``offset`` on, by type (the last wins)."""
    return dict(iter_attrs(data, offset))


def cstr(value: bytes | None) -> str | None:
    return None if value is None else value.split(b"\0", 1)[0].decode(errors="replace")


def u32(value: bytes | None) -> int | None:
    return None if value is None or len(value) < 4 else int(U32.unpack_from(value)[0])


def mac_str(value: bytes | None) -> str | None:
    return None if value is None else ":".join(f"{b:02x}" for b in value)


def ip(value: bytes) -> Address:
    return ipaddress.ip_address(value)


# --- requests and their answers ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """One message; ``action`` names it in errors, errnos in ``ignore`` count as "it
    was so already" (``EEXIST`` for an add, ``ENOENT`` for a delete)."""

    type: int
    flags: int
    body: bytes
    action: str
    ignore: frozenset[int] = frozenset()
    ack: bool = True
    """False for messages the kernel does not answer (the ends of an nfnetlink batch)."""
    sleeps: bool = False
    """The kernel may sleep while it carries it out (deleting a link waits for RCU grace
    periods: 15-20 ms). Netlink does the work inside the sending call, so a batch with
    such a request is sent from a worker thread and the event loop goes on meanwhile."""

    @property
    def dump(self) -> bool:
        return self.flags & NLM_F_DUMP == NLM_F_DUMP


@dataclass(slots=True)
class Reply:
    """What the kernel answered to one request: an errno (0: done), the text of its
    extended acknowledgement, and the messages of a get or dump as (type, payload)."""

    error: int = 0
    message: str | None = None
    messages: list[tuple[int, bytes]] = field(default_factory=list)
    interrupted: bool = False
    """A dump that changed while it was read (``NLM_F_DUMP_INTR``): read it again."""


def _messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, seq, payload) of each message in a datagram."""
    offset = 0
    while offset + HEADER.size <= len(data):
        length, kind, flags, seq, _ = HEADER.unpack_from(data, offset)
        if length < HEADER.size or offset + length > len(data):
            return
        yield kind, flags, seq, data[offset + HEADER.size : offset + length]
        offset += _align(length)


def _error(flags: int, payload: bytes) -> tuple[int, str | None]:
    """An ``NLMSG_ERROR`` payload: the errno (0 for an acknowledgement) and the
    extended acknowledgement's message. With ``NETLINK_CAP_ACK`` the quoted request is
    its header only."""
    code = -I32.unpack_from(payload)[0]
    message = None
    if flags & NLM_F_ACK_TLVS and len(payload) >= 4 + HEADER.size:
        message = cstr(parse_attrs(payload, 4 + HEADER.size).get(NLMSGERR_ATTR_MSG))
    return code, message


_SLEEPERS = ThreadPoolExecutor(max_workers=32, thread_name_prefix="fedgw-netlink")
"""Threads for requests that sleep in the kernel. Their own pool: the waits overlap in
the kernel (50 links deleted side by side take 1.4 ms each, one after another 24 ms),
and the default pool has a few threads (CPUs + 4) that others need too."""


class NetlinkSocket:
    """A non-blocking netlink socket (``NETLINK_ROUTE`` unless told otherwise; made in
    whatever namespace it belongs to) that sends batches of requests and collects each
    one's answer. One batch at a time; answers to a batch that was cancelled are
    recognised by their sequence numbers and dropped."""

    RECV_SIZE = 1 << 16  # the kernel fills dump datagrams up to 32 KiB

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        # Errors quote only the failed request's header, and carry the kernel's reason.
        with contextlib.suppress(OSError):
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        with contextlib.suppress(OSError):
            sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        sock.bind((0, 0))
        self._sock = sock
        self._seq = 0
        self._lock = asyncio.Lock()

    @classmethod
    def open(cls, protocol: int = socket.NETLINK_ROUTE) -> NetlinkSocket:
        """A socket in the calling thread's network namespace."""
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
        try:
            return cls(sock)
        except BaseException:
            sock.close()
            raise

    def close(self) -> None:
        self._sock.close()

    def _next_seq(self) -> int:
        self._seq = self._seq % 0xFFFFFFFF + 1
        return self._seq

    async def exchange(self, requests: Sequence[Request]) -> list[Reply]:
        """Send ``requests`` in one datagram; each one's reply, in order. An
        :class:`OSError` of the socket itself (not of a request) is raised."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            index: dict[int, int] = {}
            datagram = bytearray()
            for i, req in enumerate(requests):
                seq = self._next_seq()
                if req.ack or req.dump:
                    index[seq] = i
                # A dump ends with NLMSG_DONE; anything else is asked to acknowledge.
                ack = req.ack and not req.dump
                flags = NLM_F_REQUEST | req.flags | (NLM_F_ACK if ack else 0)
                datagram += HEADER.pack(HEADER.size + len(req.body), req.type, flags, seq, 0)
                datagram += req.body
            replies = [Reply() for _ in requests]
            pending = set(index)
            if any(req.sleeps for req in requests):
                # One datagram into a netlink socket is taken whole or not at all.
                await loop.run_in_executor(_SLEEPERS, self._sock.send, bytes(datagram))
            else:
                await loop.sock_sendall(self._sock, bytes(datagram))
            while pending:
                data = await self._recv(loop)
                for kind, flags, seq, payload in _messages(data):
                    if seq not in pending:
                        continue  # an answer to an earlier, cancelled batch
                    reply = replies[index[seq]]
                    if kind == NLMSG_ERROR:
                        reply.error, reply.message = _error(flags, payload)
                        pending.discard(seq)
                    elif kind == NLMSG_DONE:
                        if len(payload) >= 4:  # a dump that failed says so here
                            reply.error = -I32.unpack_from(payload)[0]
                        pending.discard(seq)
                    else:
                        reply.interrupted |= bool(flags & NLM_F_DUMP_INTR)
                        reply.messages.append((kind, payload))
            return replies

    async def _recv(self, loop: asyncio.AbstractEventLoop) -> bytes:
        # The kernel answered inside the send, so the answer is read at once. Waiting
        # for readiness instead (uvloop's sock_recv always does) costs a pass of the
        # event loop per batch, and under load that pass runs other requests' work
        # while the caller, typically holding the data plane's lock, waits.
        try:
            return self._sock.recv(self.RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return await loop.sock_recv(self._sock, self.RECV_SIZE)


# --- links -------------------------------------------------------------------------------


def _ifinfo(index: int = 0, *, up: bool | None = None) -> bytes:
    flags = IFF_UP if up else 0
    change = IFF_UP if up is not None else 0
    return IFINFO.pack(socket.AF_UNSPEC, 0, index, flags, change)


_SKIP_STATS = attr_u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS)


def get_link(name: str) -> Request:
    body = _ifinfo() + attr_str(IFLA_IFNAME, name) + _SKIP_STATS
    return Request(RTM_GETLINK, 0, body, f"look up {name}")


def get_link_by_index(index: int) -> Request:
    return Request(RTM_GETLINK, 0, _ifinfo(index) + _SKIP_STATS, f"look up link {index}")


def dump_links() -> Request:
    return Request(RTM_GETLINK, NLM_F_DUMP, _ifinfo() + _SKIP_STATS, "list links")


def _link_attrs(name: str, mac: str | None, mtu: int | None) -> bytes:
    out = attr_str(IFLA_IFNAME, name)
    if mac is not None:
        out += attr(IFLA_ADDRESS, mac_bytes(mac))
    if mtu is not None:
        out += attr_u32(IFLA_MTU, mtu)
    return out


def new_link(name: str, kind: str) -> Request:
    """A link of ``kind`` (``bridge``, ``wireguard``, ...); EEXIST if the name is taken."""
    info = attr_str(IFLA_INFO_KIND, kind)
    body = _ifinfo() + attr_str(IFLA_IFNAME, name) + attr(IFLA_LINKINFO, info)
    return Request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body, f"add {kind} {name}")


_ONE_QUEUE = attr_u32(IFLA_NUM_TX_QUEUES, 1) + attr_u32(IFLA_NUM_RX_QUEUES, 1)


def new_veth(
    name: str,
    peer: str,
    *,
    peer_netns_fd: int | None = None,
    mac: str | None = None,
    peer_mac: str | None = None,
    mtu: int | None = None,
    up: bool = False,
) -> Request:
    """A veth pair, its peer end made directly in the namespace ``peer_netns_fd`` (an
    open descriptor of it, which must stay open until the request is sent). The kernel
    echoes the new link (since Linux 6.3), its peer's index included.

    Each end has one queue each way. The kernel's default is one per possible CPU,
    which only XDP programs on the veth use; each queue costs kernel objects to make
    and delete. Here (2 possible CPUs) one queue made a pair in 0.28 ms instead of
    0.36; hosts with dozens of CPUs pay dozens of queues per pair."""
    peer_body = IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + _link_attrs(peer, peer_mac, mtu)
    peer_body += _ONE_QUEUE
    if peer_netns_fd is not None:
        peer_body += attr_u32(IFLA_NET_NS_FD, peer_netns_fd)
    info = attr_str(IFLA_INFO_KIND, "veth")
    info += attr(IFLA_INFO_DATA, attr(VETH_INFO_PEER, peer_body))
    body = _ifinfo(up=up or None) + _link_attrs(name, mac, mtu) + _ONE_QUEUE
    body += attr(IFLA_LINKINFO, info)
    flags = NLM_F_CREATE | NLM_F_EXCL | NLM_F_ECHO
    return Request(RTM_NEWLINK, flags, body, f"add veth {name} (peer {peer})")


def set_link(
    index: int,
    name: str,
    *,
    up: bool | None = None,
    mtu: int | None = None,
    master: int | None = None,
) -> Request:
    body = _ifinfo(index, up=up)
    if mtu is not None:
        body += attr_u32(IFLA_MTU, mtu)
    if master is not None:
        body += attr_u32(IFLA_MASTER, master)
    return Request(RTM_SETLINK, 0, body, f"set {name}")


def no_ipv6_autoconf(index: int, name: str) -> Request:
    """No IPv6 link-local address on the link, so none of the kernel's work that comes
    with one (duplicate address detection, router solicitations, MLD reports): a wire's
    ends are reached through static neighbour entries. Takes effect when the link goes
    up, and cannot be given when the link is made."""
    mode = attr(IFLA_INET6_ADDR_GEN_MODE, bytes([IN6_ADDR_GEN_MODE_NONE]))
    body = _ifinfo(index) + attr(IFLA_AF_SPEC, attr(socket.AF_INET6, mode))
    # Where the kernel or the namespace has no IPv6, there is nothing to turn off.
    no_ipv6 = frozenset({errno.EAFNOSUPPORT, errno.EOPNOTSUPP})
    return Request(RTM_SETLINK, 0, body, f"turn off IPv6 autoconf of {name}", no_ipv6)


def delete_link(index: int, name: str) -> Request:
    return Request(RTM_DELLINK, 0, _ifinfo(index), f"delete {name}", sleeps=True)


def set_group(name: str, group: int) -> Request:
    """Move link ``name`` into link group ``group``; the link is found by its name, in
    the same request."""
    body = _ifinfo() + attr_str(IFLA_IFNAME, name) + attr_u32(IFLA_GROUP, group)
    return Request(RTM_SETLINK, 0, body, f"move {name} into link group {group}")


def delete_group(group: int) -> Request:
    """Delete every link of group ``group`` at once: the kernel unregisters them as one
    batch and waits for its RCU grace periods once, not once for each link."""
    body = _ifinfo() + attr_u32(IFLA_GROUP, group)
    return Request(RTM_DELLINK, 0, body, f"delete link group {group}", sleeps=True)


@dataclass(frozen=True, slots=True)
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
    group: int = 0
    """IFLA_GROUP: the link group (0, the default group, unless someone moved it)."""


def parse_link(payload: bytes) -> Link:
    _, _, index, flags, _ = IFINFO.unpack_from(payload)
    attrs = parse_attrs(payload, IFINFO.size)
    info = attrs.get(IFLA_LINKINFO)
    kind = cstr(parse_attrs(info).get(IFLA_INFO_KIND)) if info is not None else None
    return Link(
        index=index,
        name=cstr(attrs.get(IFLA_IFNAME)) or "",
        kind=kind,
        up=bool(flags & IFF_UP),
        mtu=u32(attrs.get(IFLA_MTU)) or 0,
        master=u32(attrs.get(IFLA_MASTER)),
        mac=mac_str(attrs.get(IFLA_ADDRESS)),
        peer_index=u32(attrs.get(IFLA_LINK)),
        group=u32(attrs.get(IFLA_GROUP)) or 0,
    )


# --- addresses ---------------------------------------------------------------------------


def _ifaddr(iface: Interface, index: int, flags: int = 0) -> bytes:
    body = IFADDR.pack(AF[iface.version], iface.network.prefixlen, flags, 0, index)
    # IFA_LOCAL is the address; IFA_ADDRESS, the same here, would be a point-to-point peer.
    return body + attr_addr(IFA_LOCAL, iface.ip) + attr_addr(IFA_ADDRESS, iface.ip)


def add_address(index: int, name: str, iface: Interface, *, nodad: bool = False) -> Request:
    flags = IFA_F_NODAD if nodad and iface.version == 6 else 0
    return Request(
        RTM_NEWADDR,
        NLM_F_CREATE | NLM_F_EXCL,
        _ifaddr(iface, index, flags),
        f"add address {iface} to {name}",
    )


def delete_address(index: int, name: str, iface: Interface) -> Request:
    return Request(RTM_DELADDR, 0, _ifaddr(iface, index), f"delete address {iface} from {name}")


def dump_addresses() -> Request:
    return Request(RTM_GETADDR, NLM_F_DUMP, IFADDR.pack(0, 0, 0, 0, 0), "list addresses")


def parse_address(payload: bytes) -> tuple[int, Interface] | None:
    """(link index, address) of an address message; None for a family we do not know."""
    family, prefixlen, _, _, index = IFADDR.unpack_from(payload)
    if family not in VERSION:
        return None
    attrs = parse_attrs(payload, IFADDR.size)
    raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
    if raw is None:
        return None
    return index, ipaddress.ip_interface((ip(raw), prefixlen))


# --- routes ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """A route as the kernel takes it: the device by index."""

    dst: Network
    table: int = 254
    oif: int | None = None
    via: Address | None = None
    kind: str = "unicast"
    protocol: int = 0
    metric: int = 0
    """IPv4 only; 0 for none (a deletion then matches any)."""


def _rtmsg(spec: RouteSpec, *, deleting: bool) -> bytes:
    kind = ROUTE_TYPES.get(spec.kind)
    if kind is None:
        raise ValueError(f"route type {spec.kind!r} is not one of {sorted(ROUTE_TYPES)}")
    if spec.metric and spec.dst.version != 4:
        # Read back, an IPv6 route has the kernel's metric: it would never match.
        raise ValueError(f"route {spec.dst}: a metric is for IPv4 routes only")
    flags = 0
    if deleting:
        scope = RT_SCOPE_NOWHERE  # matches a route of any scope
    elif spec.via is None and spec.oif is not None and spec.kind == "unicast":
        scope = RT_SCOPE_LINK
    else:
        scope = RT_SCOPE_UNIVERSE
    if spec.via is not None and spec.oif is not None:
        flags |= RTNH_F_ONLINK  # the next hop on that device needs no connected route
    table_byte = spec.table if spec.table < 256 else RT_TABLE_COMPAT
    protocol = spec.protocol if (spec.protocol or deleting) else RTPROT_BOOT
    body = RTMSG.pack(
        AF[spec.dst.version], spec.dst.prefixlen, 0, 0, table_byte, protocol, scope, kind, flags
    )
    if spec.dst.prefixlen:
        body += attr_addr(RTA_DST, spec.dst.network_address)
    body += attr_u32(RTA_TABLE, spec.table)
    if spec.oif is not None:
        body += attr_u32(RTA_OIF, spec.oif)
    if spec.via is not None:
        body += attr_addr(RTA_GATEWAY, spec.via)
    if spec.metric:
        body += attr_u32(RTA_PRIORITY, spec.metric)
    return body


def replace_route(spec: RouteSpec) -> Request:
    return Request(
        RTM_NEWROUTE,
        NLM_F_CREATE | NLM_F_REPLACE,
        _rtmsg(spec, deleting=False),
        f"route {spec.dst} in table {spec.table}",
    )


def delete_route(spec: RouteSpec) -> Request:
    return Request(
        RTM_DELROUTE,
        0,
        _rtmsg(spec, deleting=True),
        f"delete route {spec.dst} from table {spec.table}",
    )


def dump_routes() -> Request:
    return Request(RTM_GETROUTE, NLM_F_DUMP, RTMSG.pack(0, 0, 0, 0, 0, 0, 0, 0, 0), "list routes")


def get_route(dst: Address) -> Request:
    body = RTMSG.pack(AF[dst.version], dst.max_prefixlen, 0, 0, 0, 0, 0, 0, 0)
    return Request(RTM_GETROUTE, 0, body + attr_addr(RTA_DST, dst), f"route to {dst}")


def parse_route(payload: bytes) -> RouteSpec | None:
    family, dst_len, _, _, table_byte, protocol, _, kind, _ = RTMSG.unpack_from(payload)
    version = VERSION.get(family)
    if version is None:
        return None
    attrs = parse_attrs(payload, RTMSG.size)
    raw_dst = attrs.get(RTA_DST)
    dst = ip(raw_dst) if raw_dst else ipaddress.ip_address(0 if version == 4 else "::")
    gateway = attrs.get(RTA_GATEWAY)
    return RouteSpec(
        dst=ipaddress.ip_network((dst, dst_len)),
        table=u32(attrs.get(RTA_TABLE)) or table_byte,
        oif=u32(attrs.get(RTA_OIF)),
        via=ip(gateway) if gateway else None,
        kind=ROUTE_KINDS.get(kind, str(kind)),
        protocol=protocol,
        metric=(u32(attrs.get(RTA_PRIORITY)) or 0) if version == 4 else 0,
    )


# --- rules -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    """A policy-routing rule; ``protocol`` tags its owner and is not part of equality."""

    priority: int
    family: int
    """4 or 6."""
    table: int = 0
    action: str = "lookup"
    """``lookup`` (in ``table``), ``goto`` (the rule of priority ``target``), ``nop``,
    ``blackhole``, ``unreachable`` or ``prohibit``."""
    iif: str | None = None
    src: Network | None = None
    target: int = 0
    fwmark: int | None = None
    """With ``fwmask``: packets whose mark, masked, is this (``fwmark 0``: unmarked)."""
    fwmask: int | None = None
    invert: bool = False
    """``not``: the rule applies to the packets its selectors do not match."""
    protocol: int = field(default=0, compare=False)


def _rule_body(rule: Rule) -> bytes:
    action = RULE_ACTIONS.get(rule.action)
    if action is None:
        raise ValueError(f"rule action {rule.action!r} is not one of {sorted(RULE_ACTIONS)}")
    src_len = rule.src.prefixlen if rule.src is not None else 0
    table_byte = rule.table if rule.action == "lookup" and rule.table < 256 else 0
    flags = FIB_RULE_INVERT if rule.invert else 0
    body = FIBRULE.pack(AF[rule.family], 0, src_len, 0, table_byte, 0, 0, action, flags)
    body += attr_u32(FRA_PRIORITY, rule.priority)
    if rule.action == "lookup":
        body += attr_u32(FRA_TABLE, rule.table)
    if rule.action == "goto":
        body += attr_u32(FRA_GOTO, rule.target)
    if rule.iif is not None:
        body += attr_str(FRA_IIFNAME, rule.iif)
    if rule.src is not None:
        body += attr_addr(FRA_SRC, rule.src.network_address)
    if rule.fwmark is not None or rule.fwmask is not None:
        # Both, always: the kernel takes a mark without a mask as "all 32 bits", except
        # for mark 0, which it takes as "any mark".
        body += attr_u32(FRA_FWMARK, rule.fwmark or 0)
        body += attr_u32(FRA_FWMASK, 0xFFFFFFFF if rule.fwmask is None else rule.fwmask)
    if rule.protocol:
        body += attr(FRA_PROTOCOL, bytes([rule.protocol]))
    return body


def add_rule(rule: Rule) -> Request:
    return Request(RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, _rule_body(rule), f"add rule {rule}")


def delete_rule(rule: Rule) -> Request:
    return Request(RTM_DELRULE, 0, _rule_body(rule), f"delete rule {rule}")


def dump_rules() -> Request:
    return Request(RTM_GETRULE, NLM_F_DUMP, FIBRULE.pack(0, 0, 0, 0, 0, 0, 0, 0, 0), "list rules")


def parse_rule(payload: bytes) -> Rule | None:
    family, _, src_len, _, table_byte, _, _, action, flags = FIBRULE.unpack_from(payload)
    version = VERSION.get(family)
    if version is None:
        return None
    attrs = parse_attrs(payload, FIBRULE.size)
    src = attrs.get(FRA_SRC)
    protocol = attrs.get(FRA_PROTOCOL)
    # The kernel reports a mask whenever the rule looks at marks at all.
    fwmask = u32(attrs.get(FRA_FWMASK))
    return Rule(
        priority=u32(attrs.get(FRA_PRIORITY)) or 0,
        family=version,
        table=u32(attrs.get(FRA_TABLE)) or table_byte,
        action=RULE_NAMES.get(action, str(action)),
        iif=cstr(attrs.get(FRA_IIFNAME)),
        src=ipaddress.ip_network((ip(src), src_len)) if src else None,
        target=u32(attrs.get(FRA_GOTO)) or 0,
        fwmark=None if fwmask is None else u32(attrs.get(FRA_FWMARK)) or 0,
        fwmask=fwmask,
        invert=bool(flags & FIB_RULE_INVERT),
        protocol=protocol[0] if protocol else 0,
    )


# --- neighbours ----------------------------------------------------------------------------


def set_neighbour(index: int, name: str, address: Address, mac: str) -> Request:
    body = NDMSG.pack(AF[address.version], index, NUD_PERMANENT, 0, 0)
    body += attr_addr(NDA_DST, address) + attr(NDA_LLADDR, mac_bytes(mac))
    return Request(
        RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, body, f"neighbour {address} on {name}"
    )


def delete_neighbour(index: int, name: str, address: Address) -> Request:
    body = NDMSG.pack(AF[address.version], index, 0, 0, 0) + attr_addr(NDA_DST, address)
    return Request(RTM_DELNEIGH, 0, body, f"delete neighbour {address} on {name}")


def dump_neighbours() -> Request:
    return Request(RTM_GETNEIGH, NLM_F_DUMP, NDMSG.pack(0, 0, 0, 0, 0), "list neighbours")


def parse_neighbour(payload: bytes) -> tuple[int, Address, str | None, int] | None:
    """(link index, address, MAC, state) of a neighbour message."""
    family, index, state, _, _ = NDMSG.unpack_from(payload)
    if family not in VERSION:
        return None
    attrs = parse_attrs(payload, NDMSG.size)
    dst = attrs.get(NDA_DST)
    if dst is None:
        return None
    return index, ip(dst), mac_str(attrs.get(NDA_LLADDR)), state
