"""The state store interface: what a gateway must not forget across a restart.

A small revisioned key-value store, in the shape etcd offers, so that a distributed store
can implement it later (the embedded SQLite one lives in ``gateway.store``). It sits in the
shared layer because federation (tokens, peers) and the data plane (address pools) keep
their records through it too. Every write gets a store-wide increasing
revision; a write may be conditional on the revision it read (``expect``), which is how
callers claim something atomically (a one-use token, an address).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from fedgw.errors import Conflict, Unavailable


class StoreUnavailable(Unavailable):
    """The state store cannot be read or written (disk full, I/O error, closed)."""

    code = "store_unavailable"


class StoreConflict(Conflict):
    """A conditional store write lost: the record changed since it was read."""

    code = "store_conflict"


ABSENT = 0
"""``expect=ABSENT``: the write succeeds only if the key does not exist yet."""


@dataclass(frozen=True, slots=True)
class Record:
    kind: str
    key: str
    value: str
    revision: int


class Store(Protocol):
    """What the gateway needs from a state store.

    ``put``/``delete`` return only once the change is durable. ``expect`` makes a write
    conditional: ``None`` always writes, :data:`ABSENT` requires the key to be missing,
    any other number requires the key's current revision; a mismatch raises
    :class:`StoreConflict`.
    """

    @property
    def description(self) -> str: ...

    async def get(self, kind: str, key: str) -> Record | None: ...

    async def scan(self, kind: str) -> list[Record]: ...

    async def put(
        self, kind: str, key: str, value: str, *, expect: int | None = None
    ) -> Record: ...

    async def delete(self, kind: str, key: str, *, expect: int | None = None) -> bool: ...

    async def close(self) -> None: ...


M = TypeVar("M", bound=BaseModel)


class Collection(Generic[M]):
    """One kind of record in a store, read and written as a pydantic model."""

    def __init__(self, store: Store, kind: str, model: type[M]) -> None:
        self.store = store
        self.kind = kind
        self.model = model

    def _decode(self, record: Record) -> M:
        try:
            return self.model.model_validate_json(record.value)
        except ValidationError as exc:
            # A record this version cannot read is kept in the store, never dropped.
            raise StoreUnavailable(
                f"{self.store.description}: stored {self.kind} {record.key!r} "
                f"is not readable by this version: {exc.error_count()} error(s)"
            ) from exc

    async def get(self, key: str) -> M | None:
        record = await self.store.get(self.kind, key)
        return None if record is None else self._decode(record)

    async def all(self) -> list[M]:
        return [self._decode(r) for r in await self.store.scan(self.kind)]

    async def put(self, key: str, value: M, *, expect: int | None = None) -> Record:
        return await self.store.put(self.kind, key, value.model_dump_json(), expect=expect)

    async def delete(self, key: str, *, expect: int | None = None) -> bool:
        return await self.store.delete(self.kind, key, expect=expect)
