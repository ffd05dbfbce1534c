"""mTLS benchmark: what SPIFFE mutual TLS costs on the federation API.

One gateway process serves the same handler (GET /healthz) twice: on its plain-HTTP
health listener (the baseline) and on its federation listener (mutual TLS with SPIFFE
identities, verified per trust domain inside the handshake). A client holding an SVID
of a second domain, which the gateway trusts through a static federated bundle, measures
in the same run, interleaved:

* requests/s over one kept-alive connection (mTLS vs plain);
* requests/s with a new connection per request (mTLS handshake vs TCP connect);
* and the latency of each, median and p99.

    .venv/bin/python -m bench.mtls [--seconds 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench._http import Target, close, exchange
from spire_integration import BuiltinCA, SpiffeId, TrustBundle, client_context

FEDGW = str(Path(sys.executable).with_name("fedgw"))


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports: each socket stays bound until all are picked, or the
    kernel could pick one port twice."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_for(seconds: float, once: Callable[[], Awaitable[None]]) -> list[float]:
    """Call ``once`` back to back for ``seconds``; the latency of each call."""
    latencies: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        await once()
        latencies.append(time.perf_counter() - t0)
    return latencies


async def keep_alive(target: Target, seconds: float) -> list[float]:
    stream = await target.connect()
    try:

        async def once() -> None:
            status, _ = await exchange(stream, "GET", "/healthz")
            assert status == 200, status

        return await run_for(seconds, once)
    finally:
        await close(stream)


async def new_connections(target: Target, seconds: float) -> list[float]:
    async def once() -> None:
        stream = await target.connect()
        try:
            status, _ = await exchange(stream, "GET", "/healthz")
            assert status == 200, status
        finally:
            await close(stream)

    return await run_for(seconds, once)


async def wait_up(port: int, proc: asyncio.subprocess.Process) -> None:
    while proc.returncode is None:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise SystemExit(f"gateway exited with {proc.returncode}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    args = parser.parse_args()
    seconds: float = args.seconds
    rounds: int = args.rounds
    work = Path(tempfile.mkdtemp(prefix="fgw-mtls-"))
    proc: asyncio.subprocess.Process | None = None
    try:
        # The client's domain: its own CA and a gateway SVID from it.
        peer_ca = BuiltinCA("cluster2", work / "cluster2-ca")
        peer_svid = peer_ca.issue_svid()
        (work / "cluster2.json").write_text(peer_ca.bundle().to_json())
        http_port, tls_port = free_ports(2)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEDGW_")}
        proc = await asyncio.create_subprocess_exec(
            FEDGW, "gateway", "serve", "--domain", "cluster1", "--state-dir", str(work / "state"),
             "--socket", str(work / "gw.sock"), "--log-level", "warning", "--dataplane", "off",
             "--health-listen", f"127.0.0.1:{http_port}", "--listen", f"127.0.0.1:{tls_port}",
             "--federated-bundle", f"cluster2={work / 'cluster2.json'}",
            env=env,
        )  # fmt: skip
        await wait_up(tls_port, proc)
        server_bundle = await asyncio.to_thread(
            lambda: (work / "state" / "identity" / "bundle.json").read_text()
        )
        context = client_context(
            peer_svid,
            TrustBundle.parse("cluster1", server_bundle),
            SpiffeId.for_gateway("cluster1"),
        )
        plain = Target(port=http_port)
        mtls = Target(port=tls_port, ssl=context)
        series: dict[str, list[float]] = {
            k: [] for k in ("ka-plain", "ka-mtls", "nc-plain", "nc-mtls")
        }
        for _ in range(rounds):
            series["ka-plain"] += await keep_alive(plain, seconds)
            series["ka-mtls"] += await keep_alive(mtls, seconds)
            series["nc-plain"] += await new_connections(plain, seconds)
            series["nc-mtls"] += await new_connections(mtls, seconds)

        def rate(key: str) -> float:
            return len(series[key]) / (seconds * rounds)

        print(f"fedgw mTLS benchmark, {os.cpu_count()} CPUs; GET /healthz, one client, sequential")
        print(f"  {'':34} {'req/s':>9} {'p50':>9} {'p99':>9}")
        for key, label in (
            ("ka-plain", "keep-alive, plain HTTP (baseline)"),
            ("ka-mtls", "keep-alive, SPIFFE mTLS"),
            ("nc-plain", "new connection, plain HTTP"),
            ("nc-mtls", "new connection, SPIFFE mTLS"),
        ):
            s = series[key]
            print(
                f"  {label:34} {rate(key):9,.0f} {pct(s, 0.5) * 1000:7.3f}ms "
                f"{pct(s, 0.99) * 1000:7.3f}ms"
            )
        print(f"  ratio mTLS/plain, keep-alive:      {rate('ka-mtls') / rate('ka-plain'):.2f}")
        print(f"  ratio mTLS/plain, new connections: {rate('nc-mtls') / rate('nc-plain'):.2f}")
        handshake = statistics.median(series["nc-mtls"]) - statistics.median(series["ka-mtls"])
        print(f"  median cost of an mTLS handshake:  {handshake * 1000:.2f} ms")
    finally:
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
