"""The SPIRE identity source: the X509-SVID and the bundles of all trust domains (own and
federated) that a SPIRE agent streams over the SPIFFE Workload API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from spiffe import WorkloadApiClient
from spiffe.errors import ArgumentError, PySpiffeError
from spiffe.workloadapi.workload_api_client import StreamCancelHandler
from spiffe.workloadapi.x509_context import X509Context

from spire_integration.bundle import BundleSet, TrustBundle
from spire_integration.errors import (
    IdentityConfigInvalid,
    IdentityError,
    IdentityUnavailable,
    SvidInvalid,
)
from spire_integration.source import IdentityStatus, SourceState
from spire_integration.spiffe_id import SpiffeId
from spire_integration.svid import PrivateKey, X509Svid

log = logging.getLogger(__name__)

SOCKET_ENV = "SPIFFE_ENDPOINT_SOCKET"
_RESTART_BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0)


def resolve_socket(socket_path: str | Path | None) -> str:
    """The Workload API address: the argument, else ``$SPIFFE_ENDPOINT_SOCKET`` (the
    SPIFFE convention; an argument always wins), as a ``unix:`` URI (a bare absolute
    path is accepted)."""
    value = str(socket_path) if socket_path is not None else os.environ.get(SOCKET_ENV, "")
    if not value:
        raise IdentityConfigInvalid(
            f"no SPIRE Workload API socket: pass one, or set {SOCKET_ENV} "
            "(e.g. unix:///run/spire/agent-sockets/spire-agent.sock)"
        )
    if value.startswith("/"):
        return "unix:" + value
    if value.startswith(("unix:", "tcp:")):
        return value
    raise IdentityConfigInvalid(
        f"SPIRE Workload API socket {value!r} must be an absolute path or a unix: URI"
    )


def _unix_path(address: str) -> Path | None:
    if not address.startswith("unix:"):
        return None
    return Path("/" + address.removeprefix("unix:").lstrip("/"))


def _convert(context: X509Context, wanted: SpiffeId | None) -> tuple[X509Svid, BundleSet]:
    """Our types from the spiffe package's (runs on the gRPC thread)."""
    svids = context.x509_svids
    chosen = svids[0]
    if wanted is not None:
        matching = [s for s in svids if str(s.spiffe_id) == str(wanted)]
        if not matching:
            offered = ", ".join(str(s.spiffe_id) for s in svids)
            raise IdentityUnavailable(f"SPIRE offers no SVID for {wanted} (only {offered})")
        chosen = matching[0]
    key = chosen.private_key
    if not isinstance(key, PrivateKey):
        raise SvidInvalid(f"SPIRE SVID key type {type(key).__name__} is not supported")
    svid = X509Svid.from_chain(chosen.cert_chain, key)
    bundles = BundleSet()
    for bundle in context.x509_bundle_set.bundles:
        # The Workload API carries no sequence; sort for a stable comparison.
        authorities = sorted(
            bundle.x509_authorities, key=lambda c: c.public_bytes(serialization.Encoding.DER)
        )
        bundles.replace(TrustBundle(bundle.trust_domain.name, tuple(authorities)))
    if bundles.get(svid.spiffe_id.trust_domain) is None:
        raise IdentityUnavailable(f"SPIRE sent no bundle for our own trust domain of {svid}")
    return svid, bundles


