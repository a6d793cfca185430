"""Adapters loaded from object storage while the engine serves: no head-of-line blocking, single
flight, rotation of 200 adapters through 8 slots, and failures confined to their own requests."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loraplex import LLM, SamplingParams
from loraplex.adapters.cache import RemoteSource
from loraplex.adapters.storage import ObjectStore, StoreUnavailable, open_store
from loraplex.api.errors import wire_of
from tiny_models import make_tiny_model

TARGETS = ["q_proj", "v_proj", "down_proj"]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    make_tiny_model("llama", folder)
    return folder


def write_adapter(folder: Path, seed: int, rank: int = 4) -> Path:
    """A PEFT folder for the tiny llama (hidden 64, kv 32, MLP 128, 2 layers), random weights."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"q_proj": (64, 64), "v_proj": (64, 32), "down_proj": (128, 64)}
    tensors = {}
    for layer in range(2):
        for target, (n_in, n_out) in shapes.items():
            block = "mlp" if target == "down_proj" else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{target}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, n_in, generator=g) * 0.3
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(n_out, rank, generator=g) * 0.3
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": TARGETS}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def upload(store: ObjectStore, folder: Path) -> RemoteSource:
    config = store.put_file(folder / "adapter_config.json")
    weights = store.put_file(folder / "adapter_model.safetensors")
    return RemoteSource(config.key, weights.key)


class SlowCountingStore:
    """Wraps a store (duck-typed): counts fetches per key, sleeps `delay` in each, can go down."""

    def __init__(self, inner: ObjectStore, delay: float = 0.0):
        self.inner, self.delay, self.down = inner, delay, False
        self.fetches: dict[str, int] = {}
        self._lock = threading.Lock()

    def fetch_to(self, key, dest):
        with self._lock:
            self.fetches[key] = self.fetches.get(key, 0) + 1
        if self.down:
            raise StoreUnavailable("the store is down (test)")
        time.sleep(self.delay)
        return self.inner.fetch_to(key, dest)

    def __getattr__(self, name):  # everything else goes to the wrapped store
        return getattr(self.inner, name)


def make_llm(base_dir, tmp_path, monkeypatch, **kwargs) -> LLM:
    monkeypatch.setenv("LORAPLEX_DATA_DIR", str(tmp_path / "data"))
    kwargs.setdefault("kv_cache_memory", 8 << 20)
    return LLM(str(base_dir), dtype="float32", device="cpu", **kwargs)


def test_slow_load_blocks_no_one_and_fetches_once(base_dir, tmp_path, monkeypatch):
    slow = SlowCountingStore(open_store(str(tmp_path / "store")), delay=0.4)
    llm = make_llm(base_dir, tmp_path, monkeypatch, max_loras=2, storage=slow)
    engine = llm.engine
    engine.register_lora("slow", upload(slow.inner, write_adapter(tmp_path / "a", seed=1)))
    llm.add_lora("resident", write_adapter(tmp_path / "b", seed=2))
    busy = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
    engine.add_request("base", [256, 1, 2, 3], busy)
    engine.add_request("warm", [256, 4, 5, 6], busy, lora="resident")
    while len(engine.scheduler.running) < 2:  # "resident" copied into its slot, both running
        engine.step()
    for _ in range(3):  # past the first decode steps (numba compiles its kernels on first use)
        engine.step()
    for i in range(10):  # ten requests for one cold adapter
        engine.add_request(f"cold-{i}", [256, 7, 8, 9, i], GREEDY, lora="slow")
    start, steps_while_loading, finished, busy_left = time.monotonic(), 0, {}, {"base", "warm"}
    while not all(f"cold-{i}" in finished for i in range(10)):
        outs = engine.step()
        ids = {o.request_id for o in outs}
        if not any(r.startswith("cold-") for r in ids) and not any(r.startswith("cold-") for r in finished):
            assert busy_left <= ids, (ids, engine.adapters.tiers.state("slow"))  # a token every step
            steps_while_loading += bool(busy_left)
        finished.update({o.request_id: o for o in outs if o.finished})
        busy_left -= set(finished)
        assert time.monotonic() - start < 30
    assert time.monotonic() - start >= 0.4 and steps_while_loading >= 3
    assert sorted(slow.fetches.values()) == [1, 1]  # config and weights, fetched once each
    assert all(finished[f"cold-{i}"].finish_reason == "length" for i in range(10))
    engine.abort("base"), engine.abort("warm")  # (if still running)


