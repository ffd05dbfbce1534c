"""TLS contexts for SPIFFE mutual TLS: servers that follow the identity source (uvicorn,
asyncio), clients for a peer of a known trust domain, and the bundle-endpoint profile."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import ssl
import tempfile
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedgw.clock import Clock, SystemClock, to_datetime
from spire_integration.bundle import BundleSet, TrustBundle
from spire_integration.errors import (
    IdentityConfigInvalid,
    IdentityError,
    PeerMismatch,
    SvidInvalid,
    SvidUntrusted,
    TlsSetupFailed,
)
from spire_integration.source import IdentitySource
from spire_integration.spiffe_id import SpiffeId
from spire_integration.svid import X509Svid, validate_svid

log = logging.getLogger(__name__)

# How a peer is checked. OpenSSL first verifies the chain against a pool: on the server
# all authorities of all held bundles, on a client only the bundle of the peer's domain.
# The server's pool mixes domains, so OpenSSL cannot tell a ``cluster1`` certificate
# signed by ``cluster2``'s CA from a genuine one, and it does not apply the X509-SVID
# rules (cA, keyUsage, one URI SAN). So every context also runs ``validate_svid`` (per
# trust domain) inside the handshake, through its ``sslobject_class``/``sslsocket_class``:
# a peer that fails it never reaches the application, and the verified ID is left on
# the SSL object (``peer_spiffe_id``).
#
# Python 3.11's ``ssl`` shows only the peer's leaf, not the chain it sent, so on 3.11 a
# peer whose leaf is signed by an intermediate (not directly by a bundle authority) is
# refused; from Python 3.13 on, ``get_verified_chain()`` supplies the intermediates.

# TLS 1.2 suites with forward secrecy and AEAD; TLS 1.3 (preferred by OpenSSL) has its own.
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

PeerCheck = Callable[[list[bytes]], SpiffeId]


class SpiffeHandshakeError(ssl.SSLCertVerificationError):
    """The peer's certificate passed OpenSSL but not the SPIFFE checks; ``error`` says why.

    An ``ssl`` error so that asyncio, anyio and httpx treat it as a failed handshake
    (httpx raises ``ConnectError`` from it).
    """

    def __init__(self, error: IdentityError) -> None:
        super().__init__(ssl.SSL_ERROR_SSL, f"SPIFFE peer verification failed: {error}")
        self.error = error
        self.verify_message = str(error)


# --- peer verification ----------------------------------------------------------------


def _certificates(ders: Sequence[bytes]) -> list[x509.Certificate]:
    try:
        return [x509.load_der_x509_certificate(der) for der in ders]
    except ValueError as exc:
        raise SvidInvalid(f"peer certificate is not valid DER: {exc}") from exc


def verify_peer(
    der_leaf: bytes,
    bundles: BundleSet,
    now: datetime | None = None,
    intermediates: Sequence[bytes] = (),
) -> SpiffeId:
    """Validate a peer's DER leaf (and intermediates, leaf-first) as an X509-SVID of its
    own trust domain; return its SPIFFE ID."""
    chain = _certificates([der_leaf, *intermediates])
    return validate_svid(chain, bundles, now or to_datetime(SystemClock().now()))


def check_server_identity(
    der_chain: Sequence[bytes],
    expected: SpiffeId | None,
    bundle: TrustBundle,
    now: datetime | None = None,
) -> SpiffeId:
    """Validate a server's chain against ``bundle`` only, and that it is ``expected``
    (``None``: any SPIFFE ID of that trust domain)."""
    if not der_chain:
        raise SvidInvalid("server sent no certificate")
    spiffe_id = verify_peer(der_chain[0], BundleSet([bundle]), now, der_chain[1:])
    if expected is not None and spiffe_id != expected:
        raise PeerMismatch(f"server is {spiffe_id}, but {expected} was expected")
    return spiffe_id


def peer_chain(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> list[bytes]:
    """The peer's DER chain, leaf first, as far as this Python can tell (see module doc)."""
    get_chain = getattr(ssl_object, "get_verified_chain", None)  # Python >= 3.13
    if get_chain is not None:
        chain: list[bytes] = list(get_chain())
        if chain:
            return chain
    leaf = ssl_object.getpeercert(binary_form=True)
    return [leaf] if leaf else []


def peer_spiffe_id(ssl_object: object) -> SpiffeId:
    """The SPIFFE ID the handshake verified, from an SSL object made by a context of this
    module (``transport.get_extra_info("ssl_object")`` for asyncio)."""
    spiffe_id = getattr(ssl_object, "spiffe_id", None)
    if not isinstance(spiffe_id, SpiffeId):
        raise SvidUntrusted("this connection has no verified SPIFFE ID")
    return spiffe_id


