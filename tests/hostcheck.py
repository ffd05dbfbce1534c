"""What network tests must leave as they found it: the host's own namespace, the list
of namespaces, wireguard-go and gateway processes, and UAPI sockets."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")


def _ip_json(*args: str) -> Any:
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out or "[]")


def _processes() -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "wireguard-go" in cmd or "gateway serve" in cmd:
            found.append(cmd.strip())
    return sorted(found)


def host_snapshot() -> dict[str, Any]:
    """The host's namespace and what the lab or the data plane could leave behind."""
    uapi = Path("/var/run/wireguard")
    return {
        "netns": sorted(p.name for p in Path("/run/netns").iterdir())
        if Path("/run/netns").exists()
        else [],
        "links": sorted((link["ifname"], link.get("mtu")) for link in _ip_json("link")),
        "addresses": sorted(
            (a["ifname"], i["local"], i["prefixlen"])
            for a in _ip_json("addr")
            for i in a.get("addr_info", [])
        ),
        "routes": sorted(
            json.dumps(r, sort_keys=True) for r in _ip_json("route", "show", "table", "all")
        ),
        "rules": sorted(json.dumps(r, sort_keys=True) for r in _ip_json("rule")),
        "uapi_sockets": sorted(p.name for p in uapi.iterdir()) if uapi.exists() else [],
        "processes": _processes(),
        "ip_forward": Path("/proc/sys/net/ipv4/ip_forward").read_text().strip(),
    }
