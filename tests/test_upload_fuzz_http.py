"""The adapter-file fuzzing of test_fuzz_adapter.py, through the HTTP upload route of a live
server: each generated pair of files (byte-level mutations of a real PEFT adapter for the served
model, and edited safetensors headers) is uploaded with one httpx client. Every file gets 200 or
400/5004, never a 5xx; the keep-alive connection survives every refusal; no ERROR is logged; and a
valid adapter still uploads and serves at the end."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from api_server import LiveServer, server_options
from adapter_fuzzing import edited_file, fuzz, mutated, split_file
from upload_client import CONFIG, MODEL, WEIGHTS, ErrorLog, Tenant, connection, make_model_and_adapter

EXAMPLES = 40  # per test: bounded, the suite stays quick (the deep profile of test_fuzz_adapter runs many more)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_model_and_adapter(tmp_path_factory)


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    live = LiveServer.start(server_options(files[0], tmp_path_factory.mktemp("data"), max_finetunes_per_account=3))
    yield live
    live.stop()


class Uploader:
    """Uploads pairs of files to fresh finetunes over one connection, checking every answer."""

    def __init__(self, tenant: Tenant):
        self.tenant, self.names = tenant, itertools.count()
        self.first = connection(tenant.client.get("/finetunes"))
        self.outcomes = {"ready": 0, "refused": 0}

    def check(self, response) -> bool:
        assert response.status_code in (200, 400), response.text
        if response.status_code == 400:
            assert response.json()["errors"][0]["code"] == 5004, response.text
        assert connection(response) == self.first
        return response.status_code == 200

    def upload(self, config: bytes | None, weights: bytes | None) -> None:
        finetune = self.tenant.create_id(f"fuzz-{next(self.names)}")
        accepted = [self.check(self.tenant.send(finetune, name, data or b""))
                    for name, data in ((CONFIG, config), (WEIGHTS, weights))]
        state = self.tenant.get(finetune)["state"]  # "invalid" while its latest upload is a refused one
        assert state == ("ready" if all(accepted) else "invalid" if not accepted[-1] else "pending"), state
        self.outcomes["ready" if all(accepted) else "refused"] += 1
        assert self.check(self.tenant.client.delete(f"/finetunes/{finetune}"))


def test_mutated_adapters_over_http(server, files):
    config, weights = (files[1] / CONFIG).read_bytes(), (files[1] / WEIGHTS).read_bytes()
    tenant = Tenant.open(server, "fuzz-mutated", MODEL)
    uploader = Uploader(tenant)

    @fuzz(EXAMPLES)
    @given(mutated(config, weights))
    def run(pair):
        uploader.upload(*pair)

    with ErrorLog().watching() as log:
        run()
        uploader.upload(config, weights)  # healthy afterwards
    assert log.messages() == []
    assert uploader.outcomes["refused"] >= EXAMPLES // 2 and uploader.outcomes["ready"] >= 1, uploader.outcomes
    tenant.close()


def test_edited_headers_over_http(server, files):
    config, weights = (files[1] / CONFIG).read_bytes(), (files[1] / WEIGHTS).read_bytes()
    base = split_file(weights)
    names = [name for name, _ in base[0]]
    tenant = Tenant.open(server, "fuzz-headers", MODEL)
    uploader = Uploader(tenant)

    @fuzz(EXAMPLES)
    @given(edited_file(base, names))
    def run(edited):
        uploader.upload(config, edited[0])

    with ErrorLog().watching() as log:
        run()
        uploader.upload(config, weights)
    assert log.messages() == []
    assert uploader.outcomes["refused"] >= EXAMPLES // 2, uploader.outcomes
    tenant.close()
