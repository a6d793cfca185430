"""The registry's nouns (Asset, Finetune) and the rules every value meets before it reaches the
database (names, text bounds, storable strings, token hashing, timestamps): pure functions, no I/O.
registry.py applies them; either database (registry_sql.py) stores what passed them."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime, timezone

from loraplex import errors

REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
MAX_TOKEN_CHARS = 512
_MAX_TEXT = {"account name": 128, "model": 256, "description": 4096, "object_key": 1024}


@dataclass(frozen=True)
class Asset:
    """One uploaded file of a finetune. Immutable once recorded."""

    file_name: str  # one of REQUIRED_FILES
    size: int  # bytes
    sha256: str  # lowercase hex
    object_key: str  # where the bytes live in object storage (opaque here)


@dataclass(frozen=True)
class Finetune:
    """A snapshot of a finetune row and its assets (later changes are not reflected)."""

    id: str  # uuid4 string
    account_id: str
    name: str  # unique per account (case-sensitive); 1–64 chars of [A-Za-z0-9._-]
    model: str  # the base model it targets
    description: str
    public: bool
    created_at: str  # ISO 8601 UTC, "2026-11-23T18:00:00.000000Z"
    modified_at: str
    state: str  # "pending" (not all REQUIRED_FILES yet) | "ready" | "invalid" (its last upload was refused)
    assets: dict[str, Asset]  # file name → Asset
    state_reason: str | None = None  # why it is "invalid": the refusal's message; None otherwise

    @property
    def missing_files(self) -> tuple[str, ...]:
        """REQUIRED_FILES not uploaded yet, in REQUIRED_FILES order."""
        return tuple(f for f in REQUIRED_FILES if f not in self.assets)


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def invalid(message: str) -> errors.InvalidInput:
    return errors.InvalidInput(message)


def not_found(id_or_name: object) -> errors.FinetuneNotFound:
    return errors.FinetuneNotFound(f"finetune {str(id_or_name)[:100]!r} not found")


def storable(value: object) -> bool:
    """A string both databases can store and compare: no NUL, no lone surrogate (PostgreSQL refuses
    both; such a value can match nothing stored, since what is stored passed the same checks)."""
    if not isinstance(value, str) or "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(value: object) -> str:
    """`value` as text either database stores (for messages built from user input)."""
    return str(value).replace("\x00", "").encode("utf-8", "replace").decode("utf-8")


def check_text(what: str, value: object, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not allow_empty):
        raise invalid(f"{what} must be a {'' if allow_empty else 'non-empty '}string")
    if len(value) > _MAX_TEXT[what]:
        raise invalid(f"{what} is longer than {_MAX_TEXT[what]} characters")
    if not storable(value):
        raise invalid(f"{what} contains a NUL character or is not valid Unicode")
    return value


# names a URL path cannot carry as a finetune: dot segments (clients and proxies resolve them away)
# and the fixed segment of GET …/finetunes/public
_UNADDRESSABLE_NAMES = {".": "a dot segment", "..": "a dot segment", "public": "the route …/finetunes/public"}


def check_name(name: object) -> str:
    """1-64 of [A-Za-z0-9._-] (URL-safe as they are), and not a name that would not reach the
    finetune as a URL path segment."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise invalid("finetune name must be 1-64 characters of A-Z, a-z, 0-9, '.', '_' or '-'")
    if name in _UNADDRESSABLE_NAMES:
        raise invalid(f"finetune name {name!r} cannot be used: in a URL path it is {_UNADDRESSABLE_NAMES[name]}, so "
                       "the finetune could not be addressed by name; choose another name")
    return name
