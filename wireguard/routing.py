"""Policy routing in the gateway-node namespace: fedgw's names, numbers and ownership, and
the rules, routes, neighbours and allowed IPs each tunnel and each wire needs."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from wireguard.errors import InvalidSpec, WireConflict
from wireguard.netns import IFNAMSIZ, Address, Neighbour, Network, Route, Rule
from wireguard.nftables import Mark
from wireguard.nftables import describe as describe_mark
from wireguard.wires import ClientWire, EndpointWire, Role, Wire, WorkloadEnd

# Why it is built this way.
#
# Nothing connection-specific is ever an address in the gateway namespace: an address
# there becomes a local route that every lookup sees first (priority 0), so two peers that
# hand out the same pair to two clients would collide. Instead:
#
# - The gateway end of a wire has no address. The workload reaches the other end of its
#   point-to-point pair on-link, through a static neighbour entry that maps that address
#   to the gateway end's MAC; the gateway reaches the workload through a static entry
#   for the workload's address on the gateway end. Neighbour entries are per device, so
#   the same address on two wires never meets. (A link-local next hop would work too,
#   but would show the workload an address that is not the endpoint's.)
# - Per peer domain, one table ``T(peer)``: the peer's prefixes (the endpoint address and
#   offered routes of client wires) through the peer's WireGuard interface, and the client
#   addresses of client wires through their veths. Per endpoint wire (and per local
#   connection), a table ``T(connection)`` of its own: the endpoint address and its
#   offered routes through its veth, and the client's address through the tunnel (or the
#   client's veth). Two endpoints of this domain may offer the same prefix to two clients
#   of one peer, so what comes from a peer is told apart by the client's source address.
# - Which table a packet is looked up in is chosen by its mark, which fedgw's nftables
#   table sets from hashed maps (see :mod:`wireguard.nftables`): a veth's packets get the
#   mark of its wire's table, a tunnel's packets that of ``T(connection)`` when they come
#   from the client of an endpoint wire, else that of ``T(peer)``. The same chain drops a
#   marked packet unless the selected table routes its source back out of the interface
#   it came in on (``fib saddr . mark . iif``), which is every wire's source guard, and
#   drops what arrives unmarked on one of fedgw's interfaces.
# - The kernel walks rules as a list on every lookup, so the rules are per table, not
#   per wire; unmarked packets jump over them, and marked ones find their table's rule
#   in two short walks: tables come in buckets of 64 (by mark), each bucket's rules
#   behind a ``goto`` of their own. At ``base`` (``P``) and up, with ``b`` a bucket::
#
#       P+0       fwmark 0/<mask> goto <end>                           IPv4 and IPv6
#       P+1       fwmark <bucket b>/<mask of buckets> goto P+3+2b      per bucket in use
#       P+2       not fwmark 0/<mask> blackhole                        IPv4 and IPv6
#       P+3+2b    fwmark <mark of T>/<mask> lookup T                   per table in b
#       P+4+2b    blackhole                                            per bucket in use
#       <end>     nop                                                  IPv4 and IPv6
#
#   A marked packet walks the buckets in use and the tables of its own bucket: at most
#   about 220 rules for 10,000 tables, where one rule per table would be 10,000. P+2 and
#   P+4+2b drop a marked packet whose table has just gone, so it cannot fall through
#   to the main table. Tables are allocated lowest first, to fill buckets. Every table
#   ends in an ``unreachable default``, so that nothing falls through either. A
#   connection's table has rules and routes only for the IP versions the connection
#   has; the other version's packets marked for it are dropped by the blackholes. A
#   mark is the table's position in fedgw's range plus one, shifted into the mask.
# - Every interface fedgw creates starts with its prefix; rules are fedgw's when their
#   priority is in ``P..<end>`` and, if they look a table up, that table is in fedgw's
#   range; routes when their table is; every rule and route also carries fedgw's
#   protocol number, for humans.

MAX_PREFIX = 6
"""At most 6 characters, so that 8 or more remain for a hash in a 15-character name."""
SKIP, BUCKETS, GUARD, LEAVES = 0, 1, 2, 3
BUCKET_BITS = 6
"""64 tables to a bucket."""


def priority_span(table_count: int) -> int:
    """How many rule priorities fedgw's rules take for ``table_count`` tables."""
    return LEAVES + 2 * ((table_count >> BUCKET_BITS) + 1) + 1


