"""Domain errors: what went wrong, in words the caller may see. No wire codes here.

Every layer below the API (registry, storage, adapters, residency, engine, training) raises these
kinds; the API alone turns a kind into a Workers AI code, an HTTP status and OpenAI's error shape,
in one table (`loraplex/api/errors.py`, `WIRE`). A new kind needs a row there.

`message` is bounded (it may quote tenant input) and never holds a secret or a traceback.
"""

from __future__ import annotations

MAX_MESSAGE_CHARS = 1000


class LoraplexError(Exception):
    """Base of every domain error."""

    def __init__(self, message: str):
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS - 3] + "..."
        super().__init__(message)
        self.message = message


class InvalidInput(LoraplexError, ValueError):
    """The caller's input is malformed or out of range; the message names what and where."""


class TooLarge(InvalidInput):
    """An input is over a size bound (a body, a file, a prompt against the context)."""


class AdapterInvalid(InvalidInput):
    """A PEFT adapter (uploaded, trained or stored) that cannot be served."""


class AdapterFilesMissing(AdapterInvalid):
    """An adapter lacks `adapter_config.json` or `adapter_model.safetensors`."""


class NotFound(LoraplexError, LookupError):
    """A named thing does not exist, or the caller may not see it (never says which)."""


class FinetuneNotFound(NotFound):
    """No finetune (adapter) by that name or id for this account, or it was deleted."""


class ModelNotFound(NotFound):
    """The server does not serve that model."""


class Unauthenticated(LoraplexError):
    """No valid credentials."""


class Forbidden(LoraplexError):
    """Valid credentials, but this action on this thing is not theirs to take."""


class LimitReached(LoraplexError):
    """An account's quota is used up (finetunes, files, jobs…); freeing some lifts it."""


class CapacityExhausted(LoraplexError):
    """The server is full right now (queue, slots); the same request may succeed soon."""


class Unavailable(LoraplexError):
    """A dependency failed (object store, engine, trainer); retry later."""


class AdapterUnavailable(Unavailable):
    """An adapter could not be brought into memory (its store failed); retry later."""
