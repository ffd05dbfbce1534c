"""Connection offers to a peer, sent in bursts: while a call to the peer is out, the
offers that arrive queue up and go together in the next call. An offer that finds no
call out leaves at once, so batching never adds a wait of its own; under load, the
cost of a call (TLS, HTTP and routing on both gateways) is shared by all it carries."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from federation.errors import BadPeerAnswer
from federation.models import MAX_OFFERS, ConnectionGrant, ConnectionOffer, OfferResults
from fedgw.http import error_of

log = logging.getLogger(__name__)

Send = Callable[[str, list[ConnectionOffer]], Awaitable[OfferResults]]
_Waiting = tuple[ConnectionOffer, "asyncio.Future[ConnectionGrant]"]


class OfferBatcher:
    def __init__(self, send: Send, *, max_batch: int = MAX_OFFERS) -> None:
        self._send = send
        self._max = max_batch
        self._queues: dict[str, list[_Waiting]] = {}
        self._senders: dict[str, asyncio.Task[None]] = {}

    async def offer(self, domain: str, offer: ConnectionOffer) -> ConnectionGrant:
        """The peer's grant for ``offer``, or the error it (or the call) ended in."""
        future: asyncio.Future[ConnectionGrant] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(domain, []).append((offer, future))
        if domain not in self._senders:
            self._senders[domain] = asyncio.get_running_loop().create_task(
                self._drain(domain), name=f"fedgw-offers-{domain}"
            )
        return await future

    async def _drain(self, domain: str) -> None:
        queue = self._queues[domain]
        try:
            while queue:
                batch = [(o, f) for o, f in queue[: self._max] if not f.done()]
                del queue[: self._max]
                if batch:
                    await self._call(domain, batch)
        finally:
            self._senders.pop(domain, None)
            for _, future in self._queues.pop(domain, []):
                future.cancel()  # only when the sender itself was cancelled

    async def _call(self, domain: str, batch: list[_Waiting]) -> None:
        try:
            answer = await self._send(domain, [offer for offer, _ in batch])
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        results = {result.id: result for result in answer.results}
        for offer, future in batch:
            if future.done():
                continue  # its requester gave up; the peer's lease on it runs out
            result = results.get(offer.id)
            if result is None:
                future.set_exception(BadPeerAnswer(f"{domain} did not answer offer {offer.id}"))
            elif result.grant is not None:
                future.set_result(result.grant)
            else:
                assert result.error is not None
                e = result.error
                future.set_exception(
                    error_of(e.status, e.error, e.detail, retryable=e.retryable, source=domain)
                )

    async def close(self) -> None:
        """Stop sending; offers still waiting are cancelled."""
        senders = list(self._senders.values())
        for task in senders:
            task.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
        # A sender cancelled before it ran never got to cancel its queue.
        for queue in self._queues.values():
            for _, future in queue:
                future.cancel()
        self._queues.clear()
        self._senders.clear()
