"""`x-loraplex-replica`: every response of the scale-out ingress names who served it.

A generation names the engine replica it ran on (RemoteEngine calls `note_replica` at the
replica's first output, which comes before the response starts, streamed or not); any other route
names the ingress itself (`INGRESS`). When a request was sent again after its replica died, the
header names the replica whose output came last before the response started (a stream's header
is sent with its first byte; an OpenAI request with several choices names one of their replicas).

The middleware puts a fresh mutable holder into a context variable per HTTP request; code below it
(in the same task, or in tasks started with a copy of its context) writes into that holder.
"""

from __future__ import annotations

from contextvars import ContextVar

HEADER = b"x-loraplex-replica"
INGRESS = "ingress"
_SERVED_BY: ContextVar[list[str] | None] = ContextVar("loraplex_served_by", default=None)


def note_replica(replica_id: str) -> None:
    """Record that the current HTTP request is being served by `replica_id` (no-op outside one)."""
    holder = _SERVED_BY.get()
    if holder is not None:
        holder[0] = replica_id


class ReplicaHeaderMiddleware:
    """ASGI middleware adding `x-loraplex-replica` to every HTTP response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        holder = [INGRESS]
        _SERVED_BY.set(holder)

        async def send_with_replica(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (HEADER, holder[0].encode())]
            await send(message)

        await self.app(scope, receive, send_with_replica)
