"""A minimal HTTP/1.1 client for load generation, over a unix socket or TCP (with TLS).

httpx spends more CPU per request than the gateway does to answer it, so a benchmark
driven by httpx measures httpx. This speaks just enough HTTP for fedgw's JSON API
(Content-Length bodies, no chunking) and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from dataclasses import dataclass
from typing import Any

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass(frozen=True)
class Target:
    """Where to connect: a unix socket path, or host and port (with TLS if ``ssl``)."""

    unix: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    ssl: ssl.SSLContext | None = None

    async def connect(self) -> Stream:
        if self.unix is not None:
            return await asyncio.open_unix_connection(self.unix)
        return await asyncio.open_connection(self.host, self.port, ssl=self.ssl)


async def exchange(stream: Stream, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
    """One request and its response on an open connection."""
    reader, writer = stream
    payload = b"" if body is None else json.dumps(body).encode()
    head = f"{method} {path} HTTP/1.1\r\nhost: fedgw\r\ncontent-length: {len(payload)}\r\n"
    if body is not None:
        head += "content-type: application/json\r\n"
    writer.write(head.encode() + b"\r\n" + payload)
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed before a response")
    status = int(status_line.split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)


async def close(stream: Stream) -> None:
    writer = stream[1]
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()


class RawHttp:
    """A pool of keep-alive connections to one target."""

    def __init__(self, target: Target | str, connections: int = 16) -> None:
        self.target = Target(unix=target) if isinstance(target, str) else target
        self.connections = connections
        self._idle: asyncio.Queue[Stream] = asyncio.Queue()
        self._all: list[Stream] = []

    async def __aenter__(self) -> RawHttp:
        for _ in range(self.connections):
            stream = await self.target.connect()
            self._all.append(stream)
            self._idle.put_nowait(stream)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for stream in self._all:
            await close(stream)

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        stream = await self._idle.get()
        try:
            return await exchange(stream, method, path, body)
        finally:
            self._idle.put_nowait(stream)
