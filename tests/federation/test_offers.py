"""Offers to a peer go out at once when nothing is in flight, and together while a call
is out; each waiter gets its own grant or error."""

from __future__ import annotations

import asyncio

import pytest

from federation.errors import BadPeerAnswer, PeerUnreachable
from federation.models import (
    ConnectionGrant,
    ConnectionOffer,
    OfferError,
    OfferResult,
    OfferResults,
    WireGuardInfo,
)
from federation.offers import OfferBatcher
from fedgw.errors import Conflict, PermissionDenied
from wireguard.keys import PrivateKey

KEY = WireGuardInfo(public_key=str(PrivateKey.generate().public_key()))


def offer(cid: str) -> ConnectionOffer:
    return ConnectionOffer(id=cid, service="vpn", wireguard=KEY)


def grant(cid: str) -> ConnectionGrant:
    return ConnectionGrant(
        id=cid,
        endpoint="e1",
        endpoint_address="172.16.1.0/31",
        client_address="172.16.1.1/31",
        routes=[],
        wireguard=KEY,
        expires_at="2030-01-01T00:00:00Z",  # type: ignore[arg-type]
    )


class FakePeer:
    """Answers each call when released; refuses ids starting with "x" or "full"."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.fail: Exception | None = None
        self.drop: set[str] = set()

    async def send(self, domain: str, offers: list[ConnectionOffer]) -> OfferResults:
        assert domain == "cluster2"
        self.calls.append([o.id for o in offers])
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        results = []
        for o in offers:
            if o.id in self.drop:
                continue
            if o.id.startswith("x"):
                error = OfferError(status=403, error="not_exported", detail=f"{o.id} refused")
                results.append(OfferResult(id=o.id, error=error))
            elif o.id.startswith("full"):
                error = OfferError(status=409, error="exhausted", detail="pool full")
                results.append(OfferResult(id=o.id, error=error))
            else:
                results.append(OfferResult(id=o.id, grant=grant(o.id)))
        return OfferResults(results=results)


async def test_an_offer_alone_leaves_at_once_and_a_burst_goes_together() -> None:
    peer = FakePeer()
    batcher = OfferBatcher(peer.send)
    assert (await batcher.offer("cluster2", offer("a1"))).id == "a1"
    peer.release.clear()
    first = asyncio.create_task(batcher.offer("cluster2", offer("b1")))
    await asyncio.sleep(0)  # b1's call is out
    rest = [asyncio.create_task(batcher.offer("cluster2", offer(f"c{i}"))) for i in range(5)]
    await asyncio.sleep(0)
    peer.release.set()
    grants = await asyncio.gather(first, *rest)
    assert [g.id for g in grants] == ["b1", "c0", "c1", "c2", "c3", "c4"]
    assert peer.calls == [["a1"], ["b1"], ["c0", "c1", "c2", "c3", "c4"]]


async def test_each_waiter_gets_its_own_answer() -> None:
    peer = FakePeer()
    peer.drop = {"lost"}
    batcher = OfferBatcher(peer.send)
    peer.release.clear()
    blocker = asyncio.create_task(batcher.offer("cluster2", offer("b0")))
    await asyncio.sleep(0)
    tasks = {
        cid: asyncio.create_task(batcher.offer("cluster2", offer(cid)))
        for cid in ("ok1", "xno", "full1", "lost")
    }
    await asyncio.sleep(0)
    peer.release.set()
    await blocker
    assert (await tasks["ok1"]).id == "ok1"
    with pytest.raises(PermissionDenied, match=r"^cluster2: xno refused") as refused:
        await tasks["xno"]
    assert refused.value.code == "not_exported"
    with pytest.raises(Conflict, match="pool full") as full:
        await tasks["full1"]
    assert full.value.code == "exhausted"
    with pytest.raises(BadPeerAnswer, match="did not answer offer lost"):
        await tasks["lost"]


async def test_a_failed_call_fails_every_offer_it_carried_and_later_ones_go_on() -> None:
    peer = FakePeer()
    batcher = OfferBatcher(peer.send, max_batch=2)
    peer.fail = PeerUnreachable("cluster2 at https://198.18.0.12:8443: refused")
    peer.release.clear()
    tasks = [asyncio.create_task(batcher.offer("cluster2", offer(f"o{i}"))) for i in range(3)]
    await asyncio.sleep(0)
    peer.release.set()
    for task in tasks:
        with pytest.raises(PeerUnreachable):
            await task
    assert peer.calls == [["o0", "o1"], ["o2"]]
    peer.fail = None
    assert (await batcher.offer("cluster2", offer("o3"))).id == "o3"


async def test_a_waiter_that_gives_up_does_not_disturb_the_others() -> None:
    peer = FakePeer()
    batcher = OfferBatcher(peer.send)
    peer.release.clear()
    blocker = asyncio.create_task(batcher.offer("cluster2", offer("b0")))
    await asyncio.sleep(0)
    quitter = asyncio.create_task(batcher.offer("cluster2", offer("q1")))
    stayer = asyncio.create_task(batcher.offer("cluster2", offer("s1")))
    await asyncio.sleep(0)
    quitter.cancel()
    peer.release.set()
    assert (await stayer).id == "s1"
    await blocker
    assert peer.calls == [["b0"], ["s1"]]  # the offer nobody waits for was not sent


async def test_close_cancels_what_waits() -> None:
    peer = FakePeer()
    batcher = OfferBatcher(peer.send)
    peer.release.clear()
    tasks = [asyncio.create_task(batcher.offer("cluster2", offer(f"o{i}"))) for i in range(3)]
    await asyncio.sleep(0)
    await batcher.close()
    for task in tasks:
        with pytest.raises(asyncio.CancelledError):
            await task
