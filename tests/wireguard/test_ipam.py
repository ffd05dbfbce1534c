"""IPAM: /31 and /127 pairs, exclusions, exhaustion, persistence across restarts,
concurrent claims, and allocation speed with thousands of pairs in use."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from datetime import UTC, datetime

import pytest

from fedgw.store import Store
from gateway.store.memory import MemoryStore
from wireguard.errors import InvalidSpec, PoolExhausted
from wireguard.ipam import AddressPair, Ipam, IpamStore, PairClaim


def test_the_gateway_store_is_an_ipam_store() -> None:
    # Checked by mypy: the gateway's store satisfies IPAM's structural protocol.
    store: IpamStore = MemoryStore()
    assert store is not None


async def test_pairs_are_point_to_point_and_distinct(store: Store) -> None:
    ipam = Ipam(store)
    a = await ipam.allocate("172.16.1.0/24", "conn-a")
    b = await ipam.allocate("172.16.1.0/24", "conn-b")
    assert a.network == ipaddress.ip_network("172.16.1.2/31")  # .0/.1 skipped: network address
    assert str(a.endpoint_address) == "172.16.1.2/31"
    assert str(a.client_address) == "172.16.1.3/31"
    assert b.network == ipaddress.ip_network("172.16.1.4/31")
    v6 = await ipam.allocate("fd00:1::/64", "conn-c")
    assert v6.network.prefixlen == 127
    assert str(v6.endpoint_address) == "fd00:1::2/127"
    assert str(v6.client_address) == "fd00:1::3/127"


async def test_allocation_is_idempotent_per_owner(store: Store) -> None:
    ipam = Ipam(store)
    first = await ipam.allocate("10.9.0.0/24", "conn-a")
    assert await ipam.allocate("10.9.0.0/24", "conn-a") == first
    # Concurrent requests of one owner get one pair between them.
    pairs = await asyncio.gather(*(ipam.allocate("10.9.0.0/24", "conn-b") for _ in range(5)))
    assert len(set(pairs)) == 1
    assert len(await ipam.allocations("10.9.0.0/24")) == 2


async def test_exclusions_skip_every_pair_touching_them(store: Store) -> None:
    ipam = Ipam(store)
    exclude = ["172.16.0.0/25", "172.16.0.129/32", "fd00::/8", "10.0.0.0/8"]
    pair = await ipam.allocate("172.16.0.0/24", "c1", exclude=exclude)
    # .128/31 holds the excluded .129; the first free pair after it is .130/31.
    assert pair.network == ipaddress.ip_network("172.16.0.130/31")
    # A pool entirely inside an excluded prefix has nothing to give.
    with pytest.raises(PoolExhausted, match=r"overlap excluded prefixes \(10.0.0.0/8"):
        await ipam.allocate("10.1.0.0/30", "c2", exclude=["10.0.0.0/8"])


async def test_exhaustion_says_why(store: Store) -> None:
    ipam = Ipam(store)
    got = {await ipam.allocate("192.0.2.0/29", f"c{i}") for i in range(2)}
    assert [str(p.network) for p in sorted(got, key=lambda p: p.network)] == [
        "192.0.2.2/31",
        "192.0.2.4/31",
    ]  # .0/31 and .6/31 hold the network and broadcast addresses
    with pytest.raises(PoolExhausted) as exc:
        await ipam.allocate("192.0.2.0/29", "c9")
    assert str(exc.value) == (
        "address pool 192.0.2.0/29 has no free pair for c9: 2 usable /31 pairs, 2 in use"
    )
    assert exc.value.code == "pool_exhausted"
    assert not exc.value.retryable
    # A /31 pool is one pair, used in full.
    only = await ipam.allocate("192.0.2.8/31", "c10")
    assert only.network == ipaddress.ip_network("192.0.2.8/31")


async def test_release_frees_and_reuses_last(store: Store) -> None:
    ipam = Ipam(store)
    pool = "192.0.2.0/28"  # 6 usable pairs
    pairs = [await ipam.allocate(pool, f"c{i}") for i in range(6)]
    assert await ipam.release("c2") is True
    assert await ipam.release("c2") is False
    assert await ipam.lookup("c2") == []
    again = await ipam.allocate(pool, "c-new")
    assert again.network == pairs[2].network  # the only free one
    await ipam.release("c0")
    await ipam.release("c1")
    # Next fit: after the last allocation, c0's pair comes before c1's on wrap-around.
    assert (await ipam.allocate(pool, "x")).network == pairs[0].network


async def test_a_restart_never_hands_out_a_pair_twice(store: Store) -> None:
    ipam = Ipam(store)
    held = {await ipam.allocate("10.20.0.0/28", f"c{i}") for i in range(4)}
    await ipam.release("c1")
    fresh = Ipam(store)  # a restarted gateway: same store, empty memory
    assert {p.owner for p in await fresh.allocations("10.20.0.0/28")} == {"c0", "c2", "c3"}
    assert await fresh.lookup("c3") == [p for p in held if p.owner == "c3"]
    new = [await fresh.allocate("10.20.0.0/28", f"n{i}") for i in range(3)]
    in_use = {p.network for p in held if p.owner != "c1"}
    assert not in_use & {p.network for p in new}
    with pytest.raises(PoolExhausted):
        await fresh.allocate("10.20.0.0/28", "one-too-many")
    # Releasing after a restart works without allocating from the pool first.
    again = Ipam(store)
    assert await again.release("c0") is True
    assert [r.key for r in await store.scan("ipam")].count("10.20.0.0/28|10.20.0.2/31") == 0


async def test_two_allocators_on_one_store_never_collide(store: Store) -> None:
    """Two gateways (or a stale cache) sharing one store: the conditional put decides."""
    await Ipam(store).allocate("10.30.0.0/28", "warm-up")
    a, b = Ipam(store), Ipam(store)
    await a.allocations("10.30.0.0/28")
    await b.allocations("10.30.0.0/28")
    pa = await a.allocate("10.30.0.0/28", "from-a")
    pb = await b.allocate("10.30.0.0/28", "from-b")  # b's memory still thinks pa is free
    assert pa.network != pb.network
    assert {p.owner for p in await Ipam(store).allocations("10.30.0.0/28")} == {
        "warm-up",
        "from-a",
        "from-b",
    }
    # b learnt a's claim when it lost the race; a learns b's the same way.
    pc = await a.allocate("10.30.0.0/28", "from-a-again")
    assert pc.network not in {pa.network, pb.network}


async def test_one_hundred_concurrent_allocations_are_distinct(store: Store) -> None:
    ipam = Ipam(store)
    pairs: list[AddressPair] = await asyncio.gather(
        *(ipam.allocate("10.40.0.0/24", f"conn-{i}") for i in range(100))
    )
    assert len({p.network for p in pairs}) == 100
    assert len({p.owner for p in pairs}) == 100
    assert len(await store.scan("ipam")) == 100
    # Concurrent allocators on the same store, too.
    others = [Ipam(store) for _ in range(4)]
    more = await asyncio.gather(
        *(others[i % 4].allocate("10.40.0.0/24", f"more-{i}") for i in range(20))
    )
    assert not {p.network for p in more} & {p.network for p in pairs}
    assert len({p.network for p in more}) == 20


async def _timed_allocations(ipam: Ipam, pool: str, n: int, exclude: list[str]) -> float:
    await ipam.allocations(pool)  # load first: only allocation is timed
    started = time.perf_counter()
    for i in range(n):
        await ipam.allocate(pool, f"timed-{i}", exclude=exclude)
    return (time.perf_counter() - started) / n


async def test_allocation_cost_does_not_grow_with_the_pairs_in_use() -> None:
    """20000 pairs in use in a /16 (written straight into the store, as a restarted
    gateway finds them) cost no more per allocation than an empty pool; a scan of the
    pairs in use would make it some twenty times dearer."""
    value = PairClaim(owner="old", allocated_at=datetime.now(UTC)).model_dump_json()
    busy_store = MemoryStore()
    for i in range(1, 20001):
        net = ipaddress.ip_network((int(ipaddress.ip_address("10.0.0.0")) + 2 * i, 31))
        await busy_store.put("ipam", f"10.0.0.0/16|{net}", value)
    exclude = ["10.0.128.0/18", "192.168.0.0/16"]
    empty = await _timed_allocations(Ipam(MemoryStore()), "10.0.0.0/16", 500, exclude)
    busy = await _timed_allocations(Ipam(busy_store), "10.0.0.0/16", 500, exclude)
    assert busy < 3 * empty + 0.0002, f"{busy * 1e6:.0f} us vs {empty * 1e6:.0f} us per call"
    # Pairs freed in the middle of used ones are found without walking either.
    ipam = Ipam(busy_store)
    for i in range(1, 20001, 2):
        net = ipaddress.ip_network((int(ipaddress.ip_address("10.0.0.0")) + 2 * i, 31))
        await busy_store.delete("ipam", f"10.0.0.0/16|{net}")
    fragmented = await _timed_allocations(ipam, "10.0.0.0/16", 500, exclude)
    assert fragmented < 3 * empty + 0.0002, f"{fragmented * 1e6:.0f} us per call"


async def test_big_ipv6_pools_and_wide_exclusions_are_cheap() -> None:
    ipam = Ipam(MemoryStore())
    started = time.perf_counter()
    pair = await ipam.allocate("fd00::/48", "c", exclude=["fd00::/49"])
    assert pair.network == ipaddress.ip_network("fd00:0:0:8000::/127")
    # Milliseconds; walking the pool address by address would take longer than the run.
    assert time.perf_counter() - started < 1.0


async def test_bad_input_is_rejected() -> None:
    ipam = Ipam(MemoryStore())
    with pytest.raises(InvalidSpec, match="not a CIDR"):
        await ipam.allocate("10.0.0.1/24", "c")  # host bits: probably a typo
    with pytest.raises(InvalidSpec, match="too small"):
        await ipam.allocate("10.0.0.1/32", "c")
    with pytest.raises(InvalidSpec, match="excluded prefix"):
        await ipam.allocate("10.0.0.0/24", "c", exclude=["nonsense"])
    with pytest.raises(InvalidSpec, match="owner"):
        await ipam.allocate("10.0.0.0/24", "")


async def test_unreadable_records_are_kept_and_skipped() -> None:
    store = MemoryStore()
    await store.put("ipam", "garbage", "{}")
    await store.put("ipam", "10.50.0.0/30|10.50.0.0/31", "not json")
    ipam = Ipam(store)
    # The unreadable claim still blocks its pair: the /30 has one pair left.
    pair = await ipam.allocate("10.50.0.0/30", "c")
    assert pair.network == ipaddress.ip_network("10.50.0.2/31")
    with pytest.raises(PoolExhausted):
        await ipam.allocate("10.50.0.0/30", "d")
    # Learning about it on a conflict does not loop either.
    late = Ipam(store)
    await late.allocations("10.50.0.0/29")
    await store.put("ipam", "10.50.0.0/29|10.50.0.2/31", "not json")
    assert (await late.allocate("10.50.0.0/29", "e")).network == ipaddress.ip_network(
        "10.50.0.4/31"
    )
    with pytest.raises(PoolExhausted):
        await late.allocate("10.50.0.0/29", "f")
    assert len(await store.scan("ipam")) == 5
