"""OpenAI Files API over HTTP with the real OpenAI SDK: upload, list, get, content, delete;
line-numbered refusals, wrong purpose, another account's file: clear 4xx, nothing left behind."""

import io
import json

import openai
import pytest

from tests.api_server import LiveServer, server_options


def _line(user: str, assistant: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]})


GOOD = ("\n".join(_line(f"question {i}", f"ARR, answer {i}") for i in range(3)) + "\n").encode()


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    live = LiveServer.start(server_options(model_dir, tmp_path_factory.mktemp("data")))
    yield live
    live.stop()



def _leftovers(server) -> list[str]:
    """The training files' objects in the server's object store (a file:// folder here)."""
    from loraplex.training.files import KEY_SCOPE

    return sorted(str(p) for p in (server.ctx.store.root / KEY_SCOPE).rglob("*") if p.is_file())


def test_upload_list_get_content_delete(server):
    client = server.openai_client("files-alice")
    f = client.files.create(file=("train.jsonl", io.BytesIO(GOOD)), purpose="fine-tune")
    assert (f.filename, f.bytes, f.purpose) == ("train.jsonl", len(GOOD), "fine-tune")
    assert [x.id for x in client.files.list()] == [f.id]
    assert client.files.retrieve(f.id).bytes == len(GOOD)
    assert client.files.content(f.id).read() == GOOD
    assert client.files.delete(f.id).deleted is True
    assert list(client.files.list()) == []
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


def test_another_account_cannot_see_a_file(server):
    alice, bob = server.openai_client("files-a2"), server.openai_client("files-b2")
    f = alice.files.create(file=("train.jsonl", io.BytesIO(GOOD)), purpose="fine-tune")
    assert list(bob.files.list()) == []
    for call in (bob.files.retrieve, bob.files.content, bob.files.delete):
        with pytest.raises(openai.NotFoundError):
            call(f.id)
    assert alice.files.content(f.id).read() == GOOD


@pytest.mark.parametrize("data, purpose, needle", [
    (GOOD + b'{"messages": [{"role": "robot", "content": "x"}]}\n', "fine-tune", "line 4: message 0 has role 'robot'"),
    (b"{broken\n" + GOOD, "fine-tune", "line 1: not valid JSON"),
    (_line("hi " * 5000, "long").encode(), "fine-tune", "line 1: "),
    (GOOD, "assistants", "purpose must be 'fine-tune'"),
])
def test_refusals_name_their_cause_and_leave_nothing(server, data, purpose, needle):
    client = server.openai_client(f"files-bad-{len(data)}-{purpose}")
    before = _leftovers(server)
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("train.jsonl", io.BytesIO(data)), purpose=purpose)
    assert needle in str(err.value)
    assert list(client.files.list()) == [] and _leftovers(server) == before
    assert client.models.list()  # the server is still up


def test_a_file_larger_than_a_json_body_is_accepted(server):
    """Files have their own body limit (the file store's), not the 4 MiB of JSON requests."""
    line = _line("question", "answer " * 40) + "\n"
    data = (line * (server.ctx.limits.max_json_body_bytes // len(line) + 100)).encode()
    assert server.ctx.limits.max_json_body_bytes < len(data) < server.ctx.files.max_file_bytes
    client = server.openai_client("files-big")
    assert client.files.create(file=("big.jsonl", io.BytesIO(data)), purpose="fine-tune").bytes == len(data)
