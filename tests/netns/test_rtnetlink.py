"""The rtnetlink codec: what is packed parses back to the same thing, and batches get
each request's own answer. Sockets are made in throwaway namespaces (root only)."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import platform
import time

import pytest
import uvloop

from tests.hostcheck import needs_root
from wireguard import rtnetlink as nl
from wireguard.netns import in_throwaway_netns

NETS = [ipaddress.ip_network("10.60.0.0/16"), ipaddress.ip_network("fd00:60::/64")]


def _payload(request: nl.Request) -> bytes:
    return request.body


async def _socket() -> nl.NetlinkSocket:
    """A socket in a new, empty namespace, which goes when the socket is closed."""
    return await in_throwaway_netns(nl.NetlinkSocket.open)


@pytest.mark.parametrize("dst", [*NETS, ipaddress.ip_network("0.0.0.0/0")])
@pytest.mark.parametrize("table", [254, 1000])
def test_a_route_parses_back(dst: ipaddress.IPv4Network, table: int) -> None:
    via = ipaddress.ip_address("10.0.0.1" if dst.version == 4 else "fd00::1")
    spec = nl.RouteSpec(dst, table=table, oif=7, via=via, protocol=99)
    assert nl.parse_route(_payload(nl.replace_route(spec))) == spec
    unreachable = nl.RouteSpec(dst, table=table, kind="unreachable", protocol=99)
    assert nl.parse_route(_payload(nl.replace_route(unreachable))) == unreachable


def test_a_route_of_an_unknown_type_is_refused() -> None:
    with pytest.raises(ValueError, match="route type"):
        nl.replace_route(nl.RouteSpec(NETS[0], kind="teleport"))


def test_an_ipv4_metric_parses_back_and_an_ipv6_one_is_refused() -> None:
    v4, v6 = (next(n for n in NETS if n.version == v) for v in (4, 6))
    spec = nl.RouteSpec(v4, table=100_001, kind="unreachable", protocol=99, metric=100_001)
    assert nl.parse_route(_payload(nl.replace_route(spec))) == spec
    assert nl.parse_route(_payload(nl.delete_route(spec))) == spec
    # IPv6 routes are dumped with the kernel's metric (1024 unless told): not ours.
    dumped = _payload(nl.replace_route(nl.RouteSpec(v6))) + nl.attr_u32(nl.RTA_PRIORITY, 1024)
    assert nl.parse_route(dumped) == nl.RouteSpec(v6, protocol=nl.RTPROT_BOOT)
    with pytest.raises(ValueError, match="IPv4 routes only"):
        nl.replace_route(nl.RouteSpec(v6, metric=5))


@pytest.mark.parametrize(
    "rule",
    [
        nl.Rule(1000, 4, table=1200, iif="fgw-abc", src=NETS[0], protocol=99),
        nl.Rule(1002, 6, action="blackhole", iif="fgw-abc", protocol=99),
        nl.Rule(1001, 6, table=70000, src=NETS[1]),
        nl.Rule(1000, 4, action="goto", iif="lo", target=1004, protocol=99),
        nl.Rule(1004, 6, action="nop"),
        nl.Rule(1000, 4, action="goto", fwmark=0, fwmask=0x1FFFF, target=1004),
        nl.Rule(1001, 6, table=100_005, fwmark=0x6, fwmask=0x1FFFF, protocol=99),
        nl.Rule(1002, 4, action="blackhole", fwmark=0, fwmask=0x1FFFF, invert=True),
    ],
)
def test_a_rule_parses_back(rule: nl.Rule) -> None:
    parsed = nl.parse_rule(_payload(nl.add_rule(rule)))
    assert parsed == rule
    assert parsed.protocol == rule.protocol  # not part of equality


def test_an_address_and_a_neighbour_parse_back() -> None:
    iface = ipaddress.ip_interface("fd00::3/127")
    assert nl.parse_address(_payload(nl.add_address(5, "x", iface, nodad=True))) == (5, iface)
    address = ipaddress.ip_address("172.16.1.1")
    request = nl.set_neighbour(5, "x", address, "02:aa:bb:cc:dd:ee")
    assert nl.parse_neighbour(_payload(request)) == (5, address, "02:aa:bb:cc:dd:ee", 0x80)


def test_attributes_stop_at_a_truncated_one() -> None:
    data = nl.attr_u32(1, 7) + nl.attr_str(3, "eth0")
    assert nl.parse_attrs(data) == {1: b"\x07\0\0\0", 3: b"eth0\0"}
    assert nl.parse_attrs(data[:-4]) == {1: b"\x07\0\0\0"}


@needs_root
async def test_a_batch_answers_each_request_with_its_own_reply() -> None:
    sock = await _socket()
    try:
        replies = await sock.exchange(
            [nl.get_link("lo"), nl.get_link("fgw-no-such"), nl.dump_links()]
        )
        assert [r.error for r in replies] == [0, errno.ENODEV, 0]
        assert nl.parse_link(replies[0].messages[0][1]).name == "lo"
        assert replies[1].messages == []
        assert "lo" in {nl.parse_link(p).name for _, p in replies[2].messages}
    finally:
        sock.close()


@needs_root
async def test_answers_to_an_abandoned_request_are_dropped() -> None:
    sock = await _socket()
    try:
        # As if a batch had been cancelled after sending: its answer waits in the socket.
        (leftover,) = [nl.get_link("lo")]
        seq = sock._next_seq()
        header = nl.HEADER.pack(
            nl.HEADER.size + len(leftover.body),
            leftover.type,
            nl.NLM_F_REQUEST | nl.NLM_F_ACK,
            seq,
            0,
        )
        sock._sock.send(header + leftover.body)
        (reply,) = await sock.exchange([nl.get_link("fgw-no-such")])
        assert reply.error == errno.ENODEV
        assert reply.messages == []
    finally:
        sock.close()


@needs_root
async def test_the_kernel_says_why_a_request_failed() -> None:
    sock = await _socket()
    try:
        # A route through a next hop that nothing leads to (the namespace is empty).
        via = ipaddress.ip_address("10.1.1.1")
        (reply,) = await sock.exchange([nl.replace_route(nl.RouteSpec(NETS[0], via=via))])
        assert reply.error == errno.ENETUNREACH
        assert reply.message and "gateway" in reply.message  # the extended ack's text
    finally:
        sock.close()


def _kernel() -> tuple[int, int]:
    major, minor = platform.release().split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


@needs_root
async def test_both_ends_of_a_new_veth_have_one_queue_each_way() -> None:
    """Not one per possible CPU, the kernel's default (on a one-CPU host the same)."""
    sock = await _socket()
    try:
        await sock.exchange([nl.new_veth("fgwt-a", "fgwt-b")])
        ends = await sock.exchange([nl.get_link("fgwt-a"), nl.get_link("fgwt-b")])
    finally:
        sock.close()
    for end in ends:
        attrs = nl.parse_attrs(end.messages[0][1], nl.IFINFO.size)
        queues = [nl.u32(attrs.get(k)) for k in (nl.IFLA_NUM_TX_QUEUES, nl.IFLA_NUM_RX_QUEUES)]
        assert queues == [1, 1]


