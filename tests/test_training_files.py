"""FileStore, on both databases: per-account fine-tuning files whose contents live in the object
store (one object per file); refusals leave nothing behind; a file created through one store is
read through another on the same database and object store (two servers); row and object stay
consistent when either write fails."""

import json

import pytest

from loraplex.adapters.storage import LocalStore, StoreUnavailable
from loraplex.errors import InvalidInput, NotFound, TooLarge
from loraplex.training.files import KEY_SCOPE, FileStore

GOOD = (json.dumps({"messages": [{"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": "ARR"}]}) + "\n").encode()


@pytest.fixture
def objects(tmp_path):
    return LocalStore(tmp_path / "objects")


def _objects_left(objects: LocalStore) -> list[str]:
    return sorted(str(p.relative_to(objects.root)) for p in objects.root.rglob("*") if p.is_file())


def test_create_list_get_content_delete(open_training, objects):
    store = FileStore(open_training(), objects)
    rec = store.create("acct-a", "fine-tune", "train.jsonl", GOOD * 3)
    assert (rec.examples, rec.bytes) == (3, len(GOOD) * 3)
    assert [r.id for r in store.list("acct-a")] == [rec.id]
    assert store.get("acct-a", rec.id) == rec
    assert store.content("acct-a", rec.id) == GOOD * 3
    [key] = _objects_left(objects)
    assert key.startswith(f"{KEY_SCOPE}/{rec.id}/sha256/")  # the content is in the object store, scoped to the file
    other_server = FileStore(open_training(), LocalStore(objects.root))
    assert other_server.get("acct-a", rec.id) == rec and other_server.content("acct-a", rec.id) == GOOD * 3
    other_server.delete("acct-a", rec.id)
    assert store.list("acct-a") == [] and _objects_left(objects) == []
    assert not (objects.root / KEY_SCOPE / rec.id).exists()
    with pytest.raises(NotFound):
        store.get("acct-a", rec.id)


def test_same_content_twice_is_two_files_each_deleted_alone(open_training, objects):
    store = FileStore(open_training(), objects)
    first, second = (store.create("acct-a", "fine-tune", "t.jsonl", GOOD) for _ in range(2))
    store.delete("acct-a", first.id)
    assert store.content("acct-a", second.id) == GOOD and len(_objects_left(objects)) == 1


def test_another_account_sees_nothing(open_training, objects):
    store = FileStore(open_training(), objects)
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
def test_refusals_leave_nothing(open_training, objects, purpose, data, kind, cause):
    store = FileStore(open_training(), objects, max_file_bytes=len(GOOD) * 10)
    with pytest.raises(kind, match=cause):
        store.create("acct-a", purpose, "train.jsonl", data)
    assert store.list("acct-a") == [] and _objects_left(objects) == []


def test_a_failed_write_leaves_no_orphan(open_training, objects, monkeypatch):
    """The object is stored first, then the row: a row that cannot be written takes the object
    back out; an object store that cannot be reached writes no row."""
    db = open_training()
    store = FileStore(db, objects)
    db.close()  # every statement now fails
    with pytest.raises(RuntimeError, match="database is closed"):
        store.create("acct-a", "fine-tune", "t.jsonl", GOOD)
    assert _objects_left(objects) == []

    store = FileStore(open_training(), objects)

    def unreachable(*args, **kwargs):
        raise StoreUnavailable("down")

    monkeypatch.setattr(objects, "_upload", unreachable)
    with pytest.raises(StoreUnavailable):
        store.create("acct-a", "fine-tune", "t.jsonl", GOOD)
    assert store.list("acct-a") == []
