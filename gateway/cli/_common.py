"""What every command shares: the gateway it talks to, output as a table or JSON, and
turning errors into one line on stderr."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from fedgw.durations import format_duration
from fedgw.errors import InvalidInput
from gateway.client import GatewayClient
from gateway.settings import DEFAULT_SOCKET

T = TypeVar("T")


@dataclass
class CliState:
    gateway: str = str(DEFAULT_SOCKET)
    debug: bool = False


def state(ctx: typer.Context) -> CliState:
    obj = ctx.find_root().obj
    assert isinstance(obj, CliState)
    return obj


def with_client(ctx: typer.Context, call: Callable[[GatewayClient], Awaitable[T]]) -> T:
    """Run ``call`` against the gateway chosen with --gateway / FEDGW_GATEWAY."""
    target = state(ctx).gateway

    async def go() -> T:
        async with GatewayClient(target) as client:
            return await call(client)

    return asyncio.run(go())


JsonOption = typer.Option(False, "--json", help="Print JSON instead of a table.")


def print_json(data: Any) -> None:
    def plain(item: Any) -> Any:
        if isinstance(item, BaseModel):
            return item.model_dump(mode="json")
        if isinstance(item, list):
            return [plain(i) for i in item]
        return item

    sys.stdout.write(json.dumps(plain(data), indent=2) + "\n")


def print_table(columns: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    table = Table(*columns, box=None, pad_edge=False, header_style="bold")
    for row in rows:
        table.add_row(*row)
    # Unwrapped when piped: lines that scripts and logs can read whole.
    Console(highlight=False, width=None if sys.stdout.isatty() else 250).print(table)


def print_fields(fields: Iterable[tuple[str, str]]) -> None:
    print_table(["FIELD", "VALUE"], fields)


def say(message: str) -> None:
    Console(highlight=False, soft_wrap=True).print(message, markup=False)


def relative(when: datetime, now: datetime | None = None) -> str:
    """``in 9m59s`` / ``12s ago``."""
    delta = (when - (now or datetime.now(UTC))).total_seconds()
    return f"in {format_duration(delta)}" if delta >= 0 else f"{format_duration(-delta)} ago"


def parse_pairs(items: Sequence[str], what: str) -> dict[str, str]:
    """``["k=v", ...]`` given with option ``what`` as a dict; each key once."""
    pairs: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise InvalidInput(f"{what} {item!r} must have the form key=value")
        if key in pairs:
            raise InvalidInput(f"{what} gives {key!r} twice")
        pairs[key] = value
    return pairs


def parse_labels(items: Sequence[str]) -> dict[str, str]:
    return parse_pairs(items, "--label")
