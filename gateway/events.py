"""Registry and connection events (added / updated / deleted) and the bus that fans them out to
watchers. A watcher that falls too far behind is cut off with an explicit error rather
than silently missing events."""

from __future__ import annotations

import asyncio
import enum
import itertools
from collections import deque
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

from fedgw.models import Connection, Endpoint, NetworkService
from gateway.errors import EventStreamOverflow


class EventType(enum.StrEnum):
    ADDED = "added"
    UPDATED = "updated"
    DELETED = "deleted"


ResourceKind = Literal["service", "endpoint", "connection"]


class Event(BaseModel):
    """One change in the registry. ``seq`` increases by one per event of a gateway
    process; a gap seen by a watcher would mean a lost event."""

    model_config = ConfigDict(frozen=True)

    seq: int
    type: EventType
    kind: ResourceKind
    name: str
    object: NetworkService | Endpoint | Connection
    reason: str | None = None
    time: datetime


class Subscription:
    """The events of one watcher, in order."""

    def __init__(self, bus: EventBus, maxsize: int) -> None:
        self._bus = bus
        self._maxsize = maxsize
        self._items: deque[Event] = deque()
        self._wake = asyncio.Event()
        self._closed = False
        self.overflowed = False

    def _push(self, event: Event) -> None:
        if self._closed:
            return
        if len(self._items) >= self._maxsize:
            self.overflowed = True
            self._close()
            return
        self._items.append(event)
        self._wake.set()

    def _close(self) -> None:
        self._closed = True
        self._wake.set()

    async def __anext__(self) -> Event:
        """The next event. Ends (:class:`StopAsyncIteration`) when the bus closes;
        raises :class:`EventStreamOverflow` when this watcher was cut off. Safe to
        cancel (e.g. under ``asyncio.timeout``): no event is lost by that."""
        while not self._items:
            if self._closed:
                if self.overflowed:
                    raise EventStreamOverflow(
                        f"watcher fell more than {self._maxsize} events behind; watch again"
                    )
                raise StopAsyncIteration
            self._wake.clear()
            await self._wake.wait()
        return self._items.popleft()

    def __aiter__(self) -> Subscription:
        return self

    def close(self) -> None:
        self._bus._subscriptions.discard(self)
        self._close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventBus:
    def __init__(self, queue_size: int = 10_000) -> None:
        self._queue_size = queue_size
        self._subscriptions: set[Subscription] = set()
        self._seq = itertools.count(1)

    def next_seq(self) -> int:
        return next(self._seq)

    def publish(self, event: Event) -> None:
        for sub in list(self._subscriptions):
            sub._push(event)
            if sub.overflowed:
                self._subscriptions.discard(sub)

    def subscribe(self) -> Subscription:
        sub = Subscription(self, self._queue_size)
        self._subscriptions.add(sub)
        return sub

    @property
    def watchers(self) -> int:
        return len(self._subscriptions)

    def close(self) -> None:
        """End every subscription (the gateway is stopping)."""
        for sub in list(self._subscriptions):
            sub.close()
