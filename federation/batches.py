"""Calls to a peer that carry many items (connection offers, closes), sent in bursts:
while as many calls to the peer are out as may be, the items that arrive queue up and go
together in the next call. An item that finds a call free leaves at once, so batching
never adds a wait of its own; under load, the cost of a call (TLS, HTTP and routing on
both gateways) is shared by all it carries."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from federation.errors import BadPeerAnswer
from federation.models import (
    ClosedConnections,
    ConnectionCloses,
    ConnectionGrant,
    ConnectionOffer,
    OfferResults,
    parse_answer,
)
from fedgw.errors import FedgwError, NotFound
from fedgw.http import error_of

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """``send(domain, items)`` makes one call and gives each item's outcome, in the
    items' order: its result, or the exception it failed with alone. At most ``calls``
    calls to a domain are out at once: one where the peer's work is CPU (offers: more
    calls would only share it), more where it mostly waits (closes wait for the kernel),
    so that a call does not hold the next batch back for that wait."""

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

    async def submit(self, domain: str, item: T) -> R:
        """The outcome of ``item``, or the error it (or the call) ended in."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(domain, []).append((item, future))
        senders = self._senders.setdefault(domain, set())
        if len(senders) < self._calls:
            senders.add(
                asyncio.get_running_loop().create_task(
                    self._drain(domain), name=f"fedgw-calls-{domain}"
                )
            )
        return await future

    async def _drain(self, domain: str) -> None:
        queue = self._queues[domain]
        try:
            while queue:
                batch = [(i, f) for i, f in queue[: self._max] if not f.done()]
                del queue[: self._max]
                if batch:
                    await self._call(domain, batch)
        finally:
            senders = self._senders[domain]
            senders.discard(asyncio.current_task())
            if not senders:
                del self._senders[domain]
                for _, future in self._queues.pop(domain, []):
                    future.cancel()  # only when the senders themselves were cancelled

    async def _call(self, domain: str, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            outcomes = await self._send(domain, [item for item, _ in batch])
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


def offer_outcomes(
    domain: str, offers: list[ConnectionOffer], answer: OfferResults
) -> list[ConnectionGrant | Exception]:
    """Each offer's grant, or the error the peer refused it with, in the offers' order."""
    results = {result.id: result for result in answer.results}
    outcomes: list[ConnectionGrant | Exception] = []
    for offer in offers:
        result = results.get(offer.id)
        if result is None:
            outcomes.append(BadPeerAnswer(f"{domain} did not answer offer {offer.id}"))
        elif result.grant is not None:
            outcomes.append(result.grant)
        else:
            assert result.error is not None
            e = result.error
            outcomes.append(
                error_of(e.status, e.error, e.detail, retryable=e.retryable, source=domain)
            )
    return outcomes


Call = Callable[..., Awaitable[Any]]
"""``call(domain, method, path, json=...)``: a call to a peer's federation API."""


async def send_closes(call: Call, domain: str, ids: list[str]) -> list[Exception | None]:
    """Close the connections ``ids`` on ``domain``'s side in one call; for each, None or
    the error (NotFound if the peer has no such connection of ours)."""
    body = ConnectionCloses(ids=ids).model_dump(mode="json")
    try:
        answer = await call(domain, "POST", "/federation/v1/connections/close", json=body)
    except FedgwError as exc:
        if exc.code != "method_not_allowed":
            raise
        # A peer from before closes were batched: one call per connection.
        return list(await asyncio.gather(*(_close_one(call, domain, cid) for cid in ids)))
    closed = set(parse_answer(ClosedConnections, answer, domain).closed)
    return [
        None if cid in closed else NotFound(f"{domain} has no connection {cid} of ours")
        for cid in ids
    ]


async def _close_one(call: Call, domain: str, connection_id: str) -> Exception | None:
    try:
        await call(domain, "DELETE", f"/federation/v1/connections/{connection_id}")
    except FedgwError as exc:
        return exc
    return None
