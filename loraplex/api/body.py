"""Request bodies: JSON whatever the Content-Type (Workers AI clients send text/plain too),
validated by a schema; every failure is a 400 / 5004 that names the field."""

from __future__ import annotations

import json
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from loraplex.api.errors import invalid, validation_message

M = TypeVar("M", bound=BaseModel)


async def parse_body(request: Request, schema: type[M]) -> M:
    raw = await request.body()
    try:
        data = json.loads(raw) if raw.strip() else {}
    except (ValueError, RecursionError):  # bad UTF-8 or JSON, absurd nesting
        raise invalid("the request body is not valid JSON") from None
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise invalid(validation_message(e.errors(include_url=False, include_input=False))) from None
