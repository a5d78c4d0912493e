"""How uvicorn runs the service: bounded request heads (431), a header read timeout, keep-alive timeout.

Two HTTP/1.1 parsers, picked with ``TRANSRESNET_HTTP_PARSER`` (``transresnet serve --http-parser``), behave
the same at the edges:

- ``h11`` (pure Python): uvicorn bounds a head still arriving (``h11_max_incomplete_event_size``) but
  answers 400; :class:`HardenedH11Protocol` answers 431.
- ``httptools`` (llhttp, C): uvicorn sets no bound at all; :class:`HardenedHttpToolsProtocol` counts a
  head's bytes as they arrive and answers 431 past ``max_header_bytes``.

Neither parser bounds a head that arrives whole in one read: the app does (``HeaderLimitMiddleware``, 431,
with the field count). Both protocols close an idle kept-alive connection after ``timeout_keep_alive``
(uvicorn) and a connection whose request line and headers have not arrived within ``header_timeout_s``
(uvicorn has no such timeout: a client trickling its headers a byte at a time would keep its connection for
ever). Slow bodies are bounded in the app (``read_timeout_s``, 408).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
import httptools
from uvicorn.protocols.http.h11_impl import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE, STATUS_PHRASES, H11Protocol
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from .settings import ServiceSettings

logger = logging.getLogger(__name__)


class HeaderDeadline:
    """The header read timeout of both protocols: armed when a request's head is awaited, cancelled when
    its headers are in; on expiry the connection is closed if the head is still incomplete."""

    header_timeout_s: float = 10.0
    """Longest the request line and headers may take to arrive: from the connection for the first request,
    from the first byte for the next ones (an idle kept-alive connection is uvicorn's ``timeout_keep_alive``)."""
    _header_timer: asyncio.TimerHandle | None = None
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    client: Any

    def _awaiting_headers(self) -> bool:
        raise NotImplementedError

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]  (the protocol class after this mixin)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport is not None and not self.transport.is_closing() and self._awaiting_headers():
            logger.info("closing a connection from %r: no complete request headers within %.0fs",
                        self.client, self.header_timeout_s)
            self.transport.close()


class HardenedH11Protocol(HeaderDeadline, H11Protocol):
    def _awaiting_headers(self) -> bool:
        return self.conn.their_state is h11.IDLE

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._awaiting_headers():  # the headers are in (or the connection failed)
            self._cancel_header_timer()
        elif self._header_timer is None and not self.transport.is_closing():
            self._arm_header_timer()  # a next request has begun on a kept-alive connection

    def send_400_response(self, msg: str) -> None:
        """h11 refused the request; an over-long head (h11 keeps it unconsumed) gets 431, the rest 400."""
        limit = self.config.h11_max_incomplete_event_size or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
        if len(self.conn.trailing_data[0]) > limit:
            self._send_error(431, head_too_large(limit))
        else:
            self._send_error(400, msg)

    def _send_error(self, status: int, msg: str) -> None:
        self._cancel_header_timer()
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")]
        for event in (h11.Response(status_code=status, headers=headers, reason=STATUS_PHRASES[status]),
                      h11.Data(data=msg.encode("ascii")), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


class HardenedHttpToolsProtocol(HeaderDeadline, HttpToolsProtocol):
    max_header_bytes: int = DEFAULT_MAX_INCOMPLETE_EVENT_SIZE

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # the first request's head starts with the connection
        self._head_bytes = 0

    def _awaiting_headers(self) -> bool:
        return self._in_head

    def data_received(self, data: bytes) -> None:
        # llhttp buffers an unfinished header field itself, so the bound counts the bytes as they arrive.
        # A head that completes inside one read is measured by the app (HeaderLimitMiddleware).
        if self._in_head:
            self._head_bytes += len(data)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self._send_error(400, msg)
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._in_head and self._head_bytes > self.max_header_bytes and not self.transport.is_closing():
            self._send_error(431, head_too_large(self.max_header_bytes))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_timer is None:
            self._arm_header_timer()  # a next request has begun on a kept-alive connection

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_header_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head_bytes = True, 0  # what arrives next is the next request's head

    def send_400_response(self, msg: str) -> None:
        self._send_error(400, msg)

    def _send_error(self, status: int, msg: str) -> None:
        self._cancel_header_timer()
        body = msg.encode("ascii")
        head = [STATUS_LINE[status]]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head += [b"content-type: text/plain; charset=utf-8\r\n", b"content-length: %d\r\n" % len(body),
                 b"connection: close\r\n", b"\r\n"]
        self.transport.write(b"".join(head) + body)
        self.transport.close()


def head_too_large(limit: int) -> str:
    return f"Request line and headers exceed {limit} bytes."


def protocol_class(settings: ServiceSettings) -> type[asyncio.Protocol]:
    """The configured parser's hardened protocol, with the settings' limits."""
    if settings.http_parser == "httptools":
        return type("ServiceHttpToolsProtocol", (HardenedHttpToolsProtocol,),
                    {"header_timeout_s": settings.header_timeout_s, "max_header_bytes": settings.max_header_bytes})
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
