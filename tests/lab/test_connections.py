"""Connections end to end in the lab: real gateways, real WireGuard (wireguard-go), real
packets between workload namespaces; healing when endpoints, gateways or leases go."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from clusters.lab import Lab, spawn_in_netns, wait_exited
from clusters.pytest_plugin import LabFactory
from tests.hostcheck import host_snapshot, needs_root
from wireguard.netns import Rtnl, set_sysctl

pytestmark = needs_root
T = TypeVar("T")

INTRANET = "10.60.0.0/16"
SERVER = "10.60.0.10"


async def fedgw(lab: Lab, cluster: str, *args: str) -> Any:
    """``fedgw ARGS --json`` inside a cluster, parsed."""
    _, out, _ = await lab.run(cluster, "fedgw", *args, "--json")
    return json.loads(out)


async def fails(lab: Lab, cluster: str, *args: str) -> str:
    code, _, err = await lab.run(cluster, "fedgw", *args, check=False)
    assert code == 1, err
    assert "Traceback" not in err
    return err


async def join(lab: Lab, client: str, server: str) -> None:
    _, token, _ = await lab.run(server, "fedgw", "token", "create")
    await lab.run(client, "fedgw", "join", token.strip())


async def endpoint(
    lab: Lab, cluster: str, name: str, service: str, pool: str, *, export: str = "*",
    intranet: bool = True,
) -> str:  # fmt: skip
    """An endpoint workload serving ``service``, with an HTTP server behind it (10.60/16)."""
    ns = await lab.add_workload(cluster, name)
    await lab.run(cluster, "fedgw", "ns", "register", service, "--export", export)
    if intranet:
        server_ns = await lab.add_workload(cluster, f"{name}-net")
        async with Rtnl(ns) as rtnl:
            await rtnl.add_veth("intra0", "eth0", server_ns)
            await rtnl.set_link("intra0", up=True)
            await rtnl.add_address("intra0", "10.60.0.1/16")
        async with Rtnl(server_ns) as rtnl:
            await rtnl.set_link("eth0", up=True)
            await rtnl.add_address("eth0", f"{SERVER}/16")
            await rtnl.add_route("0.0.0.0/0", via="10.60.0.1")
        await set_sysctl(ns, "net.ipv4.ip_forward", "1")
        page = lab.layout.dir / f"{cluster}-{name}"
        page.mkdir(exist_ok=True)
        (page / "index.html").write_text(f"served by {name} in {cluster}\n")
        await spawn_in_netns(
            server_ns,
            ["python3", "-m", "http.server", "80", "--bind", SERVER, "--directory", str(page)],
            lab.layout.dir / f"{cluster}-{name}-http.log",
        )
    await lab.run(
        cluster, "fedgw", "nse", "register", name, "--service", service, "--pool", pool,
        "--route", INTRANET, "--netns", ns, "--label", f"name={name}",
    )  # fmt: skip
    return ns


async def request(lab: Lab, cluster: str, service: str, client: str = "client", *extra: str) -> Any:
    ns = await lab.add_workload(cluster, client)
    return await fedgw(lab, cluster, "request", service, "--netns", ns, *extra)


async def ping(lab: Lab, cluster: str, address: str, client: str = "client") -> bool:
    code, _, _ = await lab.run(
        cluster, "ping", "-c", "1", "-W", "2", address, workload=client, check=False
    )
    return code == 0


async def http_get(lab: Lab, cluster: str, client: str = "client") -> str:
    for _ in range(30):  # the server may still be starting
        code, out, _ = await lab.run(
            cluster, "curl", "-s", "-m", "3", f"http://{SERVER}/", workload=client, check=False
        )
        if code == 0:
            return out
        await asyncio.sleep(0.2)
    raise AssertionError(f"no HTTP answer from {SERVER} in {cluster}/{client}")


async def eventually(probe: Callable[[], Awaitable[T | None]], within: float, what: str) -> T:
    """Poll ``probe`` until it gives something: other processes' state has no event."""
    try:
        async with asyncio.timeout(within):
            while (result := await probe()) is None:  # noqa: ASYNC110 - other processes
                await asyncio.sleep(0.3)
    except TimeoutError:
        raise AssertionError(f"not within {within}s: {what}") from None
    return result


async def wait_state(lab: Lab, cluster: str, cid: str, state: str, within: float = 30) -> Any:
    async def probe() -> Any:
        listed = {c["id"]: c for c in await fedgw(lab, cluster, "connections")}
        found = listed.get(cid)
        return found if found is not None and found["state"] == state else None

    return await eventually(probe, within, f"connection {cid} {state} in {cluster}")


