"""Wires and policy routing without root: names, table numbers, the ledger of shared
objects, the plan of each kind of wire, validation of what the gateway asks for."""

from __future__ import annotations

import ipaddress
import os
import random
from typing import Any

import pytest
from pydantic import ValidationError

from fedgw.models import Workload
from wireguard import nftables
from wireguard.dataplane import DataplaneSettings
from wireguard.errors import InvalidSpec, NamespaceNotFound, WireConflict
from wireguard.keys import PrivateKey
from wireguard.netns import Neighbour, Route, Rule
from wireguard.nftables import Mark
from wireguard.routing import (
    Allowed,
    Ledger,
    Naming,
    Policy,
    TableAllocator,
    plan_tunnel,
    plan_wire,
    wire_table,
)
from wireguard.wires import (
    ClientWire,
    EndpointWire,
    PeerTunnel,
    Wire,
    process_start_ticks,
    workload_netns,
)

E = ipaddress.ip_interface("172.16.1.0/31")
C = ipaddress.ip_interface("172.16.1.1/31")
OFFERED = ipaddress.ip_network("10.60.0.0/16")
NAMING = Naming("fgw", "gw-a")
TABLES = range(100, 200)
POLICY = Policy(priority=20000, protocol=147, tables=TABLES, mark_mask=0xFF00)


def net(text: str) -> Any:
    return ipaddress.ip_network(text)


def client(**changes: Any) -> ClientWire:
    fields: dict[str, Any] = {
        "connection_id": "conn-1",
        "peer": "b.example",
        "workload": Workload(netns="c"),
        "interface": "nsm0",
        "address": C,
        "endpoint_address": E,
        "routes": (OFFERED,),
    }
    return ClientWire(**(fields | changes))


def endpoint(**changes: Any) -> EndpointWire:
    fields: dict[str, Any] = {
        "connection_id": "conn-1",
        "peer": "a.example",
        "workload": Workload(netns="e"),
        "interface": "nsm0",
        "address": E,
        "client_address": C,
        "routes": (OFFERED,),
    }
    return EndpointWire(**(fields | changes))


# --- names -----------------------------------------------------------------------------------


def test_names_fit_15_characters_and_say_what_they_are() -> None:
    tunnel = NAMING.tunnel("b.example")
    veth_c = NAMING.veth("conn-1", "client")
    veth_e = NAMING.veth("conn-1", "endpoint")
    assert {len(tunnel), len(veth_c), len(veth_e)} == {15}
    assert (tunnel[:4], veth_c[:4], veth_e[:4]) == ("fgww", "fgwc", "fgwe")
    assert [NAMING.kind_of(n) for n in (tunnel, veth_c, veth_e)] == ["tunnel", "veth", "veth"]
    assert NAMING.kind_of("uplink") is None
    assert NAMING.kind_of("fgwx0123456789a") is None
    assert NAMING.kind_of("fgww") is None  # not one of ours: too short
    assert Naming("a1b2c3", None).tunnel("b.example").startswith("a1b2c3w")
    # Same peer, other gateway namespace: other name (wireguard-go names are host-wide).
    assert Naming("fgw", "gw-c").tunnel("b.example") != tunnel
    assert NAMING.tunnel("b.example") == tunnel  # stable across runs


def test_macs_are_stable_unicast_and_locally_administered() -> None:
    macs = {
        NAMING.mac(cid, role, side)
        for cid in ("conn-1", "conn-2")
        for role in ("client", "endpoint")
        for side in ("gateway", "workload")
    }
    assert len(macs) == 8
    for mac in macs:
        first = int(mac.split(":")[0], 16)
        assert first & 0x03 == 0x02  # locally administered, not multicast
    assert NAMING.mac("conn-1", "client", "gateway") == Naming("fgw", "gw-a").mac(
        "conn-1", "client", "gateway"
    )


@pytest.mark.parametrize("prefix", ["", "toolong", "fg-w", "fgw ", "fgé"])
def test_a_bad_prefix_is_refused(prefix: str) -> None:
    with pytest.raises(InvalidSpec, match="prefix"):
        Naming(prefix, None)


# --- tables ----------------------------------------------------------------------------------


