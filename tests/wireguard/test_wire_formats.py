"""Wire formats without daemon or kernel: UAPI against a fake daemon on a unix socket, and the
kernel driver's netlink messages through pyroute2's own encoder and decoder."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pyroute2.netlink.generic.wireguard import AsyncWireGuard, wgmsg

from wireguard.drivers import Endpoint, InterfaceRef, PeerUpdate, prefixes
from wireguard.drivers.base import parse_prefix
from wireguard.drivers.kernel import parse_device as parse_netlink
from wireguard.drivers.kernel import peer_messages
from wireguard.drivers.uapi import UapiSocket, owner_pid, parse_device, peer_lines, prefix_text
from wireguard.errors import UapiFailed
from wireguard.keys import PresharedKey, PrivateKey

REF = InterfaceRef("wg0", "ns")


class FakeDaemon:
    """Answers each connection with ``answer(request)`` and remembers the requests."""

    def __init__(self, path: Path, answer: Callable[[str], bytes]) -> None:
        self.path = path
        self.answer = answer
        self.requests: list[str] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lines = []
        while (line := await reader.readline()) not in (b"\n", b""):
            lines.append(line.decode())
        request = "".join(lines)
        self.requests.append(request)
        writer.write(self.answer(request))
        await writer.drain()
        writer.close()


async def serve(path: Path, answer: Callable[[str], bytes]) -> tuple[FakeDaemon, asyncio.Server]:
    fake = FakeDaemon(path, answer)
    server = await asyncio.start_unix_server(fake.handle, str(path))
    return fake, server


async def test_get_parses_a_wireguard_go_answer(short_tmp: Path) -> None:
    own, peer_key, psk = (
        PrivateKey.generate(),
        PrivateKey.generate().public_key(),
        PresharedKey.generate(),
    )
    answer = (
        f"private_key={own.secret_hex()}\nlisten_port=51820\nfwmark=7\n"
        f"public_key={peer_key.hex()}\npreshared_key={psk.secret_hex()}\nprotocol_version=1\n"
        "endpoint=[2001:db8::1]:51821\nlast_handshake_time_sec=1700000000\n"
        "last_handshake_time_nsec=123456789\ntx_bytes=10\nrx_bytes=20\n"
        "persistent_keepalive_interval=25\nallowed_ip=10.0.0.0/24\nallowed_ip=fd00::/64\n"
        "some_future_key=whatever\nerrno=0\n\n"
    ).encode()
    fake, server = await serve(short_tmp / "wg0.sock", lambda _: answer)
    try:
        sock = UapiSocket(fake.path, timeout=2)
        device = parse_device(REF, await sock.get())
        assert owner_pid(fake.path) is not None  # we listen ourselves: our own pid
    finally:
        server.close()
    assert fake.requests == ["get=1\n"]
    assert device.private_key == own
    state = device.state
    assert (state.public_key, state.listen_port, state.fwmark) == (own.public_key(), 51820, 7)
    (peer,) = state.peers
    assert peer.public_key == peer_key
    assert peer.preshared_key == psk
    assert peer.endpoint == Endpoint.parse("[2001:db8::1]:51821")
    assert peer.last_handshake == datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=UTC)
    assert (peer.rx_bytes, peer.tx_bytes, peer.persistent_keepalive) == (20, 10, 25)
    assert peer.allowed_ips == prefixes("10.0.0.0/24", "fd00::/64")


async def test_a_long_answer_in_small_pieces_is_read_whole(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thousands of allowed IPs, written a few bytes at a time (the empty line that ends
    the answer split between two writes): every line arrives, and a read that leaves the
    allowed IPs out still has the peer's counters."""
    peer_key = PrivateKey.generate().public_key()
    nets = [f"10.{i // 256}.{i % 256}.1/32" for i in range(3000)]
    answer = (
        f"listen_port=51820\npublic_key={peer_key.hex()}\ntx_bytes=10\nrx_bytes=20\n"
        + "".join(f"allowed_ip={n}\n" for n in nets)
        + "errno=0\n\n"
    ).encode()

    async def dribble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\n\n")
        for i in range(0, len(answer) - 1, 4099):
            writer.write(answer[i : min(i + 4099, len(answer) - 1)])
            await writer.drain()
            await asyncio.sleep(0)
        writer.write(answer[-1:])
        await writer.drain()
        await reader.read()  # the client closes

    server = await asyncio.start_unix_server(dribble, str(short_tmp / "wg0.sock"))
    try:
        sock = UapiSocket(short_tmp / "wg0.sock", timeout=5)
        full = parse_device(REF, await sock.get()).state
        light = parse_device(REF, await sock.get(), allowed_ips=False).state
        # An answer longer than the daemon could sensibly send is refused, not kept.
        monkeypatch.setattr("wireguard.drivers.uapi._MAX_RESPONSE", 10_000)
        with pytest.raises(UapiFailed, match="longer than") as long:
            await sock.get()
    finally:
        server.close()
    assert long.value.errno == errno.EMSGSIZE
    assert full.peers[0].allowed_ips == prefixes(*nets)
    assert light.peers[0].allowed_ips == ()
    assert (light.peers[0].rx_bytes, light.peers[0].tx_bytes) == (20, 10)
    assert light.listen_port == 51820