def _run_check(check: PeerCheck, ssl_object: ssl.SSLObject | ssl.SSLSocket) -> SpiffeId:
    try:
        return check(peer_chain(ssl_object))
    except IdentityError as exc:
        log.warning("TLS peer refused: %s", exc)
        raise SpiffeHandshakeError(exc) from exc


def _verifying_classes(check: PeerCheck) -> tuple[type[ssl.SSLObject], type[ssl.SSLSocket]]:
    """SSL object classes whose handshake ends with ``check`` on the peer's chain."""

    class SpiffeSSLObject(ssl.SSLObject):
        spiffe_id: SpiffeId | None = None

        def do_handshake(self) -> None:
            super().do_handshake()  # raises SSLWantReadError until the handshake is done
            if self.spiffe_id is None:
                self.spiffe_id = _run_check(check, self)

    class SpiffeSSLSocket(ssl.SSLSocket):
        spiffe_id: SpiffeId | None = None

        def do_handshake(self, block: bool = False) -> None:
            super().do_handshake(block)
            if self.spiffe_id is None:
                try:
                    self.spiffe_id = _run_check(check, self)
                except SpiffeHandshakeError:
                    self.close()
                    raise

    return SpiffeSSLObject, SpiffeSSLSocket


# --- building contexts ------------------------------------------------------------------


