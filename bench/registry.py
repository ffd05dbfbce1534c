"""Registry benchmark: 100,000 endpoints across 1,000 services with labels.

Measures, in one run, each figure next to a baseline made in the same run:

* find (service + label selector) in the registry, p50/p99, against a linear scan of
  all endpoints (what the indexes save);
* find through the local API of a real gateway process, against GET /healthz on the
  same socket (the HTTP floor);
* register and refresh throughput through the API (concurrency 32), and in-process
  register throughput with group commit against one SQLite transaction per write;
* gateway RSS before and after loading, and the time a restart takes to reload.

    .venv/bin/python bench/registry.py [--endpoints 100000] [--services 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench._http import RawHttp
from fedgw.clock import SystemClock
from fedgw.models import EndpointRegistration
from gateway.events import EventBus
from gateway.registry import Registry, RegistrySettings
from gateway.store.sqlite import SqliteStore, Synchronous
from gateway.workloads import WorkloadProbe

ZONES = [f"zone-{i}" for i in range(10)]
TIERS = ["gold", "silver", "bronze", "iron", "tin"]
FEDGW = str(Path(sys.executable).with_name("fedgw"))


def endpoint_body(i: int, services: int) -> dict[str, object]:
    return {
        "name": f"nse-{i}",
        "services": [f"svc-{i % services}"],
        "labels": {"zone": ZONES[i % 10], "tier": TIERS[(i // 10) % 5], "rack": f"r{i % 97}"},
        "pool": f"10.{(i >> 8) & 255}.{i & 255}.0/24",
        "routes": ["10.60.0.0/16"],
        "ttl": 3600,
    }


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f} ms"


def row(name: str, value: str, note: str = "") -> None:
    print(f"  {name:<44} {value:>16}  {note}")


async def timed(fn: Callable[[], Awaitable[object]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t0)
    return out


async def store_throughput(
    regs: list[EndpointRegistration], workdir: Path, sync: Synchronous
) -> tuple[float, float]:
    """Puts/s of the store (group commit, 64 concurrent) and of one SQLite transaction
    per write, same rows, same synchronous mode."""
    values = [(r.name, r.model_dump_json()) for r in regs]
    store = await SqliteStore.open(workdir / f"store-{sync}.db", synchronous=sync)
    sem = asyncio.Semaphore(64)

    async def put(key: str, value: str) -> None:
        async with sem:
            await store.put("endpoints", key, value)

    t0 = time.perf_counter()
    await asyncio.gather(*(put(k, v) for k, v in values))
    grouped = len(values) / (time.perf_counter() - t0)
    await store.close()

    db = sqlite3.connect(workdir / f"naive-{sync}.db", isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute(f"PRAGMA synchronous = {sync}")
    db.execute("CREATE TABLE r (kind TEXT, key TEXT, value TEXT, PRIMARY KEY (kind, key))")
    sample = values[: 5_000 if sync == "FULL" else 20_000]
    t0 = time.perf_counter()
    for key, value in sample:
        db.execute("INSERT INTO r VALUES ('endpoints', ?, ?)", (key, value))
    naive = len(sample) / (time.perf_counter() - t0)
    db.close()
    return grouped, naive


async def in_process(n: int, services: int, workdir: Path) -> None:
    print(f"in-process registry, {n:,} endpoints, {services:,} services")
    regs = [EndpointRegistration.model_validate(endpoint_body(i, services)) for i in range(n)]
    modes: tuple[Synchronous, ...] = ("NORMAL", "FULL")
    store_rate = 0.0
    for sync in modes:
        grouped, naive = await store_throughput(regs, workdir, sync)
        row(f"store puts, group commit, synchronous={sync}", f"{grouped:,.0f} /s")
        row(
            "  baseline: one transaction per write",
            f"{naive:,.0f} /s",
            f"ratio {grouped / naive:.2f}",
        )
        if sync == "NORMAL":
            store_rate = grouped

    store = await SqliteStore.open(workdir / "registry.db")
    registry = Registry(
        store, RegistrySettings(), bus=EventBus(), clock=SystemClock(), probe=WorkloadProbe()
    )
    sem = asyncio.Semaphore(64)

    async def register(reg: EndpointRegistration) -> None:
        async with sem:
            await registry.register_endpoint(reg)

    t0 = time.perf_counter()
    await asyncio.gather(*(register(r) for r in regs))
    registered = n / (time.perf_counter() - t0)
    row(
        "registry register (64 concurrent, NORMAL)",
        f"{registered:,.0f} /s",
        f"vs store puts alone: ratio {registered / store_rate:.2f}",
    )

    rnd = random.Random(1)
    queries = [
        (f"svc-{rnd.randrange(services)}", {"zone": rnd.choice(ZONES)}) for _ in range(20_000)
    ]
    find: list[float] = []
    found = 0
    for service, selector in queries:
        t0 = time.perf_counter()
        found += len(registry.endpoints(service, selector))
        find.append(time.perf_counter() - t0)
    everything = registry.endpoints()
    scan: list[float] = []
    for service, selector in queries[:200]:
        t0 = time.perf_counter()
        [e for e in everything if e.matches(service, selector)]
        scan.append(time.perf_counter() - t0)
    row("find p50 (service + zone label)", ms(pct(find, 0.5)), f"{found / len(queries):.1f} hits")
    row("find p99", ms(pct(find, 0.99)))
    row(
        "baseline: linear scan p50",
        ms(pct(scan, 0.5)),
        f"{pct(scan, 0.5) / pct(find, 0.5):,.0f}x slower",
    )
    row("baseline: linear scan p99", ms(pct(scan, 0.99)))
    await store.close()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def start_gateway(workdir: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDGW_")}
    return subprocess.Popen(
        [
            FEDGW,
            "gateway",
            "serve",
            "--domain",
            "bench",
            "--state-dir",
            str(workdir / "state"),
            "--socket",
            str(workdir / "gw.sock"),
            "--log-level",
            "warning",
            "--dataplane",
            "off",
        ],
        env=env,
    )


async def wait_healthy(sock: str, proc: subprocess.Popen[bytes]) -> float:
    t0 = time.perf_counter()
    while proc.poll() is None:
        try:
            async with RawHttp(sock, connections=1) as http:
                await http.request("GET", "/healthz")
            return time.perf_counter() - t0
        except OSError:
            await asyncio.sleep(0.02)
    raise SystemExit(f"gateway exited with {proc.returncode}")


async def through_api(n: int, services: int, workdir: Path) -> None:
    print(f"gateway process, local API on a unix socket, {n:,} endpoints")
    proc = start_gateway(workdir)
    sock = str(workdir / "gw.sock")
    try:
        await wait_healthy(sock, proc)
        rss_empty = rss_kib(proc.pid)
        async with RawHttp(sock, connections=32) as http:

            async def call(method: str, path: str, body: object | None = None) -> None:
                status, data = await http.request(method, path, body)
                if status >= 400:
                    raise SystemExit(f"{method} {path}: {status} {data!r}")

            t0 = time.perf_counter()
            await asyncio.gather(
                *(call("POST", "/v1/endpoints", endpoint_body(i, services)) for i in range(n))
            )
            register_rate = n / (time.perf_counter() - t0)
            refreshes = min(n, 20_000)
            t0 = time.perf_counter()
            await asyncio.gather(
                *(call("POST", f"/v1/endpoints/nse-{i}/refresh", {}) for i in range(refreshes))
            )
            refresh_rate = refreshes / (time.perf_counter() - t0)
            rss_full = rss_kib(proc.pid)

            rnd = random.Random(2)

            async def find() -> None:
                service, zone = f"svc-{rnd.randrange(services)}", rnd.choice(ZONES)
                await call("GET", f"/v1/endpoints?service={service}&label=zone%3D{zone}")

            async def health() -> None:
                await call("GET", "/healthz")

            # Sequential requests, interleaved rounds so that noise hits both series alike.
            api_find: list[float] = []
            floor: list[float] = []
            for _ in range(10):
                api_find += await timed(find, 200)
                floor += await timed(health, 200)

        row("register through the API (32 concurrent)", f"{register_rate:,.0f} /s")
        row("refresh through the API (32 concurrent)", f"{refresh_rate:,.0f} /s")
        row("find via API p50", ms(pct(api_find, 0.5)))
        row("find via API p99", ms(pct(api_find, 0.99)))
        row(
            "baseline: GET /healthz p50",
            ms(pct(floor, 0.5)),
            f"find/healthz {pct(api_find, 0.5) / pct(floor, 0.5):.2f}",
        )
        row("baseline: GET /healthz p99", ms(pct(floor, 0.99)))
        row("gateway RSS, empty", f"{rss_empty / 1024:,.1f} MiB")
        row(
            f"gateway RSS, {n:,} endpoints",
            f"{rss_full / 1024:,.1f} MiB",
            f"{(rss_full - rss_empty) * 1024 / n:,.0f} bytes/endpoint",
        )

        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        proc = start_gateway(workdir)
        reload_s = await wait_healthy(sock, proc)
        async with RawHttp(sock, connections=1) as http:
            _, data = await http.request("GET", "/v1/status")
        count = json.loads(data)["endpoints"]
        row(
            "restart until healthy (reload from SQLite)",
            f"{reload_s:.2f} s",
            f"{count:,} endpoints back",
        )
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--endpoints", type=int, default=100_000)
    parser.add_argument("--services", type=int, default=1_000)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="fgw-bench-"))
    try:
        print(f"fedgw registry benchmark on {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
        await in_process(args.endpoints, args.services, workdir)
        await through_api(args.endpoints, args.services, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
