"""``fedgw status`` and ``fedgw events``."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import datetime
from typing import Annotated, Any

import typer

from fedgw.durations import format_duration
from gateway.cli._common import JsonOption, print_fields, print_json, print_table, relative, state
from gateway.client import GatewayClient


def status(ctx: typer.Context, as_json: bool = JsonOption) -> None:
    """Show what the gateway is and holds."""

    async def go() -> Any:
        async with GatewayClient(state(ctx).gateway) as client:
            return await client.status()

    st = asyncio.run(go())
    if as_json:
        print_json(st)
        return
    print_fields(
        [
            ("domain", st.domain),
            ("version", st.version),
            ("pid", str(st.pid)),
            ("uptime", format_duration(st.uptime_seconds)),
            ("local API", st.socket),
            ("state dir", st.state_dir),
            ("store", st.store),
            ("network services", str(st.services)),
            (
                "endpoints",
                f"{st.endpoints} ({st.workload_bound_endpoints} kept alive by their workload)",
            ),
            ("event watchers", str(st.watchers)),
            ("peers", str(st.peers)),
            (
                "connections",
                ", ".join(f"{n} {state}" for state, n in st.connections.items()) or "none",
            ),
            (
                "data plane",
                st.dataplane.driver if st.dataplane else f"{st.dataplane_mode} (not started)",
            ),
        ]
    )
    if st.dataplane and st.dataplane.tunnels:
        print_table(
            ["TUNNEL TO", "INTERFACE", "ENDPOINT", "LAST HANDSHAKE", "RX", "TX"],
            [
                (
                    t.domain,
                    t.interface,
                    # No key yet: started ahead of the first connection, no peer on it.
                    t.endpoint or ("(learnt)" if t.public_key else "(no connection yet)"),
                    relative(t.last_handshake) if t.last_handshake else "never",
                    f"{t.rx_bytes:,}",
                    f"{t.tx_bytes:,}",
                )
                for t in st.dataplane.tunnels
            ],
        )
        for t in st.dataplane.tunnels:
            if t.error:
                print(f"tunnel to {t.domain}: {t.error}")


def _describe(item: dict[str, Any]) -> str | None:
    kind = item.get("type")
    if kind == "heartbeat":
        return None
    if kind == "synced":
        return "-- present state above, changes below --"
    when = datetime.fromisoformat(item["time"]).astimezone().strftime("%H:%M:%S")
    reason = f" ({item['reason']})" if item.get("reason") else ""
    return f"{when} {kind} {item['kind']} {item['name']}{reason}"


def events(
    ctx: typer.Context,
    snapshot: Annotated[bool, typer.Option(help="Start with the present state.")] = False,
    as_json: bool = JsonOption,
) -> None:
    """Watch registry changes until interrupted (JSON: one object per line)."""

    async def go() -> None:
        async with GatewayClient(state(ctx).gateway) as client:
            async for item in client.events(snapshot=snapshot):
                line = json.dumps(item) if as_json else _describe(item)
                if line is not None:
                    sys.stdout.write(line + "\n")
                    sys.stdout.flush()

    asyncio.run(go())
