"""How uvicorn runs the service: h11 with bounded headers (431), a header read timeout, keep-alive timeout.

uvicorn's h11 protocol bounds a request line plus headers that is still arriving
(``h11_max_incomplete_event_size``) but answers 400, and closes an idle connection only between requests
(``timeout_keep_alive``): a client that trickles its headers a byte at a time keeps its connection for
ever. :class:`HardenedH11Protocol` answers 431 for the first and closes the second after
``header_timeout_s``. A head that arrives whole in one read passes h11 at any size; the app bounds it
(``HeaderLimitMiddleware``, 431). Slow bodies are bounded in the app (``read_timeout_s``, 408).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE, STATUS_PHRASES, H11Protocol

from .settings import ServiceSettings

logger = logging.getLogger(__name__)


class HardenedH11Protocol(H11Protocol):
    header_timeout_s: float = 10.0
    """Longest the request line and headers may take to arrive: from the connection for the first request,
    from the first byte for the next ones (an idle kept-alive connection is uvicorn's ``timeout_keep_alive``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport is not None and not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            logger.info("closing a connection from %r: no complete request headers within %.0fs",
                        self.client, self.header_timeout_s)
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the headers are in (or the connection failed)
            self._cancel_header_timer()
        elif self._header_timer is None and not self.transport.is_closing():
            self._arm_header_timer()  # a next request has begun on a kept-alive connection

    def send_400_response(self, msg: str) -> None:
        """h11 refused the request; an over-long head (h11 keeps it unconsumed) gets 431, the rest 400."""
        limit = self.config.h11_max_incomplete_event_size or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
        if len(self.conn.trailing_data[0]) > limit:
            self._send_error(431, f"Request line and headers exceed {limit} bytes.")
        else:
            self._send_error(400, msg)

    def _send_error(self, status: int, msg: str) -> None:
        self._cancel_header_timer()
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")]
        for event in (h11.Response(status_code=status, headers=headers, reason=STATUS_PHRASES[status]),
                      h11.Data(data=msg.encode("ascii")), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


def protocol_class(settings: ServiceSettings) -> type[HardenedH11Protocol]:
    return type("ServiceH11Protocol", (HardenedH11Protocol,), {"header_timeout_s": settings.header_timeout_s})


def server_options(settings: ServiceSettings, **overrides: Any) -> dict[str, Any]:
    """The uvicorn options (``uvicorn.run(app, **options)``) ``transresnet serve`` and the tests use."""
    options: dict[str, Any] = {
        "host": settings.host, "port": settings.port, "log_level": settings.log_level,
        "http": protocol_class(settings), "h11_max_incomplete_event_size": settings.max_header_bytes,
        "timeout_keep_alive": settings.keep_alive_s, "timeout_graceful_shutdown": 30,
    }
    options.update(overrides)
    return options