def _new_context(server_side: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    if server_side:
        # No resumption: every connection is verified against the pool of that moment.
        ctx.options |= ssl.OP_NO_TICKET
        ctx.num_tickets = 0
    else:
        # The SPIFFE ID check replaces host name checks.
        ctx.check_hostname = False
    return ctx


def _load_svid(ctx: ssl.SSLContext, svid: X509Svid) -> None:
    """Load chain and key. ``ssl`` reads them only from a file: a memfd keeps the key off
    the disk (Linux); elsewhere a 0600 file in a private temporary directory."""
    data = svid.chain_pem() + svid.key_pem()
    try:
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("fedgw-svid", os.MFD_CLOEXEC)
            try:
                _write_all(fd, data)
                ctx.load_cert_chain(f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)
        else:  # pragma: no cover - not Linux
            tmp = Path(tempfile.mkdtemp(prefix="fedgw-svid-"))
            try:
                path = tmp / "svid.pem"
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    _write_all(fd, data)
                finally:
                    os.close(fd)
                ctx.load_cert_chain(path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except (ssl.SSLError, OSError) as exc:
        raise TlsSetupFailed(f"OpenSSL refused SVID {svid.spiffe_id}: {exc}") from exc


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _load_authorities(ctx: ssl.SSLContext, authorities: Sequence[x509.Certificate]) -> None:
    if not authorities:
        raise TlsSetupFailed("no trust bundle holds an authority: no peer could be verified")
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in authorities)
    try:
        ctx.load_verify_locations(cadata=pem.decode("ascii"))
    except ssl.SSLError as exc:
        raise TlsSetupFailed(f"OpenSSL refused the trust bundle: {exc}") from exc
    ctx.verify_mode = ssl.CERT_REQUIRED
    # Any bundle authority is a trust anchor in SPIFFE, self-signed or not.
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN


def server_context(
    svid: X509Svid,
    bundles: BundleSet | None,
    *,
    clock: Clock | None = None,
    accept: Callable[[SpiffeId], bool] | None = None,
) -> ssl.SSLContext:
    """A server context presenting ``svid``. With ``bundles`` it requires a client SVID
    of one of their trust domains (and ``accept(id)`` if given); with ``None`` it asks
    for no client certificate (the bundle-endpoint profile)."""
    ctx = _new_context(server_side=True)
    _load_svid(ctx, svid)
    if bundles is not None:
        _load_authorities(ctx, bundles.authorities())
        ctx.sslobject_class, ctx.sslsocket_class = _verifying_classes(
            _client_check(lambda: bundles, clock or SystemClock(), accept)
        )
    return ctx


def _client_check(
    bundles: Callable[[], BundleSet], clock: Clock, accept: Callable[[SpiffeId], bool] | None
) -> PeerCheck:
    def check(chain: list[bytes]) -> SpiffeId:
        if not chain:
            raise SvidInvalid("client sent no certificate")
        spiffe_id = verify_peer(chain[0], bundles(), to_datetime(clock.now()), chain[1:])
        if accept is not None and not accept(spiffe_id):
            raise PeerMismatch(f"client {spiffe_id} is not allowed on this listener")
        return spiffe_id

    return check


def client_context(
    svid: X509Svid | None,
    bundle: TrustBundle,
    expected: SpiffeId | None,
    *,
    clock: Clock | None = None,
) -> ssl.SSLContext:
    """A client context for a server of ``bundle``'s trust domain: trusts only that
    bundle, presents ``svid`` (if any), and fails the handshake unless the server is
    ``expected`` (``None``: any SPIFFE ID of that domain)."""
    if expected is not None and expected.trust_domain != bundle.trust_domain:
        raise IdentityConfigInvalid(
            f"expected server {expected} is not in trust domain {bundle.trust_domain!r} "
            "of the bundle given"
        )
    ctx = _new_context(server_side=False)
    if svid is not None:
        _load_svid(ctx, svid)
    _load_authorities(ctx, bundle.x509_authorities)
    the_clock = clock or SystemClock()

    def check(chain: list[bytes]) -> SpiffeId:
        return check_server_identity(chain, expected, bundle, to_datetime(the_clock.now()))

    ctx.sslobject_class, ctx.sslsocket_class = _verifying_classes(check)
    return ctx


# --- contexts that follow the identity source -----------------------------------------


class ServerTLS:
    """The server side of SPIFFE TLS for the life of a listener.

    ``context`` is created once (uvicorn's ``ssl_context_factory`` is called once); its
    ``sni_callback``, which OpenSSL calls for every ClientHello, with or without SNI,
    moves each new connection onto the newest context, rebuilt whenever the source
    reports a change, so SVID renewal and CA rotation need no restart. The SPIFFE check
    in the handshake always uses the bundles of that moment.
    """

    def __init__(
        self,
        source: IdentitySource,
        *,
        require_client_cert: bool = True,
        accept: Callable[[SpiffeId], bool] | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._source = source
        self._mtls = require_client_cert
        self._accept = accept
        self._clock: Clock = clock or SystemClock()
        self._bundles = source.bundles()
        self._current = self._build()
        self.context = self._build()
        if self._mtls:
            self.context.sslobject_class, self.context.sslsocket_class = _verifying_classes(
                _client_check(lambda: self._bundles, self._clock, self._accept)
            )
        self.context.sni_callback = self._switch
        self._unsubscribe = source.subscribe(self.rebuild)

    def _build(self) -> ssl.SSLContext:
        ctx = _new_context(server_side=True)
        _load_svid(ctx, self._source.svid())
        if self._mtls:
            _load_authorities(ctx, self._bundles.authorities())
        return ctx

    def _switch(
        self, ssl_object: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        ssl_object.context = self._current

    def rebuild(self) -> None:
        """Take the source's current SVID and bundles for new connections."""
        bundles = self._source.bundles()
        previous = self._bundles
        self._bundles = bundles
        try:
            self._current = self._build()
        except IdentityError:
            # Keep serving with the last good context; the source will change again.
            self._bundles = previous
            log.exception("TLS server context not rebuilt")

    def ssl_context_factory(
        self, config: object, default: Callable[[], ssl.SSLContext]
    ) -> ssl.SSLContext:
        """For ``uvicorn.Config(ssl_context_factory=server_tls.ssl_context_factory)``."""
        return self.context

    def close(self) -> None:
        self._unsubscribe()


class PeerClientContext(ssl.SSLContext):
    """A client context for one peer trust domain that follows the identity source: each
    new connection gets our current SVID and the current bundle of ``trust_domain`` only,
    and the handshake fails unless the server is ``expected``.

    Give it to ``httpx.AsyncClient(verify=...)`` once: ``wrap_bio``/``wrap_socket`` (what
    asyncio, anyio and httpx call per connection) go to a context rebuilt on change.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> PeerClientContext:
        return super().__new__(cls, ssl.PROTOCOL_TLS_CLIENT)

    def __init__(
        self,
        source: IdentitySource,
        trust_domain: str,
        expected: SpiffeId | None,
        *,
        present_svid: bool = True,
        clock: Clock | None = None,
    ) -> None:
        self._source = source
        self._trust_domain = trust_domain
        self._expected = expected
        self._present_svid = present_svid
        self._clock = clock
        self._alpn: list[str] | None = None
        self._built: tuple[int, ssl.SSLContext] | None = None
        # This outer context never handshakes itself; keep it strict in case it is used.
        self.check_hostname = False
        self.verify_mode = ssl.CERT_REQUIRED

    def current(self) -> ssl.SSLContext:
        version = self._source.version
        if self._built is None or self._built[0] != version:
            bundle = self._source.bundles().get(self._trust_domain)
            if bundle is None:
                raise SvidUntrusted(
                    f"no trust bundle for {self._trust_domain!r}: cannot verify its servers"
                )
            svid = self._source.svid() if self._present_svid else None
            ctx = client_context(svid, bundle, self._expected, clock=self._clock)
            if self._alpn is not None:
                ctx.set_alpn_protocols(self._alpn)
            self._built = (version, ctx)
        return self._built[1]

    def set_alpn_protocols(self, alpn_protocols: Any) -> None:
        self._alpn = list(alpn_protocols)
        if self._built is not None:
            self._built[1].set_alpn_protocols(self._alpn)

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        return self.current().wrap_bio(incoming, outgoing, server_side, server_hostname, session)

    def wrap_socket(
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        return self.current().wrap_socket(
            sock,
            server_side,
            do_handshake_on_connect,
            suppress_ragged_eofs,
            server_hostname,
            session,
        )