DEFAULTS = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
Families = tuple[int, ...]
BOTH: Families = (4, 6)
_ROLE_LETTER: dict[Role, str] = {"client": "c", "endpoint": "e"}
TUNNEL_LETTER = "w"

TableKey = tuple[Literal["peer", "connection"], str]


def host_prefix(address: Address) -> Network:
    return ipaddress.ip_network(address)


def check_prefix(prefix: str) -> str:
    if not 1 <= len(prefix) <= MAX_PREFIX or not (prefix.isascii() and prefix.isalnum()):
        raise InvalidSpec(
            f"interface prefix {prefix!r} must be 1 to {MAX_PREFIX} ASCII letters or digits"
        )
    return prefix


def _digest(text: str, length: int) -> str:
    raw = hashlib.sha256(text.encode()).digest()
    return base64.b32encode(raw).decode("ascii").lower()[:length]


@dataclass(frozen=True, slots=True)
class Naming:
    """Names and MACs of what one gateway creates.

    ``<prefix>w<hash of namespace and peer domain>`` for WireGuard interfaces: userspace
    ones must be unique on the whole host (their UAPI socket is named after them), so the
    gateway's namespace is part of the hash. ``<prefix>c<hash>``/``<prefix>e<hash>`` for
    the gateway ends of client/endpoint wires, hashed from the connection id (unique in
    the namespace is enough). MACs are derived too, so a restarted gateway recognises its
    veths (and their other ends) without any stored state.
    """

    prefix: str
    netns: str | None
    """The gateway's namespace, or whatever identifies it on the host."""

    def __post_init__(self) -> None:
        check_prefix(self.prefix)

    @property
    def _hash_length(self) -> int:
        return IFNAMSIZ - len(self.prefix) - 1

    def tunnel(self, domain: str) -> str:
        digest = _digest(f"{self.netns or ''}|{domain}", self._hash_length)
        return f"{self.prefix}{TUNNEL_LETTER}{digest}"

    def veth(self, connection_id: str, role: Role) -> str:
        return f"{self.prefix}{_ROLE_LETTER[role]}{_digest(connection_id, self._hash_length)}"

    def mac(self, connection_id: str, role: Role, side: Literal["gateway", "workload"]) -> str:
        raw = hashlib.sha256(f"{self.prefix}|{connection_id}|{role}|{side}".encode()).digest()
        # 0x02: locally administered, unicast.
        return ":".join(f"{b:02x}" for b in (0x02, *raw[:5]))

    def patterns(self) -> list[str]:
        """nftables name patterns of every kind of interface fedgw creates."""
        return [self.tunnel_pattern(), *(f"{self.prefix}{r}*" for r in _ROLE_LETTER.values())]

    def tunnel_pattern(self) -> str:
        return f"{self.prefix}{TUNNEL_LETTER}*"

    def kind_of(self, ifname: str) -> Literal["tunnel", "veth"] | None:
        """What fedgw made ``ifname`` for, if it is one of its names."""
        if len(ifname) != IFNAMSIZ or not ifname.startswith(self.prefix):
            return None
        letter = ifname[len(self.prefix)]
        if letter == TUNNEL_LETTER:
            return "tunnel"
        if letter in _ROLE_LETTER.values():
            return "veth"
        return None


class TableAllocator:
    """Routing-table numbers from a range, one per key: the lowest free one, so that
    tables fill the rules' buckets (a restarted gateway adopts the numbers in use)."""

    def __init__(self, tables: range) -> None:
        self.tables = tables
        self._by_key: dict[TableKey, int] = {}
        self._keys: dict[int, TableKey] = {}
        self._lowest_free = 0
        """No position below this one is free."""

    def get(self, key: TableKey) -> int | None:
        return self._by_key.get(key)

    def owner(self, table: int) -> TableKey | None:
        return self._keys.get(table)

    def assign(self, key: TableKey) -> int:
        found = self._by_key.get(key)
        if found is not None:
            return found
        if len(self._keys) >= len(self.tables):
            raise WireConflict(f"all {len(self.tables)} routing tables are in use")
        offset = self._lowest_free
        while self.tables[offset] in self._keys:
            offset += 1
        self._lowest_free = offset + 1
        return self._take(key, self.tables[offset])

    def adopt(self, key: TableKey, table: int) -> bool:
        """Keep the number the kernel already uses for ``key`` (after a restart)."""
        if table not in self.tables or key in self._by_key or table in self._keys:
            return False
        self._take(key, table)
        return True

    def _take(self, key: TableKey, table: int) -> int:
        self._by_key[key] = table
        self._keys[table] = key
        return table

    def release(self, key: TableKey) -> None:
        table = self._by_key.pop(key, None)
        if table is not None:
            del self._keys[table]
            self._lowest_free = min(self._lowest_free, self.tables.index(table))

    def keys(self) -> list[TableKey]:
        return list(self._by_key)


