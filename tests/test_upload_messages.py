"""Refusals that name their cause (issue 19, item 10), over HTTP against a live server:
modules_to_save, a missing `file_name` field, the rank limit and the option that raises it, and
another account's public finetune asked for by name."""

from __future__ import annotations

import pytest

from api_server import LiveServer, server_options
from loraplex.config import DEFAULT_MAX_LORA_RANK
from upload_client import CONFIG, MODEL, WEIGHTS, Tenant, assert_error, make_model_and_adapter

MODULES_TO_SAVE = "modules_to_save is not supported"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_model_and_adapter(tmp_path_factory)


@pytest.fixture(scope="module")
def full_weight(tmp_path_factory):
    """A PEFT adapter that also saves lm_head whole (modules_to_save)."""
    return make_model_and_adapter(tmp_path_factory, modules_to_save=["lm_head"])[1]


@pytest.fixture(scope="module")
def over_rank(tmp_path_factory):
    return make_model_and_adapter(tmp_path_factory, r=DEFAULT_MAX_LORA_RANK + 8, target_modules=["q_proj"])[1]


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    live = LiveServer.start(server_options(files[0], tmp_path_factory.mktemp("data")))
    yield live
    live.stop()


@pytest.fixture
def tenant(server, request):
    t = Tenant.open(server, request.node.name[:100], MODEL)
    yield t
    t.close()


def test_modules_to_save_is_named_in_either_order(tenant, full_weight):
    config, weights = (full_weight / CONFIG).read_bytes(), (full_weight / WEIGHTS).read_bytes()
    assert b"modules_to_save" in config
    first = tenant.create_id("config-first")
    assert_error(tenant.send(first, CONFIG, config), 400, 5004, "'modules_to_save'", "not supported")
    second = tenant.create_id("weights-first")
    assert_error(tenant.send(second, WEIGHTS, weights), 400, 5004, "lm_head", MODULES_TO_SAVE)


def test_modules_to_save_is_named_when_the_file_is_over_the_size_limit(server, tenant, full_weight, monkeypatch):
    """Was: a size error only (lm_head alone is 113 MB in float32 on the default model)."""
    weights = (full_weight / WEIGHTS).read_bytes()
    monkeypatch.setattr(server.ctx.limits, "max_adapter_bytes", len(weights) // 2)
    finetune = tenant.create_id("too-big")
    assert_error(tenant.send(finetune, WEIGHTS, weights), 413, 3006, "too large", MODULES_TO_SAVE)
    assert tenant.get(finetune)["state"] == "invalid"


def test_a_missing_file_name_field_is_named(tenant, files):
    finetune = tenant.create_id("no-name")
    data = (files[1] / CONFIG).read_bytes()
    response = tenant.client.post(f"/finetunes/{finetune}/finetune-assets", files={"file": (CONFIG, data)})
    assert_error(response, 400, 5004, "`file_name` is missing", "file_name=adapter_config.json")
    as_file = tenant.client.post(f"/finetunes/{finetune}/finetune-assets",
                                 files={"file_name": ("x", b"adapter_config.json")})
    assert_error(as_file, 400, 5004, "as a text field")
    assert tenant.get(finetune)["state"] == "pending"  # a malformed request says nothing about the files


def test_the_rank_refusal_names_the_option_that_raises_it(tenant, over_rank):
    finetune = tenant.create_id("high-rank")
    assert tenant.send(finetune, CONFIG, (over_rank / CONFIG).read_bytes()).status_code == 200
    assert_error(tenant.send(finetune, WEIGHTS, (over_rank / WEIGHTS).read_bytes()), 400, 5004,
                 f"rank {DEFAULT_MAX_LORA_RANK + 8}", f"maximum rank {DEFAULT_MAX_LORA_RANK}", "--max-lora-rank")


def test_another_accounts_public_finetune_by_name_says_to_use_its_id(server, files):
    owner, other = Tenant.open(server, "owner", MODEL), Tenant.open(server, "other", MODEL)
    try:
        shared = owner.create_id("shared", public=True)
        owner.send_folder(shared, files[1])
        private = owner.create_id("secret")
        owner.send_folder(private, files[1])
        for response in (other.run("shared"), other.client.get("/finetunes/shared")):
            assert_error(response, 404, 3037, "addressed by its id", "finetunes/public")
        assert other.run(shared).status_code == 200
        # a private finetune's name still reveals nothing
        message = assert_error(other.run("secret"), 404, 3037)
        assert "id" not in message.replace("'secret'", "")
    finally:
        owner.close()
        other.close()
