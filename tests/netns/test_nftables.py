"""wireguard.nftables: the table's chains and the map elements sent over nfnetlink, in
a namespace the test creates and removes."""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import AsyncIterator

import pytest

from tests.hostcheck import host_snapshot, needs_root
from wireguard import nftables
from wireguard.errors import NetlinkFailed
from wireguard.netns import create_netns, delete_netns, run
from wireguard.nftables import Mark, Nft

pytestmark = needs_root

PATTERNS = ["fgtw*", "fgtc*", "fgte*"]


@pytest.fixture
async def ns() -> AsyncIterator[str]:
    name = f"fgwn-{secrets.token_hex(3)}"
    before = host_snapshot()
    try:
        assert await create_netns(name)
        yield name
    finally:
        await delete_netns(name)
        assert host_snapshot() == before


def _marks(n: int) -> list[Mark]:
    """``n`` marks of each kind: by interface, by interface and IPv4 or IPv6 source."""
    found = []
    for i in range(n):
        v4 = ipaddress.ip_address(int(ipaddress.ip_address("172.16.0.0")) + i)
        v6 = ipaddress.ip_address(int(ipaddress.ip_address("fd00::")) + i)
        found += [
            Mark(f"fgtc{i:011d}", None, i + 1),
            Mark("fgtwtunnel00000", v4, i + 1),
            Mark("fgtwtunnel00000", v6, 0x1FFFF - i),
        ]
    return found


async def test_marks_go_in_and_come_back_out(ns: str) -> None:
    await nftables.apply_ruleset(ns, nftables.ruleset("fgt", PATTERNS, clamp_tunnels=None))
    async with Nft(ns, "fgt") as nft:
        # More than one transaction's worth: they go in chunks.
        marks = _marks(1200)
        await nft.add(marks)
        await nft.add(marks[:5])  # again: kept as they are
        assert sorted(await nft.marks(), key=repr) == sorted(marks, key=repr)

        # Applying the chains again keeps the elements.
        script = nftables.ruleset("fgt", PATTERNS, clamp_tunnels="fgtw*")
        await nftables.apply_ruleset(ns, script)
        assert len(await nft.marks()) == len(marks)

        # A missing element does not stop the others from going.
        gone = [marks[0], Mark("fgtcnothere0000", None, 7), *marks[1500:]]
        await nft.delete(gone)
        left = await nft.marks()
        assert sorted(left, key=repr) == sorted(set(marks) - set(gone), key=repr)

    assert await nftables.remove_table(ns, "fgt")
    assert not await nftables.remove_table(ns, "fgt")
    async with Nft(ns, "fgt") as nft:
        assert await nft.marks() == []  # no table: nothing, not an error


async def test_an_element_that_contradicts_one_is_refused(ns: str) -> None:
    await nftables.apply_ruleset(ns, nftables.ruleset("fgt", PATTERNS, clamp_tunnels=None))
    async with Nft(ns, "fgt") as nft:
        await nft.add([Mark("fgtc00000000001", None, 1)])
        with pytest.raises(NetlinkFailed, match="add mark 0x2 on fgtc00000000001"):
            await nft.add([Mark("fgtc00000000001", None, 2)])
        out = await run(
            "ip", "netns", "exec", ns, "nft", "list", "map", "inet", "fedgw_fgt", "links"
        )
        assert '"fgtc00000000001" : 0x00000001' in out
