"""The connection table's indexes agree with what scanning every record would say."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime

import pytest

from fedgw.errors import Exhausted
from fedgw.models import Connection, ConnectionEnd, Workload
from fedgw.names import Reference
from gateway import connection_table
from gateway.connection_table import ConnectionRecord, ConnectionTable, Role, workload_key

NOW = datetime(2026, 1, 1, tzinfo=UTC)
CLIENTS = [Workload(netns="c1"), Workload(netns="c2"), Workload(pid=42, pid_start_ticks=7)]
SERVERS = [Workload(netns="nse1"), Workload(netns="nse2")]


def record(
    cid: str,
    role: Role,
    *,
    client: Workload | None = None,
    interface: str | None = None,
    server: Workload | None = None,
    endpoint: str | None = None,
    endpoint_interface: str | None = None,
) -> ConnectionRecord:
    return ConnectionRecord(
        connection=Connection(
            id=cid,
            service=Reference("vpn", "b"),
            client=ConnectionEnd(domain="a", workload=client, interface=interface),
            server=ConnectionEnd(domain="b", workload=server, endpoint=endpoint),
            created_at=NOW,
            updated_at=NOW,
            expires_at=NOW,
        ),
        role=role,
        peer=None if role == "local" else "b",
        endpoint_interface=endpoint_interface,
    )


def scanned_free(records: list[ConnectionRecord], workload: Workload, skip: str | None) -> str:
    """What the table must answer, found the slow way."""
    used = set()
    for r in records:
        c = r.connection
        if c.id == skip:
            continue
        if c.client.workload == workload and c.client.interface:
            used.add(c.client.interface)
        if c.server.workload == workload and r.endpoint_interface:
            used.add(r.endpoint_interface)
    return next(f"nsm{i}" for i in range(10_000) if f"nsm{i}" not in used)


def random_record(rng: random.Random, cid: str) -> ConnectionRecord:
    role: Role = rng.choice(["client", "server", "local"])
    names = [f"nsm{i}" for i in range(6)]
    return record(
        cid,
        role,
        client=rng.choice(CLIENTS) if role != "server" else None,
        interface=rng.choice(names) if role != "server" else None,
        server=rng.choice(SERVERS) if role != "client" else None,
        endpoint=rng.choice(["e1", "e2"]) if role != "client" else None,
        endpoint_interface=rng.choice(names) if role != "client" else None,
    )


def test_indexes_follow_puts_replacements_and_pops() -> None:
    rng = random.Random(5)  # noqa: S311 (a reproducible test sequence, not a secret)
    table = ConnectionTable()
    ids = [f"c{i}" for i in range(40)]
    for _ in range(1500):
        cid = rng.choice(ids)
        if rng.random() < 0.3:
            table.pop(cid)
        else:
            table.put(random_record(rng, cid))  # a new record or one replacing the old
        records = table.values()
        assert len(table) == len(records)
        for workload in CLIENTS + SERVERS:
            skip = rng.choice([None, *ids])
            assert table.free_interface(workload, skip=skip) == scanned_free(
                records, workload, skip
            )
        load = Counter(
            r.connection.server.endpoint for r in records if r.role in ("server", "local")
        )
        assert {e: table.load(e) for e in ("e1", "e2")} == {e: load[e] for e in ("e1", "e2")}
        clients: dict[tuple[object, ...], set[str]] = {}
        for r in records:
            w = r.connection.client.workload
            if r.role != "server" and w is not None:
                clients.setdefault(workload_key(w), set()).add(r.connection.id)
        indexed = table.client_workloads()
        assert len(indexed) == len(clients)  # each workload once
        assert {workload_key(w): set(ids) for w, ids in indexed} == clients
    assert set(table._low) <= set(table._names)  # nothing kept for workloads without names


def test_a_pid_workload_is_told_apart_by_its_start_time() -> None:
    table = ConnectionTable()
    table.put(record("a", "client", client=Workload(pid=42, pid_start_ticks=7), interface="nsm0"))
    assert table.free_interface(Workload(pid=42, pid_start_ticks=7)) == "nsm1"
    assert table.free_interface(Workload(pid=42, pid_start_ticks=8)) == "nsm0"


def test_a_full_workload_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connection_table, "MAX_INTERFACES", 2)
    table = ConnectionTable()
    for i in range(2):
        table.put(record(f"c{i}", "client", client=CLIENTS[0], interface=f"nsm{i}"))
    with pytest.raises(Exhausted, match="2 connections already"):
        table.free_interface(CLIENTS[0])
    assert table.free_interface(CLIENTS[0], skip="c1") == "nsm1"