@dataclass(frozen=True, slots=True)
class Allowed:
    """One prefix a peer may send from (and is sent to)."""

    domain: str
    prefix: Network


GatewayObject = Rule | Route | Neighbour | Allowed | Mark


def object_key(obj: GatewayObject) -> Hashable:
    """What must be unique: two objects with one key and different values conflict."""
    if isinstance(obj, Rule):
        return ("rule", obj.priority, obj.family, obj.iif, obj.src, obj.fwmark, obj.invert)
    if isinstance(obj, Route):
        return ("route", obj.table, obj.dst)
    if isinstance(obj, Neighbour):
        return ("neighbour", obj.dev, obj.address)
    if isinstance(obj, Mark):
        return ("mark", obj.iif, obj.src)
    return ("allowed", obj.domain, obj.prefix)


def describe(obj: GatewayObject) -> str:
    if isinstance(obj, Rule):
        selectors = "not " if obj.invert else ""
        if obj.fwmark is not None:
            selectors += f"fwmark {obj.fwmark:#x}/{obj.fwmask or 0:#x} "
        selectors += f"iif {obj.iif} " if obj.iif else ""
        selectors += f"from {obj.src} " if obj.src else ""
        target = {"lookup": f"lookup {obj.table}", "goto": f"goto {obj.target}"}
        action = target.get(obj.action, obj.action)
        return f"rule {obj.priority}: {selectors}{action} (IPv{obj.family})"
    if isinstance(obj, Mark):
        return describe_mark(obj)
    if isinstance(obj, Route):
        metric = f" metric {obj.metric}" if obj.metric else ""
        if obj.kind != "unicast":
            return f"route {obj.kind} {obj.dst} table {obj.table}{metric}"
        via = f" via {obj.via}" if obj.via else ""
        return f"route {obj.dst}{via} dev {obj.dev} table {obj.table}{metric}"
    if isinstance(obj, Neighbour):
        return f"neighbour {obj.address} lladdr {obj.mac} dev {obj.dev}"
    return f"allowed IP {obj.prefix} of peer {obj.domain}"


class Ledger:
    """The gateway objects wanted by tunnels and wires, counted: an object shared by
    several wires (a peer's offered prefix, a table's default) is created by the first
    and removed with the last."""

    def __init__(self) -> None:
        self._objects: dict[Hashable, tuple[GatewayObject, int]] = {}
        # Each peer's allowed IPs on their own as well: a closing wire rewrites its
        # peer's list, and finding them among every object would grow with the wires.
        self._allowed: dict[str, dict[Network, None]] = {}

    def check(self, objects: Iterable[GatewayObject], what: str) -> None:
        """:class:`WireConflict` if any object contradicts one already held."""
        for obj in objects:
            held = self._objects.get(object_key(obj))
            if held is not None and held[0] != obj:
                raise WireConflict(f"{what}: {describe(obj)} contradicts {describe(held[0])}")

    def acquire(self, objects: Iterable[GatewayObject]) -> list[GatewayObject]:
        """Count ``objects`` in (check first); those that are new."""
        new = []
        for obj in objects:
            key = object_key(obj)
            held = self._objects.get(key)
            if held is None:
                self._objects[key] = (obj, 1)
                new.append(obj)
                if isinstance(obj, Allowed):
                    self._allowed.setdefault(obj.domain, {})[obj.prefix] = None
            else:
                self._objects[key] = (held[0], held[1] + 1)
        return new

    def holds(self, obj: GatewayObject) -> bool:
        return object_key(obj) in self._objects

    def release(self, objects: Iterable[GatewayObject]) -> list[GatewayObject]:
        """Count ``objects`` out; those nobody wants any more."""
        gone = []
        for obj in objects:
            key = object_key(obj)
            held = self._objects.get(key)
            if held is None:
                continue
            if held[1] <= 1:
                del self._objects[key]
                gone.append(held[0])
                if isinstance(obj, Allowed):
                    self._forget_allowed(obj)
            else:
                self._objects[key] = (held[0], held[1] - 1)
        return gone

    def __iter__(self) -> Iterator[GatewayObject]:
        return (obj for obj, _ in self._objects.values())

    def __len__(self) -> int:
        return len(self._objects)

    def _forget_allowed(self, obj: Allowed) -> None:
        prefixes = self._allowed[obj.domain]
        del prefixes[obj.prefix]
        if not prefixes:
            del self._allowed[obj.domain]

    def allowed(self, domain: str) -> tuple[Network, ...]:
        return tuple(self._allowed.get(domain, ()))