def test_tables_are_allocated_lowest_first_and_adoptable() -> None:
    tables = TableAllocator(range(1000, 1004))
    assert tables.assign(("peer", "b")) == 1000
    assert tables.assign(("peer", "b")) == 1000  # one per key
    numbers = [tables.assign(("connection", str(i))) for i in range(3)]
    assert numbers == [1001, 1002, 1003]
    with pytest.raises(WireConflict, match="routing tables"):
        tables.assign(("peer", "z"))
    tables.release(("connection", "0"))
    tables.release(("connection", "2"))
    assert tables.get(("connection", "0")) is None
    assert tables.assign(("peer", "z")) == 1001  # the lowest free one
    assert tables.assign(("peer", "y")) == 1003

    fresh = TableAllocator(range(1000, 1004))
    assert fresh.adopt(("peer", "b"), 1003)
    assert not fresh.adopt(("peer", "d"), 1003)  # taken
    assert not fresh.adopt(("peer", "d"), 99)  # not fedgw's
    assert fresh.assign(("peer", "b")) == 1003
    assert fresh.owner(1003) == ("peer", "b")
    assert fresh.assign(("peer", "d")) == 1000  # around what was adopted


# --- the ledger ------------------------------------------------------------------------------


def test_the_ledger_counts_shared_objects_and_refuses_contradictions() -> None:
    ledger = Ledger()
    shared = Route(OFFERED, 7, dev="fgwwtunnel")
    one = Route(net("172.16.1.1/32"), 7, dev="fgwcone")
    assert ledger.acquire([shared, one]) == [shared, one]
    assert ledger.acquire([shared]) == []  # counted, not created again
    assert ledger.release([shared]) == []
    assert ledger.release([shared, one]) == [shared, one]
    assert len(ledger) == 0

    ledger.acquire([one, Allowed("b", OFFERED)])
    other = Route(net("172.16.1.1/32"), 7, dev="fgwctwo")  # same address, other wire
    with pytest.raises(WireConflict, match="contradicts"):
        ledger.check([other], "connection conn-2")
    ledger.check([Route(net("172.16.1.1/32"), 8, dev="fgwctwo")], "another table: fine")
    assert ledger.allowed("b") == (OFFERED,)
    # The protocol number is a tag, not part of what a route is.
    ledger.check([Route(net("172.16.1.1/32"), 7, dev="fgwcone", protocol=147)], "same")


def test_the_ledger_knows_each_peers_allowed_ips_as_a_scan_would_find_them() -> None:
    """The per-peer index of allowed IPs against a scan of every object, through random
    acquires and releases of shared and unshared prefixes."""
    rng = random.Random(7)  # noqa: S311 (a reproducible test sequence, not a secret)
    ledger = Ledger()
    held: list[list[Allowed | Route]] = []
    for _ in range(400):
        if held and rng.random() < 0.4:
            ledger.release(held.pop(rng.randrange(len(held))))
        else:
            domain = rng.choice("bcd")
            prefix = net(f"10.{rng.randrange(3)}.{rng.randrange(8)}.0/24")
            objs: list[Allowed | Route] = [Allowed(domain, prefix), Route(prefix, 7, dev="x")]
            ledger.acquire(objs)
            held.append(objs)
        for domain in "bcd":
            scanned = [o.prefix for o in ledger if isinstance(o, Allowed) and o.domain == domain]
            assert ledger.allowed(domain) == tuple(scanned)
    for objs in held:
        ledger.release(objs)
    assert len(ledger) == 0
    assert ledger.allowed("b") == ()


# --- plans -----------------------------------------------------------------------------------


# Unmarked packets jump over the tables' rules (to the end: 3 + 2 buckets of 64 tables
# for 100 tables), marked ones that no table took are dropped: shared by all plans.
FRAME = {
    rule
    for family in (4, 6)
    for rule in (
        Rule(20000, family, action="goto", fwmark=0, fwmask=0xFF00, target=20007),
        Rule(20002, family, action="blackhole", fwmark=0, fwmask=0xFF00, invert=True),
        Rule(20007, family, action="nop"),
    )
}


def mark(table: int) -> int:
    return (table - 100 + 1) << 8