class SpireIdentitySource:
    """An :class:`~spire_integration.source.IdentitySource` fed by a SPIRE agent.

    ``spiffe_id`` picks one SVID when the agent offers several (default: the first, the
    Workload API's default identity). Updates pushed by the agent (SVID rotation, new or
    changed federated bundles) replace SVID and bundles as a whole.
    """

    kind = "spire"

    def __init__(
        self,
        socket_path: str | Path | None = None,
        *,
        spiffe_id: SpiffeId | None = None,
        first_update_timeout: float = 10.0,
    ) -> None:
        self._address = resolve_socket(socket_path)
        self._wanted = spiffe_id
        self._first_update_timeout = first_update_timeout
        self._state = SourceState()
        self._client: WorkloadApiClient | None = None
        self._stream: StreamCancelHandler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._first = asyncio.Event()
        self._restart: asyncio.Task[None] | None = None
        self._failures = 0
        self._stopped = False

    # --- IdentitySource --------------------------------------------------------------

    @property
    def description(self) -> str:
        return f"SPIRE Workload API at {self._address}"

    @property
    def trust_domain(self) -> str:
        return self.svid().spiffe_id.trust_domain

    @property
    def version(self) -> int:
        return self._state.version

    def svid(self) -> X509Svid:
        return self._state.current_svid(self.description)

    def bundles(self) -> BundleSet:
        return self._state.bundles.copy()

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        return self._state.subscribe(callback)

    async def wait_for_update(self, version: int) -> int:
        return await self._state.wait_for_update(version)

    def status(self) -> IdentityStatus:
        return self._state.status(self.kind, self.description)

    async def start(self) -> None:
        if self._client is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stopped = False
        self._first = asyncio.Event()
        path = _unix_path(self._address)
        if path is not None and not path.exists():
            raise IdentityUnavailable(
                f"SPIRE agent socket {path} does not exist: is the agent running?"
            )
        try:
            self._client = await asyncio.to_thread(WorkloadApiClient, self._address)
        except ArgumentError as exc:
            raise IdentityConfigInvalid(f"{self.description}: {exc}") from exc
        self._open_stream()
        try:
            await asyncio.wait_for(self._first.wait(), self._first_update_timeout)
        except TimeoutError:
            error = self._state.error or "no answer"
            await self.stop()
            raise IdentityUnavailable(
                f"no X509-SVID from the {self.description} within "
                f"{self._first_update_timeout:g} s ({error})"
            ) from None

    async def stop(self) -> None:
        self._stopped = True
        if self._restart is not None:
            self._restart.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._restart
            self._restart = None
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.cancel()
        client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(client.close)

    # --- the stream (callbacks arrive on gRPC's thread) ------------------------------

    def _open_stream(self) -> None:
        assert self._client is not None
        # The client retries unavailable agents by itself (backoff up to 5 s); on_error
        # fires only for what it gives up on, and then we open a new stream later.
        self._stream = self._client.stream_x509_contexts(self._on_update, self._on_error)

    def _to_loop(self, callback: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed in between
            loop.call_soon_threadsafe(callback)

    def _on_update(self, context: X509Context) -> None:
        try:
            svid, bundles = _convert(context, self._wanted)
        except (IdentityError, PySpiffeError, ValueError) as exc:
            message = f"unusable update from the {self.description}: {exc}"
            log.error("%s", message)
            self._to_loop(lambda: self._set_error(message))
            return
        self._to_loop(lambda: self._apply(svid, bundles))

    def _on_error(self, exc: Exception) -> None:
        self._to_loop(lambda: self._stream_failed(exc))

    def _apply(self, svid: X509Svid, bundles: BundleSet) -> None:
        if self._stopped:
            return
        self._failures = 0
        self._state.error = None
        changed = self._state.svid != svid or self._state.bundles != bundles
        self._state.svid = svid
        self._state.bundles = bundles
        self._first.set()
        if changed:
            log.info(
                "SPIRE update: SVID %s until %s, bundles %s",
                svid.spiffe_id,
                svid.not_after.isoformat(),
                ", ".join(bundles.domains()),
            )
            self._state.notify()

    def _set_error(self, message: str) -> None:
        self._state.error = message

    def _stream_failed(self, exc: Exception) -> None:
        if self._stopped:
            return
        self._state.error = f"Workload API stream failed: {exc}"
        log.warning("%s: %s", self.description, self._state.error)
        delay = _RESTART_BACKOFF[min(self._failures, len(_RESTART_BACKOFF) - 1)]
        self._failures += 1
        self._restart = asyncio.create_task(self._reopen(delay), name="identity-spire-reopen")

    async def _reopen(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if not self._stopped and self._client is not None:
            self._open_stream()