def test_200_adapters_through_8_slots_match_each_alone(base_dir, tmp_path, monkeypatch):
    # small host and disk budgets force evictions in every tier
    store = open_store(str(tmp_path / "store"))
    llm = make_llm(
        base_dir, tmp_path, monkeypatch, max_loras=8, adapter_host_cache_bytes=40 << 10, adapter_disk_cache_bytes=400 << 10,
        storage=store,
    )
    names = [f"ft-{i}" for i in range(200)]
    for i, name in enumerate(names):
        llm.engine.register_lora(name, upload(store, write_adapter(tmp_path / "src" / name, seed=100 + i)))
    rng = random.Random(0)
    weights = [1 / (k + 1) ** 1.1 for k in range(200)]
    chosen = rng.choices(names, weights=weights, k=240)
    prompts = [[256] + [rng.randrange(256) for _ in range(rng.randrange(2, 12))] for _ in chosen]
    outs = llm.generate(prompts, GREEDY, lora=chosen)
    assert all(o.finish_reason == "length" for o in outs)
    stats = llm.engine.adapters.tiers.stats()
    assert len(set(chosen)) > 8
    for name in sorted(set(chosen))[:40]:  # each adapter alone, in a batch of its own
        mine = [i for i, c in enumerate(chosen) if c == name]
        alone = llm.generate([prompts[i] for i in mine], GREEDY, lora=name)
        assert [o.token_ids for o in alone] == [outs[i].token_ids for i in mine], name
    assert stats["host_evictions"] > 0 and stats["disk_evictions"] > 0  # every tier rotated
    assert stats["loads_deferred"] > 0  # queued adapters waited for room instead of all loading at once
    manager = llm.engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks


def test_corrupt_object_and_store_outage_fail_only_their_requests(base_dir, tmp_path, monkeypatch):
    store = SlowCountingStore(open_store(str(tmp_path / "store")))
    llm = make_llm(base_dir, tmp_path, monkeypatch, max_loras=4, storage=store)
    engine = llm.engine
    good = upload(store.inner, write_adapter(tmp_path / "good", seed=1))
    bad = upload(store.inner, write_adapter(tmp_path / "bad", seed=2))
    blob = next((tmp_path / "store").rglob(bad.weights_key.split("/")[-1]))  # flip bytes of the stored weights
    data = bytearray(blob.read_bytes())
    data[-5] ^= 0xFF
    blob.write_bytes(bytes(data))
    engine.register_lora("good", good)
    engine.register_lora("bad", bad)
    outs = llm.generate([[256, 1, 2], [256, 3, 4], [256, 5, 6]], GREEDY, lora=["good", "bad", None])
    assert outs[0].finish_reason == "length" and outs[2].finish_reason == "length"
    assert outs[1].finish_reason == "error" and "bad" in outs[1].error.message and outs[1].token_ids == []

    store.down = True  # the store goes away: only requests needing a fetch fail
    engine.register_lora("unreachable", upload(store.inner, write_adapter(tmp_path / "c", seed=3)))
    outs = llm.generate([[256, 7], [256, 8], [256, 9]], GREEDY, lora=["good", "unreachable", None])
    assert [o.finish_reason for o in outs] == ["length", "error", "length"]
    assert wire_of(outs[1].error)[0] == 3040
    manager = engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks
