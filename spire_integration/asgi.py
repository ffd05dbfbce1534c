"""Hands the SPIFFE ID that the TLS handshake verified to the ASGI app under uvicorn, as
``scope["state"]["spiffe_id"]`` (``request.state.spiffe_id`` in FastAPI/Starlette)."""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

STATE_KEY = "spiffe_id"


class SpiffeHttpProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol (httptools' C parser) plus the peer's SPIFFE ID in
    every request's state.

    ``uvicorn.Config(app, http=SpiffeHttpProtocol, ssl_context_factory=...)``. uvicorn
    copies ``app_state`` into each request scope; this connection gets its own copy with
    the verified ID (``None`` without TLS or without a client certificate). When the
    server stops, idle connections are dropped at once (see :meth:`shutdown`).
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        self.app_state = {**self.app_state, STATE_KEY: getattr(ssl_object, "spiffe_id", None)}

    def shutdown(self) -> None:
        """The server stops: a connection between requests is dropped at once.

        Closing a TLS connection waits for the peer's ``close_notify``, and a client's
        idle kept-alive connection does not answer until it uses or closes it: every
        peer's pool held a stopping gateway for the whole graceful timeout. Nothing is
        lost by not waiting: no response is under way and none is left in the buffers
        (one still being sent, or a request in progress, gets the graceful close)."""
        idle = self.cycle is None or self.cycle.response_complete
        if idle and self.transport.get_write_buffer_size() == 0:
            self.transport.abort()
        else:
            super().shutdown()
