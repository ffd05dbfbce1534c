"""The network-namespace lab: N simulated clusters on one Linux host, with real kernel
networking and one real gateway process per cluster.

Topology of a lab named ``fedgw`` (every name starts with ``<lab>.``, so two labs never
collide and leftovers of a crashed run are found by that prefix)::

    fedgw.inet                      the "internet": bridge br0, 198.18.0.1/24
     ├── u1 ─ uplink  fedgw.cluster1        gateway node, 198.18.0.11
     ├── u2 ─ uplink  fedgw.cluster2        gateway node, 198.18.0.12
     └── u3 ─ wan     fedgw.cluster3.nat    NAT router, 198.18.0.13 (with --nat cluster3)
                      lan ─ uplink fedgw.cluster3   gateway node, 192.168.103.2
    fedgw.cluster1.<workload>       workload namespaces, unwired until fedgw wires them

198.18.0.0/15 is the benchmarking range (RFC 2544): it is never routed on the internet,
and nothing in the lab has a route out of the lab. A NAT router masquerades what its
cluster sends out and drops every unsolicited packet from outside, except TCP to the
federation API (8443) and the bundle endpoint (8444), which it forwards to the gateway
node so that peers can reach them. WireGuard's UDP port is deliberately not forwarded:
the NAT'd side keeps its mapping open with persistent keepalives, as behind a real NAT.

Nothing is ever created in the host's own namespace: namespaces are made with
``ip netns add`` and veth pairs are created with each end directly in its namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
from pydantic import BaseModel

from clusters.errors import LabConflict, LabGatewayFailed, LabInvalid, LabNeedsRoot, LabNotFound
from fedgw.names import InvalidName, check_name
from wireguard.netns import (
    Rtnl,
    create_netns,
    delete_netns,
    list_netns,
    netns_exists,
    netns_pids,
    run,
    set_sysctl,
)

LAB_ROOT = Path("/run/fedgw-lab")
UAPI_DIR = Path("/var/run/wireguard")
UNDERLAY = ipaddress.IPv4Network("198.18.0.0/24")
INTERNET_ADDRESS = ipaddress.IPv4Interface("198.18.0.1/24")
HEALTH_PORT = 8080
FEDERATION_PORT = 8443
BUNDLE_PORT = 8444
MAX_CLUSTERS = 99
MAX_LAB_NAME = 20
RESERVED_WORKLOADS = frozenset({"nat"})
FEDGW = str(Path(sys.executable).with_name("fedgw"))

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


class ClusterSpec(BaseModel):
    """One simulated cluster; its name is also its domain."""

    name: str
    index: int
    nat: bool = False

    @property
    def public_address(self) -> ipaddress.IPv4Interface:
        """Where the cluster is reached from the underlay (its router's, when NAT'd)."""
        return ipaddress.IPv4Interface(f"{UNDERLAY[10 + self.index]}/{UNDERLAY.prefixlen}")

    @property
    def lan(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"192.168.{100 + self.index}.0/24")

    @property
    def node_address(self) -> ipaddress.IPv4Interface:
        """The gateway node's own address: public, or private behind its NAT router."""
        if not self.nat:
            return self.public_address
        return ipaddress.IPv4Interface(f"{self.lan[2]}/{self.lan.prefixlen}")

    @property
    def router_lan_address(self) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface(f"{self.lan[1]}/{self.lan.prefixlen}")


class LabState(BaseModel):
    """What ``lab.json`` records of a lab that is up."""

    name: str
    clusters: list[ClusterSpec]
    created_at: datetime

    def cluster(self, name: str) -> ClusterSpec:
        for c in self.clusters:
            if c.name == name:
                return c
        known = ", ".join(c.name for c in self.clusters)
        raise LabNotFound(f"lab {self.name} has no cluster {name!r} (it has {known})")


class ClusterStatus(BaseModel):
    name: str
    netns: str
    nat: bool
    router_netns: str | None
    public_address: str
    node_address: str
    gateway_pid: int | None
    healthy: bool
    health: str
    socket: str
    log: str
    workloads: list[str]