def mask_shift(mask: int) -> int:
    """The position of the lowest bit of ``mask``."""
    return (mask & -mask).bit_length() - 1


def check_mark_mask(mask: int, table_count: int) -> int:
    """``mask`` if its bits are contiguous and number ``table_count`` tables (a mark is
    a table's position plus one; 0 is "unmarked"), else :class:`InvalidSpec`."""
    values = mask >> mask_shift(mask) if mask > 0 else 0
    if values & (values + 1) or values < table_count or mask > 0xFFFFFFFF:
        raise InvalidSpec(
            f"mark mask {mask:#x} must be contiguous bits, of 32, that number {table_count} tables"
        )
    return mask


@dataclass(frozen=True, slots=True)
class Policy:
    """The numbers a gateway's objects carry."""

    priority: int
    protocol: int
    tables: range
    mark_mask: int

    def __post_init__(self) -> None:
        check_mark_mask(self.mark_mask, len(self.tables))

    def rule(self, offset: int, family: int, **kwargs: object) -> Rule:
        return Rule(self.priority + offset, family, protocol=self.protocol, **kwargs)  # type: ignore[arg-type]

    def mark(self, table: int) -> int:
        return (self.tables.index(table) + 1) << mask_shift(self.mark_mask)

    def table_of(self, mark: int) -> int | None:
        """The table whose mark ``mark`` is, if it is one."""
        position = (mark >> mask_shift(self.mark_mask)) - 1
        if mark & ~self.mark_mask or not 0 <= position < len(self.tables):
            return None
        return self.tables[position]

    def classify(self, iif: str, table: int, src: Address | None = None) -> Mark:
        return Mark(iif, src, self.mark(table))

    def table_rules(self, table: int, families: Families = BOTH) -> list[Rule]:
        """What sends the packets marked for ``table`` to it: its rule, and its bucket's
        (shared with the other tables of the bucket), for each IP version in
        ``families``."""
        mark, mask, shift = self.mark(table), self.mark_mask, mask_shift(self.mark_mask)
        bucket = mark >> shift >> BUCKET_BITS
        leaf = LEAVES + 2 * bucket
        bucket_mark = bucket << BUCKET_BITS << shift
        bucket_mask = mask & ~(((1 << BUCKET_BITS) - 1) << shift)
        return [
            rule
            for family in families
            for rule in (
                self.rule(
                    BUCKETS,
                    family,
                    action="goto",
                    fwmark=bucket_mark,
                    fwmask=bucket_mask,
                    target=self.priority + leaf,
                ),
                self.rule(leaf, family, table=table, fwmark=mark, fwmask=mask),
                self.rule(leaf + 1, family, action="blackhole"),
            )
        ]

    def route(self, dst: Network, table: int, **kwargs: object) -> Route:
        # The kernel keeps IPv4 routes with the same attributes (type, protocol, metric,
        # devices) in one hash chain, whatever their table, and walks it to add one.
        # Every table has an unreachable default, and every served connection's a route
        # through its tunnel: each new table cost time in proportion to the tables there
        # are. The table's number as the metric keeps the chains short.
        if dst.version == 4:
            kwargs.setdefault("metric", table)
        return Route(dst, table, protocol=self.protocol, **kwargs)  # type: ignore[arg-type]

    def defaults(self, table: int, families: Families = BOTH) -> list[Route]:
        return [
            self.route(dst, table, kind="unreachable")
            for dst in DEFAULTS
            if dst.version in families
        ]

    def frame_rules(self) -> list[Rule]:
        """What lets unmarked packets past the tables' rules and stops marked ones that
        none of them took (see the module's comments); shared by all tunnels and wires."""
        end, mask = priority_span(len(self.tables)) - 1, self.mark_mask
        return [
            rule
            for family in (4, 6)
            for rule in (
                self.rule(
                    SKIP, family, action="goto", fwmark=0, fwmask=mask, target=self.priority + end
                ),
                self.rule(GUARD, family, action="blackhole", fwmark=0, fwmask=mask, invert=True),
                self.rule(end, family, action="nop"),
            )
        ]


