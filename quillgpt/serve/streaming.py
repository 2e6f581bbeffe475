"""Waiting on a generation without losing track of the client.

A streamed response cancels its generation however it ends (done, failed, client gone); a plain
response races the generation against the client's disconnect, so a client that hangs up stops its
generation in both cases.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterable

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from quillgpt.serve.engine import Generation

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: dict | str) -> str:
    """One Server-Sent Event: `data: {...}` and a blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n"


class GenerationStream(StreamingResponse):
    def __init__(self, content: AsyncIterable[str], generation: Generation, media_type: str = "text/event-stream"):
        super().__init__(content, media_type=media_type, headers=STREAM_HEADERS)
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.cancel()


async def _disconnected(request: Request) -> None:
    # The body has been read, so the next message the server sends us is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def finish_or_disconnect(generation: Generation, request: Request) -> bool:
    """Wait for the generation to end; False (and the generation cancelled) if the client left first.
    Engine errors (timeout, shutdown) are raised."""
    waiter = asyncio.ensure_future(generation.wait())
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not waiter.done():
            generation.cancel()
            waiter.cancel()
    if waiter in done:
        waiter.result()
        return True
    return False
