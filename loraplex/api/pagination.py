"""Pagination of every list route, as the Cloudflare v4 API (and so its SDK) expects it.

Query parameters: `page` (1-based, default 1) and `per_page` (default and maximum in
`config.PageConfig`), or `limit` and `offset` (what the SDK's `finetunes.public.list` sends;
`offset` counts items, `limit` is the page size). A value that is not an integer in range is
refused with 400 / 5004. The answer is the usual envelope plus

    "result_info": {"page": P, "per_page": N, "count": items on this page, "total_count": T,
                    "total_pages": ceil(T / N)}        (and "offset" when the caller sent one)

A page past the end has an empty `result` (count 0): that is what ends the SDK's auto-paginating
iterators (`SyncV4PagePaginationArray` asks for page + 1 until a page comes back empty).
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import Request

from loraplex.api.errors import envelope, invalid
from loraplex.config import PageConfig

PAGES = PageConfig()


def _param(name: str, minimum: int, description: str, maximum: int | None = None) -> dict:
    schema = {"type": "integer", "minimum": minimum} | ({"maximum": maximum} if maximum is not None else {})
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


def page_params(max_per_page: int = PAGES.max_per_page) -> dict:
    """The query parameters, for the OpenAPI document of a list route (`openapi_extra=`)."""
    return {"parameters": [
        _param("page", 1, "1-based page number (default 1)"),
        _param("per_page", 1, f"items per page (default {PAGES.default_per_page})", max_per_page),
        _param("limit", 1, "page size, with `offset` (instead of `page` / `per_page`)", max_per_page),
        _param("offset", 0, "items to skip, with `limit`"),
    ]}


PAGE_PARAMS = page_params()  # every list route's, unless it allows smaller pages only


def _int_param(request: Request, name: str, default: int, low: int, high: int | None = None) -> int:
    text = request.query_params.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise invalid(f"{name} must be an integer, got {text[:40]!r}") from None
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise invalid(f"{name} must be {bound}, got {value}")
    return value


def paginated(request: Request, items: Sequence, max_per_page: int = PAGES.max_per_page) -> dict:
    """The envelope for one page of `items` (all of them, in their listing order), chosen by the
    request's query parameters. `items` may be a lazy sequence (`len` and one slice are taken).
    A route whose items are large passes a smaller `max_per_page`."""
    params = request.query_params
    size_name = "limit" if "limit" in params and "per_page" not in params else "per_page"
    per_page = _int_param(request, size_name, min(PAGES.default_per_page, max_per_page), 1, max_per_page)
    if "offset" in params and "page" not in params:
        offset = _int_param(request, "offset", 0, 0)
        page = offset // per_page + 1
    else:
        page = _int_param(request, "page", 1, 1)
        offset = (page - 1) * per_page
    chunk = list(items[offset:offset + per_page])
    total = len(items)
    body = envelope(chunk)
    body["result_info"] = {"page": page, "per_page": per_page, "count": len(chunk), "total_count": total,
                           "total_pages": -(-total // per_page)}
    if "offset" in params and "page" not in params:
        body["result_info"]["offset"] = offset
    return body
