"""A store in memory, for tests and benchmarks: same semantics as SQLite, no durability."""

from __future__ import annotations

from fedgw.store import Record, StoreConflict, StoreUnavailable


class MemoryStore:
    def __init__(self) -> None:
        self._records: dict[tuple[str, str], Record] = {}
        self._revision = 0
        self._closed = False

    @property
    def description(self) -> str:
        return "memory store"

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable("memory store is closed")

    def _check_expect(self, kind: str, key: str, expect: int | None) -> Record | None:
        current = self._records.get((kind, key))
        if expect is not None and (current.revision if current else 0) != expect:
            raise StoreConflict(f"{kind} {key!r} changed concurrently")
        return current

    async def get(self, kind: str, key: str) -> Record | None:
        self._check_open()
        return self._records.get((kind, key))

    async def scan(self, kind: str) -> list[Record]:
        self._check_open()
        return sorted((r for (k, _), r in self._records.items() if k == kind), key=lambda r: r.key)

    async def put(self, kind: str, key: str, value: str, *, expect: int | None = None) -> Record:
        self._check_open()
        self._check_expect(kind, key, expect)
        self._revision += 1
        record = Record(kind, key, value, self._revision)
        self._records[(kind, key)] = record
        return record

    async def delete(self, kind: str, key: str, *, expect: int | None = None) -> bool:
        self._check_open()
        current = self._check_expect(kind, key, expect)
        if current is None:
            return False
        del self._records[(kind, key)]
        return True

    async def close(self) -> None:
        self._closed = True
