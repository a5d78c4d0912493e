"""Response security headers and the request header-count limit, as pure ASGI middleware.

The page and the API get a Content-Security-Policy that allows only the app's own files (the page has no
inline script or style; the preview image is a ``blob:`` URL). ``/docs`` sets its own, relaxed policy
(Swagger UI from its CDN plus the hash of its one inline bootstrap script): see ``routers/web.py``.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

APP_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
           "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)


class SecurityHeadersMiddleware:
    """Adds the security headers to every HTTP response; a response that sets its own CSP keeps it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [h for h in SECURITY_HEADERS if h[0] not in present]
                if b"content-security-policy" not in present:
                    headers.append((b"content-security-policy", APP_CSP.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class HeaderLimitMiddleware:
    """431 for requests with more than ``max_headers`` header fields or a request line plus headers over
    ``max_header_bytes``. Those checks see a head that arrived whole; one still arriving is bounded earlier,
    in the server's protocol (``transresnet.service.server``), which answers 431 itself."""

    def __init__(self, app: ASGIApp, max_headers: int, max_header_bytes: int) -> None:
        self.app = app
        self.max_headers = max_headers
        self.max_header_bytes = max_header_bytes

    def _refusal(self, scope: Scope) -> str | None:
        headers = scope["headers"]
        if len(headers) > self.max_headers:
            return (f"the request has {len(headers)} header fields; at most {self.max_headers} are accepted: "
                    "drop the ones the API does not need")
        head = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + sum(
            len(name) + len(value) + 4 for name, value in headers)
        if head > self.max_header_bytes:
            return (f"the request line and headers are about {head} bytes; they must not exceed "
                    f"{self.max_header_bytes} bytes: drop or shorten the ones the API does not need")
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self._refusal(scope) if scope["type"] == "http" else None
        if refusal is not None:
            body = json.dumps({"error": "headers_too_large", "message": refusal}).encode()
            await send({"type": "http.response.start", "status": 431,
                        "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)
