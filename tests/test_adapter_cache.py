"""AdapterCache: the host / disk / remote tiers and their state machine, on tiny llama PEFT adapters."""

from __future__ import annotations

import copy
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.adapters import cache as cache_module
from loraplex.adapters.cache import CONFIG_FILE, WEIGHTS_FILE, AdapterCache, AdapterState, LocalSource, RemoteSource
from loraplex.adapters.storage import IntegrityError, StoreUnavailable, open_store
from loraplex.api.errors import wire_of
from loraplex.config import LoraConfig, engine_settings
from loraplex.errors import AdapterInvalid
from loraplex.lora.adapter import load_adapter
from loraplex.models.hf_config import read_model_args
from s3_server import BUCKET, s3_env
from tiny_models import make_tiny_model

S = AdapterState


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base-llama")
    return make_tiny_model("llama", folder), read_model_args(folder)


@pytest.fixture(scope="module")
def args(base):
    return base[1]


def _peft_adapter(model, folder: Path, r: int) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(copy.deepcopy(model), config)
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(base, tmp_path_factory) -> list[Path]:
    """Eight valid adapters (r=4): one saved by peft, seven with the same config and other weights."""
    root = tmp_path_factory.mktemp("adapters")
    first = _peft_adapter(base[0], root / "a0", r=4)
    out = [first]
    shapes = {k: v.shape for k, v in load_file(first / WEIGHTS_FILE).items()}
    for i in range(1, 8):
        folder = root / f"a{i}"
        folder.mkdir()
        shutil.copy(first / CONFIG_FILE, folder / CONFIG_FILE)
        g = torch.Generator().manual_seed(i)
        save_file({k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}, folder / WEIGHTS_FILE)
        out.append(folder)
    return out


@pytest.fixture(scope="module")
def rank16(base, tmp_path_factory) -> Path:
    return _peft_adapter(base[0], tmp_path_factory.mktemp("rank16"), r=16)


@pytest.fixture(scope="module")
def sizes(folders, args) -> tuple[int, int]:
    """(host bytes of one parsed adapter, disk bytes of one downloaded adapter): the same for all
    eight, except that peft's own file (folders[0]) carries a few more bytes of metadata."""
    files = sum((folders[1] / f).stat().st_size for f in (CONFIG_FILE, WEIGHTS_FILE))
    return load_adapter(folders[1], args).size_bytes, files


@pytest.fixture
def store(tmp_path):
    return open_store((tmp_path / "store").as_uri())


def upload(store, folder: Path) -> RemoteSource:
    return RemoteSource(store.put_file(folder / CONFIG_FILE).key, store.put_file(folder / WEIGHTS_FILE).key)


class WrappedStore:
    """Counts fetch_to calls per key; can be slowed, gated or taken down."""

    def __init__(self, inner, delay_s: float = 0.0, gate: threading.Event | None = None) -> None:
        self.inner, self.delay_s, self.gate = inner, delay_s, gate
        self.calls: Counter[str] = Counter()
        self.down = False
        self._lock = threading.Lock()

    def fetch_to(self, key, dest):
        with self._lock:
            self.calls[key] += 1
        if self.down:
            raise StoreUnavailable("test store is down")
        if self.gate is not None:
            assert self.gate.wait(10)
        time.sleep(self.delay_s)
        return self.inner.fetch_to(key, dest)


@pytest.fixture
def make_cache(args, tmp_path):
    made = []

    def make(store=None, **kwargs) -> AdapterCache:
        """kwargs: LoraConfig settings (adapter_host_cache_bytes, adapter_workers, …) or AdapterCache's own."""
        kwargs.setdefault("disk_dir", tmp_path / "disk")
        settings = {name: kwargs.pop(name) for name in list(kwargs) if name in engine_settings()}
        made.append(AdapterCache(args, LoraConfig(max_lora_rank=8, **settings), store=store, **kwargs))
        return made[-1]

    yield make
    for c in made:
        c.close()


def wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def wait_state(cache: AdapterCache, name: str, state: AdapterState) -> None:
    wait_for(lambda: cache.state(name) is state)


# -- the state machine ------------------------------------------------------------------------


