"""Point-to-point address pairs (IPv4 /31, IPv6 /127) for connections, from an endpoint's
pool, claimed atomically in the state store so that no restart hands one out twice."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

from fedgw.errors import Conflict
from fedgw.store import ABSENT
from wireguard.errors import InvalidSpec, PoolExhausted

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

PAIR_PREFIXLEN = {4: 31, 6: 127}
"""RFC 3021 (/31) and RFC 6164 (/127): both addresses usable, nothing wasted, unlike a
/30, which spends half its addresses on network and broadcast."""

# --- what IPAM needs from the state store -------------------------------------------------


class StoredRecord(Protocol):
    @property
    def kind(self) -> str: ...
    @property
    def key(self) -> str: ...
    @property
    def value(self) -> str: ...
    @property
    def revision(self) -> int: ...


class IpamStore(Protocol):
    """The part of the revisioned key-value store that IPAM uses (:class:`fedgw.store.Store`
    has this shape). ``expect``: ``None`` writes unconditionally, ``0`` only if the key is
    absent, else only if the key's revision is that number; a mismatch raises
    :class:`fedgw.errors.Conflict` (or a subclass, such as ``StoreConflict``)."""

    async def get(self, kind: str, key: str) -> StoredRecord | None: ...

    async def scan(self, kind: str) -> Sequence[StoredRecord]: ...

    async def put(
        self, kind: str, key: str, value: str, *, expect: int | None = None
    ) -> StoredRecord: ...

    async def delete(self, kind: str, key: str, *, expect: int | None = None) -> bool: ...


class PairClaim(BaseModel):
    """The stored value of one claimed pair."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    owner: str
    allocated_at: datetime


# --- results ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AddressPair:
    """A point-to-point pair: the lower address for the endpoint (NSE) side, the higher
    one for the client (NSC) side, both with the pair's prefix length."""

    pool: Network
    network: Network
    owner: str

    @property
    def endpoint_address(self) -> Interface:
        return ipaddress.ip_interface(f"{self.network.network_address}/{self.network.prefixlen}")

    @property
    def client_address(self) -> Interface:
        return ipaddress.ip_interface(f"{self.network.broadcast_address}/{self.network.prefixlen}")


# --- interval sets over pair indexes --------------------------------------------------------


class _Ranges:
    """Disjoint, non-adjacent [start, end) ranges of integers, sorted."""

    __slots__ = ("ends", "starts")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    @classmethod
    def of(cls, intervals: Iterable[tuple[int, int]]) -> _Ranges:
        ranges = cls()
        for start, end in sorted(intervals):
            if start >= end:
                continue
            if ranges.ends and start <= ranges.ends[-1]:
                ranges.ends[-1] = max(ranges.ends[-1], end)
            else:
                ranges.starts.append(start)
                ranges.ends.append(end)
        return ranges

    def covering(self, i: int) -> int | None:
        """The index of the range that contains ``i``."""
        k = bisect_right(self.starts, i) - 1
        return k if k >= 0 and i < self.ends[k] else None

    def first_from(self, i: int) -> int | None:
        """The smallest member >= ``i``."""
        k = bisect_right(self.starts, i) - 1
        if k >= 0 and i < self.ends[k]:
            return i
        return self.starts[k + 1] if k + 1 < len(self.starts) else None

    def remove(self, i: int) -> None:
        k = self.covering(i)
        if k is None:
            raise KeyError(i)
        start, end = self.starts[k], self.ends[k]
        if start == i and end == i + 1:
            del self.starts[k], self.ends[k]
        elif start == i:
            self.starts[k] = i + 1
        elif end == i + 1:
            self.ends[k] = i
        else:
            self.ends[k] = i
            self.starts.insert(k + 1, i + 1)
            self.ends.insert(k + 1, end)

    def add(self, i: int) -> None:
        k = bisect_right(self.starts, i) - 1
        if k >= 0 and i < self.ends[k]:
            return
        joins_left = k >= 0 and self.ends[k] == i
        joins_right = k + 1 < len(self.starts) and self.starts[k + 1] == i + 1
        if joins_left and joins_right:
            self.ends[k] = self.ends[k + 1]
            del self.starts[k + 1], self.ends[k + 1]
        elif joins_left:
            self.ends[k] = i + 1
        elif joins_right:
            self.starts[k + 1] = i
        else:
            self.starts.insert(k + 1, i)
            self.ends.insert(k + 1, i + 1)

    def count(self) -> int:
        return sum(e - s for s, e in zip(self.starts, self.ends, strict=True))

    def overlap(self, other: _Ranges) -> int:
        total = 0
        for s, e in zip(other.starts, other.ends, strict=True):
            k = max(bisect_right(self.starts, s) - 1, 0)
            while k < len(self.starts) and self.starts[k] < e:
                total += max(0, min(e, self.ends[k]) - max(s, self.starts[k]))
                k += 1
        return total