def lookups(table: int, families: tuple[int, ...] = (4, 6)) -> set[Rule]:
    """The rules of a table of the first bucket (marks 1 to 63)."""
    assert mark(table) < 64 << 8
    return {
        rule
        for f in families
        for rule in (
            Rule(20001, f, action="goto", fwmark=0, fwmask=0xC000, target=20003),
            Rule(20003, f, table, fwmark=mark(table), fwmask=0xFF00),
            Rule(20004, f, action="blackhole"),
        )
    }


def test_a_tables_rules_sit_behind_its_buckets() -> None:
    """Mark 64 (table 163) opens the second bucket: its own goto, lookup and blackhole."""
    assert set(POLICY.table_rules(163)) == {
        rule
        for f in (4, 6)
        for rule in (
            Rule(20001, f, action="goto", fwmark=0x4000, fwmask=0xC000, target=20005),
            Rule(20005, f, 163, fwmark=0x4000, fwmask=0xFF00),
            Rule(20006, f, action="blackhole"),
        )
    }
    # A bucket's goto and blackhole are shared, so the ledger counts them.
    assert set(POLICY.table_rules(164)) & set(POLICY.table_rules(163)) == {
        r for r in POLICY.table_rules(163) if r.action != "lookup"
    }


def unreachable(table: int, families: tuple[int, ...] = (4, 6)) -> set[Route]:
    defaults = {4: "0.0.0.0/0", 6: "::/0"}
    # IPv4's has the table's number as its metric (see Policy.route).
    return {
        Route(net(defaults[f]), table, kind="unreachable", metric=table if f == 4 else 0)
        for f in families
    }


def test_marks_number_the_tables_inside_the_mask() -> None:
    assert [POLICY.mark(t) for t in (100, 101, 199)] == [0x100, 0x200, 0x6400]
    assert [POLICY.table_of(m) for m in (0x100, 0x6400)] == [100, 199]
    # Not a mark of fedgw's: bits outside the mask, none set, or beyond the range.
    assert [POLICY.table_of(m) for m in (0x101, 0, 0x6500)] == [None, None, None]
    with pytest.raises(InvalidSpec, match="contiguous"):
        Policy(priority=1, protocol=147, tables=TABLES, mark_mask=0xF0F0)
    with pytest.raises(InvalidSpec, match="100 tables"):
        Policy(priority=1, protocol=147, tables=TABLES, mark_mask=0x3F)


def plan(wire: Wire) -> tuple[Any, TableAllocator]:
    tables = TableAllocator(TABLES)
    tables.assign(wire_table(wire))
    return (
        plan_wire(wire, naming=NAMING, policy=POLICY, tables=tables, workload_netns="ns", mtu=1420),
        tables,
    )


def test_a_client_wire_routes_through_its_peers_table() -> None:
    wire = client()
    p, tables = plan(wire)
    t_peer = tables.get(("peer", "b.example"))
    assert t_peer is not None
    veth, tunnel = p.veth, NAMING.tunnel("b.example")
    assert wire_table(wire) == ("peer", "b.example")
    # No rule of its own: its veth's packets are marked for the peer's table.
    assert (
        set(p.objects)
        == {
            Neighbour(veth, C.ip, NAMING.mac("conn-1", "client", "workload")),
            # IPv4 routes have their table's number as their metric (Policy.route).
            Route(net("172.16.1.1/32"), t_peer, dev=veth, metric=t_peer),
            Route(net("172.16.1.0/32"), t_peer, dev=tunnel, metric=t_peer),
            Route(OFFERED, t_peer, dev=tunnel, metric=t_peer),
            Mark(veth, None, mark(t_peer)),
            Allowed("b.example", net("172.16.1.0/32")),
            Allowed("b.example", OFFERED),
        }
        | FRAME
    )
    end = p.workload_end
    assert (end.name, end.address, end.next_hop, end.routes, end.mtu) == (
        "nsm0",
        C,
        E.ip,
        (OFFERED,),
        1420,
    )
    assert end.gateway_mac == p.mac
    # The tunnel's own objects: its table's rules and defaults, and its mark.
    tp = plan_tunnel("b.example", NAMING, POLICY, t_peer)
    assert set(tp.objects) == (
        {Mark(tunnel, None, mark(t_peer))} | lookups(t_peer) | unreachable(t_peer) | FRAME
    )


