"""Fixtures shared by all tests: short temporary directories (unix socket paths are
limited to 107 bytes), each store, gateways in-process and as real processes."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from fedgw.clock import Clock
from fedgw.store import Store
from gateway.client import GatewayClient
from gateway.runtime import Gateway
from gateway.server import run_gateway
from gateway.settings import GatewaySettings
from gateway.store.memory import MemoryStore
from gateway.store.sqlite import SqliteStore

pytest_plugins = ["clusters.pytest_plugin"]

FEDGW = str(Path(sys.executable).with_name("fedgw"))

# Every loopback port free_port has handed out in this run, by socket type.
_ports_given: set[tuple[socket.SocketKind, int]] = set()


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out by itself (``bind`` to port 0, a connection's
    source port)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A loopback port nothing is bound to, never the same one twice in a run.

    Picked below the kernel's ephemeral range: a port there can be taken between this
    check and its use only by a process that names it, never by the kernel for an
    outgoing connection or a ``bind`` to port 0 (anyone's, this run's included: two
    ports the kernel picked one after the other were once the same and failed a CI
    run)."""
    low = min(_ephemeral_low(), 65536)
    start = max(1024, low - 12000)
    if low <= start:
        raise RuntimeError(f"the kernel's ephemeral ports start at {low}: no room below them")
    for _ in range(1000):
        port = start + secrets.randbelow(low - start)
        if (kind, port) in _ports_given:
            continue
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use
        _ports_given.add((kind, port))
        return port
    raise RuntimeError(f"no free loopback port below {low}")


async def udp_listening(port: int, proc: asyncio.subprocess.Process, within: float = 10) -> None:
    """Wait until ``proc`` (a DNS server, say) listens on UDP 127.0.0.1:``port``: until
    then a query is refused at once. Read from /proc/net/udp: binding the port to test
    it would take it from the server for that moment."""
    # /proc writes the address as the hex of the number its four bytes make in memory.
    address = int.from_bytes(socket.inet_aton("127.0.0.1"), sys.byteorder)
    wanted = f"{address:08X}:{port:04X}"
    async with asyncio.timeout(within):
        while True:
            assert proc.returncode is None, "the server exited"
            table = await asyncio.to_thread(Path("/proc/net/udp").read_text)
            if any(line.split()[1] == wanted for line in table.splitlines()[1:]):
                return
            await asyncio.sleep(0.02)


@pytest.fixture(autouse=True)
def _no_fedgw_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings and the CLI read FEDGW_* variables: one left exported in the shell that
    runs the tests would change what the tests run (and their subprocesses)."""
    for key in [k for k in os.environ if k.startswith("FEDGW_")]:
        monkeypatch.delenv(key)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """After a green run pytest removes its temporary directories, but not the per-user
    folder it made them in; that goes too when nothing else is in it."""
    folder = Path(tempfile.gettempdir()) / f"pytest-of-{getpass.getuser()}"
    with contextlib.suppress(OSError):  # not there, or holding a failed run's leftovers
        folder.rmdir()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fgw-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """Each of the gateway's stores in turn, fresh and empty."""
    s: Store = (
        await SqliteStore.open(tmp_path / "state.db")
        if request.param == "sqlite"
        else MemoryStore()
    )
    try:
        yield s
    finally:
        await s.close()


def gateway_settings(base: Path, domain: str = "cluster1", **extra: Any) -> GatewaySettings:
    # These gateways run in the host's namespace: no data plane there, ever.
    extra.setdefault("dataplane", "off")
    return GatewaySettings(
        domain=domain, state_dir=base / "state", socket=base / "gw.sock", **extra
    )


@dataclass
class InProcessGateway:
    settings: GatewaySettings
    client: GatewayClient
    task: asyncio.Task[None]
    stopping: asyncio.Event
    gateway: Gateway

    def raw(self) -> httpx.AsyncClient:
        """A bare HTTP client on the socket, for requests the typed client will not send."""
        transport = httpx.AsyncHTTPTransport(uds=str(self.settings.socket))
        return httpx.AsyncClient(transport=transport, base_url="http://fedgw")

    async def stop(self) -> None:
        self.stopping.set()
        await asyncio.wait_for(self.task, 10)


async def start_gateway(settings: GatewaySettings, clock: Clock | None = None) -> InProcessGateway:
    stopping = asyncio.Event()
    ready: asyncio.Future[Gateway] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run_gateway(settings, stopping, ready=ready.set_result, clock=clock))
    waiting: set[asyncio.Future[Any]] = {task, ready}
    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED, timeout=10)
    if task.done():
        task.result()  # raises the startup error
    assert ready.done(), "gateway did not start within 10 s"
    client = GatewayClient(settings.socket)
    return InProcessGateway(settings, client, task, stopping, ready.result())


@pytest.fixture
async def gateway(short_tmp: Path) -> AsyncIterator[InProcessGateway]:
    """A real gateway (store, registry, uvicorn on its unix socket) in this process."""
    gw = await start_gateway(gateway_settings(short_tmp, event_heartbeat=0.5))
    try:
        yield gw
    finally:
        await gw.client.close()
        await gw.stop()


@dataclass
class GatewayProcess:
    """``fedgw gateway serve`` as a separate process, driven like a user would."""

    base: Path
    domain: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.base / "gw.sock"

    @property
    def log(self) -> Path:
        return self.base / "gateway.log"

    def start(self, *extra: str) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    FEDGW,
                    "gateway",
                    "serve",
                    "--domain",
                    self.domain,
                    "--state-dir",
                    str(self.base / "state"),
                    "--socket",
                    str(self.socket),
                    # in the host's namespace: no data plane there, ever
                    "--dataplane",
                    "off",
                    *extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_healthy(20)
        except BaseException:
            self.stop(signal.SIGKILL)
            raise

    def _wait_healthy(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        transport = httpx.HTTPTransport(uds=str(self.socket))
        with httpx.Client(transport=transport, base_url="http://fedgw") as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"gateway exited {self.proc.returncode}: {self.log.read_text()}"
                    )
                try:
                    http.get("/healthz")
                    return
                except httpx.TransportError:
                    time.sleep(0.05)
        raise AssertionError(f"gateway not healthy within {timeout} s: {self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def restart(self) -> None:
        assert self.stop() == 0, self.log.read_text()
        self.start()

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run ``fedgw`` against this gateway."""
        env = {**os.environ, "FEDGW_GATEWAY": str(self.socket)}
        result = subprocess.run([FEDGW, *args], env=env, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"fedgw {' '.join(args)} -> {result.returncode}: {result.stderr}")
        return result


@pytest.fixture
def gateway_process(short_tmp: Path) -> Iterator[GatewayProcess]:
    gp = GatewayProcess(short_tmp, "cluster1")
    gp.start()
    try:
        yield gp
    finally:
        if gp.proc is not None:
            code = gp.stop()
            assert code == 0, f"gateway exited {code}: {gp.log.read_text()}"
