"""FileStore: per-account fine-tuning files; refusals leave nothing behind."""

import json

import pytest

from loraplex.errors import InvalidInput, NotFound, TooLarge
from loraplex.training.files import FileStore

GOOD = (json.dumps({"messages": [{"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": "ARR"}]}) + "\n").encode()


def _leftovers(store: FileStore) -> list[str]:
    return sorted(p.name for p in store.content_dir.iterdir())


def test_create_list_get_content_delete(tmp_path):
    store = FileStore(tmp_path)
    rec = store.create("acct-a", "fine-tune", "train.jsonl", GOOD * 3)
    assert (rec.examples, rec.bytes) == (3, len(GOOD) * 3)
    assert [r.id for r in store.list("acct-a")] == [rec.id]
    assert store.get("acct-a", rec.id) == rec
    assert store.content("acct-a", rec.id) == GOOD * 3
    assert FileStore(tmp_path).get("acct-a", rec.id) == rec  # survives a reopen
    store.delete("acct-a", rec.id)
    assert store.list("acct-a") == [] and _leftovers(store) == []
    with pytest.raises(NotFound):
        store.get("acct-a", rec.id)


def test_another_account_sees_nothing(tmp_path):
    store = FileStore(tmp_path)
    rec = store.create("acct-a", "fine-tune", "train.jsonl", GOOD)
    assert store.list("acct-b") == []
    for call in (store.get, store.content, store.delete):
        with pytest.raises(NotFound):
            call("acct-b", rec.id)
    assert store.content("acct-a", rec.id) == GOOD


@pytest.mark.parametrize("purpose, data, kind, cause", [
    ("assistants", GOOD, InvalidInput, "purpose must be 'fine-tune'"),
    ("fine-tune", GOOD + b"{oops\n", InvalidInput, "line 2: not valid JSON"),
    ("fine-tune", GOOD * 100, TooLarge, "the limit is"),
])
def test_refusals_leave_nothing(tmp_path, purpose, data, kind, cause):
    store = FileStore(tmp_path, max_file_bytes=len(GOOD) * 10)
    with pytest.raises(kind, match=cause):
        store.create("acct-a", purpose, "train.jsonl", data)
    assert store.list("acct-a") == [] and _leftovers(store) == []
