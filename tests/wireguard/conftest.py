"""Data-plane test fixtures: namespaces ``fgwt-<random>`` and host-unique interface names, removed
with everything in them (daemons, UAPI sockets) even when a test fails."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from wireguard.drivers.uapi import SOCKET_DIR
from wireguard.netns import (
    create_netns,
    delete_netns,
    kill_netns_processes,
    netns_exists,
    netns_pids,
)

IS_ROOT = os.geteuid() == 0
HAVE_WIREGUARD_GO = shutil.which("wireguard-go") is not None

needs_wireguard_go = pytest.mark.skipif(
    not (IS_ROOT and HAVE_WIREGUARD_GO), reason="needs root and wireguard-go"
)


@dataclass
class Lab:
    """Namespaces and interface names of one test, and their removal."""

    prefix: str = field(default_factory=lambda: f"fgwt-{secrets.token_hex(3)}")
    namespaces: list[str] = field(default_factory=list)
    ifnames: list[str] = field(default_factory=list)

    async def netns(self, label: str) -> str:
        name = f"{self.prefix}-{label}"
        self.namespaces.append(name)
        await create_netns(name)
        return name

    def ifname(self) -> str:
        """A name no interface and no UAPI socket on this host has (``fgwt`` + 4 hex)."""
        while True:
            name = f"fgwt{secrets.token_hex(2)}"
            if name not in self.ifnames and not (SOCKET_DIR / f"{name}.sock").exists():
                self.ifnames.append(name)
                return name

    async def cleanup(self) -> None:
        await kill_netns_processes(self.namespaces)
        for name in self.ifnames:
            with contextlib.suppress(FileNotFoundError):
                (SOCKET_DIR / f"{name}.sock").unlink()
        for ns in self.namespaces:
            await delete_netns(ns)
        left = [ns for ns in self.namespaces if netns_exists(ns)]
        left += [str(p) for n in self.ifnames if (p := SOCKET_DIR / f"{n}.sock").exists()]
        left += [f"pid {pid}" for pid in netns_pids(self.namespaces)]
        assert not left, f"test left behind: {left}"


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    if not IS_ROOT:
        pytest.skip("needs root (network namespaces)")
    lab = Lab()
    try:
        yield lab
    finally:
        await lab.cleanup()