@pytest.mark.parametrize(
    "text",
    ["10.0.0.0/24", "172.16.1.7/32", "0.0.0.0/0", "fd00:60::/64", "2001:db8::1/128", "::/0"],
)
def test_a_prefix_is_written_as_python_writes_it(text: str) -> None:
    net = parse_prefix(text)
    assert prefix_text(net) == str(net) == text


def test_an_ipv4_mapped_prefix_reads_back_the_same() -> None:
    """Python and inet_ntop may write this one differently; both read back the same."""
    net = parse_prefix("::ffff:10.0.0.1/128")
    assert parse_prefix(prefix_text(net)) == net


async def test_set_sends_one_peer_and_maps_errno(short_tmp: Path) -> None:
    answers = iter([b"errno=0\n\n", b"errno=-22\n\n", b"errno=16\n\n"])
    fake, server = await serve(short_tmp / "wg0.sock", lambda _: next(answers))
    peer = PrivateKey.generate().public_key()
    update = PeerUpdate(
        peer,
        create=False,
        endpoint=Endpoint.parse("192.0.2.1:51820"),
        persistent_keepalive=0,
        set_preshared_key=True,
        replace_allowed_ips=True,
        allowed_ips=prefixes("10.0.0.0/24"),
    )
    try:
        sock = UapiSocket(fake.path, timeout=2)
        await sock.set(peer_lines(update))
        with pytest.raises(UapiFailed, match="Invalid argument") as invalid:
            await sock.set(["listen_port=nope"])
        with pytest.raises(UapiFailed) as busy:
            await sock.set(["listen_port=1"])
    finally:
        server.close()
    assert fake.requests[0] == (
        f"set=1\npublic_key={peer.hex()}\nupdate_only=true\npreshared_key={'0' * 64}\n"
        "endpoint=192.0.2.1:51820\npersistent_keepalive_interval=0\n"
        "replace_allowed_ips=true\nallowed_ip=10.0.0.0/24\n"
    )
    assert invalid.value.errno == errno.EINVAL
    assert not invalid.value.retryable
    assert busy.value.errno == errno.EBUSY
    assert busy.value.retryable


async def test_broken_answers_and_dead_sockets(short_tmp: Path) -> None:
    answers = iter([b"listen_port=1\n", b"\n", b"listen_port\nerrno=0\n\n"])
    fake, server = await serve(short_tmp / "wg0.sock", lambda _: next(answers))
    try:
        with pytest.raises(UapiFailed, match="closed before the answer ended") as exc:
            await UapiSocket(fake.path, timeout=2).get()
        assert exc.value.errno == errno.EPROTO
        with pytest.raises(UapiFailed, match="answer without errno"):
            await UapiSocket(fake.path, timeout=2).get()
        with pytest.raises(UapiFailed, match="malformed answer line 'listen_port'"):
            await UapiSocket(fake.path, timeout=2).get()
    finally:
        server.close()
        await server.wait_closed()
    with pytest.raises(UapiFailed) as gone:
        await UapiSocket(short_tmp / "missing.sock", timeout=2).get()
    assert gone.value.errno == errno.ENOENT
    # A socket file nobody listens on (a daemon killed by SIGKILL leaves one).
    stale = short_tmp / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))
    with pytest.raises(UapiFailed) as refused:
        await UapiSocket(stale, timeout=2).get()
    assert refused.value.errno == errno.ECONNREFUSED
    assert refused.value.retryable
    assert owner_pid(stale) is None


async def test_a_daemon_that_does_not_answer_times_out(short_tmp: Path) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    server = await asyncio.start_unix_server(silent, str(short_tmp / "wg0.sock"))
    try:
        with pytest.raises(UapiFailed, match=r"no answer within 0\.1 s") as exc:
            await UapiSocket(short_tmp / "wg0.sock", timeout=0.1).get()
        assert exc.value.errno == errno.ETIMEDOUT
    finally:
        server.close()


# --- netlink (kernel driver) ------------------------------------------------------------


def encode_set(peer: dict[str, Any]) -> wgmsg:
    """What pyroute2's WireGuard.set would send for ``peer``, decoded again."""
    wg = AsyncWireGuard.__new__(AsyncWireGuard)  # the encoder needs no socket
    msg = wgmsg()
    msg["cmd"] = 1
    msg["version"] = 1
    msg["attrs"].append(["WGDEVICE_A_IFNAME", "wg0"])
    wg._wg_set_peer(msg, peer)
    msg["header"]["type"] = 20
    msg.encode()
    decoded = wgmsg(msg.data)
    decoded.decode()
    return decoded


