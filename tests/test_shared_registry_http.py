"""Two live servers in two processes sharing one PostgreSQL registry and one object store (a
`file://` folder), the layout of a scale-out deployment, driven by the Cloudflare SDK: a LiveServer
given `ServerOptions.registry`, and `loraplex serve --registry URL` in a subprocess (two servers in
one process would share its in-process upload locks and hide a missing cross-process one).
Creates through both at once hold the account's limit and name uniqueness; the two files of one
finetune sent through different servers at once are still checked together; a finetune uploaded
through one server is listed and served by the other. The database gone: a clean 503."""

from __future__ import annotations

import threading

import cloudflare
import pytest

from shared_servers import two_servers
from upload_client import ALL_LINEAR, CONFIG, MODEL, WEIGHTS

LIMIT = 4


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory):
    """name → PEFT folder: two adapters of different ranks (their files do not pair)."""
    import transformers

    from tiny_models import make_peft_adapter

    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    root = tmp_path_factory.mktemp("adapters")
    make_peft_adapter(base, root / "r4", seed=1, r=4, lora_alpha=8, target_modules=ALL_LINEAR)
    make_peft_adapter(base, root / "r8", seed=2, r=8, lora_alpha=16, target_modules=ALL_LINEAR)
    return {"r4": root / "r4", "r8": root / "r8"}


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory, postgres_module_url):
    """(LiveServer a, `loraplex serve` process b), each with its own data dir and engine, on one
    registry and one object store."""
    with two_servers(model_dir, tmp_path_factory.mktemp("two-servers"), postgres_module_url,
                     ("--max-finetunes-per-account", str(LIMIT)), max_finetunes_per_account=LIMIT) as (a, b):
        yield a, b


def sdk(server, token: str) -> cloudflare.Cloudflare:
    return cloudflare.Cloudflare(api_token=token, base_url=f"{server.url}/client/v4", max_retries=0)


def at_once(*calls) -> list:
    """Run the calls in threads released together; each result is its return value or its exception."""
    results: list = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = calls[i]()
        except Exception as e:  # noqa: BLE001 — the refusals are the results
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def send(cf: cloudflare.Cloudflare, account_id: str, finetune_id: str, folder, file_name: str):
    with open(folder / file_name, "rb") as f:
        return cf.ai.finetunes.assets.create(finetune_id, account_id=account_id, file=f, file_name=file_name)


def test_two_servers_share_one_registry_and_store(servers, adapters):
    a, b = servers
    account_id, token = a.account("alice")  # made through a's registry: b knows it too
    cf_a, cf_b = sdk(a, token), sdk(b, token)

    # creates through both servers at once: "same" on each, then two names of each server's own.
    # The later "same" meets at most 3 finetunes, so it is a name refusal; one create of the 5
    # others finds the account at its limit of 4.
    def creates(cf, prefix):
        outcomes = []
        for name in ("same", f"{prefix}1", f"{prefix}2"):
            try:
                outcomes.append((name, cf.ai.finetunes.create(account_id=account_id, model=MODEL, name=name).id))
            except cloudflare.APIStatusError as e:
                outcomes.append((name, (e.status_code, e.body["errors"][0]["code"], e.body["errors"][0]["message"])))
        return outcomes

    outcomes = [o for result in at_once(lambda: creates(cf_a, "a"), lambda: creates(cf_b, "b")) for o in result]
    made = {ft_id: name for name, ft_id in outcomes if isinstance(ft_id, str)}
    refused = [(name, r) for name, r in outcomes if not isinstance(r, str)]
    assert len(made) == LIMIT and list(made.values()).count("same") == 1
    assert [(status, code) for name, (status, code, _) in refused if name == "same"] == [(400, 5004)]
    assert "already exists" in next(message for name, (_, _, message) in refused if name == "same")
    assert [(status, code) for name, (status, code, _) in refused if name != "same"] == [(429, 3036)]
    for cf in (cf_a, cf_b):  # both list exactly what was made, nothing half-written
        listed = list(cf.ai.finetunes.list(account_id=account_id))
        assert {f.id: f.name for f in listed} == made

    # one finetune's two files through the two servers at once, files that do not pair: whichever is
    # recorded second is checked with the first and refused; the finetune never becomes ready
    mixed = next(ft_id for ft_id, name in made.items() if name == "same")
    sent = at_once(lambda: send(cf_a, account_id, mixed, adapters["r4"], CONFIG),
                   lambda: send(cf_b, account_id, mixed, adapters["r8"], WEIGHTS))
    assert sum(isinstance(r, cloudflare.BadRequestError) for r in sent) == 1, sent
    assert a.ctx.registry.get_finetune(account_id, mixed).state == "invalid"

    # a finetune uploaded through a is listed by b and serves the same text through both
    good = next(ft_id for ft_id, name in made.items() if name != "same")
    for file_name in (CONFIG, WEIGHTS):
        assert send(cf_a, account_id, good, adapters["r4"], file_name).success
    listed = {f.id: f for f in cf_b.ai.finetunes.list(account_id=account_id)}
    assert listed[good].model_extra["state"] == "ready" and listed[mixed].model_extra["state"] == "invalid"
    assert a.ctx.registry.get_finetune(account_id, good).state == "ready"

    def text(cf, lora=None) -> str:
        return cf.ai.run(MODEL, account_id=account_id, prompt="The capital of France is", raw=True, max_tokens=8,
                         temperature=0, **({"lora": lora} if lora else {}))["response"]

    through_b = text(cf_b, good)
    assert through_b == text(cf_a, good) and through_b != text(cf_b)


def test_a_registry_gone_is_a_clean_503_that_names_no_database(servers, postgres_module_url):
    """The database goes away under both servers (dropped, its connections closed): requests that
    need the registry are refused 503 / 3040 (the SDK's InternalServerError), saying nothing about
    the database. (Last in this module: the servers' registry is gone afterwards.)"""
    import psycopg

    a, b = servers
    account_id, token = a.account("bob")
    database = postgres_module_url.split("?")[0].rsplit("/", 1)[1]
    with psycopg.connect(postgres_module_url.replace(f"/{database}?", "/postgres?"), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE "{database}" WITH (FORCE)')
    for server in (a, b):
        for _ in range(2):  # a connection found closed, then a new one refused
            with pytest.raises(cloudflare.InternalServerError) as refused:
                sdk(server, token).ai.finetunes.list(account_id=account_id)
            assert refused.value.status_code == 503
            assert refused.value.body["errors"][0]["code"] == 3040
            message = refused.value.body["errors"][0]["message"]
            assert "registry is unavailable" in message and database not in message and "postgres" not in message
