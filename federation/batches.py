"""Calls to a peer that carry many items (connection offers, closes), sent in bursts by a
:class:`fedgw.batches.Batcher`: under load, the cost of a call (TLS, HTTP and routing on
both gateways) is shared by all it carries. Here: what the answers mean for each item."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

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
