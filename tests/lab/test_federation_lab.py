"""Federation inside the lab, as the issue checks it: real gateways in their own
network namespaces, one of them behind NAT, joined with the CLI."""

from __future__ import annotations

import json

import pytest

from clusters.lab import Lab
from tests.hostcheck import needs_root

pytestmark = needs_root


async def fedgw(lab: Lab, cluster: str, *args: str, check: bool = True) -> tuple[int, str, str]:
    return await lab.run(cluster, "fedgw", *args, check=check)


@pytest.mark.lab(clusters=3, nat=["cluster3"])
async def test_join_in_the_lab_including_a_nat_cluster(lab: Lab) -> None:
    _, token, _ = await fedgw(lab, "cluster2", "token", "create", "--ttl", "10m")
    await fedgw(lab, "cluster1", "join", token.strip())
    _, peers1, _ = await fedgw(lab, "cluster1", "peers", "--json")
    _, peers2, _ = await fedgw(lab, "cluster2", "peers", "--json")
    assert [p["domain"] for p in json.loads(peers1)] == ["cluster2"]
    assert [p["domain"] for p in json.loads(peers2)] == ["cluster1"]
    assert json.loads(peers2)[0]["url"] == "https://198.18.0.11:8443"

    code, _, err = await fedgw(lab, "cluster3", "join", token.strip(), check=False)
    assert code == 1
    assert "used already" in err

    await fedgw(lab, "cluster2", "ns", "register", "vpn-gateway", "--export", "cluster1")
    await fedgw(lab, "cluster2", "ns", "register", "private")
    _, listed, _ = await fedgw(lab, "cluster1", "ns", "list", "--domain", "cluster2", "--json")
    assert [s["name"] for s in json.loads(listed)] == ["vpn-gateway"]

    # cluster3, behind NAT, joins cluster1: it advertises its router's public address,
    # whose forwarded ports let cluster1 call it back.
    _, token3, _ = await fedgw(lab, "cluster1", "token", "create")
    await fedgw(lab, "cluster3", "join", token3.strip())
    _, peers1, _ = await fedgw(lab, "cluster1", "peers", "--json")
    by_domain = {p["domain"]: p for p in json.loads(peers1)}
    assert by_domain["cluster3"]["url"] == "https://198.18.0.13:8443"
    await fedgw(lab, "cluster3", "ns", "register", "behind-nat", "--export", "*")
    _, listed, _ = await fedgw(lab, "cluster1", "ns", "list", "--domain", "cluster3", "--json")
    assert [s["name"] for s in json.loads(listed)] == ["behind-nat"]