async def dataplane(lab: Lab, cluster: str) -> Any:
    return (await fedgw(lab, cluster, "status"))["dataplane"]


@pytest.mark.lab(clusters=2)
async def test_request_ping_and_http_across_domains(lab: Lab) -> None:
    assert await dataplane(lab, "cluster1") is None  # nothing to connect: untouched
    await join(lab, "cluster1", "cluster2")
    await endpoint(lab, "cluster2", "vpn-gw-1", "vpn-gateway", "172.16.1.0/24", export="cluster1")
    # Both gateways open their data plane, and start the tunnel to the other, ahead of
    # the first connection; the tunnel has no peer until that connection brings the key.
    for cluster, other in (("cluster1", "cluster2"), ("cluster2", "cluster1")):

        async def tunnels(cluster: str = cluster) -> Any:
            state = await dataplane(lab, cluster)
            return state["tunnels"] if state is not None and state["tunnels"] else None

        (early,) = await eventually(tunnels, 30, f"{cluster}'s tunnel to {other}")
        assert (early["domain"], early["public_key"], early["error"]) == (other, None, None)
        _, shown, _ = await lab.run(cluster, "fedgw", "status")
        assert "(no connection yet)" in shown
    conn = await request(lab, "cluster1", "vpn-gateway@cluster2")
    assert conn["state"] == "up"
    assert conn["client"]["interface"] == "nsm0"
    assert conn["routes"] == [INTRANET]
    endpoint_ip = conn["server"]["address"].split("/")[0]
    assert await ping(lab, "cluster1", endpoint_ip)
    assert await ping(lab, "cluster1", SERVER)
    assert "served by vpn-gw-1 in cluster2" in await http_get(lab, "cluster1")
    # both sides list it; the serving side with the client's domain
    (served,) = await fedgw(lab, "cluster2", "connections")
    assert (served["id"], served["state"], served["client"]["domain"]) == (
        conn["id"],
        "up",
        "cluster1",
    )
    status = await fedgw(lab, "cluster1", "status")
    assert status["connections"]["up"] == 1
    (tunnel,) = status["dataplane"]["tunnels"]
    assert tunnel["domain"] == "cluster2"
    assert tunnel["last_handshake"] is not None
    # The node's namespace is the gateway's alone once its uplink is made: the lab runs
    # gateways with --ipv6-as-needed. Links made since (the tunnel, the IPv4 wire's end)
    # start without IPv6, the gateway turns it on for the tunnel; the uplink keeps it.
    _, out, _ = await lab.run("cluster1", "ip", "-j", "link", "show", "type", "veth")
    (wire_end,) = {link["ifname"] for link in json.loads(out)} - {"uplink"}
    ipv6_off = [
        (await lab.run("cluster1", "sysctl", "-n", f"net.ipv6.conf.{link}.disable_ipv6"))[1]
        for link in ("default", "uplink", tunnel["interface"], wire_end)
    ]
    assert ipv6_off == ["1\n", "0\n", "0\n", "1\n"]
    # close removes both sides
    await lab.run("cluster1", "fedgw", "close", conn["id"])
    assert await fedgw(lab, "cluster1", "connections") == []
    assert await fedgw(lab, "cluster2", "connections") == []
    assert not await ping(lab, "cluster1", SERVER)


@pytest.mark.lab(clusters=2)
async def test_own_domain_reference_and_export_policy(lab: Lab) -> None:
    await join(lab, "cluster1", "cluster2")
    await endpoint(lab, "cluster1", "local-gw", "local-svc", "172.20.0.0/24")
    # name@<own domain> is the same as name: a local connection, no tunnel
    conn = await request(lab, "cluster1", "local-svc@cluster1")
    assert conn["state"] == "up"
    assert conn["service"] == "local-svc"
    assert await ping(lab, "cluster1", SERVER)
    conn2 = await request(lab, "cluster1", "local-svc", "client2")
    assert conn2["client"]["address"] != conn["client"]["address"]
    assert await ping(lab, "cluster1", SERVER, "client2")
    # not exported to cluster1: refused, and nothing is left behind
    await endpoint(
        lab, "cluster2", "private-gw", "private", "172.21.0.0/24", export="cluster9", intranet=False
    )
    ns = await lab.add_workload("cluster1", "client3")
    err = await fails(lab, "cluster1", "request", "private@cluster2", "--netns", ns)
    assert "not exported to cluster1" in err
    assert [c["service"] for c in await fedgw(lab, "cluster1", "connections")] == [
        "local-svc",
        "local-svc",
    ]
    assert await fedgw(lab, "cluster2", "connections") == []


