"""WireGuard drivers behind one async interface: kernel (netlink), userspace
(wireguard-go over UAPI) and in-memory (tests), chosen by :func:`select_driver`."""

from __future__ import annotations

import logging
from typing import Literal

from wireguard.drivers.base import (
    DriverKind,
    Endpoint,
    InterfaceRef,
    InterfaceSpec,
    InterfaceState,
    PeerSpec,
    PeerState,
    PeerUpdate,
    WireGuardDriver,
    prefixes,
)
from wireguard.drivers.kernel import KernelDriver, kernel_supports_wireguard
from wireguard.drivers.memory import MemoryDriver
from wireguard.drivers.userspace import OnExit, ProcessExit, UserspaceDriver, UserspaceSettings
from wireguard.errors import DriverUnavailable

__all__ = [
    "DriverKind",
    "DriverSelection",
    "Endpoint",
    "InterfaceRef",
    "InterfaceSpec",
    "InterfaceState",
    "KernelDriver",
    "MemoryDriver",
    "PeerSpec",
    "PeerState",
    "PeerUpdate",
    "ProcessExit",
    "UserspaceDriver",
    "UserspaceSettings",
    "WireGuardDriver",
    "kernel_supports_wireguard",
    "prefixes",
    "select_driver",
]

log = logging.getLogger(__name__)

DriverSelection = Literal["auto", "kernel", "userspace", "memory"]


async def select_driver(
    kind: DriverSelection = "auto",
    *,
    userspace: UserspaceSettings | None = None,
    on_exit: OnExit | None = None,
) -> WireGuardDriver:
    """The driver asked for, checked to work here; :class:`DriverUnavailable` if not.

    ``auto`` takes the kernel where it has WireGuard (probed by creating a link in a
    throwaway namespace), else ``wireguard-go``. ``userspace``/``on_exit`` configure the
    userspace driver (``on_exit`` is called when one of its daemons dies).
    """
    if kind == "memory":
        return MemoryDriver()
    if kind in ("kernel", "auto"):
        kernel = KernelDriver()
        try:
            await kernel.check()
        except DriverUnavailable:
            if kind == "kernel":
                raise
            log.info("kernel WireGuard unavailable; using wireguard-go")
        else:
            return kernel
    if kind not in ("userspace", "auto"):
        raise DriverUnavailable(f"unknown WireGuard driver {kind!r}", retryable=False)
    driver = UserspaceDriver(userspace, on_exit=on_exit)
    try:
        await driver.check()
    except DriverUnavailable as exc:
        if kind == "auto":
            raise DriverUnavailable(
                f"neither kernel WireGuard nor wireguard-go is available: {exc}", retryable=False
            ) from exc
        raise
    return driver
