"""The peer table: what it stores of its calls' outcomes, and when."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from federation.models import PeerRecord
from federation.peers import CONTACT_SAVED_EVERY, PeerTable
from fedgw.clock import ManualClock, to_datetime
from fedgw.store import Record
from gateway.store.memory import MemoryStore


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.puts = 0

    async def put(self, kind: str, key: str, value: str, *, expect: int | None = None) -> Record:
        self.puts += 1
        return await super().put(kind, key, value, expect=expect)


async def stored(store: MemoryStore) -> PeerRecord:
    [record] = await store.scan(PeerTable.KIND)
    return PeerRecord.model_validate_json(record.value)


async def test_contacts_are_shown_at_once_and_stored_now_and_then_changes_of_state_at_once() -> (
    None
):
    store, clock = CountingStore(), ManualClock()
    identity = SimpleNamespace(set_bundle=lambda bundle: True, remove_bundle=lambda domain: None)
    peers = PeerTable(store, cast(Any, identity), clock)
    joined = PeerRecord(
        domain="cluster2", bundle="{}", joined_at=to_datetime(clock.now()), joined_via="token"
    )
    await peers.add(joined, cast(Any, object()))
    assert store.puts == 1

    clock.advance(1)
    await peers.contacted("cluster2")  # the first since the start: stored
    assert store.puts == 2
    for _ in range(50):  # a burst of calls: shown, not stored
        clock.advance(0.5)
        await peers.contacted("cluster2")
    assert store.puts == 2
    shown = peers.require("cluster2").last_contact
    assert shown == to_datetime(clock.now())
    assert (await stored(store)).last_contact == to_datetime(clock.now() - 25)

    await peers.contacted("cluster2", "connection refused")  # a change of state: at once
    assert store.puts == 3
    assert (await stored(store)).state == "unreachable"
    await peers.contacted("cluster2", "connection refused")  # no change: nothing
    await peers.contacted("cluster2")  # reachable again: at once
    assert store.puts == 4
    assert (await stored(store)).state == "active"

    clock.advance(CONTACT_SAVED_EVERY / 2)
    await peers.contacted("cluster2")
    assert store.puts == 4
    clock.advance(CONTACT_SAVED_EVERY / 2)
    await peers.contacted("cluster2")  # the stored contact is old enough to renew
    assert store.puts == 5
    assert (await stored(store)).last_contact == to_datetime(clock.now())

    await peers.remove("cluster2")
    await peers.contacted("cluster2")  # a call that raced a leave brings nothing back
    assert await store.scan(PeerTable.KIND) == []