@pytest.mark.lab(clusters=2, nat=["cluster1"])
async def test_a_client_cluster_behind_nat(lab: Lab) -> None:
    await join(lab, "cluster1", "cluster2")
    await endpoint(lab, "cluster2", "vpn-gw-1", "vpn-gateway", "172.16.1.0/24")
    conn = await request(lab, "cluster1", "vpn-gateway@cluster2")
    assert conn["state"] == "up"
    assert "served by vpn-gw-1" in await http_get(lab, "cluster1")
    # cluster2 learnt cluster1's address from its packets: the NAT router's
    status = await fedgw(lab, "cluster2", "status")
    assert status["dataplane"]["tunnels"][0]["endpoint"].startswith("198.18.0.11:")


@pytest.mark.lab(clusters=3)
async def test_two_peers_with_overlapping_pools_at_once(lab: Lab) -> None:
    await join(lab, "cluster1", "cluster2")
    await join(lab, "cluster1", "cluster3")
    # Same pool, same intranet prefix, same server address, in both peers.
    await endpoint(lab, "cluster2", "gw-two", "vpn", "172.16.1.0/24")
    await endpoint(lab, "cluster3", "gw-three", "vpn", "172.16.1.0/24")
    a = await request(lab, "cluster1", "vpn@cluster2", "client-a")
    b = await request(lab, "cluster1", "vpn@cluster3", "client-b")
    assert a["client"]["address"] == b["client"]["address"]  # overlapping, on purpose
    for _ in range(3):  # both at once, alternating
        assert "served by gw-two in cluster2" in await http_get(lab, "cluster1", "client-a")
        assert "served by gw-three in cluster3" in await http_get(lab, "cluster1", "client-b")


@pytest.mark.lab(clusters=2)
async def test_endpoint_deleted_heals_onto_another(lab: Lab) -> None:
    await join(lab, "cluster1", "cluster2")
    await endpoint(lab, "cluster2", "gw-a", "vpn", "172.16.1.0/24")
    conn = await request(lab, "cluster1", "vpn@cluster2")
    first = conn["server"]["endpoint"]
    second = "gw-b" if first == "gw-a" else "gw-a"
    if second == "gw-b":
        await endpoint(lab, "cluster2", "gw-b", "vpn", "172.16.2.0/24")
    await lab.run("cluster2", "fedgw", "nse", "delete", first)

    async def moved() -> Any:
        current = await wait_state(lab, "cluster1", conn["id"], "up")
        return current if current["server"]["endpoint"] == second else None

    await eventually(moved, 30, f"connection healed onto {second}")
    assert f"served by {second}" in await http_get(lab, "cluster1")


@pytest.mark.lab(clusters=2)
async def test_serving_gateway_killed_and_restarted(lab: Lab) -> None:
    await join(lab, "cluster1", "cluster2")
    await endpoint(lab, "cluster2", "vpn-gw-1", "vpn", "172.16.1.0/24")
    conn = await request(lab, "cluster1", "vpn@cluster2")
    assert await ping(lab, "cluster1", SERVER)
    pid = (await lab.status()).clusters[1].gateway_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await asyncio.sleep(0.5)
    await lab.up(2)  # restarts the dead gateway
    up = await wait_state(lab, "cluster1", conn["id"], "up")
    assert up["id"] == conn["id"]
    (served,) = await fedgw(lab, "cluster2", "connections")
    assert served["id"] == conn["id"]
    assert "served by vpn-gw-1" in await http_get(lab, "cluster1")


@pytest.mark.lab(clusters=2, gateway_args=["--connection-lease", "3s", "--log-level", "debug"])
async def test_leases_are_refreshed_and_connections_outlive_them(lab: Lab) -> None:
    await join(lab, "cluster1", "cluster2")
    await endpoint(lab, "cluster2", "vpn-gw-1", "vpn", "172.16.1.0/24", intranet=False)
    started = time.monotonic()
    conns = [await request(lab, "cluster1", "vpn@cluster2", f"c{i}") for i in range(3)]
    served = {c["id"]: c for c in await fedgw(lab, "cluster2", "connections")}
    await asyncio.sleep(7.5)  # two and a half leases: only refreshes keep them
    now_served = {c["id"]: c for c in await fedgw(lab, "cluster2", "connections")}
    assert set(now_served) == {c["id"] for c in conns}
    for cid, before in served.items():
        assert now_served[cid]["expires_at"] > before["expires_at"]
    states = {c["id"]: c["state"] for c in await fedgw(lab, "cluster1", "connections")}
    assert states == {c["id"]: "up" for c in conns}
    # A round a second (a third of the lease), each one call for all three: a call per
    # connection would make three times as many.
    calls = lab.layout.log("cluster2").read_text().count("POST /federation/v1/connections/refresh")
    assert 2 <= calls <= time.monotonic() - started + 3


