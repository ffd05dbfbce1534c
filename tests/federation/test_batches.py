"""Calls that carry many items (offers here): an item goes out at once when nothing is
in flight, and together with others while a call is out; each waiter gets its own
outcome. And closes: batched, or one by one to a peer that does not batch them."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from federation.batches import offer_outcomes, send_closes
from federation.errors import BadPeerAnswer, PeerUnreachable
from federation.models import (
    ConnectionGrant,
    ConnectionOffer,
    OfferError,
    OfferResult,
    OfferResults,
    WireGuardInfo,
)
from fedgw.batches import Batcher
from fedgw.errors import Conflict, FedgwError, NotFound, PermissionDenied
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

    async def send(
        self, domain: str, offers: list[ConnectionOffer]
    ) -> list[ConnectionGrant | Exception]:
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
        return offer_outcomes(domain, offers, OfferResults(results=results))


async def test_an_offer_alone_leaves_at_once_and_a_burst_goes_together() -> None:
    peer = FakePeer()
    batcher = Batcher(peer.send, 64)
    assert (await batcher.submit("cluster2", offer("a1"))).id == "a1"
    peer.release.clear()
    first = asyncio.create_task(batcher.submit("cluster2", offer("b1")))
    await asyncio.sleep(0)  # b1's call is out
    rest = [asyncio.create_task(batcher.submit("cluster2", offer(f"c{i}"))) for i in range(5)]
    await asyncio.sleep(0)
    peer.release.set()
    grants = await asyncio.gather(first, *rest)
    assert [g.id for g in grants] == ["b1", "c0", "c1", "c2", "c3", "c4"]
    assert peer.calls == [["a1"], ["b1"], ["c0", "c1", "c2", "c3", "c4"]]


async def test_waiting_for_the_batcher_waits_for_later_items_too_and_cancels_nothing() -> None:
    peer = FakePeer()
    batcher = Batcher(peer.send, 64)
    peer.release.clear()
    first = asyncio.create_task(batcher.submit("cluster2", offer("a1")))
    await asyncio.sleep(0)  # a1's call is out
    later = asyncio.create_task(batcher.submit("cluster2", offer("a2")))
    waiting = asyncio.create_task(batcher.wait())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    waiting.cancel()  # giving up the wait leaves the calls alone
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    waiting = asyncio.create_task(batcher.wait())
    await asyncio.sleep(0)
    peer.release.set()
    await waiting
    assert first.done() and later.done()
    assert [first.result().id, later.result().id] == ["a1", "a2"]
    assert peer.calls == [["a1"], ["a2"]]
    await batcher.wait()  # nothing out: at once


async def test_waiting_for_the_batcher_covers_calls_that_start_while_it_waits() -> None:
    releases = {"cluster2": asyncio.Event(), "cluster3": asyncio.Event()}

    async def send(domain: str, items: list[str]) -> list[str]:
        await releases[domain].wait()
        return items

    batcher: Batcher[str, str] = Batcher(send, 64)
    first = asyncio.create_task(batcher.submit("cluster2", "a"))
    await asyncio.sleep(0)
    waiting = asyncio.create_task(batcher.wait())
    await asyncio.sleep(0)
    other = asyncio.create_task(batcher.submit("cluster3", "b"))  # a call of its own
    await asyncio.sleep(0)
    releases["cluster2"].set()
    await first
    await asyncio.sleep(0.01)
    assert not waiting.done()  # the call to cluster3 is still out
    releases["cluster3"].set()
    await waiting
    assert other.done() and other.result() == "b"


async def test_each_waiter_gets_its_own_answer() -> None:
    peer = FakePeer()
    peer.drop = {"lost"}
    batcher = Batcher(peer.send, 64)
    peer.release.clear()
    blocker = asyncio.create_task(batcher.submit("cluster2", offer("b0")))
    await asyncio.sleep(0)
    tasks = {
        cid: asyncio.create_task(batcher.submit("cluster2", offer(cid)))
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
    batcher = Batcher(peer.send, 2)
    peer.fail = PeerUnreachable("cluster2 at https://198.18.0.12:8443: refused")
    peer.release.clear()
    tasks = [asyncio.create_task(batcher.submit("cluster2", offer(f"o{i}"))) for i in range(3)]
    await asyncio.sleep(0)
    peer.release.set()
    for task in tasks:
        with pytest.raises(PeerUnreachable):
            await task
    assert peer.calls == [["o0", "o1"], ["o2"]]
    peer.fail = None
    assert (await batcher.submit("cluster2", offer("o3"))).id == "o3"


async def test_a_waiter_that_gives_up_does_not_disturb_the_others() -> None:
    peer = FakePeer()
    batcher = Batcher(peer.send, 64)
    peer.release.clear()
    blocker = asyncio.create_task(batcher.submit("cluster2", offer("b0")))
    await asyncio.sleep(0)
    quitter = asyncio.create_task(batcher.submit("cluster2", offer("q1")))
    stayer = asyncio.create_task(batcher.submit("cluster2", offer("s1")))
    await asyncio.sleep(0)
    quitter.cancel()
    peer.release.set()
    assert (await stayer).id == "s1"
    await blocker
    assert peer.calls == [["b0"], ["s1"]]  # the offer nobody waits for was not sent


async def test_close_cancels_what_waits() -> None:
    peer = FakePeer()
    batcher = Batcher(peer.send, 64)
    peer.release.clear()
    tasks = [asyncio.create_task(batcher.submit("cluster2", offer(f"o{i}"))) for i in range(3)]
    await asyncio.sleep(0)
    await batcher.close()
    for task in tasks:
        with pytest.raises(asyncio.CancelledError):
            await task


class ClosingPeer:
    """A peer's federation API for closes: batched, or (``old``) one DELETE each."""

    def __init__(self, *, old: bool = False, known: frozenset[str] = frozenset()) -> None:
        self.old = old
        self.known = known
        self.calls: list[tuple[str, str]] = []

    async def call(self, domain: str, method: str, path: str, **kwargs: Any) -> Any:
        assert domain == "cluster2"
        self.calls.append((method, path))
        if method == "POST" and path == "/federation/v1/connections/close":
            if self.old:
                error = FedgwError("cluster2: Method Not Allowed")
                error.code = "method_not_allowed"
                raise error
            ids = kwargs["json"]["ids"]
            return {
                "closed": [i for i in ids if i in self.known],
                "unknown": [i for i in ids if i not in self.known],
            }
        assert method == "DELETE" and self.old
        cid = path.rsplit("/", 1)[1]
        if cid not in self.known:
            raise NotFound(f"cluster2: no connection {cid!r}")
        return None


