"""fedgw's nftables table in a gateway namespace: the chains that classify what arrives
from its wires and tunnels (and, if asked, clamp the TCP MSS), and the map elements that
each tunnel and wire adds.

The chains are written by ``nft -f`` at start and at reconciliation, in one transaction
that keeps the maps' elements. The elements come and go with connections, so they are
sent as nfnetlink messages from here: tens of microseconds each, where starting ``nft``
costs milliseconds. How the marks are used is explained in :mod:`wireguard.routing`.
"""

from __future__ import annotations

import errno
import ipaddress
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

from wireguard import rtnetlink as nl
from wireguard.errors import CommandFailed, NetlinkFailed
from wireguard.netns import Address, NetlinkSession, run

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWSETELEM, NFT_MSG_GETSETELEM, NFT_MSG_DELSETELEM = 12, 13, 14
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_DATA = 1, 2
NFTA_DATA_VALUE = 1
NLA_F_NESTED = 0x8000
NFPROTO_UNSPEC, NFPROTO_INET = 0, 1
NFGENMSG = struct.Struct("!BBH")  # family, version, resource id (big-endian)
IFNAMSIZ = 16  # with the terminating zero: an ``ifname`` key's length

LINKS = "links"
"""Interface -> mark: every wire's veth and every tunnel."""
SOURCES = {4: "sources4", 6: "sources6"}
"""Interface and source address -> mark: a tunnel's packets from one client."""


def table_name(prefix: str) -> str:
    return f"fedgw_{prefix}"


@dataclass(frozen=True, slots=True)
class Mark:
    """Packets that arrive on ``iif`` (from ``src``, if given) are marked ``mark``."""

    iif: str
    src: Address | None
    mark: int

    @property
    def map(self) -> str:
        return LINKS if self.src is None else SOURCES[self.src.version]

    @property
    def key(self) -> bytes:
        name = self.iif.encode()
        if len(name) >= IFNAMSIZ:
            raise ValueError(f"interface name {self.iif!r} is too long")
        key = name.ljust(IFNAMSIZ, b"\0")
        return key if self.src is None else key + self.src.packed


def ruleset(prefix: str, interfaces: Sequence[str], *, clamp_tunnels: str | None) -> str:
    """The table's chains, as one ``nft -f`` transaction that can be applied again and
    again: maps that exist keep their elements.

    ``classify`` marks what arrives from an interface in the maps (a tunnel's packets
    from a known client first, by source), and ``check`` drops a marked packet unless
    the table its mark selects routes its source back out of the interface it came in
    on: the source guard of every wire and tunnel at once. What arrives on one of
    fedgw's ``interfaces`` (name patterns) unmarked is dropped: a wire being made or
    removed. ``clamp_tunnels`` (a name pattern) turns MSS clamping on: SYNs into and
    out of the tunnels get an MSS that fits the route's MTU, so that a workload whose
    MTU is larger than the tunnel's gets through (the gateway has no address on a wire
    to send "fragmentation needed" from)."""
    t = f"inet {table_name(prefix)}"
    lines = [
        f"add table {t}",
        f"add map {t} {LINKS} {{ type ifname : mark; }}",
        f"add map {t} {SOURCES[4]} {{ type ifname . ipv4_addr : mark; }}",
        f"add map {t} {SOURCES[6]} {{ type ifname . ipv6_addr : mark; }}",
        f"add chain {t} classify {{ type filter hook prerouting priority mangle; policy accept; }}",
        f"add chain {t} check",
        f"add chain {t} forward {{ type filter hook forward priority mangle; policy accept; }}",
        f"flush chain {t} classify",
        f"flush chain {t} check",
        f"flush chain {t} forward",
        f"add rule {t} classify meta mark set iifname . ip saddr map @{SOURCES[4]} goto check",
        f"add rule {t} classify meta mark set iifname . ip6 saddr map @{SOURCES[6]} goto check",
        f"add rule {t} classify meta mark set iifname map @{LINKS} goto check",
        *(f'add rule {t} classify iifname "{pattern}" drop' for pattern in interfaces),
        f"add rule {t} check fib saddr . mark . iif oif missing drop",
    ]
    if clamp_tunnels is None:
        lines.append(f"delete chain {t} forward")
    else:
        syn = "tcp flags & (syn | rst) == syn"
        for direction in ("oifname", "iifname"):
            lines.append(
                f'add rule {t} forward {direction} "{clamp_tunnels}" {syn} '
                "tcp option maxseg size set rt mtu"
            )
    return "\n".join(lines) + "\n"


def _nft(netns: str | None, *args: str) -> list[str]:
    return ["ip", "netns", "exec", netns, "nft", *args] if netns else ["nft", *args]


async def apply_ruleset(netns: str | None, script: str) -> None:
    await run(*_nft(netns, "-f", "-"), input=script.encode())


async def has_table(netns: str | None, prefix: str) -> bool:
    out = await run(*_nft(netns, "list", "tables", "inet"))
    return f"table inet {table_name(prefix)}" in out.splitlines()


async def remove_table(netns: str | None, prefix: str) -> bool:
    """False if there was no table."""
    if not await has_table(netns, prefix):
        return False
    try:
        await run(*_nft(netns, "delete", "table", "inet", table_name(prefix)))
    except CommandFailed:
        if await has_table(netns, prefix):
            raise
        return False
    return True


# --- elements ---------------------------------------------------------------------------


def _nested(kind: int, data: bytes) -> bytes:
    return nl.attr(kind | NLA_F_NESTED, data)