def test_an_endpoint_wire_gets_a_table_chosen_by_the_clients_source() -> None:
    wire = endpoint()
    p, tables = plan(wire)
    t_conn = tables.get(("connection", "conn-1"))
    assert t_conn is not None
    veth, tunnel = p.veth, NAMING.tunnel("a.example")
    # One table both ways: what the tunnel brings from the client, and what the veth
    # brings back; its routes are also what the source guard checks sources against.
    assert set(p.objects) == (
        {
            Neighbour(veth, E.ip, NAMING.mac("conn-1", "endpoint", "workload")),
            Route(net("172.16.1.0/32"), t_conn, dev=veth, metric=t_conn),
            Route(OFFERED, t_conn, dev=veth, via=E.ip, metric=t_conn),
            Route(net("172.16.1.1/32"), t_conn, dev=tunnel, metric=t_conn),
            Mark(tunnel, C.ip, mark(t_conn)),
            Mark(veth, None, mark(t_conn)),
            Allowed("a.example", net("172.16.1.1/32")),
        }
        | lookups(t_conn, (4,))  # an IPv4 connection: no IPv6 rules or routes
        | unreachable(t_conn, (4,))
        | FRAME
    )
    assert p.workload_end.routes == ()


@pytest.mark.parametrize(
    ("address", "other", "routes", "families"),
    [
        ("172.16.1.0/31", "172.16.1.1/31", ["10.60.0.0/16", "fd00:60::/48"], (4, 6)),
        ("fd00:1::/127", "fd00:1::1/127", ["fd00:60::/48"], (6,)),
    ],
)
def test_a_connections_table_serves_the_ip_versions_it_has(
    address: str, other: str, routes: list[str], families: tuple[int, ...]
) -> None:
    wire = endpoint(
        address=ipaddress.ip_interface(address),
        client_address=ipaddress.ip_interface(other),
        routes=tuple(net(r) for r in routes),
    )
    p, tables = plan(wire)
    t_conn = tables.get(("connection", "conn-1"))
    assert t_conn is not None
    in_table = {o for o in p.objects if isinstance(o, Rule) and o.table == t_conn}
    assert in_table == {r for r in lookups(t_conn, families) if r.table == t_conn}
    defaults = {o for o in p.objects if isinstance(o, Route) and o.kind == "unreachable"}
    assert defaults == unreachable(t_conn, families)


def test_the_two_halves_of_a_local_connection_share_one_table() -> None:
    c, e = client(peer=None), endpoint(peer=None)
    assert wire_table(c) == wire_table(e) == ("connection", "conn-1")
    pc, tables = plan(c)
    pe = plan_wire(e, naming=NAMING, policy=POLICY, tables=tables, workload_netns="e", mtu=1420)
    t = tables.get(("connection", "conn-1"))
    assert not [o for o in (*pc.objects, *pe.objects) if isinstance(o, Allowed)]
    assert t is not None
    tables_used = {o.table for o in (*pc.objects, *pe.objects) if isinstance(o, Route | Rule)}
    assert tables_used == {t, 0}  # 0: the blackhole, goto and nop rules
    marks = {o for o in (*pc.objects, *pe.objects) if isinstance(o, Mark)}
    assert marks == {Mark(pc.veth, None, mark(t)), Mark(pe.veth, None, mark(t))}
    ledger = Ledger()
    ledger.acquire(pc.objects)
    ledger.check(pe.objects, "the other half")  # the shared defaults agree
    assert pc.veth != pe.veth


