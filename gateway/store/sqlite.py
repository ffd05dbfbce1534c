"""The embedded default store: one SQLite file in WAL mode, written with group commit.

All SQLite work runs on one dedicated thread, so the event loop never blocks on disk.
Writes queue up while the previous transaction commits and then go in together as one
transaction: a caller's ``put`` returns after its change is committed, yet a thousand
concurrent registrations cost a handful of fsyncs rather than a thousand.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fedgw.store import Record, StoreConflict, StoreUnavailable

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    revision INTEGER NOT NULL,
    PRIMARY KEY (kind, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO meta (name, value) VALUES ('schema', '1'), ('revision', '0');
"""

Synchronous = Literal["NORMAL", "FULL"]


@dataclass(slots=True)
class _Write:
    kind: str
    key: str
    value: str | None  # None deletes
    expect: int | None
    future: asyncio.Future[Record | bool] = field(repr=False)


class SqliteStore:
    """A :class:`fedgw.store.Store` in one SQLite file."""

    def __init__(self, path: Path, db: sqlite3.Connection, executor: ThreadPoolExecutor) -> None:
        self.path = path
        self._db = db
        self._executor = executor
        self._revision = 0
        self._pending: list[_Write] = []
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def description(self) -> str:
        return f"sqlite store {self.path}"

    @classmethod
    async def open(cls, path: Path, *, synchronous: Synchronous = "NORMAL") -> SqliteStore:
        """Open (creating, mode 0600) the database at ``path``.

        ``synchronous=NORMAL`` in WAL mode loses nothing when the gateway process dies;
        only a power cut may drop the last transactions. ``FULL`` survives that too, at
        the cost of one more fsync per group commit.
        """
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedgw-store")
        loop = asyncio.get_running_loop()
        try:
            db = await loop.run_in_executor(executor, _connect, path, synchronous)
        except (sqlite3.Error, OSError) as exc:
            executor.shutdown(wait=False)
            raise StoreUnavailable(f"cannot open state store {path}: {exc}") from exc
        store = cls(path, db, executor)
        try:
            store._revision = await loop.run_in_executor(executor, _check_schema, db, path)
        except BaseException:
            await store.close()
            raise
        return store

    async def get(self, kind: str, key: str) -> Record | None:
        rows = await self._read(
            "SELECT kind, key, value, revision FROM records WHERE kind = ? AND key = ?",
            (kind, key),
        )
        return rows[0] if rows else None

    async def scan(self, kind: str) -> list[Record]:
        return await self._read(
            "SELECT kind, key, value, revision FROM records WHERE kind = ? ORDER BY key", (kind,)
        )

    async def _read(self, sql: str, params: tuple[str, ...]) -> list[Record]:
        self._check_open()

        def run() -> list[Record]:
            return [Record(*row) for row in self._db.execute(sql, params)]

        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, run)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"{self.description}: read failed: {exc}") from exc

    async def put(self, kind: str, key: str, value: str, *, expect: int | None = None) -> Record:
        result = await self._write(kind, key, value, expect)
        assert isinstance(result, Record)
        return result

    async def delete(self, kind: str, key: str, *, expect: int | None = None) -> bool:
        result = await self._write(kind, key, None, expect)
        assert isinstance(result, bool)
        return result

    async def _write(
        self, kind: str, key: str, value: str | None, expect: int | None
    ) -> Record | bool:
        self._check_open()
        loop = asyncio.get_running_loop()
        write = _Write(kind, key, value, expect, loop.create_future())
        self._pending.append(write)
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush(), name="fedgw-store-flush")
        # The write is queued: it commits even if this caller is cancelled meanwhile.
        return await asyncio.shield(write.future)

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                results = await loop.run_in_executor(self._executor, self._apply, batch)
            except sqlite3.Error as exc:
                error = StoreUnavailable(f"{self.description}: write failed: {exc}")
                log.error("%s", error)
                for write in batch:
                    if not write.future.done():
                        write.future.set_exception(error)
                continue
            for write, outcome in zip(batch, results, strict=True):
                if write.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    write.future.set_exception(outcome)
                else:
                    write.future.set_result(outcome)

    def _apply(self, batch: list[_Write]) -> list[Record | bool | StoreConflict]:
        """One transaction for the whole batch (runs on the store thread)."""
        db = self._db
        revision = self._revision
        results: list[Record | bool | StoreConflict] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for w in batch:
                if w.expect is not None:
                    row = db.execute(
                        "SELECT revision FROM records WHERE kind = ? AND key = ?", (w.kind, w.key)
                    ).fetchone()
                    current = row[0] if row else 0
                    if current != w.expect:
                        results.append(StoreConflict(f"{w.kind} {w.key!r} changed concurrently"))
                        continue
                if w.value is None:
                    cursor = db.execute(
                        "DELETE FROM records WHERE kind = ? AND key = ?", (w.kind, w.key)
                    )
                    results.append(cursor.rowcount > 0)
                else:
                    revision += 1
                    db.execute(
                        "INSERT INTO records (kind, key, value, revision) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (kind, key) DO UPDATE "
                        "SET value = excluded.value, revision = excluded.revision",
                        (w.kind, w.key, w.value, revision),
                    )
                    results.append(Record(w.kind, w.key, w.value, revision))
            db.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (str(revision),))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._revision = revision
        return results

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable(f"{self.description} is closed")

    async def close(self) -> None:
        """Wait for queued writes, then close the database and its thread."""
        if self._closed:
            return
        if self._flusher is not None:
            await asyncio.shield(self._flusher)
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._db.close)
        finally:
            self._executor.shutdown(wait=True)


def _connect(path: Path, synchronous: Synchronous) -> sqlite3.Connection:
    # Create the file 0600 first: SQLite gives its -wal and -shm files the same mode.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    db = sqlite3.connect(path, isolation_level=None)  # used only on the store thread
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {synchronous}")
        db.execute("PRAGMA busy_timeout = 5000")
        db.executescript(_SCHEMA)
    except BaseException:
        db.close()
        raise
    return db


def _check_schema(db: sqlite3.Connection, path: Path) -> int:
    meta = dict(db.execute("SELECT name, value FROM meta").fetchall())
    schema = int(meta["schema"])
    if schema > SCHEMA_VERSION:
        raise StoreUnavailable(
            f"state store {path} has schema {schema}, newer than this fedgw understands "
            f"({SCHEMA_VERSION}); upgrade fedgw or use another --state-dir"
        )
    return int(meta["revision"])
