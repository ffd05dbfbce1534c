"""``fedgw request``, ``fedgw connections``, ``fedgw close``."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Annotated, Any

import typer

from fedgw.durations import parse_duration
from fedgw.errors import FedgwError, InvalidInput
from fedgw.models import Connection
from gateway.cli._common import (
    JsonOption,
    parse_labels,
    print_json,
    print_table,
    say,
    state,
    with_client,
)
from gateway.client import GatewayClient


def _describe(c: Connection) -> list[tuple[str, str]]:
    return [
        ("id", c.id),
        ("service", str(c.service)),
        ("state", c.state.value + (f" ({c.reason})" if c.reason else "")),
        ("interface", c.client.interface or "-"),
        ("address", c.client.address or "-"),
        (
            "endpoint",
            f"{c.server.endpoint or '-'} at {c.server.address or '-'} ({c.server.domain})",
        ),
        ("routes", ", ".join(str(r) for r in c.routes) or "-"),
    ]


def request(
    ctx: typer.Context,
    service: Annotated[str, typer.Argument(help="NAME or NAME@DOMAIN.")],
    netns: Annotated[str | None, typer.Option(help="The client's network namespace.")] = None,
    pid: Annotated[int | None, typer.Option(help="A process in the client's namespace.")] = None,
    label: Annotated[
        list[str], typer.Option("--label", "-l", help="Endpoint label key=value (repeatable).")
    ] = [],  # noqa: B006
    interface: Annotated[
        str | None, typer.Option(help="Interface name in the client [nsm0, nsm1, ...].")
    ] = None,
    exclude: Annotated[
        list[str], typer.Option("--exclude", help="A prefix the client uses already.")
    ] = [],  # noqa: B006
    wait: Annotated[
        str, typer.Option(help="Keep trying this long while the peer is unreachable.")
    ] = "30s",
    as_json: bool = JsonOption,
) -> None:
    """Connect a workload to a network service: an interface appears in its namespace
    with an address and routes, wired to an endpoint (in another domain for NAME@DOMAIN)."""
    if (netns is None) == (pid is None):
        raise InvalidInput("give --netns or --pid (exactly one)")
    body: dict[str, Any] = {
        "service": service,
        "workload": {"netns": netns} if netns is not None else {"pid": pid},
        "labels": parse_labels(label),
        "exclude": exclude,
    }
    if interface is not None:
        body["interface"] = interface
    deadline = time.monotonic() + parse_duration(wait, "--wait")

    async def go(client: GatewayClient) -> Connection:
        while True:
            try:
                return await client.request(body)
            except FedgwError as exc:
                if not exc.retryable or time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(1.0)

    connection = with_client(ctx, go)
    if as_json:
        print_json(connection)
    else:
        print_table(["FIELD", "VALUE"], _describe(connection))


def connections(
    ctx: typer.Context,
    watch: Annotated[bool, typer.Option(help="Then print each change as it happens.")] = False,
    as_json: bool = JsonOption,
) -> None:
    """Connections of this gateway (client, server and local ones)."""
    listed = with_client(ctx, lambda c: c.connections())
    if as_json and not watch:
        print_json(listed)
        return
    if not as_json:
        print_table(
            ["ID", "SERVICE", "STATE", "CLIENT", "ENDPOINT", "REASON"],
            [
                (
                    c.id,
                    str(c.service),
                    c.state.value,
                    f"{c.client.address or '-'} ({c.client.domain})",
                    f"{c.server.endpoint or '-'} {c.server.address or '-'} ({c.server.domain})",
                    c.reason or "-",
                )
                for c in listed
            ],
        )
    if not watch:
        return

    async def follow() -> None:
        async with GatewayClient(state(ctx).gateway) as client:
            async for item in client.events():
                if item.get("kind") != "connection":
                    continue
                if as_json:
                    sys.stdout.write(json.dumps(item) + "\n")
                else:
                    c, reason = item["object"], item.get("reason") or ""
                    sys.stdout.write(f"{item['time'][11:19]} {c['id']} {c['state']}: {reason}\n")
                sys.stdout.flush()

    asyncio.run(follow())


def close(
    ctx: typer.Context, connection_id: Annotated[str, typer.Argument(help="The connection id.")]
) -> None:
    """Close a connection: both sides are unwired and its addresses freed."""
    with_client(ctx, lambda c: c.close_connection(connection_id))
    say(f"connection {connection_id} closed")
