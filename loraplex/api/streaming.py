"""Server-sent events: `data: <json>\n\n` lines, ending with `data: [DONE]`."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Protocol

from fastapi.responses import StreamingResponse

from loraplex.api.errors import as_api_error

log = logging.getLogger(__name__)
DONE = b"data: [DONE]\n\n"


class Closable(Protocol):
    async def aclose(self) -> None: ...


def sse(data: dict) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


def sse_response(gen: Closable, events: AsyncIterator[bytes]) -> StreamingResponse:
    """Stream `events`; a client that goes away cancels the stream, which aborts the request(s)
    (`gen.aclose()`: a Generation, or an OpenAI request's Choices). A failure mid-stream ends it with an error event instead of a traceback."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                yield event
        except Exception as exc:
            error = as_api_error(exc)
            yield sse({"error": {"code": error.code, "message": error.message}})
        finally:
            await gen.aclose()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
