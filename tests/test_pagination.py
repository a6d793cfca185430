"""Every list route honours the Cloudflare v4 pagination contract: the real Cloudflare SDK's
auto-paginating iterators (sync and async) end, with every item exactly once, when the listing
spans several pages; `result_info` carries page, per_page, count, total_count; bad values are 400."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import httpx
import pytest
from cloudflare import AsyncCloudflare, Cloudflare

from api_server import LiveServer, server_options
from loraplex.config import PageConfig
from tiny_models import make_tiny_model

MODEL = "@cf/test/tiny-llama"
OWN, PUBLIC = 7, 5  # finetunes of the account (PUBLIC of them public), more than one page of 2 or 3


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama", model_dir)
    live = LiveServer.start(server_options(model_dir, tmp_path_factory.mktemp("data")))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def account(server):
    account_id, token = server.account("pager")
    cf = Cloudflare(api_token=token, base_url=f"{server.url}/client/v4", max_retries=0)
    for i in range(OWN):
        cf.ai.finetunes.create(account_id=account_id, model=MODEL, name=f"ft-{i}", public=i < PUBLIC)
    return account_id, token


def get(server, token, path, **params) -> httpx.Response:
    return httpx.get(f"{server.url}/client/v4{path}", params=params, headers={"Authorization": f"Bearer {token}"})


def test_models_search_sdk_iterators_end(server, account):
    account_id, token = account
    cf = Cloudflare(api_token=token, base_url=f"{server.url}/client/v4", max_retries=0)
    names = [m["name"] for m in cf.ai.models.list(account_id=account_id, per_page=1)]
    assert names == [MODEL, f"{MODEL}-lora"]
    assert [m["name"] for m in cf.ai.models.list(account_id=account_id)] == names  # default page size

    async def collect() -> list[str]:
        acf = AsyncCloudflare(api_token=token, base_url=f"{server.url}/client/v4", max_retries=0)
        return [m["name"] async for m in acf.ai.models.list(account_id=account_id, per_page=1)]

    assert asyncio.run(collect()) == names


def test_models_search_result_info(server, account):
    account_id, token = account
    body = get(server, token, f"/accounts/{account_id}/ai/models/search", page=2, per_page=1).json()
    assert [m["name"] for m in body["result"]] == [f"{MODEL}-lora"]
    assert body["result_info"] == {"page": 2, "per_page": 1, "count": 1, "total_count": 2, "total_pages": 2}
    past = get(server, token, f"/accounts/{account_id}/ai/models/search", page=3, per_page=1).json()
    assert past["result"] == [] and past["result_info"]["count"] == 0 and past["success"] is True


def test_finetunes_pages_cover_every_finetune_once(server, account):
    account_id, token = account
    seen, page = [], 1
    while True:
        body = get(server, token, f"/accounts/{account_id}/ai/finetunes", page=page, per_page=3).json()
        info = body["result_info"]
        assert (info["page"], info["per_page"], info["count"], info["total_count"]) == (page, 3, len(body["result"]), OWN)
        if not body["result"]:
            break
        seen += [f["name"] for f in body["result"]]
        page += 1
    assert seen == [f"ft-{i}" for i in range(OWN)] and page == 4  # 3 + 3 + 1, then an empty page
    whole = get(server, token, f"/accounts/{account_id}/ai/finetunes").json()
    assert [f["name"] for f in whole["result"]] == seen  # the default page holds them all
    assert whole["result_info"]["per_page"] == PageConfig().default_per_page
    cf = Cloudflare(api_token=token, base_url=f"{server.url}/client/v4", max_retries=0)
    listed = cf.ai.finetunes.list(account_id=account_id)  # the SDK does not paginate this one: the default page
    assert [f.name for f in listed] == seen


def test_public_finetunes_with_the_sdk_limit_and_offset(server, account):
    account_id, token = account
    cf = Cloudflare(api_token=token, base_url=f"{server.url}/client/v4", max_retries=0)
    everything = [f.name for f in cf.ai.finetunes.public.list(account_id=account_id)]
    assert everything == [f"ft-{i}" for i in range(PUBLIC)]
    pages = [[f.name for f in cf.ai.finetunes.public.list(account_id=account_id, limit=2, offset=offset)]
             for offset in range(0, PUBLIC + 2, 2)]
    assert pages == [["ft-0", "ft-1"], ["ft-2", "ft-3"], ["ft-4"], []]
    body = get(server, token, f"/accounts/{account_id}/ai/finetunes/public", limit=2, offset=2).json()
    assert body["result_info"] == {"page": 2, "per_page": 2, "count": 2, "total_count": PUBLIC, "total_pages": 3,
                                   "offset": 2}
    paged = get(server, token, f"/accounts/{account_id}/ai/finetunes/public", page=3, per_page=2).json()
    assert [f["name"] for f in paged["result"]] == ["ft-4"]


@pytest.mark.parametrize("params, needle", [({"page": 0}, "page"), ({"per_page": 0}, "per_page"),
                                            ({"per_page": PageConfig().max_per_page + 1}, "per_page"),
                                            ({"page": "two"}, "integer"), ({"limit": -1}, "limit"),
                                            ({"offset": -3}, "offset")])
def test_bad_page_parameters_are_400(server, account, params, needle):
    account_id, token = account
    for route in ("models/search", "finetunes", "finetunes/public"):
        response = get(server, token, f"/accounts/{account_id}/ai/{route}", **params)
        assert response.status_code == 400, response.text
        error = response.json()["errors"][0]
        assert error["code"] == 5004 and needle in error["message"]


def test_cli_lists_every_page(server, account, monkeypatch):
    """`loraplex finetunes list` follows the pages (here 2 finetunes a page) to the end."""
    import loraplex.api.pagination as pagination

    monkeypatch.setattr(pagination, "PAGES", PageConfig(default_per_page=2))
    account_id, token = account
    env = {"LORAPLEX_ACCOUNT_ID": account_id, "LORAPLEX_API_TOKEN": token, "LORAPLEX_URL": server.url}
    done = subprocess.run([sys.executable, "-m", "loraplex.cli", "finetunes", "list"], capture_output=True, text=True,
                          env=_env(env), timeout=120)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["name"] for line in done.stdout.splitlines()] == [f"ft-{i}" for i in range(OWN)]


def _env(extra: dict) -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")} | extra