@dataclass(frozen=True, slots=True)
class TunnelPlan:
    """What a peer's tunnel needs besides its WireGuard interface."""

    domain: str
    interface: str
    table: int
    objects: tuple[GatewayObject, ...]


def plan_tunnel(domain: str, naming: Naming, policy: Policy, table: int) -> TunnelPlan:
    iface = naming.tunnel(domain)
    objects: list[GatewayObject] = [*policy.table_rules(table), *policy.frame_rules()]
    objects += policy.defaults(table)
    objects.append(policy.classify(iface, table))
    return TunnelPlan(domain, iface, table, tuple(objects))


@dataclass(frozen=True, slots=True)
class WirePlan:
    """Everything one wire needs: its veth, its objects in the gateway namespace (counted
    in the :class:`Ledger`) and its workload end."""

    wire: Wire
    veth: str
    """The gateway end."""
    mac: str
    """The gateway end's MAC."""
    mtu: int
    workload_end: WorkloadEnd
    objects: tuple[GatewayObject, ...]
    table: TableKey
    ipv6: bool
    """Whether the wire carries IPv6: its addresses, or what an end offers."""


def wire_table(wire: Wire) -> TableKey:
    """The table a wire's traffic is looked up in, both ways: its peer's for the client
    wire of a cross-domain connection, else its connection's own."""
    if wire.peer is not None and isinstance(wire, ClientWire):
        return ("peer", wire.peer)
    return ("connection", wire.connection_id)


def plan_wire(
    wire: Wire,
    *,
    naming: Naming,
    policy: Policy,
    tables: TableAllocator,
    workload_netns: str,
    mtu: int,
) -> WirePlan:
    """The plan of ``wire``; its tables must have been assigned in ``tables``."""
    cid = wire.connection_id
    veth = naming.veth(cid, wire.role)
    gateway_mac = naming.mac(cid, wire.role, "gateway")
    workload_mac = naming.mac(cid, wire.role, "workload")
    own, other = wire.address, wire.other_address
    own_host, other_host = host_prefix(own.ip), host_prefix(other.ip)

    key = wire_table(wire)
    table = tables.get(key)
    if table is None:
        raise RuntimeError(f"no table assigned for {key}")

    objects: list[GatewayObject] = [
        Neighbour(veth, own.ip, workload_mac),
        *policy.frame_rules(),
        # Delivery into the veth: the workload's address, and for an endpoint what it
        # offers; the same routes pass the source guard of what the workload sends.
        policy.route(own_host, table, dev=veth),
    ]
    if isinstance(wire, EndpointWire):
        objects += [policy.route(dst, table, dev=veth, via=own.ip) for dst in wire.routes]
    families = tuple(sorted({own.version, *(dst.version for dst in wire.routes)}))
    if key[0] == "connection":
        # Only the IP versions the connection has: packets of the other one that are
        # marked for its table find no rule, and the bucket's or the range's blackhole
        # drops them. Half the rules and routes of an IPv4-only connection, and the
        # kernel walks the rules of a version in a list when it inserts one.
        objects += [*policy.table_rules(table, families), *policy.defaults(table, families)]
    if wire.peer is not None:
        tunnel = naming.tunnel(wire.peer)
        remote = [other_host, *wire.routes] if isinstance(wire, ClientWire) else [other_host]
        objects += [policy.route(dst, table, dev=tunnel) for dst in remote]
        objects += [Allowed(wire.peer, dst) for dst in remote]
        if isinstance(wire, EndpointWire):
            # The client's packets, told apart from other clients' by their source.
            objects.append(policy.classify(tunnel, table, other.ip))
    objects.append(policy.classify(veth, table))
    end = WorkloadEnd(
        netns=workload_netns,
        name=wire.interface,
        mac=workload_mac,
        gateway_mac=gateway_mac,
        mtu=mtu,
        address=own,
        next_hop=other.ip,
        routes=wire.routes if isinstance(wire, ClientWire) else (),
    )
    return WirePlan(
        wire=wire,
        veth=veth,
        mac=gateway_mac,
        mtu=mtu,
        workload_end=end,
        objects=tuple(objects),
        table=key,
        ipv6=6 in families,
    )
