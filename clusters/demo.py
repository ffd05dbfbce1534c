"""``fedgw lab demo`` (and ``make demo``): the story so far, as the commands a user would
type, each shown with its output and the time it took.

Two simulated clusters come up on this machine; cluster2 registers the network service
``vpn-gateway`` (exported to cluster1) and its endpoint ``vpn-gw-1``. The lab stays up
afterwards, to be explored by hand. Running the demo again is harmless.
"""

from __future__ import annotations

import asyncio
import shlex
import time
from collections.abc import Callable

from clusters.lab import Lab

Say = Callable[[str], None]


class Demo:
    def __init__(self, lab_name: str, say: Say) -> None:
        self.t0 = time.monotonic()
        self.say = say
        self.lab = Lab(lab_name, progress=lambda line: say(f"    {line}"))

    def step(self, text: str) -> None:
        self.say(f"\n[{time.monotonic() - self.t0:6.2f}s] {text}")

    async def fedgw(self, cluster: str, *args: str) -> str:
        """``fedgw lab exec CLUSTER -- fedgw ARGS``, shown as the user types it."""
        self.say(f"  $ fedgw lab exec {cluster} -- fedgw {shlex.join(args)}")
        code, out, err = await self.lab.run(cluster, "fedgw", *args, check=False)
        for line in (out + err).rstrip().splitlines():
            self.say(f"    {line}")
        if code != 0:
            raise SystemExit(f"demo failed: fedgw {' '.join(args)} exited {code}")
        return out

    async def run(self) -> None:
        name = self.lab.name
        self.step("Bring up two simulated clusters (network namespaces, one gateway each)")
        self.say(f"  $ fedgw lab up --clusters 2 --name {name}")
        await self.lab.up(2)

        self.step("cluster2 registers the network service vpn-gateway, exported to cluster1")
        await self.fedgw("cluster2", "ns", "register", "vpn-gateway", "--export", "cluster1")

        self.step("...and its endpoint vpn-gw-1, which hands out 172.16.1.0/24")
        await self.fedgw(
            "cluster2", "nse", "register", "vpn-gw-1", "--service", "vpn-gateway",
            "--pool", "172.16.1.0/24", "--route", "10.60.0.0/16", "--ttl", "1h",
        )  # fmt: skip
        await self.fedgw("cluster2", "nse", "list")

        self.step("The lab as it stands")
        self.say(f"  $ fedgw lab status --name {name}")
        status = await self.lab.status()
        for c in status.clusters:
            health = "healthy" if c.healthy else c.health
            self.say(f"    {c.name}: netns {c.netns}, {c.node_address}, gateway {health}")

        self.step("Done; the lab stays up")
        self.say(
            f"  explore:   fedgw lab status --name {name}\n"
            f"             fedgw lab exec cluster2 --name {name} -- fedgw nse list\n"
            f"             fedgw lab exec cluster1 --name {name} -- ping -c1 198.18.0.12\n"
            f"  tear down: fedgw lab down --name {name}"
        )


def run_demo(lab_name: str, say: Say) -> None:
    asyncio.run(Demo(lab_name, say).run())
