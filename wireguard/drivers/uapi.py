"""The cross-platform userspace API of WireGuard (wireguard.com/xplatform): ``get=1`` and
``set=1`` requests of ``key=value`` lines over a daemon's unix socket."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from wireguard.drivers.base import (
    Endpoint,
    InterfaceRef,
    InterfaceState,
    Network,
    PeerState,
    PeerUpdate,
    handshake_time,
    parse_prefix,
    sort_prefixes,
)
from wireguard.errors import InvalidKey, InvalidSpec, UapiFailed
from wireguard.keys import PresharedKey, PrivateKey, PublicKey

SOCKET_DIR = Path("/var/run/wireguard")
_ZERO_KEY = "0" * 64
_MAX_RESPONSE = 16 * 1024 * 1024  # a get of thousands of peers is a few MB at most


def _answer_end(answer: bytearray, start: int) -> int:
    """Where the lines of a complete answer end (before its empty line); -1 if the
    empty line has not come yet. ``start``: where to look from (earlier bytes were
    searched already)."""
    if answer[:1] == b"\n":
        return 0
    end = answer.find(b"\n\n", start)
    return end if end < 0 else end + 1


def socket_path(socket_dir: Path, name: str) -> Path:
    return socket_dir / f"{name}.sock"


@dataclass(frozen=True, slots=True)
class UapiSocket:
    """A daemon's UAPI socket; every request gets ``timeout`` seconds."""

    path: Path
    timeout: float = 3.0

    async def request(self, body: str) -> list[tuple[str, str]]:
        """Send one operation on a fresh connection; the ``key=value`` pairs of the
        answer (without ``errno``). A non-zero errno becomes :class:`UapiFailed`.

        One connection per operation: after a failed ``set`` the daemon stops reading in
        the middle of the body, and the rest would be taken as the next operation.
        """
        path = self.path
        try:
            async with asyncio.timeout(self.timeout):
                pairs = await self._exchange(body)
        except TimeoutError:
            raise UapiFailed(
                f"{path}: no answer within {self.timeout} s", errno=errno.ETIMEDOUT
            ) from None
        except OSError as exc:
            code = exc.errno or errno.EIO
            raise UapiFailed(f"{path}: {os.strerror(code)}", errno=code) from exc
        if not pairs or pairs[-1][0] != "errno":
            raise UapiFailed(f"{path}: answer without errno", errno=errno.EPROTO)
        status = _int(pairs.pop()[1], "errno")
        if status != 0:
            # wireguard-go answers negative errnos (-EINVAL), the C daemons positive ones.
            code = abs(status)
            raise UapiFailed(
                f"{path}: the daemon refused the request: {os.strerror(code)}", errno=code
            )
        return pairs

    async def _exchange(self, body: str) -> list[tuple[str, str]]:
        # A plain socket, not a stream: on a unix socket, connecting and sending are
        # done at once, so a request waits for the event loop once, for the answer. A
        # stream waited for several passes of the loop, which other work fills under
        # load, and the data plane makes its writes holding its lock.
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.setblocking(False)
            await loop.sock_connect(sock, str(self.path))
            await loop.sock_sendall(sock, body.encode("ascii"))
            # The answer is read in large chunks up to its empty line, not line by line:
            # a get carries one line per allowed IP, thousands with many connections.
            answer = bytearray()
            end = -1
            while end < 0:
                chunk = await loop.sock_recv(sock, 1 << 16)
                if not chunk:
                    raise UapiFailed(
                        f"{self.path}: connection closed before the answer ended",
                        errno=errno.EPROTO,
                    )
                searched = max(len(answer) - 1, 0)
                answer += chunk
                end = _answer_end(answer, searched)
                if len(answer) > _MAX_RESPONSE:
                    raise UapiFailed(
                        f"{self.path}: answer longer than {_MAX_RESPONSE} bytes",
                        errno=errno.EMSGSIZE,
                    )
        pairs: list[tuple[str, str]] = []
        for text in answer[:end].decode("ascii", errors="replace").split("\n")[:-1]:
            key, sep, value = text.partition("=")
            if not sep:
                raise UapiFailed(f"{self.path}: malformed answer line {text!r}", errno=errno.EPROTO)
            pairs.append((key, value))
        return pairs

    async def get(self) -> list[tuple[str, str]]:
        return await self.request("get=1\n\n")

    async def set(self, lines: Sequence[str]) -> None:
        if lines:
            await self.request("set=1\n" + "".join(f"{line}\n" for line in lines) + "\n")