@dataclass
class _Claim:
    owner: str
    revision: int


@dataclass
class _Pool:
    network: Network
    key: str
    first: int
    """First usable pair index; the pairs holding the pool's network and broadcast
    addresses are not handed out when the pool has more than two pairs (some stacks and
    middleboxes treat those addresses specially)."""
    end: int
    free: _Ranges
    cursor: int = 0
    claims: dict[int, _Claim] = field(default_factory=dict)

    @property
    def pair_prefixlen(self) -> int:
        return PAIR_PREFIXLEN[self.network.version]

    def pair(self, index: int, owner: str) -> AddressPair:
        base = int(self.network.network_address) + 2 * index
        net = ipaddress.ip_network((base, self.pair_prefixlen))
        return AddressPair(self.network, net, owner)

    def excluded(self, nets: Sequence[Network]) -> _Ranges:
        lo, hi = int(self.network.network_address), int(self.network.broadcast_address)
        spans = []
        for net in nets:
            if net.version != self.network.version:
                continue
            a, b = max(lo, int(net.network_address)), min(hi, int(net.broadcast_address))
            if a <= b:  # a pair is excluded if either of its addresses is
                spans.append(((a - lo) // 2, (b - lo) // 2 + 1))
        return _Ranges.of(spans)

    def find(self, excluded: _Ranges) -> int | None:
        """Next fit from the cursor, wrapping once: recently released pairs are reused
        last, so a stale neighbour cache or conntrack entry of a closed connection
        rarely meets its address again. O(excluded ranges * log) per call, whatever the
        number of pairs in use."""
        for lo, hi in ((self.cursor, self.end), (self.first, self.cursor)):
            found = self._first_free(max(lo, self.first), hi, excluded)
            if found is not None:
                return found
        return None

    def _first_free(self, lo: int, hi: int, excluded: _Ranges) -> int | None:
        pos = lo
        while pos < hi:
            candidate = self.free.first_from(pos)
            if candidate is None or candidate >= hi:
                return None
            k = excluded.covering(candidate)
            if k is None:
                return candidate
            pos = excluded.ends[k]  # jump over the whole excluded range at once
        return None


# --- the allocator ----------------------------------------------------------------------------


class Ipam:
    """Allocates pairs from pools; one instance per store (per gateway).

    Layout in the store: kind ``kind`` (default ``ipam``), key ``"<pool>|<pair>"`` (e.g.
    ``"172.16.0.0/16|172.16.3.4/31"``), value a :class:`PairClaim` as JSON. A pair is
    claimed with a conditional put (``expect=0``), so two allocators on one store never
    hand out the same pair, and a restarted gateway reads every claim back before its
    first allocation. In memory each pool keeps its free pairs as ranges, so allocation
    does not scan the pairs in use.

    A pool is identified by its CIDR: endpoints registering the same pool share its
    pairs; overlapping but different pools do not see each other's claims.
    """

    def __init__(self, store: IpamStore, *, kind: str = "ipam") -> None:
        self.store = store
        self.kind = kind
        self._pools: dict[str, _Pool] = {}
        self._stored: dict[str, list[tuple[int, _Claim]]] = {}
        self._owners: dict[str, dict[str, set[int]]] = {}  # owner -> pool key -> indexes
        self._pending: dict[tuple[str, str], asyncio.Future[AddressPair]] = {}
        self._loaded = False
        self._load_lock = asyncio.Lock()

    # --- loading ---------------------------------------------------------------------------

    async def _load(self) -> None:
        """Read every claim once, before the first allocation after a (re)start."""
        async with self._load_lock:  # uncontended after loading: no suspension
            if self._loaded:
                return
            for record in await self.store.scan(self.kind):
                parsed = self._parse(record)
                if parsed is not None:
                    pool, index, claim = parsed
                    self._stored.setdefault(pool, []).append((index, claim))
            self._loaded = True

    def _parse(self, record: StoredRecord) -> tuple[str, int, _Claim] | None:
        """A stored claim; a record with an unreadable value still blocks its pair (owner
        ``""``), one with an unreadable key is skipped. Neither is ever deleted."""
        try:
            pool_text, _, pair_text = record.key.partition("|")
            pool = ipaddress.ip_network(pool_text)
            pair = ipaddress.ip_network(pair_text)
        except ValueError as exc:
            log.warning("ignoring IPAM record with unreadable key %r: %s", record.key, exc)
            return None
        index = (int(pair.network_address) - int(pool.network_address)) // 2
        try:
            owner = PairClaim.model_validate_json(record.value).owner
        except ValidationError as exc:
            log.warning("IPAM record %r is unreadable; its pair stays blocked: %s", record.key, exc)
            owner = ""
        return str(pool), index, _Claim(owner, record.revision)

    def _pool(self, network: Network) -> _Pool:
        key = str(network)
        pool = self._pools.get(key)
        if pool is not None:
            return pool
        pairs = network.num_addresses // 2
        first, end = (1, pairs - 1) if pairs > 2 else (0, pairs)
        claims = dict(self._stored.pop(key, []))
        used = sorted(i for i in claims if first <= i < end)
        gaps, start = [], first
        for i in used:
            gaps.append((start, i))
            start = i + 1
        gaps.append((start, end))
        pool = _Pool(network, key, first, end, _Ranges.of(gaps), cursor=first, claims=claims)
        for index, claim in claims.items():
            if claim.owner:
                self._owners.setdefault(claim.owner, {}).setdefault(key, set()).add(index)
        if used:
            pool.cursor = used[-1] + 1 if used[-1] + 1 < end else first
        self._pools[key] = pool
        return pool

    # --- allocation ---------------------------------------------------------------------

    async def allocate(
        self, pool: Network | str, owner: str, *, exclude: Iterable[Network | str] = ()
    ) -> AddressPair:
        """A pair from ``pool`` for ``owner`` (a connection id), avoiding every pair that
        touches a prefix of ``exclude`` (the client domain's pod and service CIDRs).

        Idempotent: an owner that holds a pair of this pool gets it again (even if it
        now touches ``exclude``; release it first to move). :class:`PoolExhausted` when
        nothing is left.
        """
        network = _parse_pool(pool)
        excluded_nets = [_parse_net(n, "excluded prefix") for n in exclude]
        if not owner:
            raise InvalidSpec("an address pair needs an owner (the connection id)")
        await self._load()
        p = self._pool(network)
        held = self._owners.get(owner, {}).get(p.key)
        if held:
            return p.pair(min(held), owner)
        pending = self._pending.get((p.key, owner))
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[AddressPair] = asyncio.get_running_loop().create_future()
        self._pending[(p.key, owner)] = future
        try:
            pair = await self._claim(p, owner, excluded_nets)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: nobody else may be waiting
            raise
        finally:
            del self._pending[(p.key, owner)]
        future.set_result(pair)
        return pair

    async def _claim(self, p: _Pool, owner: str, excluded_nets: Sequence[Network]) -> AddressPair:
        excluded = p.excluded(excluded_nets)
        while True:
            index = p.find(excluded)
            if index is None:
                raise PoolExhausted(self._exhausted(p, owner, excluded, excluded_nets))
            # Taken in memory before the first await: concurrent calls pick other pairs.
            p.free.remove(index)
            p.cursor = index + 1
            pair = p.pair(index, owner)
            value = PairClaim(owner=owner, allocated_at=datetime.now(UTC)).model_dump_json()
            try:
                record = await self.store.put(self.kind, self._key(pair), value, expect=ABSENT)
            except Conflict:
                # Claimed behind our back (another allocator on this store): learn it.
                if not await self._learn(p, index):
                    continue
                held = self._owners.get(owner, {}).get(p.key)
                if held:
                    return p.pair(min(held), owner)
                continue
            except BaseException:
                p.free.add(index)
                raise
            p.claims[index] = _Claim(owner, record.revision)
            self._owners.setdefault(owner, {}).setdefault(p.key, set()).add(index)
            return pair

    async def _learn(self, p: _Pool, index: int) -> bool:
        """Record the stored claim of ``index``; False (and the pair freed again) if
        the claim is gone already."""
        record = await self.store.get(self.kind, self._key(p.pair(index, "")))
        parsed = self._parse(record) if record is not None else None
        if parsed is None:
            p.free.add(index)
            return False
        claim = parsed[2]
        p.claims[index] = claim
        if claim.owner:
            self._owners.setdefault(claim.owner, {}).setdefault(p.key, set()).add(index)
        return True

    def _key(self, pair: AddressPair) -> str:
        return f"{pair.pool}|{pair.network}"

    def _exhausted(self, p: _Pool, owner: str, excluded: _Ranges, nets: Sequence[Network]) -> str:
        total = p.end - p.first
        free = p.free.count()
        blocked = p.free.overlap(excluded)
        why = f"{total} usable /{p.pair_prefixlen} pairs, {total - free} in use"
        if blocked:
            shown = ", ".join(str(n) for n in nets[:5]) + (", ..." if len(nets) > 5 else "")
            why += f", the {blocked} free ones overlap excluded prefixes ({shown})"
        return f"address pool {p.network} has no free pair for {owner}: {why}"

    # --- release and queries -----------------------------------------------------------

    async def release(self, owner: str) -> bool:
        """Give back every pair ``owner`` holds (on connection close); False if none.
        The store forgets a pair before it may be handed out again."""
        await self._load()
        self._materialise(owner)
        held = self._owners.get(owner, {})
        released = False
        for pool_key, indexes in list(held.items()):
            p = self._pools[pool_key]
            for index in sorted(indexes):
                await self._release_one(p, index, owner)
                indexes.discard(index)
                released = True
            held.pop(pool_key, None)
        self._owners.pop(owner, None)
        return released

    async def _release_one(self, p: _Pool, index: int, owner: str) -> None:
        key = self._key(p.pair(index, owner))
        claim = p.claims.get(index)
        try:
            await self.store.delete(
                self.kind, key, expect=claim.revision if claim is not None else None
            )
        except Conflict:
            record = await self.store.get(self.kind, key)
            parsed = self._parse(record) if record is not None else None
            if parsed is not None and parsed[2].owner != owner:
                p.claims[index] = parsed[2]  # someone else's now; not ours to free
                return
            if record is not None:
                await self.store.delete(self.kind, key, expect=record.revision)
        p.claims.pop(index, None)
        if p.first <= index < p.end:
            p.free.add(index)

    def _materialise(self, owner: str) -> None:
        """Build the pools of ``owner``'s stored claims, so it can release them even if
        nothing has allocated from those pools since the restart."""
        for key, claims in list(self._stored.items()):
            if any(c.owner == owner for _, c in claims):
                self._pool(ipaddress.ip_network(key))

    async def lookup(self, owner: str) -> list[AddressPair]:
        """The pairs ``owner`` holds."""
        await self._load()
        self._materialise(owner)
        return [
            self._pools[key].pair(index, owner)
            for key, indexes in sorted(self._owners.get(owner, {}).items())
            for index in sorted(indexes)
        ]

    async def owners(self) -> set[str]:
        """Everyone holding a pair, in any pool."""
        await self._load()
        held = {o for o, pools in self._owners.items() if any(pools.values())}
        return held | {c.owner for claims in self._stored.values() for _, c in claims if c.owner}

    async def allocations(self, pool: Network | str) -> list[AddressPair]:
        """Every pair claimed from ``pool``, in address order."""
        await self._load()
        p = self._pool(_parse_pool(pool))
        return [p.pair(i, c.owner) for i, c in sorted(p.claims.items())]


def _parse_net(value: Network | str, what: str) -> Network:
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError as exc:
        raise InvalidSpec(f"{what} {value!r} is not an IP prefix: {exc}") from None


def _parse_pool(value: Network | str) -> Network:
    if isinstance(value, str):
        try:
            net = ipaddress.ip_network(value)  # strict: a pool with host bits is a typo
        except ValueError as exc:
            raise InvalidSpec(f"address pool {value!r} is not a CIDR: {exc}") from None
    else:
        net = value
    if net.prefixlen > PAIR_PREFIXLEN[net.version]:
        raise InvalidSpec(
            f"address pool {net} is too small for a /{PAIR_PREFIXLEN[net.version]} pair"
        )
    return net