def test_prefetch_returns_at_once_and_walks_the_states(store, folders, make_cache, monkeypatch):
    fetch_gate, parse_gate = threading.Event(), threading.Event()

    def gated_load(*a, **kw):
        assert parse_gate.wait(10)
        return load_adapter(*a, **kw)

    monkeypatch.setattr(cache_module, "load_adapter", gated_load)
    changes = []
    cache = make_cache(WrappedStore(store, gate=fetch_gate), on_change=changes.append)
    cache.register("t1/a", upload(store, folders[0]))
    assert cache.state("t1/a") is S.REMOTE and cache.host_adapter("t1/a") is None
    t0 = time.perf_counter()
    assert cache.prefetch("t1/a") is S.DOWNLOADING
    assert time.perf_counter() - t0 < 0.05
    assert cache.prefetch("t1/a") is S.DOWNLOADING and cache.host_adapter("t1/a") is None
    fetch_gate.set()
    wait_state(cache, "t1/a", S.LOADING)
    assert changes == []
    parse_gate.set()
    wait_state(cache, "t1/a", S.IN_HOST)
    assert cache.host_adapter("t1/a").name == "t1/a" and cache.error("t1/a") is None
    wait_for(lambda: changes == ["t1/a"])


def test_concurrent_prefetch_is_single_flight(store, folders, make_cache):
    slow = WrappedStore(store, delay_s=0.1)
    cache = make_cache(slow, adapter_workers=4)
    source = upload(store, folders[0])
    cache.register("a", source)
    barrier = threading.Barrier(20)
    states = []

    def call():
        barrier.wait()
        states.append(cache.prefetch("a"))

    threads = [threading.Thread(target=call) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(states) <= {S.DOWNLOADING, S.LOADING, S.IN_HOST}
    wait_state(cache, "a", S.IN_HOST)
    assert slow.calls == {source.config_key: 1, source.weights_key: 1}
    assert cache.stats()["fetches_started"] == 1


def test_load_now_and_stats(store, folders, make_cache, args, sizes):
    cache = make_cache(store)
    cache.register("t/a", upload(store, folders[1]))
    adapter = cache.load_now("t/a")
    expected = load_adapter(folders[1], args)
    assert adapter.name == "t/a" and adapter.size_bytes == sizes[0]
    for key, (a, b) in expected.modules.items():
        torch.testing.assert_close(adapter.modules[key][0], a)
        torch.testing.assert_close(adapter.modules[key][1], b)
    assert cache.state("t/a") is S.IN_HOST and cache.load_now("t/a") is adapter
    st = cache.stats()
    assert (st["host_misses"], st["disk_misses"], st["host_hits"], st["fetches_started"]) == (1, 1, 1, 1)
    assert (st["downloads"], st["objects_fetched"], st["bytes_fetched"], st["loads"]) == (1, 2, sizes[1], 1)
    assert st["download_seconds"] > 0 and st["parse_seconds"] > 0
    assert (st["host_bytes"], st["disk_bytes"], st["states"]) == (sizes[0], sizes[1], {"in_host": 1})
    with pytest.raises(KeyError):
        cache.state("nobody")


def test_register_is_idempotent_and_replacing_drops_copies(store, folders, make_cache, tmp_path):
    cache = make_cache(store)
    first = upload(store, folders[0])
    cache.register("a", first)
    old_path = Path(cache.load_now("a").path)
    cache.register("a", first)
    assert cache.state("a") is S.IN_HOST
    cache.pin("a")  # a request of the old version is still running
    cache.register("a", upload(store, folders[1]))  # a new version of the finetune
    assert cache.state("a") is S.REMOTE and cache.stats()["host_bytes"] == 0
    cache.unpin("a")  # pins belong to the name
    with pytest.raises(ValueError):
        cache.unpin("a")
    wait_for(lambda: not old_path.exists())
    assert Path(cache.load_now("a").path) != old_path
    cache.unregister("a")
    cache.unregister("a")  # unknown names are ignored
    cache.unpin("a")  # likewise: a request may end after its adapter was removed
    with pytest.raises(KeyError):
        cache.prefetch("a")
    local = LocalSource(str(folders[2]))
    cache.register("b", local)
    cache.load_now("b")
    cache.register("b", LocalSource(folders[2]))  # the same folder, as a Path: no change
    assert cache.state("b") is S.IN_HOST
    wait_for(lambda: list((tmp_path / "disk").iterdir()) == [])
    with pytest.raises(ValueError):
        make_cache(None).register("b", first)  # remote without a store


# -- eviction ---------------------------------------------------------------------------------


def test_host_eviction_respects_pins(store, folders, make_cache, sizes):
    slow = WrappedStore(store)
    cache = make_cache(slow, adapter_host_cache_bytes=sizes[0])
    for i, name in enumerate("abc"):
        cache.register(name, upload(store, folders[i]))
    cache.pin("a")
    cache.load_now("a")
    cache.load_now("b")
    assert cache.state("a") is cache.state("b") is S.IN_HOST  # pinned a keeps the tier over budget
    assert cache.stats()["host_bytes"] == 2 * sizes[0]
    cache.load_now("c")
    assert (cache.state("a"), cache.state("b"), cache.state("c")) == (S.IN_HOST, S.ON_DISK, S.IN_HOST)
    cache.unpin("a")
    assert (cache.state("a"), cache.state("c")) == (S.ON_DISK, S.IN_HOST)
    assert cache.stats()["host_bytes"] == sizes[0] and cache.stats()["host_evictions"] == 2
    with pytest.raises(ValueError):
        cache.unpin("a")
    fetched = sum(slow.calls.values())
    assert cache.prefetch("b") is S.LOADING  # from disk: no download
    wait_state(cache, "b", S.IN_HOST)
    assert sum(slow.calls.values()) == fetched and cache.stats()["disk_hits"] == 1


def test_downloaded_files_removed_underneath_are_fetched_again(store, folders, make_cache, sizes, tmp_path):
    counting = WrappedStore(store)
    cache = make_cache(counting, adapter_host_cache_bytes=sizes[0])
    cache.register("a", upload(store, folders[0]))
    cache.register("b", upload(store, folders[1]))
    cache.load_now("a")
    cache.load_now("b")  # evicts a from host: ON_DISK, its files in the cache's folder
    assert cache.state("a") is S.ON_DISK
    downloads = [p for p in (tmp_path / "disk").iterdir() if p.name.startswith("a-")]
    assert len(downloads) == 1
    shutil.rmtree(downloads[0])  # a temp cleaner, an operator …
    assert cache.load_now("a").name == "a"
    assert cache.state("a") is S.IN_HOST and counting.calls[upload(store, folders[0]).weights_key] == 2
    files = lambda folder: sum((folder / f).stat().st_size for f in (CONFIG_FILE, WEIGHTS_FILE))  # noqa: E731
    assert cache.stats()["disk_bytes"] == files(folders[0]) + files(folders[1])  # the lost folder un-counted


def test_pinned_adapters_hold_back_new_loads_not_the_budget(store, folders, make_cache, sizes):
    """Requests queued for many cold adapters pin each one: loads start only while the pinned host
    copies take less than the budget (plus the jobs in flight), the rest wait in request order."""
    counting = WrappedStore(store)
    cache = make_cache(counting, adapter_host_cache_bytes=sizes[0], adapter_workers=1)
    names = ["a", "b", "c", "d"]
    for i, name in enumerate(names):
        cache.register(name, upload(store, folders[i + 1]))
        cache.pin(name)  # a request is queued for it
        cache.prefetch(name)
    wait_state(cache, "a", S.IN_HOST)
    time.sleep(0.1)  # nothing else may start: a (pinned) fills the budget
    assert [cache.state(n) for n in names] == [S.IN_HOST, S.REMOTE, S.REMOTE, S.REMOTE]
    assert cache.stats()["loads_deferred"] == 3 and cache.stats()["host_bytes"] == sizes[0]
    assert cache.prefetch("d") is S.REMOTE and cache.stats()["loads_deferred"] == 3  # already queued
    cache.unpin("d")  # d's request went away: d leaves the queue
    cache.unpin("a")  # a's request finished: the oldest waiting adapter loads, a is evicted for it
    wait_state(cache, "b", S.IN_HOST)
    assert cache.state("a") is S.ON_DISK and cache.state("c") is cache.state("d") is S.REMOTE
    for name in ("b", "c"):
        cache.unpin(name)
    wait_state(cache, "c", S.IN_HOST)
    time.sleep(0.1)
    assert cache.state("d") is S.REMOTE  # nobody wants it any more
    assert cache.prefetch("d") is S.DOWNLOADING  # a new request: room now (nothing pinned)
    wait_state(cache, "d", S.IN_HOST)
    assert cache.stats()["host_bytes"] == sizes[0] and cache.state("c") is S.ON_DISK
    assert sum(counting.calls.values()) == 2 * 4  # each adapter fetched once


def test_a_zero_host_budget_still_loads_one_pinned_adapter_at_a_time(store, folders, make_cache):
    cache = make_cache(store, adapter_host_cache_bytes=0, adapter_workers=2)
    for i, name in enumerate("ab"):
        cache.register(name, upload(store, folders[i + 1]))
        cache.pin(name)
    cache.prefetch("a")
    wait_state(cache, "a", S.IN_HOST)
    assert cache.prefetch("b") is S.REMOTE  # a (pinned) is over the budget already
    cache.unpin("a")
    wait_state(cache, "b", S.IN_HOST)
    assert cache.state("a") is S.ON_DISK


def test_hot_adapter_survives_a_scan_of_cold_ones(store, folders, make_cache, sizes):
    cache = make_cache(store, adapter_host_cache_bytes=3 * sizes[0])
    names = ["hot"] + [f"cold{i}" for i in range(6)]
    for name, folder in zip(names, folders):
        cache.register(name, upload(store, folder))
    cache.load_now("hot")
    for _ in range(5):
        assert cache.host_adapter("hot") is not None
    for name in names[1:]:  # a burst of one-off adapters, each used once
        cache.load_now(name)
        assert cache.host_adapter(name) is not None
    in_host = [n for n in names if cache.state(n) is S.IN_HOST]
    assert in_host == ["hot", "cold4", "cold5"]  # plain LRU would have dropped "hot" first


def test_disk_eviction_deletes_unpinned_files_only(store, folders, make_cache, sizes, tmp_path):
    slow = WrappedStore(store)
    cache = make_cache(slow, adapter_host_cache_bytes=1, adapter_disk_cache_bytes=2 * sizes[1])
    sources = {name: upload(store, folders[i]) for i, name in enumerate("abcd", start=1)}
    for name, source in sources.items():
        cache.register(name, source)
    cache.pin("a")
    paths = {name: Path(cache.load_now(name).path) for name in "abcd"}
    assert {n: cache.state(n) for n in "abcd"} == {"a": S.IN_HOST, "b": S.REMOTE, "c": S.REMOTE, "d": S.IN_HOST}
    assert sorted((tmp_path / "disk").iterdir()) == sorted([paths["a"], paths["d"]])
    assert (paths["a"] / WEIGHTS_FILE).is_file() and (paths["d"] / CONFIG_FILE).is_file()
    st = cache.stats()
    assert st["disk_evictions"] == 2 and st["disk_bytes"] == 2 * sizes[1]
    cache.load_now("b")  # downloaded again
    assert slow.calls[sources["b"].weights_key] == 2


def test_local_source_folder_is_never_deleted(store, folders, make_cache, tmp_path):
    local = tmp_path / "my-adapter"
    shutil.copytree(folders[0], local)
    files = sorted(local.iterdir())
    cache = make_cache(store, adapter_host_cache_bytes=1, adapter_disk_cache_bytes=1)
    cache.register("local", LocalSource(local))
    assert cache.state("local") is S.ON_DISK
    assert cache.load_now("local").path == str(local)
    for i, name in enumerate(["r1", "r2"], start=1):
        cache.register(name, upload(store, folders[i]))
        cache.load_now(name)
    assert cache.state("local") is S.ON_DISK  # dropped from host, never from disk
    assert cache.stats()["disk_bytes"] < 2 * sum(f.stat().st_size for f in local.iterdir())
    cache.unregister("local")
    cache.close()
    assert sorted(local.iterdir()) == files
    assert (local / WEIGHTS_FILE).read_bytes() == (folders[0] / WEIGHTS_FILE).read_bytes()
    assert list((tmp_path / "disk").iterdir()) == []  # close() removed every downloaded folder


def test_local_only_cache_needs_no_store(folders, args):
    with AdapterCache(args, LoraConfig(max_lora_rank=8)) as cache:
        cache.register("x", LocalSource(folders[2]))
        assert cache.load_now("x").rank == 4


# -- failures ---------------------------------------------------------------------------------


def test_corrupted_object_errors_and_others_still_load(store, folders, make_cache, tmp_path):
    changes = []
    cache = make_cache(store, on_change=changes.append)
    bad, good = upload(store, folders[0]), upload(store, folders[1])
    digest = bad.weights_key.removeprefix("sha256/")
    obj = tmp_path / "store" / "sha256" / digest[:2] / digest
    obj.write_bytes(b"\0" * obj.stat().st_size)
    cache.register("bad", bad)
    cache.register("good", good)
    assert cache.prefetch("bad") is S.DOWNLOADING
    wait_state(cache, "bad", S.ERRORED)
    assert isinstance(cache.error("bad"), IntegrityError) and cache.host_adapter("bad") is None
    with pytest.raises(IntegrityError):
        cache.load_now("bad")
    good_path = Path(cache.load_now("good").path)
    wait_for(lambda: changes.count("bad") == 2 and "good" in changes)
    assert list((tmp_path / "disk").iterdir()) == [good_path]  # nothing left of the failed downloads


def test_invalid_adapter_is_errored_with_5004(store, rank16, make_cache):
    slow = WrappedStore(store)
    cache = make_cache(slow, retry_failed_adapter_after_s=60)
    cache.register("big", upload(store, rank16))
    with pytest.raises(AdapterInvalid) as err:
        cache.load_now("big")
    assert wire_of(err.value)[0] == 5004 and "rank 16" in err.value.message
    assert cache.state("big") is S.ERRORED and wire_of(cache.error("big"))[0] == 5004
    calls = sum(slow.calls.values())
    assert cache.prefetch("big") is S.ERRORED  # not retried before retry_failed_adapter_after_s
    assert sum(slow.calls.values()) == calls and cache.stats()["errors"] == 1


def test_store_outage_then_retry(store, folders, make_cache):
    flaky = WrappedStore(store)
    flaky.down = True
    changes = []
    cache = make_cache(flaky, retry_failed_adapter_after_s=0.3, on_change=changes.append)
    cache.register("a", upload(store, folders[0]))
    cache.prefetch("a")
    wait_state(cache, "a", S.ERRORED)
    failed_at = time.monotonic()
    assert isinstance(cache.error("a"), StoreUnavailable) and changes == ["a"]
    flaky.down = False
    calls = sum(flaky.calls.values())
    assert cache.prefetch("a") is S.ERRORED and sum(flaky.calls.values()) == calls  # too soon
    time.sleep(max(0.0, failed_at + 0.35 - time.monotonic()))
    assert cache.prefetch("a") in (S.DOWNLOADING, S.LOADING, S.IN_HOST)
    wait_state(cache, "a", S.IN_HOST)
    wait_for(lambda: changes == ["a", "a"])
    st = cache.stats()
    assert (st["errors"], st["retries"], st["fetches_started"]) == (1, 1, 2)
    assert cache.error("a") is None


# -- a real S3-compatible store -----------------------------------------------------------------


def test_loads_from_s3(rclone_s3, folders, args, make_cache, tmp_path, monkeypatch):
    s3_env(monkeypatch, tmp_path, rclone_s3)
    s3 = open_store(f"s3://{BUCKET}/cache-test", create_bucket=True, retries=1, backoff_s=0.05)
    cache = make_cache(s3)
    cache.register("s3/a", upload(s3, folders[3]))
    adapter = cache.load_now("s3/a")
    expected = load_adapter(folders[3], args)
    for key, (a, b) in expected.modules.items():
        assert torch.equal(adapter.modules[key][0], a) and torch.equal(adapter.modules[key][1], b)