def owner_pid(path: Path) -> int | None:
    """The pid of the process listening on the unix socket ``path`` (SO_PEERCRED of a
    client connection gives the credentials the server had when it called listen());
    ``None`` if nobody listens there. Does not block: a listening socket accepts at once."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError, BlockingIOError):
            return None
        cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid: int = struct.unpack("3i", cred)[0]
    return pid


# --- encoding ---------------------------------------------------------------------------


def device_lines(
    *,
    private_key: PrivateKey | None = None,
    listen_port: int | None = None,
    fwmark: int | None = None,
) -> list[str]:
    lines = []
    if private_key is not None:
        lines.append(f"private_key={private_key.secret_hex()}")
    if listen_port is not None:
        lines.append(f"listen_port={listen_port}")
    if fwmark is not None:
        lines.append(f"fwmark={fwmark}")
    return lines


def peer_lines(update: PeerUpdate) -> list[str]:
    """The lines of one peer; ``update_only`` must directly follow ``public_key``."""
    lines = [f"public_key={update.public_key.hex()}"]
    if not update.create:
        lines.append("update_only=true")
    if update.set_preshared_key:
        psk = update.preshared_key
        lines.append(f"preshared_key={psk.secret_hex() if psk is not None else _ZERO_KEY}")
    if update.endpoint is not None:
        lines.append(f"endpoint={update.endpoint}")
    if update.persistent_keepalive is not None:
        lines.append(f"persistent_keepalive_interval={update.persistent_keepalive}")
    if update.replace_allowed_ips:
        lines.append("replace_allowed_ips=true")
    lines.extend(f"allowed_ip={prefix_text(net)}" for net in update.allowed_ips)
    return lines


def prefix_text(net: Network) -> str:
    """``str(net)`` at half the cost: the standard library formats an address in
    Python, and a peer's list is written whole after closes (thousands of prefixes)."""
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    return f"{socket.inet_ntop(family, net.network_address.packed)}/{net.prefixlen}"


def remove_peer_lines(public_key: PublicKey) -> list[str]:
    return [f"public_key={public_key.hex()}", "remove=true"]


# --- decoding ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Device:
    """A ``get=1`` answer: the state, and the private key (kept out of the state)."""

    state: InterfaceState
    private_key: PrivateKey | None


def _int(value: str, key: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UapiFailed(
            f"UAPI answer: {key}={value!r} is not a number", errno=errno.EPROTO
        ) from None


@dataclass
class _PeerBuilder:
    public_key: PublicKey
    endpoint: Endpoint | None = None
    keepalive: int = 0
    sec: int = 0
    nsec: int = 0
    rx: int = 0
    tx: int = 0
    psk: PresharedKey | None = None

    def __post_init__(self) -> None:
        self.allowed: list[str] = []

    def build(self) -> PeerState:
        return PeerState(
            public_key=self.public_key,
            endpoint=self.endpoint,
            allowed_ips=sort_prefixes(parse_prefix(a) for a in self.allowed),
            persistent_keepalive=self.keepalive,
            last_handshake=handshake_time(self.sec, self.nsec) if self.sec else None,
            rx_bytes=self.rx,
            tx_bytes=self.tx,
            preshared_key=self.psk,
        )


def parse_device(
    ref: InterfaceRef, pairs: Sequence[tuple[str, str]], *, allowed_ips: bool = True
) -> Device:
    private_key: PrivateKey | None = None
    listen_port = fwmark = 0
    peers: list[_PeerBuilder] = []
    try:
        for key, value in pairs:
            if key == "public_key":
                peers.append(_PeerBuilder(PublicKey.from_hex(value)))
            elif key == "allowed_ip":
                if allowed_ips and peers:
                    peers[-1].allowed.append(value)
            elif not peers:
                if key == "private_key":
                    private_key = None if value == _ZERO_KEY else PrivateKey.from_hex(value)
                elif key == "listen_port":
                    listen_port = _int(value, key)
                elif key == "fwmark":
                    fwmark = _int(value, key)
            else:
                _peer_line(peers[-1], key, value)
    except (InvalidKey, InvalidSpec) as exc:
        raise UapiFailed(f"UAPI answer for {ref}: {exc}", errno=errno.EPROTO) from None
    state = InterfaceState(
        ref=ref,
        public_key=private_key.public_key() if private_key is not None else None,
        listen_port=listen_port,
        fwmark=fwmark,
        peers=tuple(p.build() for p in sorted(peers, key=lambda p: p.public_key)),
    )
    return Device(state, private_key)


def _peer_line(peer: _PeerBuilder, key: str, value: str) -> None:
    # Unknown keys are skipped: newer daemons may report more than we read.
    if key == "endpoint":
        peer.endpoint = Endpoint.parse(value)
    elif key == "persistent_keepalive_interval":
        peer.keepalive = _int(value, key)
    elif key == "last_handshake_time_sec":
        peer.sec = _int(value, key)
    elif key == "last_handshake_time_nsec":
        peer.nsec = _int(value, key)
    elif key == "rx_bytes":
        peer.rx = _int(value, key)
    elif key == "tx_bytes":
        peer.tx = _int(value, key)
    elif key == "preshared_key":
        peer.psk = None if value == _ZERO_KEY else PresharedKey.from_hex(value)