# The serving gateway gives a client no grace: the restart (start-up, reconciling the
# data plane, the first refresh) has to fit in what is left of a lease, a third to two
# thirds of it. 6 s leaves room for a slow machine.
@pytest.mark.lab(clusters=2, gateway_args=["--connection-lease", "6s"])
async def test_a_restarted_client_gateway_keeps_refreshing_its_leases(lab: Lab) -> None:
    await join(lab, "cluster1", "cluster2")
    await endpoint(lab, "cluster2", "vpn-gw-1", "vpn", "172.16.1.0/24", intranet=False)
    conn = await request(lab, "cluster1", "vpn@cluster2")
    pid = (await lab.status()).clusters[0].gateway_pid
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    await wait_exited([pid])
    await lab.up(2)
    await asyncio.sleep(15)  # two and a half leases: only refreshes keep it
    (served,) = await fedgw(lab, "cluster2", "connections")
    (kept,) = await fedgw(lab, "cluster1", "connections")
    assert served["id"] == kept["id"] == conn["id"]
    assert (kept["state"], kept["client"]["address"]) == ("up", conn["client"]["address"])
    assert "lease expired" not in lab.layout.log("cluster2").read_text()
    endpoint_ip = conn["server"]["address"].split("/")[0]
    assert await ping(lab, "cluster1", endpoint_ip)


@pytest.mark.lab(clusters=2, gateway_args=["--connection-lease", "3s"])
async def test_unrefreshed_lease_is_closed_and_addresses_reused(lab: Lab) -> None:
    await join(lab, "cluster1", "cluster2")
    await endpoint(lab, "cluster2", "vpn-gw-1", "vpn", "172.16.1.0/31", intranet=False)
    # A /31 pool holds exactly one pair: the next connection needs this one's addresses.
    conn = await request(lab, "cluster1", "vpn@cluster2")
    # The client's gateway dies: nobody refreshes the lease (3 s here).
    status = await lab.status()
    os.kill(status.clusters[0].gateway_pid or 0, signal.SIGKILL)
    served = (await fedgw(lab, "cluster2", "connections"))[0]
    assert served["id"] == conn["id"]

    async def closed() -> bool | None:
        return True if await fedgw(lab, "cluster2", "connections") == [] else None

    await eventually(closed, 20, "cluster2 closes the connection whose lease ran out")
    # The pair is free again: the next client to ask gets it (here one of cluster2's own;
    # a restarted cluster1 would ask for its old connection again).
    again = await request(lab, "cluster2", "vpn", "local-client")
    assert again["client"]["address"] == conn["client"]["address"]


@pytest.mark.lab(clusters=2)
async def test_leaving_a_peer_closes_its_connections_on_both_sides(lab: Lab) -> None:
    await join(lab, "cluster1", "cluster2")
    await endpoint(lab, "cluster2", "vpn-gw-1", "vpn", "172.16.1.0/24", intranet=False)
    clients = [f"c{i}" for i in range(5)]
    for client in clients:
        await request(lab, "cluster1", "vpn@cluster2", client)
    assert (await dataplane(lab, "cluster2"))["wires"] == 5
    await lab.run("cluster1", "fedgw", "leave", "cluster2")
    # The peer is told, and forgets this domain: its side closes at once too.
    for cluster in ("cluster1", "cluster2"):
        assert await fedgw(lab, cluster, "connections") == []
        state = await dataplane(lab, cluster)
        assert (state["tunnels"], state["wires"]) == ([], 0), cluster
    for client in clients:
        async with Rtnl(lab.netns_of("cluster1", client)) as rtnl:
            assert await rtnl.find("nsm0") is None, client


async def test_lab_with_connections_comes_down_clean(lab_factory: LabFactory) -> None:
    before = host_snapshot()
    lab = await lab_factory(2)
    await join(lab, "cluster1", "cluster2")
    await endpoint(lab, "cluster2", "vpn-gw-1", "vpn", "172.16.1.0/24")
    await request(lab, "cluster1", "vpn@cluster2")
    assert await ping(lab, "cluster1", SERVER)
    await lab.down()
    assert host_snapshot() == before
