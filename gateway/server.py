"""``fedgw gateway serve``: one gateway, its local API on a unix socket, until SIGTERM
or SIGINT; then a graceful stop that leaves no socket behind."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import grp
import logging
import os
import signal
import socket
import stat
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from fedgw.clock import Clock
from gateway.api.app import (
    create_app,
    create_bundle_app,
    create_federation_app,
    create_health_app,
)
from gateway.errors import SettingsError, StateDirInUse
from gateway.runtime import Gateway
from gateway.settings import GatewaySettings, HostPortTuple, format_host_port
from spire_integration import ServerTLS
from spire_integration.asgi import SpiffeHttpProtocol

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    # One line per request (served by uvicorn, or sent by httpx), and uvicorn's start/stop
    # lines for each listener, are noise at info level; they are there at debug.
    for name in ("uvicorn.access", "uvicorn.error", "httpx"):
        logging.getLogger(name).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)


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


@dataclass
class Listener:
    """One socket the gateway serves an app on."""

    what: str
    app: ASGIApp
    sock: socket.socket
    address: str
    tls: ServerTLS | None = None


def bind_tcp_socket(what: str, address: HostPortTuple, backlog: int = 128) -> socket.socket:
    host, port = address
    try:
        sock = socket.create_server((host, port), backlog=backlog, dualstack_ipv6=host == "::")
    except OSError as exc:
        # create_server's own message repeats the address; the errno's text is enough.
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise SettingsError(
            f"{what}: cannot listen on {format_host_port(address)}: {reason}"
        ) from exc
    # Accepted connections inherit this: without it, a response written in two parts
    # waits for the client's delayed ACK (40 ms per request on a kept-alive connection).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock


async def run_gateway(
    settings: GatewaySettings,
    stopping: asyncio.Event,
    *,
    ready: Callable[[Gateway], None] | None = None,
    clock: Clock | None = None,
) -> None:
    """Run a gateway and its listeners until ``stopping`` is set (or one of them fails);
    call ``ready(gateway)`` once every listener accepts connections."""
    async with Gateway(settings, clock=clock) as gateway, contextlib.AsyncExitStack() as stack:
        sock = bind_unix_socket(settings.socket, settings.socket_group)
        stack.callback(_remove_socket, settings.socket, settings.socket.lstat().st_ino)
        stack.callback(sock.close)
        listeners = [
            Listener("local API", create_app(settings, gateway), sock, str(settings.socket))
        ]
        tcp_listeners = [
            ("health endpoint", settings.health_listen, create_health_app, None),
            ("federation API", settings.listen, create_federation_app, True),
            ("bundle endpoint", settings.bundle_listen, create_bundle_app, False),
        ]
        for what, address, make_app, client_certs in tcp_listeners:
            if address is None:
                continue
            tcp = bind_tcp_socket(what, address)
            stack.callback(tcp.close)
            tls = None
            if client_certs is not None:
                tls = ServerTLS(gateway.identity, require_client_cert=client_certs)
                stack.callback(tls.close)
            scheme = "http" if tls is None else "https"
            url = f"{scheme}://{format_host_port(address)}"
            listeners.append(Listener(what, make_app(gateway), tcp, url, tls))
        await _serve_until(gateway, listeners, stopping, ready)
    log.info("stopped")


def _config(listener: Listener) -> uvicorn.Config:
    tls: dict[str, Any] = {}
    if listener.tls is not None:
        # The protocol subclass hands the SPIFFE ID the handshake verified to the app.
        tls = {"ssl_context_factory": listener.tls.ssl_context_factory, "http": SpiffeHttpProtocol}
    return uvicorn.Config(
        listener.app,
        lifespan="off",
        log_config=None,
        # Requests under way get 2 s to finish; idle TLS connections are dropped at once
        # (SpiffeHttpProtocol.shutdown), since their close would wait for the peer.
        timeout_graceful_shutdown=2,
        server_header=False,
        # No proxy stands between fedgw and its callers (a unix socket, or mutual TLS
        # end to end): X-Forwarded-* headers are nobody's to trust, and not read.
        proxy_headers=False,
        **tls,
    )


async def _serve_until(
    gateway: Gateway,
    listeners: list[Listener],
    stopping: asyncio.Event,
    ready: Callable[[Gateway], None] | None,
) -> None:
    servers = [_Server(_config(listener)) for listener in listeners]
    running = [
        asyncio.ensure_future(server.serve(sockets=[listener.sock]))
        for server, listener in zip(servers, listeners, strict=True)
    ]
    try:
        for server, listener, task in zip(servers, listeners, running, strict=True):
            listening = asyncio.ensure_future(server.listening.wait())
            await asyncio.wait({task, listening}, return_when=asyncio.FIRST_COMPLETED)
            listening.cancel()
            if task.done():
                task.result()  # a listener that failed to start stops the gateway
                raise RuntimeError(f"{listener.what} stopped during start-up")
            log.info("%s listening on %s", listener.what, listener.address)
        if ready is not None:
            ready(gateway)
        # What starting made (modules, apps, schemas, the state loaded) lives as long as
        # the process: keep the collector's full passes from walking it again. They
        # stalled the event loop for 60-90 ms at a time under load.
        gc.freeze()
        # And collect the young generation every 3,000 allocations, not 700: fewer of a
        # request's short-lived objects live through a collection, get promoted, and
        # start full passes. In a bench.connections run (once the gateways were ready):
        # no full pass instead of 2-3 of up to 22-30 ms, the longest pause 6-8 ms, half
        # the time in the collector, the same RSS.
        gc.set_threshold(3000, 10, 10)
        stop = asyncio.ensure_future(stopping.wait())
        await asyncio.wait({stop, *running}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        log.info("stopping")
    finally:
        # Background work stops first (it must not, say, restart a wireguard-go that is
        # being stopped with us); then event streams end, so open watchers do not hold
        # up the shutdown.
        await gateway.stop_background()
        gateway.bus.close()
        for server in servers:
            server.should_exit = True
        results = await asyncio.gather(*running, return_exceptions=True)
    for listener, result in zip(listeners, results, strict=True):
        if isinstance(result, BaseException):
            raise RuntimeError(f"{listener.what} failed: {result}") from result