def _message(kind: int, flags: int, body: bytes, action: str) -> nl.Request:
    return nl.Request((NFNL_SUBSYS_NFTABLES << 8) | kind, flags, body, action)


def _batch(requests: list[nl.Request]) -> list[nl.Request]:
    """``requests`` as one transaction: all of them happen, or none."""
    header = NFGENMSG.pack(NFPROTO_UNSPEC, 0, NFNL_SUBSYS_NFTABLES)
    return [
        nl.Request(NFNL_MSG_BATCH_BEGIN, 0, header, "begin", ack=False),
        *requests,
        nl.Request(NFNL_MSG_BATCH_END, 0, header, "end", ack=False),
    ]


def _set_header(table: str, name: str) -> bytes:
    return (
        NFGENMSG.pack(NFPROTO_INET, 0, 0)
        + nl.attr_str(NFTA_SET_ELEM_LIST_TABLE, table)
        + nl.attr_str(NFTA_SET_ELEM_LIST_SET, name)
    )


def _elements(table: str, marks: Sequence[Mark], kind: int, verb: str) -> list[nl.Request]:
    """One message per map, naming all of ``marks`` in it."""
    by_map: dict[str, list[Mark]] = {}
    for mark in marks:
        by_map.setdefault(mark.map, []).append(mark)
    requests = []
    for name, members in by_map.items():
        elements = b""
        for m in members:
            body = _nested(NFTA_SET_ELEM_KEY, nl.attr(NFTA_DATA_VALUE, m.key))
            if kind == NFT_MSG_NEWSETELEM:
                body += _nested(NFTA_SET_ELEM_DATA, nl.attr_u32(NFTA_DATA_VALUE, m.mark))
            elements += _nested(NFTA_LIST_ELEM, body)
        flags = nl.NLM_F_CREATE if kind == NFT_MSG_NEWSETELEM else 0
        body = _set_header(table, name) + _nested(NFTA_SET_ELEM_LIST_ELEMENTS, elements)
        # Named in errors: one by one when they are few (as when a wire is made).
        if len(members) <= 3:
            what = ", ".join(describe(m) for m in members)
        else:
            what = f"{len(members)} elements of map {name}"
        requests.append(_message(kind, flags, body, f"{verb} {what}"))
    return requests


def _parse_mark(name: str, element: bytes) -> Mark | None:
    attrs = nl.parse_attrs(element)
    key = nl.parse_attrs(attrs.get(NFTA_SET_ELEM_KEY, b"")).get(NFTA_DATA_VALUE)
    mark = nl.u32(nl.parse_attrs(attrs.get(NFTA_SET_ELEM_DATA, b"")).get(NFTA_DATA_VALUE))
    if key is None or mark is None or len(key) < IFNAMSIZ:
        return None
    iif = key[:IFNAMSIZ].split(b"\0", 1)[0].decode(errors="replace")
    src: Address | None = None
    if name != LINKS:
        src = ipaddress.ip_address(key[IFNAMSIZ:])
    return Mark(iif, src, mark)


def describe(mark: Mark) -> str:
    src = f" from {mark.src}" if mark.src is not None else ""
    return f"mark {mark.mark:#x} on {mark.iif}{src}"


class Nft(NetlinkSession):
    """The map elements of one gateway's table, in one namespace."""

    protocol = NETLINK_NETFILTER

    def __init__(self, netns: str | None, prefix: str) -> None:
        super().__init__(netns)
        self.table = table_name(prefix)

    async def add(self, marks: Iterable[Mark]) -> None:
        """Add ``marks`` (a transaction per thousand); one that is there already is kept."""
        for chunk in _chunks(list(marks)):
            await self.batch(_batch(_elements(self.table, chunk, NFT_MSG_NEWSETELEM, "add")))

    async def delete(self, marks: Iterable[Mark]) -> None:
        """Delete ``marks``; those that are not there are no failure."""
        for chunk in _chunks(list(marks)):
            requests = _elements(self.table, chunk, NFT_MSG_DELSETELEM, "delete")
            try:
                await self.batch(_batch(requests))
            except NetlinkFailed as exc:
                # One missing element fails the whole transaction: go one by one.
                if exc.errno != errno.ENOENT:
                    raise
                for mark in chunk:
                    (request,) = _elements(self.table, [mark], NFT_MSG_DELSETELEM, "delete")
                    await self.batch(_batch([replace(request, ignore=_MISSING)]))

    async def marks(self) -> list[Mark]:
        """Every element of the maps; none if the table is missing."""
        found: list[Mark] = []
        for name in (LINKS, *SOURCES.values()):
            request = _message(
                NFT_MSG_GETSETELEM, nl.NLM_F_DUMP, _set_header(self.table, name), f"list {name}"
            )
            payloads = await self._get(request, missing=_MISSING)
            for payload in payloads or []:
                attrs = nl.parse_attrs(payload, NFGENMSG.size)
                for kind, element in nl.iter_attrs(attrs.get(NFTA_SET_ELEM_LIST_ELEMENTS, b"")):
                    mark = _parse_mark(name, element) if kind == NFTA_LIST_ELEM else None
                    if mark is not None:
                        found.append(mark)
        return found


_MISSING = frozenset({errno.ENOENT})
_CHUNK = 1000
"""Elements per transaction: a message must fit the socket's send buffer (an element
takes up to 72 bytes; the buffer is about 200 KiB)."""


def _chunks(marks: list[Mark]) -> Iterator[list[Mark]]:
    for start in range(0, len(marks), _CHUNK):
        yield marks[start : start + _CHUNK]
