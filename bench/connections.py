"""Connections benchmark: cross-domain connection setup in a two-cluster lab.

In one run (root; a lab named ``bconn`` is built and always taken down):

* 1,000 connections from workloads of cluster1 to ``vpn@cluster2`` (concurrency 16):
  request->up latency p50/p99 and setups per second, measured as the client sees them
  (``POST /v1/connections`` on cluster1's local API until it answers ``up``);
* the baseline, in the same run and lab: local connections inside cluster2 (the same
  gateway code and data plane, but no federation call and no tunnel);
* 100 more cross-domain connections made one at a time: the latency of a request that
  does not queue behind others (at concurrency 16, Little's law makes the mean latency
  16 / setups-per-second);
* the CPU time each gateway spends per cross-domain connection;
* gateway RSS of both gateways at the end;
* a sample of the connections checked for traffic (ping through the tunnel);
* the serving gateway restarted (SIGTERM, start): how long it takes to be ready, and
  then until traffic flows again, with a ping running through it all;
* then every connection closed (``DELETE /v1/connections/ID``, same concurrency): the
  cross-domain ones on cluster1, and the local baseline ones on cluster2 as the
  baseline of closing; close latency p50/p99, closes per second, the CPU time each
  gateway spends per cross-domain close, and what is left.

    .venv/bin/python -m bench.connections [--connections 1000] [--concurrency 16]
        [--unloaded 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import time
from pathlib import Path

from bench._http import RawHttp
from clusters.lab import Lab, wait_exited


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_seconds(pid: int | None) -> float:
    """User plus system CPU time of process ``pid`` so far."""
    if pid is None:
        return 0.0
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int | None) -> float:
    if pid is None:
        return 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def connect_many(
    lab: Lab, cluster: str, service: str, workloads: list[str], count: int, concurrency: int
) -> tuple[list[float], float, list[dict[str, object]]]:
    """``count`` connections spread over ``workloads``; latencies (in the order the
    requests were made), wall time, connections."""
    sock = str(lab.layout.socket(cluster))
    latencies = [0.0] * count
    made: list[dict[str, object]] = []
    async with RawHttp(sock, connections=concurrency) as http:
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            body = {"service": service, "workload": {"netns": workloads[i % len(workloads)]}}
            async with sem:
                t0 = time.perf_counter()
                status, data = await http.request("POST", "/v1/connections", body)
                latencies[i] = time.perf_counter() - t0
            if status != 201:
                raise SystemExit(f"connection {i}: {status} {data[:300]!r}")
            made.append(json.loads(data))

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(count)))
        return latencies, time.perf_counter() - t0, made


async def close_many(
    lab: Lab, cluster: str, ids: list[str], concurrency: int
) -> tuple[list[float], float]:
    """Close connections ``ids``; latencies and wall time."""
    latencies: list[float] = []
    async with RawHttp(str(lab.layout.socket(cluster)), connections=concurrency) as http:
        sem = asyncio.Semaphore(concurrency)

        async def one(cid: str) -> None:
            async with sem:
                t0 = time.perf_counter()
                status, data = await http.request("DELETE", f"/v1/connections/{cid}")
                latencies.append(time.perf_counter() - t0)
            if status >= 300:
                raise SystemExit(f"closing {cid}: {status} {data[:300]!r}")

        t0 = time.perf_counter()
        await asyncio.gather(*(one(cid) for cid in ids))
        return latencies, time.perf_counter() - t0


async def connection_ids(lab: Lab, cluster: str) -> list[str]:
    _, out, _ = await lab.run(cluster, "fedgw", "connections", "--json")
    return [str(c["id"]) for c in json.loads(out)]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--workloads", type=int, default=50, help="client namespaces")
    parser.add_argument("--baseline", type=int, default=300, help="local connections")
    parser.add_argument(
        "--unloaded", type=int, default=100, help="cross-domain connections made one at a time"
    )
    parser.add_argument("--keep-lab", action="store_true", help="leave the lab up (to debug)")
    args = parser.parse_args()
    if min(args.connections, args.concurrency, args.workloads, args.baseline, args.unloaded) < 1:
        parser.error("every count must be at least 1")
    lab = Lab("bconn")
    await lab.down()
    try:
        await lab.up(2)
        _, token, _ = await lab.run("cluster2", "fedgw", "token", "create")
        await lab.run("cluster1", "fedgw", "join", token.strip())
        nse = await lab.add_workload("cluster2", "nse")
        await lab.run("cluster2", "fedgw", "ns", "register", "vpn", "--export", "*")
        await lab.run(
            "cluster2", "fedgw", "nse", "register", "nse", "--service", "vpn",
            "--pool", "10.128.0.0/14", "--route", "10.60.0.0/16", "--netns", nse,
        )  # fmt: skip
        clients = [await lab.add_workload("cluster1", f"c{i}") for i in range(args.workloads)]
        locals_ = [await lab.add_workload("cluster2", f"l{i}") for i in range(args.workloads)]

        pids = {c.name: c.gateway_pid for c in (await lab.status()).clusters}
        base_lat, base_wall, base_made = await connect_many(
            lab, "cluster2", "vpn", locals_, args.baseline, args.concurrency
        )
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        lat, wall, made = await connect_many(
            lab, "cluster1", "vpn@cluster2", clients, args.connections, args.concurrency
        )
        cpu_ms = {
            name: (cpu_seconds(pid) - cpu_before[name]) * 1000 / args.connections
            for name, pid in pids.items()
        }
        # One at a time: what a single request costs when nothing queues before it.
        one_lat, one_wall, one_made = await connect_many(
            lab, "cluster1", "vpn@cluster2", clients, args.unloaded, 1
        )
        made += one_made
        status = await lab.status()
        rss = {c.name: rss_mib(c.gateway_pid) for c in status.clusters}

        sample = random.Random(7).sample(made, min(20, len(made)))
        passing = 0
        for conn in sample:
            client = str(conn["client"]["workload"]["netns"])  # type: ignore[index]
            address = str(conn["server"]["address"]).split("/")[0]  # type: ignore[index]
            workload = client.rsplit(".", 1)[1]
            code, _, _ = await lab.run(
                "cluster1", "ping", "-c", "1", "-W", "2", address, workload=workload, check=False
            )
            passing += code == 0

        # Restart of the serving gateway, with a ping running through it all.
        probe = sample[0]
        target = str(probe["server"]["address"]).split("/")[0]  # type: ignore[index]
        probe_ws = str(probe["client"]["workload"]["netns"]).rsplit(".", 1)[1]  # type: ignore[index]
        pinger = asyncio.create_task(
            lab.run(
                "cluster1", "ping", "-i", "0.05", "-W", "1", "-c", "400", "-D", target,
                workload=probe_ws, check=False,
            )
        )  # fmt: skip
        await asyncio.sleep(1)
        pid = status.clusters[1].gateway_pid
        assert pid is not None
        t_stop = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        await wait_exited([pid])
        t_start = time.monotonic()
        await lab.up(2)
        t_ready = time.monotonic()
        flowing_after_ready = None
        for _ in range(100):
            code, _, _ = await lab.run(
                "cluster1", "ping", "-c", "1", "-W", "1", target, workload=probe_ws, check=False
            )
            if code == 0:
                flowing_after_ready = time.monotonic() - t_ready
                break
        _, ping_out, _ = await pinger
        received = sum(1 for line in ping_out.splitlines() if "bytes from" in line)
        connections_after = await lab.run("cluster1", "fedgw", "connections", "--json")
        up_after = sum(1 for c in json.loads(connections_after[1]) if c["state"] == "up")

        # Closing: every cross-domain connection, then the local ones as the baseline.
        pids = {c.name: c.gateway_pid for c in (await lab.status()).clusters}
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        close_lat, close_wall = await close_many(
            lab, "cluster1", await connection_ids(lab, "cluster1"), args.concurrency
        )
        close_cpu_ms = {
            name: (cpu_seconds(pid) - cpu_before[name]) * 1000 / max(len(close_lat), 1)
            for name, pid in pids.items()
        }
        local_ids = [str(c["id"]) for c in base_made]
        base_close_lat, base_close_wall = await close_many(
            lab, "cluster2", local_ids, args.concurrency
        )
        left = {name: len(await connection_ids(lab, name)) for name in ("cluster1", "cluster2")}

        print(f"fedgw connections benchmark, {os.cpu_count()} CPUs, concurrency {args.concurrency}")
        print(f"  {'':44} {'p50':>9} {'p99':>9} {'per sec':>9}")
        for label, samples, n, seconds in (
            (f"{args.connections} cross-domain (vpn@cluster2)", lat, args.connections, wall),
            (
                f"{args.baseline} local, baseline (vpn in cluster2)",
                base_lat,
                args.baseline,
                base_wall,
            ),
            (f"{args.unloaded} cross-domain, one at a time", one_lat, args.unloaded, one_wall),
            (
                f"close {len(close_lat)} cross-domain",
                close_lat,
                len(close_lat),
                close_wall,
            ),
            (
                f"close {len(base_close_lat)} local, baseline",
                base_close_lat,
                len(base_close_lat),
                base_close_wall,
            ),
        ):
            p50, p99 = pct(samples, 0.5) * 1000, pct(samples, 0.99) * 1000
            print(f"  {label:44} {p50:7.1f}ms {p99:7.1f}ms {n / seconds:9.1f}")
        # The first requests wait for the data plane to open and the tunnel to be made.
        warm = lat[args.concurrency :]
        after = (
            f"p50 {pct(warm, 0.5) * 1000:.1f}ms, p99 {pct(warm, 0.99) * 1000:.1f}ms"
            if warm
            else "none"
        )
        print(
            f"  cross-domain without the first {args.concurrency} (cold start): {after}; "
            f"the first {args.concurrency}: max {max(lat[: args.concurrency]) * 1000:.1f}ms"
        )
        print(f"  ratio cross-domain/local p50: {pct(lat, 0.5) / pct(base_lat, 0.5):.2f}")
        close_ratio = pct(close_lat, 0.5) / pct(base_close_lat, 0.5)
        print(
            f"  ratio cross-domain/local close p50: {close_ratio:.2f}; connections left "
            "after closing: " + ", ".join(f"{k} {v}" for k, v in left.items())
        )
        print(f"  mean request->up: {statistics.mean(lat) * 1000:.1f} ms")
        print("  gateway RSS: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in rss.items()))
        print(
            "  gateway CPU per cross-domain connection: "
            + ", ".join(f"{k} {v:.1f} ms" for k, v in cpu_ms.items())
        )
        print(
            "  gateway CPU per cross-domain close: "
            + ", ".join(f"{k} {v:.1f} ms" for k, v in close_cpu_ms.items())
        )
        print(f"  sample checked for traffic: {passing}/{len(sample)} answer a ping")
        flowing = (
            "not within 100 pings"
            if flowing_after_ready is None
            else f"{flowing_after_ready:.3f}s after ready"
        )
        print(
            f"  serving gateway restart: stopped in {t_start - t_stop:.2f}s, ready after "
            f"{t_ready - t_start:.2f}s; traffic flowing {flowing}; "
            f"ping through it all: {received}/400 answered; {up_after} connections up after"
        )
    finally:
        if not args.keep_lab:
            await lab.down()


if __name__ == "__main__":
    asyncio.run(main())
