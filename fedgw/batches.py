"""Work on many items done in bursts: while as many calls for a key are out as may be,
the items that arrive queue up and go together in the next call. An item that finds a
call free leaves at once, so batching never adds a wait of its own; under load, the
fixed cost of a call is shared by all it carries. Calls to a peer carry connection
offers and closes this way; the data plane attaches wires and deletes veth pairs this
way."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """``send(key, items)`` makes one call and gives each item's outcome, in the items'
    order: its result, or the exception it failed with alone. At most ``calls`` calls
    for a key (a peer's domain, a namespace) are out at once: one where the work is CPU
    (more calls would only share it), more where it mostly waits, so that a call does
    not hold the next batch back for that wait."""

    def __init__(
        self,
        send: Callable[[str, list[T]], Awaitable[Sequence[R | Exception]]],
        max_batch: int,
        *,
        calls: int = 1,
    ) -> None:
        self._send = send
        self._max = max_batch
        self._calls = calls
        self._queues: dict[str, list[tuple[T, asyncio.Future[R]]]] = {}
        self._senders: dict[str, set[asyncio.Task[None]]] = {}

    async def submit(self, key: str, item: T) -> R:
        """The outcome of ``item``, or the error it (or the call) ended in."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(key, []).append((item, future))
        senders = self._senders.setdefault(key, set())
        if len(senders) < self._calls:
            senders.add(
                asyncio.get_running_loop().create_task(self._drain(key), name=f"fedgw-batch-{key}")
            )
        return await future

    async def _drain(self, key: str) -> None:
        queue = self._queues[key]
        try:
            while queue:
                batch = [(i, f) for i, f in queue[: self._max] if not f.done()]
                del queue[: self._max]
                if batch:
                    await self._call(key, batch)
        finally:
            senders = self._senders[key]
            senders.discard(asyncio.current_task())
            if not senders:
                del self._senders[key]
                for _, future in self._queues.pop(key, []):
                    future.cancel()  # only when the senders themselves were cancelled

    async def _call(self, key: str, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            outcomes = await self._send(key, [item for item, _ in batch])
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            outcomes = [exc] * len(batch)
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():
                continue  # its requester gave up (a granted offer's lease runs out)
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    async def wait(self) -> None:
        """Until every item submitted so far, and any submitted meanwhile, has its
        outcome. Cancelling the wait cancels no call."""
        while senders := [task for tasks in self._senders.values() for task in tasks]:
            await asyncio.wait(senders)

    async def close(self) -> None:
        """Stop sending; items still waiting are cancelled."""
        senders = [task for tasks in self._senders.values() for task in tasks]
        for task in senders:
            task.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
        # A sender cancelled before it ran never got to cancel its queue.
        for queue in self._queues.values():
            for _, future in queue:
                future.cancel()
        self._queues.clear()
        self._senders.clear()
