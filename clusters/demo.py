"""``fedgw lab demo`` (and ``make demo``): the whole story, as the commands a user would
type, each shown with its output and the time it took.

Two simulated clusters come up. cluster2 issues a token and cluster1 joins with it.
cluster2 exports the network service ``vpn-gateway`` to cluster1, served by the endpoint
``vpn-gw-1`` (pool 172.16.1.0/24), behind which sits a "corporate intranet"
(10.60.0.0/16) with an HTTP server. A client workload in cluster1 requests
``vpn-gateway@cluster2``; the gateways stitch a wire through WireGuard; the client
pings the intranet server and fetches a page from it. The lab stays up afterwards, to
be explored by hand. Running the demo again is harmless.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import time
from collections.abc import Callable

from clusters.lab import Lab, spawn_in_netns
from wireguard.netns import Rtnl, set_sysctl

Say = Callable[[str], None]

INTRANET_NET = "10.60.0.0/16"
NSE_INTRANET_ADDRESS = "10.60.0.1/16"
SERVER_ADDRESS = "10.60.0.10"
PAGE = "<h1>Corporate intranet</h1><p>Reached through fedgw.</p>\n"


class Demo:
    def __init__(self, lab_name: str, say: Say) -> None:
        self.t0 = time.monotonic()
        self.say = say
        self.lab = Lab(lab_name, progress=lambda line: say(f"    {line}"))

    def step(self, text: str) -> None:
        self.say(f"\n[{time.monotonic() - self.t0:6.2f}s] {text}")

    async def run_in(
        self, cluster: str, *argv: str, workload: str | None = None, show: bool = True
    ) -> str:
        """A command inside the lab, shown as ``fedgw lab exec`` would run it."""
        where = f" --workload {workload}" if workload else ""
        if show:
            self.say(f"  $ fedgw lab exec {cluster}{where} -- {shlex.join(argv)}")
        code, out, err = await self.lab.run(cluster, *argv, workload=workload, check=False)
        if show:
            for line in (out + err).rstrip().splitlines():
                self.say(f"    {line}")
        if code != 0:
            raise SystemExit(f"demo failed: {' '.join(argv)} exited {code}: {err.strip()}")
        return out

    async def fedgw(self, cluster: str, *args: str, show: bool = True) -> str:
        return await self.run_in(cluster, "fedgw", *args, show=show)

    async def run(self) -> None:
        lab, name = self.lab, self.lab.name
        self.step("Bring up two simulated clusters (network namespaces, one gateway each)")
        self.say(f"  $ fedgw lab up --clusters 2 --name {name}")
        await lab.up(2)

        self.step("Federate: cluster2 issues a one-line token, cluster1 joins with it")
        peers = json.loads(await self.fedgw("cluster1", "peers", "--json", show=False))
        if any(p["domain"] == "cluster2" for p in peers):
            self.say("    (cluster1 and cluster2 are peers already)")
        else:
            token = (await self.fedgw("cluster2", "token", "create", "--ttl", "10m")).strip()
            await self.fedgw("cluster1", "join", token)
        await self.fedgw("cluster1", "peers")

        self.step("cluster2: a corporate intranet (10.60.0.0/16) with an HTTP server")
        await self._intranet()

        self.step("cluster2 exports the network service vpn-gateway to cluster1 ...")
        await self.fedgw("cluster2", "ns", "register", "vpn-gateway", "--export", "cluster1")
        self.step("... served by the endpoint vpn-gw-1: pool 172.16.1.0/24, route to the intranet")
        await self.fedgw(
            "cluster2", "nse", "register", "vpn-gw-1", "--service", "vpn-gateway",
            "--pool", "172.16.1.0/24", "--route", INTRANET_NET,
            "--netns", lab.layout.workload("cluster2", "vpn-gw-1"),
        )  # fmt: skip
        await self.fedgw("cluster1", "ns", "list", "--domain", "cluster2")

        self.step("A client workload in cluster1 requests vpn-gateway@cluster2")
        client_ns = await lab.add_workload("cluster1", "client")
        existing = [
            c
            for c in json.loads(await self.fedgw("cluster1", "connections", "--json", show=False))
            if c["service"] == "vpn-gateway@cluster2"
            and (c["client"]["workload"] or {}).get("netns") == client_ns
        ]
        if existing and existing[0]["state"] == "up":
            self.say(f"    (the client is connected already: {existing[0]['id']})")
        else:
            await self.fedgw("cluster1", "request", "vpn-gateway@cluster2", "--netns", client_ns)
        await self.run_in(
            "cluster1", "ip", "-brief", "address", "show", "dev", "nsm0", workload="client"
        )

        self.step("Real packets through the tunnel: ping, then HTTP, to the intranet server")
        await self.run_in(
            "cluster1", "ping", "-c", "3", "-W", "2", SERVER_ADDRESS, workload="client"
        )
        await self.run_in(
            "cluster1", "curl", "-s", "-m", "5", f"http://{SERVER_ADDRESS}/", workload="client"
        )
        await self.fedgw("cluster1", "status")

        self.step("Done; the lab stays up")
        self.say(
            f"  explore:   fedgw lab status --name {name}\n"
            f"             fedgw lab exec cluster1 --name {name} -- fedgw connections\n"
            f"             fedgw lab exec cluster1 --name {name} --workload client -- "
            f"curl http://{SERVER_ADDRESS}/\n"
            f"  tear down: fedgw lab down --name {name}"
        )

    async def _intranet(self) -> None:
        """vpn-gw-1's namespace routes into an intranet namespace with an HTTP server."""
        lab = self.lab
        nse = await lab.add_workload("cluster2", "vpn-gw-1")
        intranet = await lab.add_workload("cluster2", "intranet")
        async with Rtnl(nse) as rtnl:
            await rtnl.add_veth("intra0", "eth0", intranet)
            await rtnl.set_link("intra0", up=True)
            await rtnl.add_address("intra0", NSE_INTRANET_ADDRESS)
        async with Rtnl(intranet) as rtnl:
            await rtnl.set_link("eth0", up=True)
            await rtnl.add_address("eth0", f"{SERVER_ADDRESS}/16")
            await rtnl.add_route("0.0.0.0/0", via=NSE_INTRANET_ADDRESS.split("/")[0])
        await set_sysctl(nse, "net.ipv4.ip_forward", "1")
        site = lab.layout.dir / "intranet-site"
        await asyncio.to_thread(site.mkdir, exist_ok=True)
        await asyncio.to_thread((site / "index.html").write_text, PAGE)
        code, _, _ = await lab.run(
            "cluster2", "curl", "-s", "-m", "1", f"http://{SERVER_ADDRESS}/",
            workload="intranet", check=False,
        )  # fmt: skip
        if code != 0:
            await spawn_in_netns(
                intranet,
                [
                    "python3",
                    "-m",
                    "http.server",
                    "80",
                    "--bind",
                    SERVER_ADDRESS,
                    "--directory",
                    str(site),
                ],
                lab.layout.dir / "intranet-http.log",
            )
            for _ in range(50):
                code, _, _ = await lab.run(
                    "cluster2", "curl", "-s", "-m", "1", f"http://{SERVER_ADDRESS}/",
                    workload="intranet", check=False,
                )  # fmt: skip
                if code == 0:
                    break
                await asyncio.sleep(0.1)
        self.say(
            f"    {nse}: intra0 {NSE_INTRANET_ADDRESS}; {intranet}: eth0 {SERVER_ADDRESS}, "
            f"HTTP server on port 80"
        )


def run_demo(lab_name: str, say: Say) -> None:
    asyncio.run(Demo(lab_name, say).run())
