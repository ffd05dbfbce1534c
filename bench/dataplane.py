"""Data-plane benchmark: throughput of a fedgw wire, and wire setup/teardown latency.

Measures, in one run, on one set of namespaces (client C, gateway nodes A and B joined by
a 1500-byte veth underlay, endpoint E), with the same wireguard-go driver:

* iperf3 TCP throughput C -> E through a wire fedgw stitched (veth, policy routing,
  WireGuard tunnel A-B, veth), against a hand-made WireGuard tunnel over the same hops
  (addresses on the gateway veths, main-table routes, the same MTU 1420: what fedgw
  adds is the marking, policy routing and source guard), and against plain veths
  routed over the underlay without WireGuard (the ceiling of this machine, MTU 1500).
  The three paths coexist and rounds alternate between them, so that load from
  elsewhere hits all; medians are reported. The three again while the N wires below
  are all up (the kernel walks policy rules as a list, so rules that grew with the
  wires would slow every packet through a gateway namespace), and through the last of
  those wires.
* latency of wiring a connection (attach_endpoint on B + attach_client on A) and of
  removing it (detach on both), p50/p99 over N wires that all stay up until the last
  is made (so late ones are made next to N-1 others), with one offered route each;
  against creating and deleting two bare veth pairs (the kernel's floor: deleting a
  network device waits for RCU grace periods, whoever asks).

    sudo .venv/bin/python -m bench.dataplane [--seconds 3] [--rounds 8] [--wires 1000]

Needs root, iperf3 and wireguard-go. Everything is made in namespaces ``fgwb-<random>-*``
and removed at the end, also after a failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fedgw.models import Workload
from wireguard.dataplane import Dataplane, DataplaneSettings
from wireguard.drivers import (
    Endpoint,
    InterfaceRef,
    InterfaceSpec,
    PeerSpec,
    UserspaceDriver,
    UserspaceSettings,
    prefixes,
)
from wireguard.keys import PrivateKey
from wireguard.netns import (
    Rtnl,
    create_netns,
    delete_netns,
    kill_netns_processes,
    netns_exists,
    run,
)
from wireguard.wires import ClientWire, EndpointWire, PeerTunnel

UNDER_A, UNDER_B = "198.18.0.1", "198.18.0.2"
FEDGW_PORT, HAND_PORT = 51820, 51900
TUNNEL_MTU = 1420


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def pair(
    n: int, base: str = "172.20.0.0"
) -> tuple[ipaddress.IPv4Interface, ipaddress.IPv4Interface]:
    first = int(ipaddress.IPv4Address(base)) + 2 * n
    return (
        ipaddress.IPv4Interface(f"{ipaddress.IPv4Address(first)}/31"),
        ipaddress.IPv4Interface(f"{ipaddress.IPv4Address(first + 1)}/31"),
    )


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tag = secrets.token_hex(3)
        self.names = {k: f"fgwb-{self.tag}-{k}" for k in ("gwa", "gwb", "c", "e")}
        self.prefix = f"b{self.tag[:4]}"
        self.tmp = Path(tempfile.mkdtemp(prefix="fgwb-"))
        self.driver = UserspaceDriver(UserspaceSettings(log_dir=self.tmp, stop_timeout=2.0))
        self.key_a, self.key_b = PrivateKey.generate(), PrivateKey.generate()
        self.dp: dict[str, Dataplane] = {}
        self.hand: list[InterfaceRef] = []
        self.iperf: asyncio.subprocess.Process | None = None

    def ns(self, key: str) -> str:
        return self.names[key]

    # --- set-up ------------------------------------------------------------------------------

    async def build(self) -> None:
        for name in self.names.values():
            await create_netns(name)
        gwa, gwb = self.ns("gwa"), self.ns("gwb")
        async with Rtnl(gwa) as rtnl:
            await rtnl.add_veth("ub", "ua", gwb)
            await rtnl.add_address("ub", f"{UNDER_A}/24")
            await rtnl.set_link("ub", up=True)
        async with Rtnl(gwb) as rtnl:
            await rtnl.add_address("ua", f"{UNDER_B}/24")
            await rtnl.set_link("ua", up=True)
        for side in ("gwa", "gwb"):
            settings = DataplaneSettings(netns=self.ns(side), prefix=self.prefix)
            self.dp[side] = Dataplane(settings, self.driver)
            await self.dp[side].open()
        await self.build_fedgw()
        await self.build_hand_made()
        await self.build_plain()

    async def build_fedgw(self) -> None:
        """Client 172.16.1.1 -> endpoint 172.16.1.0, stitched by fedgw."""
        a, b = self.dp["gwa"], self.dp["gwb"]
        await a.ensure_peer(
            PeerTunnel(
                "b",
                self.key_a,
                self.key_b.public_key(),
                Endpoint.parse(f"{UNDER_B}:{FEDGW_PORT}"),
                listen_port=FEDGW_PORT,
            )
        )
        await b.ensure_peer(
            PeerTunnel(
                "a",
                self.key_b,
                self.key_a.public_key(),
                Endpoint.parse(f"{UNDER_A}:{FEDGW_PORT}"),
                listen_port=FEDGW_PORT,
            )
        )
        e_addr = ipaddress.ip_interface("172.16.1.0/31")
        c_addr = ipaddress.ip_interface("172.16.1.1/31")
        await b.attach_endpoint(
            EndpointWire("bench", "a", Workload(netns=self.ns("e")), "nsm0", e_addr, c_addr)
        )
        await a.attach_client(
            ClientWire("bench", "b", Workload(netns=self.ns("c")), "nsm0", c_addr, e_addr)
        )

    async def build_hand_made(self) -> None:
        """The same hops by hand: 10.99.1.0/24 (C) -> wg -> 10.99.3.0/24 (E)."""
        keys = {"gwa": PrivateKey.generate(), "gwb": PrivateKey.generate()}
        sides = {
            "gwa": ("c", "10.99.1", "10.99.3.0/24", UNDER_B, "gwb"),
            "gwb": ("e", "10.99.3", "10.99.1.0/24", UNDER_A, "gwa"),
        }
        for gw, (workload, net, remote, peer_ip, peer_gw) in sides.items():
            name = f"{self.prefix}h{gw[-1]}"
            ref = InterfaceRef(name, self.ns(gw))
            self.hand.append(ref)
            await self.driver.ensure_interface(
                InterfaceSpec(name, self.ns(gw), keys[gw], listen_port=HAND_PORT, mtu=TUNNEL_MTU)
            )
            await self.driver.set_peer(
                ref,
                PeerSpec(
                    keys[peer_gw].public_key(),
                    Endpoint.parse(f"{peer_ip}:{HAND_PORT}"),
                    prefixes(remote),
                ),
            )
            async with Rtnl(self.ns(gw)) as rtnl:
                await rtnl.add_veth("hand", "hand", self.ns(workload))
                await rtnl.set_link("hand", mtu=TUNNEL_MTU, up=True)
                await rtnl.add_address("hand", f"{net}.1/24")
                await rtnl.add_route(remote, dev=name)
            async with Rtnl(self.ns(workload)) as rtnl:
                await rtnl.set_link("hand", mtu=TUNNEL_MTU, up=True)
                await rtnl.add_address("hand", f"{net}.2/24")
                await rtnl.add_route(remote, via=f"{net}.1")

    async def build_plain(self) -> None:
        """Plain veths routed over the underlay: 10.98.1.0/24 (C) -> 10.98.3.0/24 (E)."""
        sides = {
            "gwa": ("c", "10.98.1", "10.98.3.0/24", UNDER_B),
            "gwb": ("e", "10.98.3", "10.98.1.0/24", UNDER_A),
        }
        for gw, (workload, net, remote, peer_ip) in sides.items():
            async with Rtnl(self.ns(gw)) as rtnl:
                await rtnl.add_veth("plain", "plain", self.ns(workload))
                await rtnl.set_link("plain", up=True)
                await rtnl.add_address("plain", f"{net}.1/24")
                await rtnl.add_route(remote, via=peer_ip)
            async with Rtnl(self.ns(workload)) as rtnl:
                await rtnl.set_link("plain", up=True)
                await rtnl.add_address("plain", f"{net}.2/24")
                await rtnl.add_route(remote, via=f"{net}.1")

    # --- throughput --------------------------------------------------------------------------

    async def iperf3(self, dst: str) -> float:
        for attempt in range(3):
            out = await run(
                "ip", "netns", "exec", self.ns("c"), "iperf3", "-c", dst, "-J",
                "-t", str(self.args.seconds), "-O", "1", check=False,
            )  # fmt: skip
            try:
                result = json.loads(out)
            except ValueError:
                result = {"error": out.strip() or "no output"}
            if "error" not in result:
                return float(result["end"]["sum_received"]["bits_per_second"]) / 1e9
            # The server may still be finishing the test before ("the server is busy").
            await asyncio.sleep(0.5 * (attempt + 1))
        raise SystemExit(f"iperf3 to {dst}: {result['error']}")

    async def throughput(
        self, rounds: int, extra: dict[str, str] | None = None
    ) -> dict[str, list[float]]:
        if self.iperf is None:
            self.iperf = await asyncio.create_subprocess_exec(
                "ip",
                "netns",
                "exec",
                self.ns("e"),
                "iperf3",
                "-s",
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            await asyncio.sleep(0.5)
        paths = {"fedgw wire": "172.16.1.0", "hand-made wg": "10.99.3.2", "plain veth": "10.98.3.2"}
        paths |= extra or {}
        for dst in paths.values():  # warm-up: handshakes, ARP
            await run("ip", "netns", "exec", self.ns("c"), "ping", "-c", "1", "-W", "2", dst)
        results: dict[str, list[float]] = {k: [] for k in paths}
        order = list(paths)
        for r in range(rounds):
            for name in order[r % len(order) :] + order[: r % len(order)]:
                results[name].append(await self.iperf3(paths[name]))
            print(
                f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in results.items()),
                file=sys.stderr,
            )
        return results

    # --- latency -------------------------------------------------------------------------------

    async def latency(self) -> tuple[list[float], list[float], dict[str, list[float]]]:
        """Set-up and teardown times of ``--wires`` wires, and the throughput of the three
        paths while all those wires are up."""
        a, b = self.dp["gwa"], self.dp["gwb"]
        wires = []
        for n in range(self.args.wires):
            e_addr, c_addr = pair(n)
            route = ipaddress.ip_network(f"10.{100 + n // 256}.{n % 256}.0/24")
            cid = f"lat-{n}"
            wires.append(
                (
                    ClientWire(
                        cid, "b", Workload(netns=self.ns("c")), f"w{n}", c_addr, e_addr, (route,)
                    ),
                    EndpointWire(
                        cid, "a", Workload(netns=self.ns("e")), f"w{n}", e_addr, c_addr, (route,)
                    ),
                )
            )
        setup, teardown = [], []
        for cw, ew in wires:
            started = time.perf_counter()
            await b.attach_endpoint(ew)
            await a.attach_client(cw)
            setup.append(time.perf_counter() - started)
        # The last wire works next to all the others.
        last = wires[-1][1].address.ip
        out = await run(
            "ip", "netns", "exec", self.ns("c"), "ping", "-c", "1", "-W", "2", str(last)
        )
        assert " 0% packet loss" in out, out
        # The kernel walks policy rules as a list: throughput with all the wires there,
        # through the first wire (made before them) and through the last (whose table
        # is in the last bucket of rules).
        print(f"throughput with {len(wires)} wires up:", file=sys.stderr)
        crowded = await self.throughput(
            max(2, self.args.rounds // 2), {"fedgw, last wire": str(last)}
        )
        for cw, _ in wires:
            started = time.perf_counter()
            await a.detach(cw.connection_id)
            await b.detach(cw.connection_id)
            teardown.append(time.perf_counter() - started)
        return setup, teardown, crowded

    async def veth_floor(self, n: int = 100) -> tuple[list[float], list[float]]:
        """Two bare veth pairs (into C and into E) made and deleted, as a wire has."""
        made, deleted = [], []
        async with Rtnl(self.ns("gwa")) as rtnl:
            for i in range(n):
                started = time.perf_counter()
                await rtnl.add_veth(f"f{i}a", "floor", self.ns("c"))
                await rtnl.add_veth(f"f{i}b", "floor", self.ns("e"))
                made.append(time.perf_counter() - started)
                started = time.perf_counter()
                await rtnl.delete_link(f"f{i}a")
                await rtnl.delete_link(f"f{i}b")
                deleted.append(time.perf_counter() - started)
        return made, deleted

    # --- clean-up -------------------------------------------------------------------------------

    async def cleanup(self) -> list[str]:
        left: list[str] = []
        if self.iperf is not None and self.iperf.returncode is None:
            self.iperf.kill()
            await self.iperf.wait()
        for dp in self.dp.values():
            with contextlib.suppress(Exception):
                report = await dp.purge()
                left += report.failures
            await dp.close()
        for ref in self.hand:
            with contextlib.suppress(Exception):
                await self.driver.remove_interface(ref)
        await self.driver.close()
        await kill_netns_processes(list(self.names.values()))
        for name in self.names.values():
            await delete_netns(name)
        left += [ns for ns in self.names.values() if netns_exists(ns)]
        left += await asyncio.to_thread(_sockets_left, self.prefix)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return left


def _sockets_left(prefix: str) -> list[str]:
    sockets = Path("/var/run/wireguard")
    return [str(p) for p in sockets.glob(f"{prefix}*")] if sockets.exists() else []


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--seconds", type=int, default=3, help="length of one iperf3 run")
    parser.add_argument("--rounds", type=int, default=8, help="iperf3 runs per path")
    parser.add_argument("--wires", type=int, default=1000, help="wires for the latency test")
    args = parser.parse_args()
    if min(args.seconds, args.rounds, args.wires) < 1:
        parser.error("--seconds, --rounds and --wires must be at least 1")
    if os.geteuid() != 0 or not shutil.which("iperf3") or not shutil.which("wireguard-go"):
        sys.exit("needs root, iperf3 and wireguard-go")
    bench = Bench(args)
    try:
        started = time.perf_counter()
        await bench.build()
        print(
            f"built in {time.perf_counter() - started:.1f} s; throughput, "
            f"{args.rounds} x {args.seconds} s per path:",
            file=sys.stderr,
        )
        tput = await bench.throughput(args.rounds)
        print(f"latency over {args.wires} wires...", file=sys.stderr)
        setup, teardown, crowded = await bench.latency()
        floor_made, floor_deleted = await bench.veth_floor()
    finally:
        left = await bench.cleanup()
    report(args, tput, crowded, setup, teardown, floor_made, floor_deleted, left)


def report(
    args: argparse.Namespace,
    tput: dict[str, list[float]],
    crowded: dict[str, list[float]],
    setup: list[float],
    teardown: list[float],
    floor_made: list[float],
    floor_deleted: list[float],
    left: list[str],
) -> None:
    med = {k: statistics.median(v) for k, v in tput.items()}
    paired = [f / h for f, h in zip(tput["fedgw wire"], tput["hand-made wg"], strict=True)]
    print(f"\nthroughput C -> E, iperf3 TCP, {args.rounds} runs of {args.seconds} s (Gbit/s)")
    for name, value in med.items():
        runs = ", ".join(f"{v:.2f}" for v in tput[name])
        print(f"  {name:14} median {value:6.2f}   [{runs}]")
    print(
        f"  fedgw / hand-made wg: {med['fedgw wire'] / med['hand-made wg']:.3f} "
        f"(median of per-round ratios {statistics.median(paired):.3f}; goal >= 0.95)"
    )
    print(f"  fedgw / plain veth:   {med['fedgw wire'] / med['plain veth']:.3f}")
    print(f"\nthe same with {args.wires} more wires up, {len(crowded['fedgw wire'])} runs per path")
    for name, samples in crowded.items():
        crowded_med = statistics.median(samples)
        alone = med.get(name, med["fedgw wire"])
        print(f"  {name:16} median {crowded_med:6.2f}   {crowded_med / alone:.2f} of the above")
    print(f"\nlatency (ms), {args.wires} wires; floor over {len(floor_made)} pairs of veths")
    for name, samples in (
        ("setup: attach_endpoint + attach_client", setup),
        ("teardown: detach on both gateways", teardown),
        ("floor: make 2 bare veth pairs", floor_made),
        ("floor: delete 2 bare veth pairs", floor_deleted),
    ):
        p50, p99 = pct(samples, 0.5) * 1e3, pct(samples, 0.99) * 1e3
        print(f"  {name:40} p50 {p50:7.2f}   p99 {p99:7.2f}")
    print(f"\nleft behind: {left or 'nothing'}")


if __name__ == "__main__":
    asyncio.run(main())