def test_peer_updates_become_the_right_netlink_flags() -> None:
    peer = PrivateKey.generate().public_key()
    psk = PresharedKey.generate()
    update = PeerUpdate(
        peer,
        create=False,
        endpoint=Endpoint.parse("[2001:db8::1]:51820"),
        persistent_keepalive=25,
        set_preshared_key=True,
        preshared_key=psk,
        replace_allowed_ips=True,
        allowed_ips=prefixes("10.0.0.0/24", "fd00::/64"),
    )
    (message,) = peer_messages(update)
    (attrs,) = encode_set(message).get_attr("WGDEVICE_A_PEERS")
    assert attrs.get_attr("WGPEER_A_PUBLIC_KEY").decode() == str(peer)
    assert attrs.get_attr("WGPEER_A_PRESHARED_KEY").decode() == psk.secret_base64()
    assert attrs.get_attr("WGPEER_A_FLAGS") == 0x2 | 0x4  # replace allowed IPs, update only
    endpoint = attrs.get_attr("WGPEER_A_ENDPOINT")
    assert (endpoint["addr"], endpoint["port"]) == ("2001:db8::1", 51820)
    assert attrs.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") == 25
    assert [a["addr"] for a in attrs.get_attr("WGPEER_A_ALLOWEDIPS")] == [
        "10.0.0.0/24",
        "fd00::/64",
    ]
    # Adding to a new peer: no flags, nothing replaced.
    (created,) = peer_messages(PeerUpdate(peer, create=True, allowed_ips=prefixes("10.1.0.0/24")))
    assert encode_set(created).get_attr("WGDEVICE_A_PEERS")[0].get_attr("WGPEER_A_FLAGS") == 0


def test_long_allowed_ip_lists_are_split_without_replacing_twice() -> None:
    peer = PrivateKey.generate().public_key()
    nets = prefixes(*(f"10.{i // 256}.{i % 256}.0/24" for i in range(1200)))
    first, second, third = peer_messages(
        PeerUpdate(peer, create=False, replace_allowed_ips=True, allowed_ips=nets)
    )
    assert first["replace_allowed_ips"]
    assert len(first["allowed_ips"]) == 500
    assert "replace_allowed_ips" not in second
    assert second["update_only"]
    assert len(second["allowed_ips"]) + len(third["allowed_ips"]) == 700
    # Replacing by an empty list still says so.
    (empty,) = peer_messages(PeerUpdate(peer, create=False, replace_allowed_ips=True))
    assert empty["allowed_ips"] == []
    assert empty["replace_allowed_ips"]


def test_a_dump_split_over_messages_is_merged() -> None:
    own, peer = PrivateKey.generate(), PrivateKey.generate().public_key()

    def message(attrs: list[Any], allowed: list[str], *, with_device: bool) -> wgmsg:
        msg = wgmsg()
        msg["cmd"] = 0
        msg["version"] = 1
        msg["header"]["type"] = 20
        if with_device:
            msg["attrs"] += [
                ["WGDEVICE_A_PRIVATE_KEY", {"value": own.secret_base64()}],
                ["WGDEVICE_A_LISTEN_PORT", 51820],
                ["WGDEVICE_A_FWMARK", 0],
            ]
        allowed_attrs = []
        for text in allowed:
            addr, length = text.split("/")
            allowed_attrs.append(
                {
                    "attrs": [
                        ["WGALLOWEDIP_A_FAMILY", socket.AF_INET],
                        ["WGALLOWEDIP_A_IPADDR", socket.inet_pton(socket.AF_INET, addr)],
                        ["WGALLOWEDIP_A_CIDR_MASK", int(length)],
                    ]
                }
            )
        peer_attrs = [["WGPEER_A_PUBLIC_KEY", {"value": str(peer)}], *attrs]
        peer_attrs.append(["WGPEER_A_ALLOWEDIPS", allowed_attrs])
        msg["attrs"].append(["WGDEVICE_A_PEERS", [{"attrs": peer_attrs}]])
        msg.encode()
        decoded = wgmsg(msg.data)
        decoded.decode()
        return decoded

    first = message(
        [
            ["WGPEER_A_PRESHARED_KEY", {"value": "A" * 43 + "="}],
            ["WGPEER_A_ENDPOINT", {"addr": "192.0.2.7", "port": 51820}],
            ["WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": 1700000000, "tv_nsec": 5000}],
            ["WGPEER_A_RX_BYTES", 1],
            ["WGPEER_A_TX_BYTES", 2],
            ["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", 0],
        ],
        ["10.0.0.0/24"],
        with_device=True,
    )
    second = message([], ["10.0.1.0/24"], with_device=False)
    state, private_key = parse_netlink(REF, [first, second])
    assert private_key == own
    assert state.public_key == own.public_key()
    (p,) = state.peers
    assert p.preshared_key is None  # all zeros: none
    assert p.endpoint == Endpoint.parse("192.0.2.7:51820")
    assert p.allowed_ips == prefixes("10.0.0.0/24", "10.0.1.0/24")
    assert p.last_handshake == datetime(2023, 11, 14, 22, 13, 20, 5, tzinfo=UTC)
    assert (p.rx_bytes, p.tx_bytes) == (1, 2)