class LabStatus(BaseModel):
    name: str
    up: bool
    directory: str
    underlay_netns: str
    clusters: list[ClusterStatus]


@dataclass(frozen=True)
class LabLayout:
    """Where everything of one lab lives: names of namespaces and files."""

    name: str
    root: Path = LAB_ROOT

    @property
    def prefix(self) -> str:
        return f"{self.name}."

    @property
    def dir(self) -> Path:
        return self.root / self.name

    @property
    def state_file(self) -> Path:
        return self.dir / "lab.json"

    @property
    def underlay(self) -> str:
        return f"{self.name}.inet"

    @property
    def tag(self) -> str:
        """Four hex digits naming this lab where names are host-wide and short
        (wireguard-go interfaces and their UAPI sockets)."""
        return hashlib.sha256(self.name.encode()).hexdigest()[:4]

    def interface_prefix(self, index: int) -> str:
        """Start of the names of a cluster gateway's interfaces: wireguard-go names are
        host-wide, so it holds the lab's tag; fixed width, so that no cluster's prefix
        starts another's."""
        return f"w{self.tag[:3]}{index:02d}"

    def node(self, cluster: str) -> str:
        return f"{self.name}.{cluster}"

    def router(self, cluster: str) -> str:
        return f"{self.name}.{cluster}.nat"

    def workload(self, cluster: str, workload: str) -> str:
        return f"{self.name}.{cluster}.{workload}"

    def cluster_dir(self, cluster: str) -> Path:
        return self.dir / cluster

    def socket(self, cluster: str) -> Path:
        return self.cluster_dir(cluster) / "gw.sock"

    def log(self, cluster: str) -> Path:
        return self.cluster_dir(cluster) / "gateway.log"

    def pid_file(self, cluster: str) -> Path:
        return self.cluster_dir(cluster) / "gateway.pid"

    def gateway_state(self, cluster: str) -> Path:
        return self.cluster_dir(cluster) / "state"


def check_lab_name(name: str) -> str:
    try:
        check_name(name, "lab name")
    except InvalidName as exc:
        raise LabInvalid(str(exc)) from None
    if len(name) > MAX_LAB_NAME:
        raise LabInvalid(f"lab name {name!r} is longer than {MAX_LAB_NAME} characters")
    return name


