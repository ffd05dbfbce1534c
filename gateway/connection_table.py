"""The connection records of a gateway, by id, with the indexes that every new
connection consults: the interface names taken in each workload, and how many
connections each endpoint serves; and the client workloads that supervision looks at
twice a second. Scanning every record for those made a connection's cost, and an idle
gateway's, grow with the number of connections there are."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Literal

from pydantic import BaseModel, Field

from fedgw.errors import Exhausted
from fedgw.models import Connection, Network, Workload

Role = Literal["client", "server", "local"]
WorkloadKey = tuple[str | None, int | None, int | None]
INTERFACE_PREFIX = "nsm"
MAX_INTERFACES = 10_000


class ConnectionRecord(BaseModel):
    """A connection as this gateway stores it."""

    connection: Connection
    role: Role
    peer: str | None = Field(description="the other domain (None for a local connection)")
    selector: dict[str, str] = Field(default_factory=dict)
    exclude: list[Network] = Field(default_factory=list)
    endpoint_interface: str | None = None
    pool: Network | None = None


def workload_key(workload: Workload) -> WorkloadKey:
    # A tuple, not the model: comparing pydantic models field by field is what made
    # the scan slow.
    return (workload.netns, workload.pid, workload.pid_start_ticks)


def _interfaces(record: ConnectionRecord) -> list[tuple[WorkloadKey, str]]:
    """The (workload, interface name) pairs a record takes: its client's and its
    endpoint's."""
    c = record.connection
    taken = []
    if c.client.workload is not None and c.client.interface:
        taken.append((workload_key(c.client.workload), c.client.interface))
    if c.server.workload is not None and record.endpoint_interface:
        taken.append((workload_key(c.server.workload), record.endpoint_interface))
    return taken


def _client(record: ConnectionRecord) -> Workload | None:
    """The workload of a connection's client, if it is in this gateway's domain."""
    if record.role in ("client", "local"):
        return record.connection.client.workload
    return None


def _served_by(record: ConnectionRecord) -> str | None:
    if record.role in ("server", "local"):
        return record.connection.server.endpoint
    return None


class ConnectionTable:
    def __init__(self) -> None:
        self._records: dict[str, ConnectionRecord] = {}
        self._names: dict[WorkloadKey, Counter[str]] = {}
        self._load: Counter[str | None] = Counter()
        # Per workload, an index below which every nsmN is taken: an endpoint serving a
        # thousand connections is not searched from nsm0 each time.
        self._low: dict[WorkloadKey, int] = {}
        self._clients: dict[WorkloadKey, tuple[Workload, set[str]]] = {}

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    def __bool__(self) -> bool:
        return bool(self._records)

    def get(self, connection_id: str) -> ConnectionRecord | None:
        return self._records.get(connection_id)

    def values(self) -> list[ConnectionRecord]:
        return list(self._records.values())

    def put(self, record: ConnectionRecord) -> None:
        self.pop(record.connection.id)
        self._records[record.connection.id] = record
        for key, name in _interfaces(record):
            self._names.setdefault(key, Counter())[name] += 1
        self._load[_served_by(record)] += 1
        if (workload := _client(record)) is not None:
            key = workload_key(workload)
            self._clients.setdefault(key, (workload, set()))[1].add(record.connection.id)

    def pop(self, connection_id: str) -> ConnectionRecord | None:
        record = self._records.pop(connection_id, None)
        if record is None:
            return None
        for key, name in _interfaces(record):
            names = self._names[key]
            names[name] -= 1
            if names[name] <= 0:
                del names[name]
                number = _number(name)
                if number is not None and number < self._low.get(key, 0):
                    self._low[key] = number
            if not names:
                del self._names[key]
                self._low.pop(key, None)
        self._load[_served_by(record)] -= 1
        if (workload := _client(record)) is not None:
            key = workload_key(workload)
            ids = self._clients[key][1]
            ids.discard(connection_id)
            if not ids:
                del self._clients[key]
        return record

    def client_workloads(self) -> list[tuple[Workload, frozenset[str]]]:
        """Each workload of this domain that is the client of connections, once, with
        those connections."""
        return [(workload, frozenset(ids)) for workload, ids in self._clients.values()]

    def load(self, endpoint: str) -> int:
        """How many connections ``endpoint`` serves."""
        return self._load[endpoint]

    def free_interface(self, workload: Workload, *, skip: str | None = None) -> str:
        """The first ``nsmN`` that no connection (but ``skip``) uses in ``workload``."""
        key = workload_key(workload)
        taken = self._names.get(key, Counter())
        skipped = self._records.get(skip) if skip is not None else None
        own = Counter(n for k, n in _interfaces(skipped) if k == key) if skipped else Counter()
        low = self._low.get(key, 0)
        for i in range(low, MAX_INTERFACES):
            if taken[f"{INTERFACE_PREFIX}{i}"] <= 0:
                break
        else:
            i = MAX_INTERFACES
        if key in self._names:
            self._low[key] = i
        # What only ``skip`` takes is free for it, below the mark too.
        mine = [n for n, count in own.items() if taken[n] - count <= 0]
        numbers = [x for x in map(_number, mine) if x is not None and x < i]
        if numbers:
            return f"{INTERFACE_PREFIX}{min(numbers)}"
        if i == MAX_INTERFACES:
            raise Exhausted(f"{workload} has {MAX_INTERFACES} connections already")
        return f"{INTERFACE_PREFIX}{i}"


def _number(name: str) -> int | None:
    """N of an ``nsmN`` name."""
    digits = name.removeprefix(INTERFACE_PREFIX)
    if digits == name or not digits.isdigit() or (digits.startswith("0") and digits != "0"):
        return None
    return int(digits)
