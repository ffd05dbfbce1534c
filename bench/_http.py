"""A minimal HTTP/1.1 keep-alive client over a unix socket, for load generation.

httpx spends more CPU per request than the gateway does to answer it, so a benchmark
driven by httpx measures httpx. This speaks just enough HTTP for fedgw's JSON API
(Content-Length bodies, no chunking) and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any


class RawHttp:
    def __init__(self, socket_path: str, connections: int = 16) -> None:
        self.socket_path = socket_path
        self.connections = connections
        self._idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue()
        )
        self._all: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> RawHttp:
        for _ in range(self.connections):
            reader, writer = await asyncio.open_unix_connection(self.socket_path)
            self._all.append(writer)
            self._idle.put_nowait((reader, writer))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for writer in self._all:
            writer.close()
        for writer in self._all:
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        payload = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nhost: fedgw\r\ncontent-length: {len(payload)}\r\n"
        if body is not None:
            head += "content-type: application/json\r\n"
        reader, writer = await self._idle.get()
        try:
            writer.write(head.encode() + b"\r\n" + payload)
            status_line = await reader.readline()
            status = int(status_line.split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            data = await reader.readexactly(length)
        finally:
            self._idle.put_nowait((reader, writer))
        return status, data
