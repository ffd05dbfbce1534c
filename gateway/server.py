"""``fedgw gateway serve``: one gateway, its local API on a unix socket, until SIGTERM
or SIGINT; then a graceful stop that leaves no socket behind."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import logging
import os
import signal
import socket
import stat
from collections.abc import Generator
from pathlib import Path

import uvicorn

from gateway.api.app import create_app
from gateway.clock import Clock
from gateway.errors import SettingsError, StateDirInUse
from gateway.runtime import Gateway
from gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    # One line per request is noise at info level; it is there at debug.
    logging.getLogger("uvicorn.access").setLevel(
        logging.DEBUG if level == "debug" else logging.WARNING
    )


def bind_unix_socket(path: Path, group: str | None = None, backlog: int = 128) -> socket.socket:
    """A listening socket at ``path`` with mode 0660 (and ``group``), replacing a stale
    socket file but never a live one."""
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        existing = path.lstat()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise SettingsError(f"cannot use socket path {path}: {exc.strerror}") from exc
    else:
        if not stat.S_ISSOCK(existing.st_mode):
            raise SettingsError(f"socket path {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink(missing_ok=True)  # stale: left by a gateway that died
        else:
            raise StateDirInUse(f"another gateway is already serving on {path}")
        finally:
            probe.close()
    gid = -1
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise SettingsError(f"socket group {group!r} does not exist") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        # Permissions are set before listen(): until then nobody can connect.
        os.chmod(path, SOCKET_MODE)
        if gid != -1:
            os.chown(path, -1, gid)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StateDirInUse(f"another gateway is already serving on {path}") from exc
        raise SettingsError(f"cannot listen on {path}: {exc.strerror}") from exc
    return sock


def _remove_socket(path: Path, inode: int) -> None:
    """Unlink ``path`` only if it is still the socket we bound (not a successor's)."""
    with contextlib.suppress(OSError):
        if path.lstat().st_ino == inode:
            path.unlink()


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to the gateway process, which stops all of
    its servers and the gateway itself in order."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.listening.set()


async def serve(settings: GatewaySettings) -> None:
    """Run a gateway until SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await run_gateway(settings, stopping)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def run_gateway(
    settings: GatewaySettings,
    stopping: asyncio.Event,
    *,
    ready: asyncio.Event | None = None,
    clock: Clock | None = None,
) -> None:
    """Run a gateway and its local API until ``stopping`` is set; set ``ready`` once
    the API accepts connections."""
    async with Gateway(settings, clock=clock) as gateway:
        sock = bind_unix_socket(settings.socket, settings.socket_group)
        inode = settings.socket.lstat().st_ino
        try:
            app = create_app(settings, gateway)
            config = uvicorn.Config(
                app,
                lifespan="off",
                log_config=None,
                timeout_graceful_shutdown=5,
                server_header=False,
            )
            server = _Server(config)
            running = asyncio.ensure_future(server.serve(sockets=[sock]))
            listening = asyncio.ensure_future(server.listening.wait())
            await asyncio.wait({running, listening}, return_when=asyncio.FIRST_COMPLETED)
            listening.cancel()
            log.info("local API listening on %s", settings.socket)
            if ready is not None:
                ready.set()
            stop = asyncio.ensure_future(stopping.wait())
            await asyncio.wait({running, stop}, return_when=asyncio.FIRST_COMPLETED)
            log.info("stopping")
            # End event streams first, so open watchers do not hold up the shutdown.
            gateway.bus.close()
            server.should_exit = True
            stop.cancel()
            await running
        finally:
            sock.close()
            _remove_socket(settings.socket, inode)
    log.info("stopped")
