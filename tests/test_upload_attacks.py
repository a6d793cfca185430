"""Hostile uploads over HTTP against a live server (issue 18): corrupt safetensors files, a body
limit chosen by the wrong route, oversized headers sent before the config, names a URL cannot
carry, and de-duplication as a cross-tenant oracle. After each attack the same keep-alive
connection must still work and a valid adapter must still upload and serve."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest

from api_server import LiveServer, server_options
from loraplex.adapters.storage import key_for
from loraplex.lora.adapter import max_header_bytes
from upload_client import CONFIG, MODEL, WEIGHTS, ErrorLog, Tenant, assert_error, connection, make_model_and_adapter


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_model_and_adapter(tmp_path_factory)


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


def valid(files) -> tuple[bytes, bytes]:
    return (files[1] / CONFIG).read_bytes(), (files[1] / WEIGHTS).read_bytes()


def with_header(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def corruptions(weights: bytes) -> dict[str, tuple[bytes, str]]:
    """name → (corrupt file, what the refusal says)."""
    n = struct.unpack("<Q", weights[:8])[0]
    header = weights[8 : 8 + n]
    one = {"t": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}
    return {
        "header length beyond the file": (struct.pack("<Q", len(weights) + 100) + weights[8:], "exceeds the file size"),
        "offsets beyond the data": (with_header(one, b"\0" * 4), "beyond the 4-byte data section"),
        "header not JSON": (weights[:8] + b"#" + header[1:] + weights[8 + n :], "not valid UTF-8 JSON"),
        "truncated data": (weights[: 8 + n + (len(weights) - 8 - n) // 2], "truncated"),
        "truncated header": (weights[: 8 + n // 2], "exceeds the file size"),
    }


@pytest.mark.parametrize("config_first", [False, True], ids=["weights-first", "config-first"])
def test_corrupt_weights_are_refused_cleanly_on_a_kept_connection(server, files, tenant, config_first):
    """Was 500/3043 with a BufferError from the upload check's mmap, two tracebacks and a dropped
    connection. Now 400/5004 naming the fault, no ERROR log, the connection kept."""
    config, weights = valid(files)
    finetune = tenant.create_id("corrupt")
    if config_first:
        assert tenant.send(finetune, CONFIG, config).status_code == 200
    first = tenant.client.get("/finetunes")
    with ErrorLog().watching() as log:
        for name, (data, needle) in corruptions(weights).items():
            response = tenant.send(finetune, WEIGHTS, data)
            assert_error(response, 400, 5004, "adapter_model.safetensors is corrupt", needle)
            assert connection(response) == connection(first), name
            assert response.headers.get("connection") != "close"
    assert log.messages() == []
    assert tenant.get(finetune)["state"] == "invalid"
    # the same finetune, and the same connection, take the valid files and serve them
    if not config_first:
        assert tenant.send(finetune, CONFIG, config).status_code == 200
    ok = tenant.send(finetune, WEIGHTS, weights)
    assert ok.status_code == 200 and connection(ok) == connection(first)
    assert tenant.get(finetune)["state"] == "ready"
    assert tenant.run(finetune).status_code == 200


def test_upload_suffix_on_another_route_gets_the_json_limit(server, tenant):
    """Was: any path ending in /finetune-assets got the upload limit (100 MiB), so a JSON body of
    96 MiB was read and parsed on the event loop. Now the route decides."""
    limit = server.ctx.limits.max_json_body_bytes
    body = b"{" + b" " * limit + b"}"
    for path in (f"/run/{MODEL}/finetune-assets", "/finetunes/x/finetune-assets/../../finetunes"):
        assert_error(tenant.client.post(path, content=body), 413, 3006, f"limit for this route is {limit} bytes")
    # the upload route itself takes a body over the JSON limit (then judges the file)
    finetune = tenant.create_id("big-body")
    junk = b"\xff" * (limit + 1024)
    assert_error(tenant.send(finetune, WEIGHTS, junk), 400, 5004, "corrupt")
    assert tenant.client.get("/finetunes").status_code == 200


def stored_objects(server) -> set[str]:
    root = server.ctx.store.root / "sha256"
    return {f"sha256/{p.name}" for p in root.glob("*/*")} if root.exists() else set()


def test_weights_sent_first_are_capped_by_what_the_served_model_needs(server, files, tenant):
    """Was: weights sent before the config were header-checked against 100 MiB, so a 96 MiB
    header with no tensors was stored. Now the cap is serving's, for the served model."""
    cap = max_header_bytes(server.ctx.model_args)
    assert cap < 2**20
    before = stored_objects(server)
    finetune = tenant.create_id("header-first")
    huge = with_header({"__metadata__": {"pad": "x" * (cap + 1)}}, b"")
    assert_error(tenant.send(finetune, WEIGHTS, huge), 400, 5004, f"exceeds the cap of {cap} bytes")
    empty = with_header({"__metadata__": {"format": "pt"}}, b"")
    assert_error(tenant.send(finetune, WEIGHTS, empty), 400, 5004, "holds no tensors")
    assert stored_objects(server) == before
    config, weights = valid(files)
    tenant.send_folder(finetune, files[1])
    assert tenant.run(finetune).status_code == 200


@pytest.mark.parametrize("name", [".", "..", "public"])
def test_names_a_url_cannot_address_are_refused(server, tenant, name):
    """`.` and `..` were accepted but vanish from a URL path (dot segments); `public` is the
    fixed segment of GET …/finetunes/public."""
    assert_error(tenant.create(name), 400, 5004, f"finetune name {name!r} cannot be used")
    assert tenant.client.get("/finetunes").json()["result"] == []


@pytest.mark.parametrize("name", ["...", ".hidden", "a..b", "publics", "v1.0"])
def test_other_dotted_names_round_trip_through_the_url(server, files, tenant, name):
    finetune = tenant.create_id(name)
    tenant.send_folder(finetune, files[1])
    got = tenant.get(name)
    assert got["id"] == finetune and got["name"] == name and got["state"] == "ready"
    assert tenant.run(name).status_code == 200
    assert tenant.client.delete(f"/finetunes/{name}").status_code == 200


def test_dedupe_does_the_same_work_for_bytes_another_tenant_stored(server, files, monkeypatch):
    """Was: bytes already in the store were not written again, so an upload of another tenant's
    file returned faster (an oracle). Now every accepted file is written, whoever stored it."""
    writes = []
    real = server.ctx.store._upload
    monkeypatch.setattr(server.ctx.store, "_upload", lambda info, src: (writes.append(info.key), real(info, src))[1])
    config, weights = valid(files)
    keys = {key_for(hashlib.sha256(data).hexdigest()) for data in (config, weights)}
    first, second = Tenant.open(server, "dedupe-a", MODEL), Tenant.open(server, "dedupe-b", MODEL)
    try:
        a = first.create_id("mine")
        first.send_folder(a, files[1])
        done_by_first = sorted(writes)
        b = second.create_id("same-bytes")
        second.send_folder(b, files[1])
        assert sorted(writes[len(done_by_first):]) == done_by_first == sorted(keys)
        # the shared objects outlive one owner's delete
        assert first.client.delete(f"/finetunes/{a}").status_code == 200
        assert keys <= stored_objects(server)
        assert second.run(b).status_code == 200
    finally:
        first.close()
        second.close()