class Lab:
    """One lab on this host. ``progress`` receives a line per step of ``up``/``down``."""

    def __init__(
        self,
        name: str = "fedgw",
        *,
        root: Path = LAB_ROOT,
        fedgw: str = FEDGW,
        progress: Progress = _quiet,
        gateway_args: Sequence[str] = (),
    ) -> None:
        self.layout = LabLayout(check_lab_name(name), root)
        self.fedgw = fedgw
        self.progress = progress
        self.gateway_args = list(gateway_args)
        """Extra ``fedgw gateway serve`` flags for every gateway (tests shorten leases)."""

    @property
    def name(self) -> str:
        return self.layout.name

    # --- state -------------------------------------------------------------------------

    def load(self) -> LabState | None:
        try:
            return LabState.model_validate_json(self.layout.state_file.read_text())
        except FileNotFoundError:
            return None

    def require(self) -> LabState:
        state = self.load()
        if state is None:
            raise LabNotFound(f"lab {self.name} is not up (start it with `fedgw lab up`)")
        return state

    def _save(self, state: LabState) -> None:
        self.layout.dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        tmp = self.layout.state_file.with_suffix(".tmp")
        tmp.write_text(state.model_dump_json(indent=2))
        tmp.replace(self.layout.state_file)

    @staticmethod
    def plan(name: str, clusters: int, nat: Sequence[str]) -> LabState:
        if not 1 <= clusters <= MAX_CLUSTERS:
            raise LabInvalid(f"--clusters must be between 1 and {MAX_CLUSTERS}, not {clusters}")
        names = [f"cluster{i}" for i in range(1, clusters + 1)]
        unknown = sorted(set(nat) - set(names))
        if unknown:
            raise LabInvalid(
                f"--nat {', '.join(unknown)}: no such cluster (this lab has {', '.join(names)})"
            )
        specs = [ClusterSpec(name=n, index=i, nat=n in nat) for i, n in enumerate(names, 1)]
        return LabState(name=name, clusters=specs, created_at=datetime.now(UTC))

    # --- up ----------------------------------------------------------------------------

    async def up(self, clusters: int = 2, nat: Sequence[str] = ()) -> LabState:
        """Build the lab, or complete it: every step is skipped if already done, and a
        gateway that is not running is started again."""
        _require_root()
        wanted = self.plan(self.name, clusters, nat)
        state = self.load()
        if state is not None:
            shape = [(c.name, c.nat) for c in state.clusters]
            if shape != [(c.name, c.nat) for c in wanted.clusters]:
                raise LabConflict(
                    f"lab {self.name} is up with another shape "
                    f"({len(state.clusters)} clusters, NAT: "
                    f"{', '.join(c.name for c in state.clusters if c.nat) or 'none'}); "
                    f"take it down first (`fedgw lab down --name {self.name}`)"
                )
        else:
            state = wanted
        t0 = time.monotonic()
        self._save(state)  # first, so that `down` after a crash knows what to remove
        await self._underlay()
        for cluster in state.clusters:
            await self._cluster(cluster)
        # Gateways start together: each takes most of a second to import and load.
        await asyncio.gather(*(self._gateway(c) for c in state.clusters))
        self.progress(f"lab {self.name} is up ({time.monotonic() - t0:.1f}s)")
        return state

    async def _underlay(self) -> None:
        ns = self.layout.underlay
        created = await create_netns(ns)
        async with Rtnl(ns) as rtnl:
            await rtnl.add_bridge("br0")
            await rtnl.set_link("br0", up=True)
            await rtnl.add_address("br0", INTERNET_ADDRESS)
        if created:
            self.progress(f"underlay {ns}: bridge br0, {INTERNET_ADDRESS}")

    async def _cluster(self, c: ClusterSpec) -> None:
        node = self.layout.node(c.name)
        created = await create_netns(node)
        # The side that faces the underlay: the node itself, or its NAT router.
        edge = self.layout.router(c.name) if c.nat else node
        edge_if = "wan" if c.nat else "uplink"
        if c.nat:
            await create_netns(edge)
        async with Rtnl(self.layout.underlay) as inet:
            await inet.add_veth(f"u{c.index}", edge_if, edge)
            await inet.set_link(f"u{c.index}", master="br0", up=True)
        async with Rtnl(edge) as rtnl:
            await rtnl.set_link(edge_if, up=True)
            await rtnl.add_address(edge_if, c.public_address)
        if c.nat:
            async with Rtnl(edge) as router:
                await router.add_veth("lan", "uplink", node)
                await router.set_link("lan", up=True)
                await router.add_address("lan", c.router_lan_address)
            async with Rtnl(node) as rtnl:
                await rtnl.set_link("uplink", up=True)
                await rtnl.add_address("uplink", c.node_address)
                await rtnl.add_route("0.0.0.0/0", via=str(c.router_lan_address.ip))
            await set_sysctl(edge, "net.ipv4.ip_forward", "1")
            await run("ip", "netns", "exec", edge, "nft", "-f", "-", input=_nat_rules(c).encode())
        if created:
            where = f"behind NAT {edge} ({c.public_address.ip})" if c.nat else "on the underlay"
            self.progress(f"{c.name}: gateway node {node}, {c.node_address.ip} {where}")

    async def _gateway(self, c: ClusterSpec) -> None:
        layout = self.layout
        if await self._healthy(c.name):
            return
        pid = self._gateway_pid(c.name)
        if pid is not None:
            await _terminate([pid])  # alive but not answering: start afresh
        layout.cluster_dir(c.name).mkdir(parents=True, exist_ok=True)
        argv = [
            "ip", "netns", "exec", layout.node(c.name),
            self.fedgw, "gateway", "serve",
            "--domain", c.name,
            "--state-dir", str(layout.gateway_state(c.name)),
            "--socket", str(layout.socket(c.name)),
            "--health-listen", f"0.0.0.0:{HEALTH_PORT}",
            "--listen", f"0.0.0.0:{FEDERATION_PORT}",
            "--bundle-listen", f"0.0.0.0:{BUNDLE_PORT}",
            "--advertise", str(c.public_address.ip),
            "--interface-prefix", layout.interface_prefix(c.index),
            # The node's namespace is the gateway's alone once its uplink is made.
            "--ipv6-as-needed",
            *(["--behind-nat"] if c.nat else []),
            *self.gateway_args,
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEDGW_")}
        pid = await asyncio.to_thread(_spawn_detached, argv, env, layout.log(c.name))
        layout.pid_file(c.name).write_text(f"{pid}\n")
        deadline = time.monotonic() + 30
        while not await self._healthy(c.name):
            if not _alive(pid):
                tail = _tail(layout.log(c.name))
                raise LabGatewayFailed(f"{c.name}: gateway exited during start-up:\n{tail}")
            if time.monotonic() > deadline:
                raise LabGatewayFailed(
                    f"{c.name}: gateway not healthy after 30 s; see {layout.log(c.name)}"
                )
            await asyncio.sleep(0.05)
        self.progress(f"{c.name}: gateway healthy (pid {pid}, socket {layout.socket(c.name)})")

    # --- workloads and exec --------------------------------------------------------------

    async def add_workload(self, cluster: str, workload: str) -> str:
        """A workload namespace of ``cluster``: only ``lo``, until fedgw wires it."""
        _require_root()
        state = self.require()
        state.cluster(cluster)
        try:
            check_name(workload, "workload name")
        except InvalidName as exc:
            raise LabInvalid(str(exc)) from None
        if workload in RESERVED_WORKLOADS:
            raise LabInvalid(f"workload name {workload!r} is reserved")
        ns = self.layout.workload(cluster, workload)
        if await create_netns(ns):
            self.progress(f"{cluster}: workload namespace {ns}")
        return ns

    def workloads(self, cluster: str) -> list[str]:
        prefix = self.layout.workload(cluster, "")
        router = self.layout.router(cluster)
        return [ns.removeprefix(prefix) for ns in list_netns(prefix) if ns != router]

    def netns_of(self, cluster: str, workload: str | None = None) -> str:
        state = self.require()
        state.cluster(cluster)
        if workload is None:
            return self.layout.node(cluster)
        ns = self.layout.workload(cluster, workload)
        if not netns_exists(ns):
            raise LabNotFound(
                f"cluster {cluster} has no workload {workload!r} "
                f"(add it with `fedgw lab workload add {cluster} {workload}`)"
            )
        return ns

    def exec_command(
        self, cluster: str, argv: Sequence[str], workload: str | None = None
    ) -> tuple[list[str], dict[str, str]]:
        """argv and environment that run ``argv`` inside the cluster's gateway node (or
        one of its workloads), with FEDGW_GATEWAY pointing at that cluster's gateway."""
        if not argv:
            raise LabInvalid("no command given (write it after --)")
        ns = self.netns_of(cluster, workload)
        env = dict(os.environ)
        env["FEDGW_GATEWAY"] = str(self.layout.socket(cluster))
        # The fedgw that runs the lab is the one on PATH inside it, venv or not.
        bindir = str(Path(self.fedgw).parent)
        env["PATH"] = os.pathsep.join([bindir, env.get("PATH", os.defpath)])
        return ["ip", "netns", "exec", ns, *argv], env

    async def run(
        self, cluster: str, *argv: str, workload: str | None = None, check: bool = True
    ) -> tuple[int, str, str]:
        """Run a command in a lab namespace and collect its output (for tests and tools)."""
        full, env = self.exec_command(cluster, argv, workload)
        proc = await asyncio.create_subprocess_exec(
            *full, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await proc.communicate()
        code = proc.returncode
        assert code is not None
        if check and code != 0:
            raise LabGatewayFailed(
                f"`{' '.join(argv)}` in {full[3]} exited {code}: {err.decode().strip()}"
            )
        return code, out.decode(), err.decode()

    # --- status ------------------------------------------------------------------------

    async def status(self) -> LabStatus:
        state = self.require()
        clusters = []
        for c in state.clusters:
            healthy, health = await self._health(c.name)
            clusters.append(
                ClusterStatus(
                    name=c.name,
                    netns=self.layout.node(c.name),
                    nat=c.nat,
                    router_netns=self.layout.router(c.name) if c.nat else None,
                    public_address=str(c.public_address.ip),
                    node_address=str(c.node_address.ip),
                    gateway_pid=self._gateway_pid(c.name),
                    healthy=healthy,
                    health=health,
                    socket=str(self.layout.socket(c.name)),
                    log=str(self.layout.log(c.name)),
                    workloads=self.workloads(c.name),
                )
            )
        return LabStatus(
            name=self.name,
            up=all(c.healthy for c in clusters),
            directory=str(self.layout.dir),
            underlay_netns=self.layout.underlay,
            clusters=clusters,
        )

    async def _health(self, cluster: str) -> tuple[bool, str]:
        sock = self.layout.socket(cluster)
        if not sock.exists():
            return False, "no socket"
        transport = httpx.AsyncHTTPTransport(uds=str(sock))
        try:
            async with httpx.AsyncClient(transport=transport, timeout=2.0) as http:
                response = await http.get("http://gateway/healthz")
        except httpx.HTTPError as exc:
            return False, f"unreachable: {exc or type(exc).__name__}"
        if response.status_code != 200:
            return False, f"HTTP {response.status_code}"
        domain = response.json().get("domain")
        if domain != cluster:
            return False, f"serves domain {domain!r}"
        return True, "ok"

    async def _healthy(self, cluster: str) -> bool:
        return (await self._health(cluster))[0]

    def _gateway_pid(self, cluster: str) -> int | None:
        """The recorded gateway pid, if that process is still the lab's gateway."""
        try:
            pid = int(self.layout.pid_file(cluster).read_text())
        except (OSError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        # A reused pid would not carry this cluster's socket path on its command line.
        return pid if str(self.layout.socket(cluster)).encode() in cmdline else None

    # --- down --------------------------------------------------------------------------

    async def down(self, keep_state: bool = False) -> list[str]:
        """Stop every process in the lab's namespaces, remove the namespaces (with their
        links), the lab's UAPI sockets and its directory. Works from any leftover,
        including those of an ``up`` that was killed half-way; harmless if nothing is up."""
        _require_root()
        removed: list[str] = []
        namespaces = list_netns(self.layout.prefix)
        state = self.load()
        gateways = {
            pid
            for cluster in (state.clusters if state else [])
            if (pid := self._gateway_pid(cluster.name)) is not None
        }
        # Gateways first: a gateway still running might start a process again (a
        # wireguard-go it sees die). Then whatever is left in the namespaces, in rounds,
        # until nothing is.
        stopped = len(gateways)
        if gateways:
            await _terminate(sorted(gateways))
        for _ in range(5):
            pids = set(netns_pids(namespaces))
            if not pids:
                break
            await _terminate(sorted(pids))
            stopped += len(pids)
        if stopped:
            removed.append(f"{stopped} process(es)")
            self.progress(f"stopped {stopped} process(es)")
        removed += await asyncio.to_thread(self._remove_uapi_sockets)
        # Workloads first, the underlay last: a veth goes with the first of its two ends.
        for ns in sorted(namespaces, key=lambda n: (n == self.layout.underlay, -n.count("."))):
            if await delete_netns(ns):
                removed.append(ns)
                self.progress(f"removed namespace {ns}")
        if self.layout.dir.exists():
            if keep_state:
                self._strip_to_state()
            else:
                shutil.rmtree(self.layout.dir)
                removed.append(str(self.layout.dir))
                with contextlib.suppress(OSError):
                    self.layout.root.rmdir()  # only if no other lab lives there
        if not removed:
            self.progress(f"lab {self.name} was not up; nothing to remove")
        return removed

    def _remove_uapi_sockets(self) -> list[str]:
        """UAPI sockets of this lab's wireguard-go interfaces that outlived them."""
        removed = []
        for sock in sorted(UAPI_DIR.glob(f"w{self.layout.tag[:3]}*.sock")):
            sock.unlink(missing_ok=True)
            removed.append(str(sock))
        return removed

    def _strip_to_state(self) -> None:
        """Keep each cluster's gateway state (and its log); drop everything else."""
        for entry in self.layout.dir.iterdir():
            if entry.is_dir():
                for item in entry.iterdir():
                    if item.name not in {"state", "gateway.log"}:
                        if item.is_dir():
                            shutil.rmtree(item)
                        else:
                            item.unlink()
            else:
                entry.unlink()


@contextlib.asynccontextmanager
async def running_lab(
    name: str,
    clusters: int = 2,
    nat: Sequence[str] = (),
    *,
    progress: Progress = _quiet,
    gateway_args: Sequence[str] = (),
) -> AsyncIterator[Lab]:
    """A lab that is up inside the block and taken down after it, whatever happens."""
    lab = Lab(name, progress=progress, gateway_args=gateway_args)
    try:
        await lab.up(clusters, nat)
        yield lab
    finally:
        await lab.down()


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabNeedsRoot("the lab needs root: it creates network namespaces (run it with sudo)")


def _nat_rules(c: ClusterSpec) -> str:
    node = c.node_address.ip
    # Flush first so that applying the rules again (a second `up`) is harmless.
    return f"""
table ip fedgw_nat
delete table ip fedgw_nat
table ip fedgw_nat {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "wan" tcp dport {{ {FEDERATION_PORT}, {BUNDLE_PORT} }} dnat to {node}
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" masquerade
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "lan" oifname "wan" accept
        iifname "wan" ct status dnat accept
    }}
    chain input {{
        type filter hook input priority filter; policy drop;
        ct state established,related accept
        iifname {{ "lo", "lan" }} accept
    }}
}}
"""


async def spawn_in_netns(netns: str, argv: list[str], log: Path) -> int:
    """Start ``argv`` inside a lab namespace, detached: it runs until ``fedgw lab down``
    stops every process of the lab's namespaces."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDGW_")}
    return await asyncio.to_thread(_spawn_detached, ["ip", "netns", "exec", netns, *argv], env, log)


def _spawn_detached(argv: list[str], env: dict[str, str], log: Path) -> int:
    """Start a process that outlives this one (own session, output to ``log``)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        path = shutil.which(argv[0]) or argv[0]
        return os.posix_spawn(
            path,
            argv,
            env,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, fd, 1),
                (os.POSIX_SPAWN_DUP2, fd, 2),
            ],
            setsid=True,
        )
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    """Is ``pid`` running? Reaps it first if it is our own exited child."""
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


async def _terminate(pids: Sequence[int], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL whatever is still there after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        waiting = [pid for pid in pids if _alive(pid)]
        for pid in waiting:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        try:
            async with asyncio.timeout(grace):
                await wait_exited(waiting)
            return
        except TimeoutError:
            continue


async def wait_exited(pids: Sequence[int]) -> None:
    """Wait until every process in ``pids`` has exited (pidfds: no polling)."""
    loop = asyncio.get_running_loop()
    waits: list[asyncio.Future[None]] = []
    fds: list[int] = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        fds.append(fd)
        done: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, _settle, done)
        waits.append(done)
    try:
        await asyncio.gather(*waits)
    finally:
        for fd in fds:
            loop.remove_reader(fd)
            os.close(fd)
        for pid in pids:
            _alive(pid)  # reaps it if it was our child


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
