"""The event bus: in order, to every watcher; a watcher too far behind is cut off loudly."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from fedgw.models import NetworkService
from gateway.errors import EventStreamOverflow
from gateway.events import Event, EventBus, EventType


def event(bus: EventBus, name: str) -> Event:
    now = datetime.now(UTC)
    service = NetworkService(name=name, created_at=now, updated_at=now)
    return Event(
        seq=bus.next_seq(),
        type=EventType.ADDED,
        kind="service",
        name=name,
        object=service,
        time=now,
    )


async def test_every_watcher_gets_every_event_in_order() -> None:
    bus = EventBus()
    a, b = bus.subscribe(), bus.subscribe()
    for i in range(5):
        bus.publish(event(bus, f"s{i}"))
    bus.close()
    assert [e.seq async for e in a] == [1, 2, 3, 4, 5]
    assert [e.name async for e in b] == ["s0", "s1", "s2", "s3", "s4"]


async def test_slow_watcher_is_cut_off_not_silently_skipped() -> None:
    bus = EventBus(queue_size=16)
    slow, other = bus.subscribe(), bus.subscribe()
    for i in range(16):
        bus.publish(event(bus, f"s{i}"))
    assert len([e async for e in _take(other, 16)]) == 16
    bus.publish(event(bus, "one-too-many"))
    # The slow one still gets what it had queued, then a clear error.
    got = [await anext(slow) for _ in range(16)]
    assert got[-1].name == "s15"
    with pytest.raises(EventStreamOverflow, match="watch again"):
        await anext(slow)
    assert bus.watchers == 1
    assert (await anext(other)).name == "one-too-many"


async def _take(sub: object, n: int):  # type: ignore[no-untyped-def]
    for _ in range(n):
        yield await anext(sub)  # type: ignore[call-overload]


async def test_waiting_watcher_wakes_and_can_time_out() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await anext(sub)
    waiter = asyncio.create_task(anext(sub))
    await asyncio.sleep(0)
    bus.publish(event(bus, "late"))
    assert (await waiter).name == "late"
    sub.close()
    assert bus.watchers == 0