def test_overlapping_pairs_conflict_within_a_peer_only() -> None:
    tables = TableAllocator(TABLES)
    ledger = Ledger()

    def add(wire: Wire) -> None:
        tables.assign(wire_table(wire))
        p = plan_wire(
            wire, naming=NAMING, policy=POLICY, tables=tables, workload_netns="n", mtu=1420
        )
        ledger.check(p.objects, wire.connection_id)
        ledger.acquire(p.objects)

    add(client(connection_id="via-b"))
    add(client(connection_id="via-d", peer="d.example"))  # same pair, other peer: fine
    # Same pair from the same peer: the gateway could not tell the clients apart.
    with pytest.raises(WireConflict):
        add(client(connection_id="again-b"))
    # Two endpoints offering one prefix to two clients of one peer: fine.
    add(
        endpoint(
            connection_id="e1",
            address=ipaddress.ip_interface("172.16.2.0/31"),
            client_address=ipaddress.ip_interface("172.16.2.1/31"),
        )
    )
    add(
        endpoint(
            connection_id="e2",
            address=ipaddress.ip_interface("172.16.3.0/31"),
            client_address=ipaddress.ip_interface("172.16.3.1/31"),
        )
    )


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"endpoint_address": ipaddress.ip_interface("172.16.2.0/31")}, "is not in"),
        ({"endpoint_address": C}, "both ends"),
        ({"endpoint_address": ipaddress.ip_interface("fd00::/127")}, "different families"),
        ({"interface": "a-very-long-interface"}, "1 to 15"),
        ({"interface": "ns/0"}, "1 to 15"),
        ({"peer": "Not A Domain"}, "peer domain"),
        ({"mtu": 1000}, "MTU"),
        ({"connection_id": ""}, "connection id"),
        ({"routes": ("10.0.0.0/8",)}, "not a network"),
    ],
)
def test_a_malformed_wire_is_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidSpec, match=message):
        client(**changes)


def test_routes_are_canonical() -> None:
    wire = client(routes=(net("10.70.0.0/16"), OFFERED, OFFERED))
    assert wire.routes == (OFFERED, net("10.70.0.0/16"))


def test_a_peer_tunnel_is_checked() -> None:
    key = PrivateKey.generate()
    with pytest.raises(InvalidSpec, match="own public key"):
        PeerTunnel("b.example", key, key.public_key())
    with pytest.raises(InvalidSpec, match="keepalive"):
        PeerTunnel("b.example", key, PrivateKey.generate().public_key(), persistent_keepalive=-1)


def test_settings_are_checked() -> None:
    assert DataplaneSettings().tables == range(100_000, 200_000)
    with pytest.raises(ValidationError, match="prefix"):
        DataplaneSettings(prefix="much-too-long")
    with pytest.raises(ValidationError, match="reserved"):
        DataplaneSettings(table_base=250, table_count=16)
    with pytest.raises(ValidationError):
        DataplaneSettings(rule_priority=32765)
    with pytest.raises(ValidationError, match="mark_mask"):
        DataplaneSettings(mark_mask=0xFFF)


def test_the_ruleset_names_the_gateways_interfaces_and_clamps_on_request() -> None:
    text = nftables.ruleset("fgw", NAMING.patterns(), clamp_tunnels=NAMING.tunnel_pattern())
    assert "add table inet fedgw_fgw\n" in text
    for pattern in ("fgww*", "fgwc*", "fgwe*"):
        assert f'add rule inet fedgw_fgw classify iifname "{pattern}" drop\n' in text
    assert (
        'oifname "fgww*" tcp flags & (syn | rst) == syn tcp option maxseg size set rt mtu' in text
    )
    assert "delete chain" not in text
    # Applied again without clamping: the chain goes, nothing else does.
    plain = nftables.ruleset("fgw", NAMING.patterns(), clamp_tunnels=None)
    assert "maxseg" not in plain
    assert plain.endswith("delete chain inet fedgw_fgw forward\n")
    assert "delete table" not in plain and "flush table" not in plain


# --- workloads ---------------------------------------------------------------------------------


def test_a_workload_by_pid_is_its_processes_namespace() -> None:
    pid = os.getpid()
    ticks = process_start_ticks(pid)
    assert ticks is not None
    assert workload_netns(Workload(pid=pid, pid_start_ticks=ticks)) == f"/proc/{pid}/ns/net"
    assert workload_netns(Workload(pid=pid)) == f"/proc/{pid}/ns/net"
    with pytest.raises(NamespaceNotFound, match="restarted"):
        workload_netns(Workload(pid=pid, pid_start_ticks=ticks + 1))
    with pytest.raises(NamespaceNotFound):
        workload_netns(Workload(netns="fgwd-no-such-namespace"))
