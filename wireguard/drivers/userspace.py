"""The userspace driver: one supervised ``wireguard-go`` process per interface, started
in the interface's namespace and configured through its UAPI socket."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, ClassVar, Literal

from wireguard.drivers import uapi
from wireguard.drivers.base import (
    DriverKind,
    InterfaceRef,
    InterfaceSpec,
    InterfaceState,
    PeerUpdate,
    WireGuardDriver,
)
from wireguard.errors import (
    CommandFailed,
    DriverUnavailable,
    InterfaceConflict,
    InterfaceDied,
    LinkNotFound,
    NamespaceNotFound,
    UapiFailed,
)
from wireguard.keys import PublicKey
from wireguard.netns import Rtnl, netns_exists, netns_inode, run

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class UserspaceSettings:
    """How to run ``wireguard-go``."""

    binary: str = "wireguard-go"
    """The daemon; any implementation of the xplatform interface (``NAME -f``) works."""
    ip_binary: str = "ip"
    """``ip`` from iproute2, used as ``ip netns exec NS`` to start the daemon in a namespace."""
    socket_dir: Path = uapi.SOCKET_DIR
    """Where the daemon puts ``NAME.sock`` (compiled into wireguard-go; change only for
    daemons that differ)."""
    log_dir: Path | None = None
    """Each daemon's output goes to ``log_dir/NAME.log`` (appended); ``None`` discards it.
    A file, not a pipe: a daemon must survive a restart of the gateway."""
    log_level: Literal["verbose", "error", "silent"] = "error"
    start_timeout: float = 5.0
    """Seconds for a new daemon to answer on its socket."""
    stop_timeout: float = 3.0
    """Seconds between SIGTERM and SIGKILL."""
    uapi_timeout: float = 3.0
    """Seconds for one UAPI request."""


@dataclass(frozen=True, slots=True)
class ProcessExit:
    """A daemon that exited without being asked to."""

    iface: InterfaceRef
    pid: int
    returncode: int | None
    """``None`` for an adopted daemon: only its parent learns its status."""
    log_tail: str
    at: float = field(default_factory=time.time)

    def describe(self) -> str:
        status = "unknown status" if self.returncode is None else f"status {self.returncode}"
        if self.returncode is not None and self.returncode < 0:
            try:
                status = f"signal {signal.Signals(-self.returncode).name}"
            except ValueError:
                status = f"signal {-self.returncode}"
        tail = f": {self.log_tail}" if self.log_tail else ""
        return f"wireguard-go of {self.iface} (pid {self.pid}) exited with {status}{tail}"


OnExit = Callable[[ProcessExit], None]


@dataclass(eq=False)
class _Daemon:
    """A daemon: our child (``proc``; asyncio reaps it, and signals only while it is
    not reaped), or adopted from an earlier gateway (``pidfd``, which keeps meaning
    that process even if its pid is reused)."""

    ref: InterfaceRef
    pid: int
    proc: asyncio.subprocess.Process | None = None
    pidfd: int | None = None
    watcher: asyncio.Task[None] | None = None
    exit: ProcessExit | None = None
    stopping: bool = False

    def signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            if self.proc is not None:
                self.proc.send_signal(sig)
            elif self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, sig)

    async def wait(self) -> int | None:
        """Until it exits; its status if it is our child."""
        if self.proc is not None:
            return await self.proc.wait()
        if self.pidfd is not None:
            await _wait_pidfd(self.pidfd)
        return None

    def release(self) -> None:
        if self.pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = None


class UserspaceDriver(WireGuardDriver):
    """WireGuard through ``wireguard-go``.

    Supervision: each daemon is a child in its own session (a Ctrl-C of the gateway does
    not reach it) with its output in a file, watched by a task. When it dies unasked,
    the driver removes its stale socket, logs, calls ``on_exit`` and from then on
    answers :class:`InterfaceDied` for that interface. It does not restart it: a new
    daemon comes up without peers, a half-configured interface that looks healthy, so
    the restart belongs to the reconciler, which calls :meth:`ensure_interface` (that
    starts a new daemon) and then sets the peers again.

    Adoption: when the gateway restarts, its daemons keep running. ``ensure_interface``
    recognises one by its socket ``socket_dir/NAME.sock``: the process listening there
    (SO_PEERCRED) must be the daemon binary, live in the interface's namespace (inode
    of ``/proc/PID/ns/net``), answer ``get=1``, and its TUN link must exist. Such a
    daemon is adopted (watched through a pidfd) with its peers and sessions intact; an
    unhealthy one is stopped and replaced; one in another namespace is a conflict,
    since the socket path makes userspace interface names unique on the host.
    """

    kind: ClassVar[DriverKind] = "userspace"

    def __init__(
        self, settings: UserspaceSettings | None = None, *, on_exit: OnExit | None = None
    ) -> None:
        super().__init__()
        self.settings = settings or UserspaceSettings()
        self._on_exit = on_exit
        self._daemons: dict[str, _Daemon] = {}
        self._version: str | None = None

    @property
    def name(self) -> str:
        return self._version or Path(self.settings.binary).name

    async def check(self) -> None:
        """Fail with :class:`DriverUnavailable` unless the daemon binary runs; learn its
        version for :attr:`name`."""
        if shutil.which(self.settings.binary) is None:
            raise DriverUnavailable(
                f"{self.settings.binary} is not installed (Debian: apt install wireguard-go)",
                retryable=False,
            )
        try:
            out = await run(self.settings.binary, "--version")
        except CommandFailed as exc:
            raise DriverUnavailable(
                f"{self.settings.binary} does not run: {exc}", retryable=False
            ) from exc
        first = out.strip().splitlines()[0] if out.strip() else ""
        self._version = first.split(" - ")[0] or None

    # --- paths and identity -------------------------------------------------------------

    def _socket(self, name: str) -> Path:
        return uapi.socket_path(self.settings.socket_dir, name)

    def _log_path(self, name: str) -> Path | None:
        return self.settings.log_dir / f"{name}.log" if self.settings.log_dir else None

    def _uapi(self, name: str) -> uapi.UapiSocket:
        return uapi.UapiSocket(self._socket(name), self.settings.uapi_timeout)

    @staticmethod
    def _netns_of(netns: str | None) -> int | None:
        """The inode that identifies a namespace (``None``: ours)."""
        if netns is None:
            return os.stat("/proc/self/ns/net").st_ino
        return netns_inode(netns)

    def _describe_owner(self, pid: int) -> tuple[str, int | None]:
        """The command name and network namespace inode of ``pid``."""
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            ino = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            return "", None
        return comm, ino

    def _is_daemon(self, comm: str) -> bool:
        return comm == Path(self.settings.binary).name[:15]  # comm holds 15 characters

    def _remove_stale_socket(self, name: str) -> None:
        path = self._socket(name)
        if path.exists() and uapi.owner_pid(path) is None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # --- supervision ----------------------------------------------------------------------

    def _watch(self, daemon: _Daemon) -> None:
        daemon.watcher = asyncio.create_task(
            self._supervise(daemon), name=f"wireguard-go {daemon.ref.name} (pid {daemon.pid})"
        )

    async def _supervise(self, daemon: _Daemon) -> None:
        returncode = await daemon.wait()
        if daemon.stopping:
            return
        tail = await asyncio.to_thread(_tail, self._log_path(daemon.ref.name))
        daemon.exit = ProcessExit(daemon.ref, daemon.pid, returncode, tail)
        log.warning("%s", daemon.exit.describe())
        await asyncio.to_thread(self._remove_stale_socket, daemon.ref.name)
        if self._on_exit is not None:
            try:
                self._on_exit(daemon.exit)
            except Exception:  # a broken callback must not hide the death from the log
                log.exception("on_exit callback failed for %s", daemon.ref)

    async def _start(self, ref: InterfaceRef) -> _Daemon:
        argv = [self.settings.binary, "-f", ref.name]
        if ref.netns is not None:
            # The TUN device is created in the namespace the daemon runs in.
            argv = [self.settings.ip_binary, "netns", "exec", ref.netns, *argv]
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "LOG_LEVEL": self.settings.log_level,
            "WG_PROCESS_FOREGROUND": "1",
        }
        log_path = self._log_path(ref.name)
        output: IO[bytes] | int = asyncio.subprocess.DEVNULL
        if log_path is not None:
            output = await asyncio.to_thread(_open_log, log_path)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise DriverUnavailable(f"cannot start {argv[0]}: {exc.strerror}") from exc
        finally:
            if not isinstance(output, int):
                output.close()
        daemon = _Daemon(ref, proc.pid, proc=proc)
        try:
            await self._wait_ready(daemon)
        except BaseException:
            await self._stop(daemon)
            raise
        self._watch(daemon)
        log.info("started wireguard-go for %s (pid %d)", ref, daemon.pid)
        return daemon

    async def _wait_ready(self, daemon: _Daemon) -> None:
        assert daemon.proc is not None
        path = self._socket(daemon.ref.name)
        deadline = time.monotonic() + self.settings.start_timeout
        # Polled at most 10 ms apart: the daemon is up in 5-20 ms, and a longer pause
        # would be the bulk of a new tunnel's wait.
        delay = 0.005
        while True:
            if daemon.proc.returncode is not None:
                tail = await asyncio.to_thread(_tail, self._log_path(daemon.ref.name))
                raise CommandFailed(
                    f"wireguard-go for {daemon.ref} exited with status "
                    f"{daemon.proc.returncode} while starting{': ' + tail if tail else ''}"
                )
            owner = uapi.owner_pid(path) if path.exists() else None
            if owner is not None:
                if owner != daemon.pid:
                    raise InterfaceConflict(
                        f"{path} belongs to pid {owner}, not to the wireguard-go just "
                        f"started for {daemon.ref}"
                    )
                await self._uapi(daemon.ref.name).get()
                return
            if time.monotonic() > deadline:
                raise CommandFailed(
                    f"wireguard-go for {daemon.ref} did not open {path} within "
                    f"{self.settings.start_timeout} s"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.01)

    async def _stop(self, daemon: _Daemon) -> None:
        """SIGTERM, then SIGKILL after ``stop_timeout``; reap; remove a stale socket."""
        daemon.stopping = True
        if daemon.watcher is not None:
            # First, so that only one waiter watches the pidfd of an adopted daemon.
            daemon.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await daemon.watcher
        try:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                daemon.signal(sig)
                try:
                    async with asyncio.timeout(self.settings.stop_timeout):
                        await daemon.wait()
                    break
                except TimeoutError:
                    log.warning("wireguard-go of %s ignored %s", daemon.ref, sig.name)
        finally:
            daemon.release()
            await asyncio.to_thread(self._remove_stale_socket, daemon.ref.name)

    # --- finding a running daemon -----------------------------------------------------------

    async def _running_pid(self, ref: InterfaceRef) -> int | None:
        """The pid of the daemon serving ``ref``'s socket if it runs in ``ref``'s
        namespace; :class:`InterfaceConflict` if it runs elsewhere or is not a daemon."""
        path = self._socket(ref.name)
        pid = await asyncio.to_thread(uapi.owner_pid, path)
        if pid is None:
            await asyncio.to_thread(self._remove_stale_socket, ref.name)
            return None
        comm, ino = self._describe_owner(pid)
        if not self._is_daemon(comm):
            raise InterfaceConflict(f"{path} is served by pid {pid} ({comm}), not wireguard-go")
        if ino != self._netns_of(ref.netns):
            raise InterfaceConflict(
                f"a userspace interface {ref.name} runs in another namespace (pid {pid}); "
                "userspace interface names must be unique on the host"
            )
        return pid

    async def _find_running(self, ref: InterfaceRef) -> _Daemon | None:
        """The running daemon of ``ref`` (see :meth:`_running_pid`), not supervised yet."""
        pid = await self._running_pid(ref)
        if pid is None:
            return None
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        return _Daemon(ref, pid, pidfd=pidfd)

    async def _uapi_for(self, ref: InterfaceRef) -> uapi.UapiSocket:
        """The socket to talk to for ``ref``, after checking the daemon lives."""
        daemon = self._daemons.get(ref.name)
        if daemon is not None and daemon.ref == ref:
            if daemon.exit is not None:
                raise InterfaceDied(f"{daemon.exit.describe()}; ensure_interface starts a new one")
            return self._uapi(ref.name)
        # Not started by this driver (e.g. before ensure_interface after a restart).
        pid = None
        if ref.netns is None or netns_exists(ref.netns):
            try:
                pid = await self._running_pid(ref)
            except InterfaceConflict as exc:
                raise LinkNotFound(f"no userspace WireGuard interface {ref}: {exc}") from exc
        if pid is None:
            raise LinkNotFound(f"userspace WireGuard interface {ref} does not exist")
        return self._uapi(ref.name)

    # --- interfaces ---------------------------------------------------------------------------

    async def ensure_interface(self, spec: InterfaceSpec) -> InterfaceState:
        ref = spec.ref
        if ref.netns is not None and not netns_exists(ref.netns):
            raise NamespaceNotFound(f"network namespace {ref.netns!r} does not exist")
        async with self._locked(ref):
            daemon = self._daemons.get(ref.name)
            if daemon is not None and daemon.ref != ref:
                raise InterfaceConflict(
                    f"userspace interface {ref.name} already runs for {daemon.ref}; "
                    "userspace interface names must be unique on the host"
                )
            if daemon is not None and daemon.exit is not None:
                await self._stop(daemon)  # reaps it, removes its socket
                del self._daemons[ref.name]
                daemon = None
            if daemon is None:
                daemon = await self._adopt_or_start(ref)
                self._daemons[ref.name] = daemon
            return await self._configure(spec)

    async def _adopt_or_start(self, ref: InterfaceRef) -> _Daemon:
        found = await self._find_running(ref)
        if found is not None:
            if await self._healthy(found):
                self._watch(found)
                log.info("adopted running wireguard-go for %s (pid %d)", ref, found.pid)
                return found
            log.warning("replacing unhealthy wireguard-go for %s (pid %d)", ref, found.pid)
            await self._stop(found)
        async with Rtnl(ref.netns) as rtnl:
            if await rtnl.find(ref.name) is not None:
                raise InterfaceConflict(
                    f"an interface {ref.name} without a wireguard-go daemon exists in "
                    f"{rtnl.where}; delete it or choose another name"
                )
        return await self._start(ref)

    async def _healthy(self, daemon: _Daemon) -> bool:
        try:
            await self._uapi(daemon.ref.name).get()
            async with Rtnl(daemon.ref.netns) as rtnl:
                return await rtnl.find(daemon.ref.name) is not None
        except (UapiFailed, LinkNotFound):
            return False

    async def _configure(self, spec: InterfaceSpec) -> InterfaceState:
        sock = self._uapi(spec.name)
        device = uapi.parse_device(spec.ref, await sock.get())
        lines = uapi.device_lines(
            # Only what differs: a new listen port rebinds the socket, a new key resets
            # every session.
            private_key=spec.private_key if device.private_key != spec.private_key else None,
            listen_port=(
                spec.listen_port
                if spec.listen_port is not None and spec.listen_port != device.state.listen_port
                else None
            ),
            fwmark=spec.fwmark if spec.fwmark not in (None, device.state.fwmark) else None,
        )
        await sock.set(lines)
        async with Rtnl(spec.netns) as rtnl:
            await rtnl.set_link(spec.name, mtu=spec.mtu, up=True)
        return await self.state(spec.ref)

    async def remove_interface(self, iface: InterfaceRef) -> bool:
        async with self._locked(iface):
            daemon = self._daemons.get(iface.name)
            if daemon is not None and daemon.ref != iface:
                return False
            if daemon is None and (iface.netns is None or netns_exists(iface.netns)):
                try:
                    daemon = await self._find_running(iface)
                except InterfaceConflict:
                    return False  # that name runs elsewhere: not this interface
            if daemon is None:
                await asyncio.to_thread(self._remove_stale_socket, iface.name)
                return False
            was_running = daemon.exit is None
            await self._stop(daemon)
            self._daemons.pop(iface.name, None)
            log.info("stopped wireguard-go for %s (pid %d)", iface, daemon.pid)
        self._forget(iface)
        return was_running

    async def state(self, iface: InterfaceRef, *, allowed_ips: bool = True) -> InterfaceState:
        sock = await self._uapi_for(iface)
        try:
            pairs = await sock.get()
        except UapiFailed as exc:
            raise self._gone(iface, exc) from exc
        return uapi.parse_device(iface, pairs, allowed_ips=allowed_ips).state

    def _gone(self, iface: InterfaceRef, exc: UapiFailed) -> UapiFailed | LinkNotFound:
        tracked = self._daemons.get(iface.name)
        if tracked is not None and tracked.ref == iface:
            # Most likely it died a moment ago and the watcher has not said so yet:
            # keep the retryable error; the next call reports InterfaceDied.
            return exc
        if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
            return LinkNotFound(f"userspace WireGuard interface {iface} is gone: {exc}")
        return exc

    async def interfaces(self, netns: str | None) -> list[InterfaceRef]:
        want = self._netns_of(netns)
        found = []
        for path in sorted(await asyncio.to_thread(_sockets, self.settings.socket_dir)):
            pid = await asyncio.to_thread(uapi.owner_pid, path)
            if pid is None:
                continue
            comm, ino = self._describe_owner(pid)
            if self._is_daemon(comm) and ino == want:
                found.append(InterfaceRef(path.name.removesuffix(".sock"), netns))
        return found

    async def close(self) -> None:
        """Stop watching; the daemons keep running for the next gateway to adopt."""
        for daemon in self._daemons.values():
            if daemon.watcher is not None:
                daemon.watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await daemon.watcher
            daemon.release()
        self._daemons.clear()

    def pid(self, iface: InterfaceRef) -> int | None:
        """The pid of the daemon this driver supervises for ``iface``."""
        daemon = self._daemons.get(iface.name)
        return daemon.pid if daemon is not None and daemon.ref == iface else None

    def exited(self, iface: InterfaceRef) -> ProcessExit | None:
        """How the daemon of ``iface`` died, if it did."""
        daemon = self._daemons.get(iface.name)
        return daemon.exit if daemon is not None and daemon.ref == iface else None

    # --- peers ----------------------------------------------------------------------------------

    async def _write_peer(self, iface: InterfaceRef, update: PeerUpdate) -> None:
        sock = await self._uapi_for(iface)
        try:
            await sock.set(uapi.peer_lines(update))
        except UapiFailed as exc:
            raise self._gone(iface, exc) from exc

    async def _delete_peer(self, iface: InterfaceRef, public_key: PublicKey) -> None:
        sock = await self._uapi_for(iface)
        try:
            await sock.set(uapi.remove_peer_lines(public_key))
        except UapiFailed as exc:
            raise self._gone(iface, exc) from exc


async def _wait_pidfd(pidfd: int) -> None:
    """Until the process of ``pidfd`` exits (a pidfd turns readable then); works for
    processes that are not our children."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(pidfd, ready)
    try:
        await done
    finally:
        loop.remove_reader(pidfd)


def _open_log(path: Path) -> IO[bytes]:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path.open("ab")


def _tail(path: Path | None, lines: int = 5) -> str:
    if path is None:
        return ""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def _sockets(socket_dir: Path) -> list[Path]:
    try:
        return [p for p in socket_dir.iterdir() if p.name.endswith(".sock")]
    except FileNotFoundError:
        return []
