"""The SQLite store: durable, conditional writes, group commit, private files."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
from pathlib import Path

import pytest

from fedgw.store import ABSENT, Store, StoreConflict, StoreUnavailable
from gateway.store.sqlite import SqliteStore


async def test_put_get_scan_delete(store: Store) -> None:
    r1 = await store.put("endpoints", "b", '{"x":1}')
    r2 = await store.put("endpoints", "a", '{"x":2}')
    await store.put("services", "a", "{}")
    assert r2.revision > r1.revision
    assert (await store.get("endpoints", "b")) == r1
    assert [r.key for r in await store.scan("endpoints")] == ["a", "b"]
    assert await store.delete("endpoints", "a") is True
    assert await store.delete("endpoints", "a") is False
    assert await store.get("endpoints", "a") is None
    assert [r.key for r in await store.scan("services")] == ["a"]


async def test_conditional_writes(store: Store) -> None:
    first = await store.put("tokens", "t", "v1", expect=ABSENT)
    with pytest.raises(StoreConflict):
        await store.put("tokens", "t", "again", expect=ABSENT)
    second = await store.put("tokens", "t", "v2", expect=first.revision)
    with pytest.raises(StoreConflict):
        await store.put("tokens", "t", "v3", expect=first.revision)  # stale
    with pytest.raises(StoreConflict):
        await store.delete("tokens", "t", expect=first.revision)
    assert await store.delete("tokens", "t", expect=second.revision)


async def test_racing_claims_exactly_one_wins(store: Store) -> None:
    """Many writers claim one key with the same expected revision: one succeeds."""
    base = await store.put("tokens", "t", "unclaimed")
    results = await asyncio.gather(
        *(store.put("tokens", "t", f"claimed by {i}", expect=base.revision) for i in range(50)),
        return_exceptions=True,
    )
    winners = [r for r in results if not isinstance(r, BaseException)]
    assert len(winners) == 1
    assert all(isinstance(r, StoreConflict) for r in results if r not in winners)


async def test_reopen_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = await SqliteStore.open(path)
    writes = [store.put("endpoints", f"e{i}", f'{{"i":{i}}}') for i in range(500)]
    records = await asyncio.gather(*writes)
    await store.delete("endpoints", "e7")
    await store.close()

    reopened = await SqliteStore.open(path)
    try:
        keys = {r.key for r in await reopened.scan("endpoints")}
        assert keys == {f"e{i}" for i in range(500)} - {"e7"}
        # Revisions keep increasing across a reopen, even past deleted records.
        later = await reopened.put("endpoints", "new", "{}")
        assert later.revision > max(r.revision for r in records)
    finally:
        await reopened.close()


async def test_group_commit_batches(tmp_path: Path) -> None:
    """Concurrent writes share transactions: far fewer commits than writes."""
    store = await SqliteStore.open(tmp_path / "state.db")
    commits = 0
    apply = store._apply

    def counting(batch):  # type: ignore[no-untyped-def]
        nonlocal commits
        commits += 1
        return apply(batch)

    store._apply = counting  # type: ignore[method-assign]
    try:
        await asyncio.gather(*(store.put("k", str(i), "v") for i in range(1000)))
        assert len(await store.scan("k")) == 1000
        assert commits < 100
    finally:
        await store.close()


async def test_files_are_private(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = await SqliteStore.open(path)
    await store.put("k", "a", "secret-ish")
    try:
        for p in [path, Path(f"{path}-wal")]:
            assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
    finally:
        await store.close()


async def test_closed_store_refuses(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "state.db")
    await store.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        await store.put("k", "a", "v")


async def test_unreadable_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match="cannot open state store"):
        await SqliteStore.open(tmp_path / "missing-dir" / "state.db")


async def test_newer_schema_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = await SqliteStore.open(path)
    await store.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = '99' WHERE name = 'schema'")
    db.commit()
    db.close()
    with pytest.raises(StoreUnavailable, match="schema 99, newer"):
        await SqliteStore.open(path)
