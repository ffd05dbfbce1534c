"""The namespace lab, driven through its Python API and through the CLI: it builds what
it says, reaches across the underlay, hides a NAT'd cluster, and leaves nothing behind."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from clusters.errors import LabConflict, LabInvalid, LabNotFound
from clusters.lab import HEALTH_PORT, Lab, LabLayout, running_lab
from clusters.pytest_plugin import LabFactory
from tests.conftest import FEDGW
from tests.hostcheck import host_snapshot, needs_root
from wireguard.netns import list_netns

pytestmark = needs_root


def lab_name() -> str:
    return f"t{secrets.token_hex(3)}"


def fedgw(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FEDGW, *args], capture_output=True, text=True, timeout=120, env=env or dict(os.environ)
    )


@pytest.fixture(scope="module")
def untouched_host() -> Iterator[None]:
    """The whole module leaves the host exactly as it found it."""
    before = host_snapshot()
    yield
    assert host_snapshot() == before


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lab3(untouched_host: None) -> AsyncIterator[Lab]:
    """Three clusters, cluster3 behind NAT, shared by the read-only tests below."""
    async with running_lab(lab_name(), 3, ["cluster3"]) as lab:
        yield lab


async def curl(lab: Lab, cluster: str, url: str) -> tuple[int, str]:
    code, out, _ = await lab.run(cluster, "curl", "-s", "-m", "2", url, check=False)
    return code, out


@pytest.mark.asyncio(loop_scope="module")
async def test_status_reports_every_cluster_healthy(lab3: Lab) -> None:
    status = await lab3.status()
    assert status.up
    assert [(c.name, c.nat, c.healthy) for c in status.clusters] == [
        ("cluster1", False, True),
        ("cluster2", False, True),
        ("cluster3", True, True),
    ]
    c3 = status.clusters[2]
    assert (c3.node_address, c3.public_address) == ("192.168.103.2", "198.18.0.13")
    assert c3.router_netns == f"{lab3.name}.cluster3.nat"
    names = set(list_netns(f"{lab3.name}."))
    assert names == {
        f"{lab3.name}.inet",
        f"{lab3.name}.cluster1",
        f"{lab3.name}.cluster2",
        f"{lab3.name}.cluster3",
        f"{lab3.name}.cluster3.nat",
    }


@pytest.mark.asyncio(loop_scope="module")
async def test_gateways_reach_each_other_across_the_underlay(lab3: Lab) -> None:
    code, out = await curl(lab3, "cluster2", f"http://198.18.0.11:{HEALTH_PORT}/healthz")
    assert code == 0
    assert json.loads(out)["domain"] == "cluster1"
    code, out = await curl(lab3, "cluster1", f"http://198.18.0.12:{HEALTH_PORT}/healthz")
    assert code == 0
    assert json.loads(out)["domain"] == "cluster2"


@pytest.mark.asyncio(loop_scope="module")
async def test_nat_cluster_reaches_out_but_is_not_reachable(lab3: Lab) -> None:
    code, out = await curl(lab3, "cluster3", f"http://198.18.0.11:{HEALTH_PORT}/healthz")
    assert code == 0
    assert json.loads(out)["domain"] == "cluster1"
    # Unsolicited from outside: to the router's public address (dropped: curl times out,
    # exit 28) and to the node's private address (no route: exit 7).
    code, _ = await curl(lab3, "cluster1", f"http://198.18.0.13:{HEALTH_PORT}/healthz")
    assert code == 28
    code, _ = await curl(lab3, "cluster1", f"http://192.168.103.2:{HEALTH_PORT}/healthz")
    assert code == 7
    code, _, _ = await lab3.run(
        "cluster1", "ping", "-c", "1", "-W", "1", "198.18.0.13", check=False
    )
    assert code != 0
    # ...except the ports it forwards on purpose: here, the bundle endpoint.
    code, out, _ = await lab3.run(
        "cluster1", "curl", "-s", "-k", "-m", "2", "https://198.18.0.13:8444/", check=False
    )
    assert code == 0
    assert json.loads(out)["keys"][0]["use"] == "x509-svid"


ACCEPT_ONE = (
    "import socket; s = socket.create_server(('0.0.0.0', 9999)); s.settimeout(5); "
    "c, peer = s.accept(); print(peer[0])"
)
CONNECT = "import socket; socket.create_connection(('198.18.0.11', 9999), 2).close()"


@pytest.mark.asyncio(loop_scope="module")
async def test_nat_masquerades_outgoing(lab3: Lab) -> None:
    """cluster1 sees cluster3's connections come from the router's public address."""
    listener = asyncio.create_task(lab3.run("cluster1", "python3", "-c", ACCEPT_ONE))
    for _ in range(50):
        code, _, _ = await lab3.run("cluster3", "python3", "-c", CONNECT, check=False)
        if code == 0:
            break
        await asyncio.sleep(0.1)  # the listener is not up yet
    _, out, _ = await listener
    assert out.strip() == "198.18.0.13"


@pytest.mark.asyncio(loop_scope="module")
async def test_exec_runs_in_the_right_namespace(lab3: Lab) -> None:
    _, out, _ = await lab3.run("cluster2", "ip", "-j", "-4", "addr", "show", "uplink")
    assert json.loads(out)[0]["addr_info"][0]["local"] == "198.18.0.12"
    _, out, _ = await lab3.run("cluster2", "sh", "-c", "echo $FEDGW_GATEWAY")
    assert out.strip() == str(lab3.layout.socket("cluster2"))
    # fedgw inside a cluster talks to that cluster's gateway
    _, out, _ = await lab3.run("cluster1", "fedgw", "status", "--json")
    assert json.loads(out)["domain"] == "cluster1"
    ns = await lab3.add_workload("cluster1", "client")
    assert ns == f"{lab3.name}.cluster1.client"
    assert lab3.workloads("cluster1") == ["client"]
    _, out, _ = await lab3.run("cluster1", "ip", "-j", "link", workload="client")
    assert [link["ifname"] for link in json.loads(out)] == ["lo"]
    with pytest.raises(LabNotFound, match="no workload 'server'"):
        await lab3.run("cluster1", "true", workload="server")
    with pytest.raises(LabNotFound, match="no cluster 'cluster9'"):
        await lab3.run("cluster9", "true")
    with pytest.raises(LabInvalid, match="reserved"):
        await lab3.add_workload("cluster1", "nat")
    with pytest.raises(LabInvalid, match="'_' at character"):
        await lab3.add_workload("cluster1", "bad_name")


@pytest.mark.asyncio(loop_scope="module")
async def test_up_again_is_harmless_and_shape_is_kept(lab3: Lab) -> None:
    pids = [c.gateway_pid for c in (await lab3.status()).clusters]
    await lab3.up(3, ["cluster3"])
    assert [c.gateway_pid for c in (await lab3.status()).clusters] == pids
    with pytest.raises(LabConflict, match="another shape"):
        await lab3.up(2)


@pytest.mark.asyncio(loop_scope="module")
async def test_a_dead_gateway_is_restarted_by_up(lab3: Lab) -> None:
    before = (await lab3.status()).clusters[0]
    assert before.gateway_pid is not None
    os.kill(before.gateway_pid, signal.SIGKILL)
    await asyncio.sleep(0.2)
    assert not (await lab3.status()).clusters[0].healthy
    await lab3.up(3, ["cluster3"])
    after = (await lab3.status()).clusters[0]
    assert after.healthy
    assert after.gateway_pid != before.gateway_pid


async def test_cli_up_status_down_leaves_nothing() -> None:
    """The issue's check: up 3 with a NAT'd cluster3, status --json, down; nothing left."""
    before = host_snapshot()
    name = lab_name()
    try:
        up = fedgw("lab", "up", "--clusters", "3", "--nat", "cluster3", "--name", name)
        assert up.returncode == 0, up.stderr
        assert "cluster3: gateway healthy" in up.stdout
        status = json.loads(fedgw("lab", "status", "--json", "--name", name).stdout)
        assert [c["healthy"] for c in status["clusters"]] == [True, True, True]
        table = fedgw("lab", "status", "--name", name).stdout
        assert "NAT, public 198.18.0.13" in table
        r = fedgw("lab", "exec", "cluster3", "--name", name, "--", "sh", "-c", "exit 7")
        assert r.returncode == 7
    finally:
        down = fedgw("lab", "down", "--name", name)
    assert down.returncode == 0, down.stderr
    assert host_snapshot() == before
    assert not LabLayout(name).dir.exists()
    again = fedgw("lab", "down", "--name", name)
    assert again.returncode == 0
    assert "nothing to remove" in again.stdout
    r = fedgw("lab", "status", "--name", name)
    assert r.returncode == 1
    assert "is not up" in r.stderr


async def test_killed_up_is_cleaned_by_down() -> None:
    before = host_snapshot()
    name = lab_name()
    proc = await asyncio.create_subprocess_exec(
        FEDGW, "lab", "up", "--clusters", "3", "--name", name,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    # Kill it once it has started the gateways, before it saw them healthy.
    for _ in range(3000):
        if list(LabLayout(name).dir.glob("*/gateway.pid")):
            break
        await asyncio.sleep(0.01)
    proc.kill()
    await proc.wait()
    assert list_netns(f"{name}.")  # it did leave something
    down = await asyncio.to_thread(fedgw, "lab", "down", "--name", name)
    assert down.returncode == 0, down.stderr
    assert host_snapshot() == before


async def test_two_labs_side_by_side(lab_factory: LabFactory) -> None:
    lab_a = await lab_factory(2)
    lab_b = await lab_factory(2, ["cluster2"])
    assert (await lab_a.status()).up
    assert (await lab_b.status()).up
    # Same addresses inside, yet separate worlds: each underlay answers its own.
    url = f"http://198.18.0.12:{HEALTH_PORT}/healthz"
    _, out, _ = await lab_a.run("cluster1", "curl", "-s", url)
    assert json.loads(out)["domain"] == "cluster2"
    code, _, _ = await lab_b.run("cluster1", "curl", "-s", "-m", "2", url, check=False)
    assert code == 28  # b's cluster2 is behind NAT
    await lab_a.down()
    assert (await lab_b.status()).up  # taking a down did not touch b


@pytest.mark.lab(clusters=1)
async def test_lab_fixture_gives_a_lab_of_the_marked_shape(lab: Lab) -> None:
    assert [c.name for c in (await lab.status()).clusters] == ["cluster1"]


async def test_keep_state_keeps_registrations() -> None:
    before = host_snapshot()
    name = lab_name()
    lab = Lab(name)
    try:
        await lab.up(1)
        await lab.run(
            "cluster1", "fedgw", "nse", "register", "e1", "--service", "vpn", "--ttl", "1h"
        )
        await lab.down(keep_state=True)
        assert not list_netns(f"{name}.")
        await lab.up(1)
        _, out, _ = await lab.run("cluster1", "fedgw", "nse", "list", "--json")
        assert [e["name"] for e in json.loads(out)] == ["e1"]
    finally:
        await lab.down()
    assert host_snapshot() == before


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--clusters", "0"], "between 1 and 99"),
        (["--clusters", "2", "--nat", "cluster5"], "--nat cluster5: no such cluster"),
        (["--name", "Bad_Lab"], "'B' at character 1"),
        (["--name", "a" * 21], "longer than 20"),
    ],
)
def test_bad_lab_arguments(args: list[str], fragment: str) -> None:
    r = fedgw("lab", "up", *args)
    assert r.returncode == 1
    assert fragment in r.stderr
    assert "Traceback" not in r.stderr


def test_lab_needs_root_message(monkeypatch: pytest.MonkeyPatch) -> None:
    from clusters.errors import LabNeedsRoot

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(LabNeedsRoot, match="needs root"):
        asyncio.run(Lab("x").up(1))