@needs_root
async def test_a_new_veth_is_echoed_with_its_peers_index() -> None:
    sock = await _socket()
    try:
        (made,) = await sock.exchange([nl.new_veth("fgwt-a", "fgwt-b")])
        (peer,) = await sock.exchange([nl.get_link("fgwt-b")])
    finally:
        sock.close()
    assert made.error == 0
    if _kernel() < (6, 3):
        pytest.skip("kernels before 6.3 do not echo new links")
    [(kind, payload)] = made.messages
    echoed = nl.parse_link(payload)
    assert (kind, echoed.name, echoed.kind) == (nl.RTM_NEWLINK, "fgwt-a", "veth")
    assert echoed.peer_index == nl.parse_link(peer.messages[0][1]).index


@needs_root
def test_an_answered_batch_does_not_wait_for_the_event_loop() -> None:
    """rtnetlink answers inside the send, so a batch (a dump too) is read at once: it
    does not wait for a pass of the event loop, which under load runs other work first.
    Under uvloop, whose ``sock_recv`` always waits."""
    assert uvloop.run(_callbacks_run_during_a_batch()) == []


async def _callbacks_run_during_a_batch() -> list[str]:
    sock = await _socket()
    ran: list[str] = []
    try:
        asyncio.get_running_loop().call_soon(ran.append, "a callback")
        get, dump = await sock.exchange([nl.get_link("lo"), nl.dump_links()])
        assert (get.error, dump.error) == (0, 0)
        assert [nl.parse_link(p).name for _, p in dump.messages] == ["lo"]
        return ran.copy()  # the callback runs before the loop closes
    finally:
        sock.close()


@needs_root
def test_deleting_a_link_does_not_stop_the_event_loop() -> None:
    """The kernel sleeps while it deletes a link (RCU grace periods), inside the send:
    that send runs in a worker thread, and the loop keeps going meanwhile. Under
    uvloop, as the gateway runs (there a blocking send stops the loop; the standard
    loop happens not to show it)."""
    each, gaps = uvloop.run(_delete_links_while_ticking())
    # A blocking send would stop the loop once per deletion, four times; one long gap
    # alone is the machine (a preemption, a collection), not the send.
    stops = [gap for gap in gaps if gap >= each / 2]
    assert len(stops) <= 1, (each, stops)


async def _delete_links_while_ticking() -> tuple[float, list[float]]:
    """Seconds each of four link deletions took, and how long each pass of the loop
    took meanwhile."""
    sock = await _socket()
    gaps: list[float] = []

    async def tick() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    try:
        names = [f"fgwt-d{i}" for i in range(4)]
        for name in names:
            await sock.exchange([nl.new_veth(name, f"{name}p")])
        (dump,) = await sock.exchange([nl.dump_links()])
        links = {(link := nl.parse_link(p)).name: link.index for _, p in dump.messages}
        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0.01)
        started = time.perf_counter()
        for name in names:
            (reply,) = await sock.exchange([nl.delete_link(links[name], name)])
            assert reply.error == 0
        each = (time.perf_counter() - started) / len(names)
        ticker.cancel()
    finally:
        sock.close()
    return each, gaps
