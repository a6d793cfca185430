"""A finetune's visible state over HTTP and in the CLI (issue 19, item 2): a refused upload
leaves it "invalid" with the reason (get, list, inference), a corrected file sent again to the
same finetune makes it ready, creating it again by name says what to do, and the per-account
limit counts finetunes in every state."""

from __future__ import annotations

import json

import pytest

from api_server import LiveServer, server_options
from upload_client import CONFIG, MODEL, WEIGHTS, Tenant, assert_error, make_model_and_adapter

LIMIT = 3


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_model_and_adapter(tmp_path_factory)


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    live = LiveServer.start(server_options(files[0], tmp_path_factory.mktemp("data"), max_finetunes_per_account=LIMIT))
    yield live
    live.stop()


@pytest.fixture
def tenant(server, request):
    t = Tenant.open(server, request.node.name[:100], MODEL)
    yield t
    t.close()


def corrupt(weights: bytes) -> bytes:
    return weights[: len(weights) // 2]


def listed(tenant: Tenant) -> dict[str, dict]:
    return {f["name"]: f for f in tenant.client.get("/finetunes").json()["result"]}


def test_refused_upload_is_invalid_with_its_reason_until_a_corrected_file_makes_it_ready(files, tenant):
    config, weights = (files[1] / CONFIG).read_bytes(), (files[1] / WEIGHTS).read_bytes()
    finetune = tenant.create_id("retry")
    assert tenant.get(finetune)["state"] == "pending" and listed(tenant)["retry"]["state_reason"] is None
    assert tenant.send(finetune, CONFIG, config).status_code == 200
    refusal = assert_error(tenant.send(finetune, WEIGHTS, corrupt(weights)), 400, 5004, "corrupt")
    for seen in (tenant.get(finetune), listed(tenant)["retry"]):
        assert seen["state"] == "invalid" and refusal in seen["state_reason"], seen
    assert_error(tenant.run("retry"), 400, 3039, "invalid", refusal)
    # the retry: the corrected file, to the same finetune
    assert tenant.send(finetune, WEIGHTS, weights).status_code == 200
    for seen in (tenant.get(finetune), listed(tenant)["retry"]):
        assert seen["state"] == "ready" and seen["state_reason"] is None, seen
    assert tenant.run("retry").status_code == 200
    # once ready, its files are immutable
    assert_error(tenant.send(finetune, CONFIG, config), 400, 5004, "immutable")


def test_a_wrong_config_is_replaced_by_sending_it_again(files, tenant):
    """The config passes alone but does not match the weights (r=8 for rank-4 tensors): the
    weights are refused; a corrected config replaces the stored one, then the weights go in."""
    config, weights = json.loads((files[1] / CONFIG).read_text()), (files[1] / WEIGHTS).read_bytes()
    finetune = tenant.create_id("wrong-r")
    assert tenant.send(finetune, CONFIG, json.dumps(config | {"r": 8}).encode()).status_code == 200
    assert_error(tenant.send(finetune, WEIGHTS, weights), 400, 5004, "r=8")
    assert tenant.get(finetune)["state"] == "invalid"
    assert tenant.send(finetune, CONFIG, json.dumps(config).encode()).status_code == 200
    assert tenant.get(finetune)["state"] == "pending"
    assert tenant.send(finetune, WEIGHTS, weights).status_code == 200
    got = tenant.get(finetune)
    assert got["state"] == "ready" and {a["file_name"] for a in got["assets"]} == {CONFIG, WEIGHTS}
    assert tenant.run(finetune).status_code == 200


def test_creating_again_with_the_same_name_says_what_to_do(files, tenant):
    finetune = tenant.create_id("again")
    assert tenant.send(finetune, WEIGHTS, b"not safetensors").status_code == 400
    assert_error(tenant.create("again"), 400, 5004, finetune, "it is invalid",
                 "send the missing or corrected files to it, or delete it first")
    tenant.send_folder(finetune, files[1])
    message = assert_error(tenant.create("again"), 400, 5004, "already exists", finetune)
    assert "delete it first" not in message


def test_the_limit_counts_finetunes_in_every_state(files, tenant):
    ready, pending, invalid = (tenant.create_id(n) for n in ("ready", "pending", "invalid"))
    tenant.send_folder(ready, files[1])
    assert tenant.send(invalid, WEIGHTS, b"\0" * 16).status_code == 400
    assert {f["state"] for f in listed(tenant).values()} == {"ready", "pending", "invalid"}
    assert_error(tenant.create("one-more"), 429, 3036, f"at most {LIMIT} finetunes", "whatever their state",
                 "2 of yours are pending or invalid")
    assert tenant.client.delete(f"/finetunes/{invalid}").status_code == 200
    assert tenant.create("one-more").status_code == 200


def test_cli_get_delete_and_create_resumes_after_a_refusal(server, files, tmp_path, monkeypatch, capsys):
    from loraplex.cli import main

    account_id, token = server.account("cli-states")
    monkeypatch.setenv("LORAPLEX_ACCOUNT_ID", account_id)
    monkeypatch.setenv("LORAPLEX_API_TOKEN", token)
    url = ["--url", server.url]
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / CONFIG).write_bytes((files[1] / CONFIG).read_bytes())
    (folder / WEIGHTS).write_bytes(corrupt((files[1] / WEIGHTS).read_bytes()))

    assert main(["finetunes", "create", MODEL, "cli-ft", str(folder), *url]) == 1
    err = capsys.readouterr().err
    assert "corrupt" in err and "run the same command again" in err and "loraplex finetunes delete" in err
    assert main(["finetunes", "list", *url]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["state"] == "invalid" and "corrupt" in json.loads(line)["state_reason"]

    (folder / WEIGHTS).write_bytes((files[1] / WEIGHTS).read_bytes())  # fixed: the same command again
    assert main(["finetunes", "create", MODEL, "cli-ft", str(folder), *url]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "ready"
    assert main(["finetunes", "get", "cli-ft", *url]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["state"] == "ready" and len(got["assets"]) == 2
    assert main(["run", MODEL, "Hello", "--lora", "cli-ft", "--raw", "--max-tokens", "4", *url]) == 0
    capsys.readouterr()
    assert main(["finetunes", "delete", "cli-ft", *url]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == got["id"]
    assert main(["finetunes", "get", "cli-ft", *url]) == 1
    assert "3037" in capsys.readouterr().err