async def test_closes_go_in_one_call_and_unknown_ones_are_named() -> None:
    peer = ClosingPeer(known=frozenset({"a", "b"}))
    outcomes = await send_closes(peer.call, "cluster2", ["a", "zz", "b"])
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], NotFound) and "zz" in str(outcomes[1])
    assert peer.calls == [("POST", "/federation/v1/connections/close")]


async def test_a_peer_without_batched_closes_gets_one_call_per_connection() -> None:
    peer = ClosingPeer(old=True, known=frozenset({"a"}))
    outcomes = await send_closes(peer.call, "cluster2", ["a", "zz"])
    assert outcomes[0] is None and isinstance(outcomes[1], NotFound)
    assert peer.calls[1:] == [
        ("DELETE", "/federation/v1/connections/a"),
        ("DELETE", "/federation/v1/connections/zz"),
    ]


async def test_a_close_call_that_fails_fails_its_closes() -> None:
    async def unreachable(domain: str, method: str, path: str, **kwargs: Any) -> Any:
        raise PeerUnreachable("cluster2 at https://198.18.0.12:8443: refused")

    batcher: Batcher[str, None] = Batcher(
        lambda domain, ids: send_closes(unreachable, domain, ids), 64
    )
    with pytest.raises(PeerUnreachable):
        await batcher.submit("cluster2", "a")


async def test_with_two_calls_allowed_the_second_item_does_not_wait_for_the_first() -> None:
    peer = FakePeer()
    peer.release.clear()
    batcher = Batcher(peer.send, 64, calls=2)

    async def settle() -> None:
        for _ in range(3):
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(batcher.submit("cluster2", offer("o0")))]
    await settle()
    tasks.append(asyncio.create_task(batcher.submit("cluster2", offer("o1"))))
    await settle()
    assert peer.calls == [["o0"], ["o1"]]  # both out at once
    tasks += [asyncio.create_task(batcher.submit("cluster2", offer(f"o{i}"))) for i in (2, 3, 4)]
    await settle()
    assert len(peer.calls) == 2  # no third call while two are out
    peer.release.set()
    assert [g.id for g in await asyncio.gather(*tasks)] == ["o0", "o1", "o2", "o3", "o4"]
    assert peer.calls[2:] == [["o2", "o3", "o4"]]
    await batcher.close()
