"""The request middleware: a request id, timing, the request counter and one log line per request.

It also enforces the body size limit: a declared Content-Length over it is refused before anything
reads the body, and a body that grows past it while arriving (chunked) fails the read with a 413.

Pure ASGI (not BaseHTTPMiddleware), so streamed responses pass through untouched and a client's
disconnect reaches the route as it happens.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from quillgpt.serve.errors import APIError, error_response
from quillgpt.serve.logs import request_id
from quillgpt.serve.metrics import Metrics

log = logging.getLogger("quillgpt.serve.access")
REQUEST_ID_HEADER = "X-Request-ID"
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, max_body_bytes: int | None = None):
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        given = headers.get(REQUEST_ID_HEADER, "")
        rid = given if _VALID_ID.match(given) else uuid.uuid4().hex
        token = request_id.set(rid)
        started = time.perf_counter()
        status = 500  # what the client gets if the app fails before answering

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, rid)
            await send(message)

        try:
            if self._too_large(headers):
                message = f"request body too large (limit: {self.max_body_bytes} bytes)"
                await error_response(APIError(413, message))(scope, receive, send_with_id)
            else:
                await self.app(scope, self._limited(receive), send_with_id)
        finally:
            seconds = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe_request(route, scope["method"], status, seconds)
            client = scope.get("client")
            log.info(
                "%s %s %d %.1f ms",
                scope["method"],
                scope["path"],
                status,
                seconds * 1000,
                extra={
                    "fields": {
                        "method": scope["method"],
                        "path": scope["path"],
                        "route": route,
                        "status": status,
                        "duration_ms": round(seconds * 1000, 1),
                        "client": f"{client[0]}:{client[1]}" if client else None,
                    }
                },
            )
            request_id.reset(token)

    def _limited(self, receive: Receive) -> Receive:
        if self.max_body_bytes is None:
            return receive
        limit, received = self.max_body_bytes, 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # raised inside the route's body read: its error handler answers
                    raise HTTPException(413, f"request body too large (limit: {limit} bytes)")
            return message

        return receive_limited

    def _too_large(self, headers: Headers) -> bool:
        length = headers.get("content-length", "")
        return self.max_body_bytes is not None and length.isdigit() and int(length) > self.max_body_bytes
