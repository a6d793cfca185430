"""The adapter-affinity decision (loraplex/serve/routing.py), without Ray: residency tiers, load,
spill past the bound, spreading new adapters, the sticky window; and the scale-out settings'
refusals (ScaleoutConfig, `serve --replicas 0`), before any Ray starts."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest

from loraplex.config import ScaleoutConfig
from loraplex.serve.routing import ReplicaView, StickyMap, rank_replicas

SPILL = 4


def view(rid: str, in_flight: int = 0, slots=(), host=()) -> ReplicaView:
    return ReplicaView(rid, in_flight, frozenset(slots), frozenset(host))


def rank(adapter, replicas, **kwargs) -> list[str]:
    return rank_replicas(adapter, replicas, spill_in_flight=SPILL, **kwargs)


def test_a_slot_beats_host_memory_beats_cold_whatever_the_load_below_the_bound():
    replicas = [view("cold", 0), view("host", 2, host={"x"}), view("slot", 3, slots={"x"})]
    assert rank("x", replicas) == ["slot", "host", "cold"]


def test_the_sticky_replica_comes_first_before_any_report_says_so():
    replicas = [view("r0", 0), view("r1", 2)]
    assert rank("x", replicas, sticky_replica="r1") == ["r1", "r0"]


def test_the_sticky_replica_beats_another_holding_the_adapter_in_a_slot():
    replicas = [view("r0", 0, slots={"x"}), view("r1", 2, slots={"x"})]
    assert rank("x", replicas, sticky_replica="r1") == ["r1", "r0"]


def test_among_replicas_holding_it_in_a_slot_the_least_loaded_first():
    replicas = [view("r0", 3, slots={"x"}), view("r1", 1, slots={"x"}), view("r2", 0)]
    assert rank("x", replicas) == ["r1", "r0", "r2"]


def test_an_overloaded_replica_spills_its_adapter_to_another():
    replicas = [view("r0", SPILL, slots={"x"}), view("r1", SPILL + 3), view("r2", 2)]
    assert rank("x", replicas) == ["r2", "r0", "r1"]


def test_when_every_replica_is_overloaded_the_least_loaded_comes_first():
    replicas = [view("r0", SPILL + 5, slots={"x"}), view("r1", SPILL + 1)]
    assert rank("x", replicas) == ["r1", "r0"]


def test_a_new_adapter_goes_to_the_least_loaded_then_the_one_with_fewest_adapters():
    replicas = [view("r0", 1), view("r1", 0), view("r2", 0)]
    assert rank("new", replicas, adapters_sent=Counter(r1=3, r2=1)) == ["r2", "r1", "r0"]
    idle = [view("r0", 0), view("r1", 0)]
    assert rank("new", idle, adapters_sent=Counter(r0=2, r1=1)) == ["r1", "r0"]


def test_the_base_model_goes_to_the_least_loaded_whatever_is_resident():
    replicas = [view("r0", 2, slots={"x"}), view("r1", 1), view("r2", SPILL + 1)]
    assert rank(None, replicas, adapters_sent=Counter(r1=9)) == ["r1", "r0", "r2"]


def test_sticky_entries_expire_and_are_bounded_and_dropped_with_their_replica():
    sticky = StickyMap(ttl_s=10, max_entries=2)
    sticky.note("a", "r0", now=0)
    assert sticky.get("a", now=10) == "r0" and sticky.get("a", now=10.5) is None
    sticky.note("b", "r1", now=1)
    sticky.note("a", "r1", now=2)  # moved: the latest send wins
    sticky.note("c", "r0", now=3)  # over the bound: "b", the least recently sent, goes
    assert (sticky.get("a", 3), sticky.get("b", 3), sticky.get("c", 3)) == ("r1", None, "r0")
    assert sticky.adapters_per_replica(now=3) == Counter(r1=1, r0=1)
    sticky.forget_replica("r0")
    assert sticky.get("c", 3) is None and sticky.adapters_per_replica(now=3) == Counter(r1=1)


def test_a_sequential_series_over_many_adapters_sticks_and_spreads():
    """What the router does with the decision: each request noted as sent; new adapters alternate."""
    sticky = StickyMap(ttl_s=60)
    replicas = [view("r0"), view("r1")]
    served = {name: Counter() for name in "abcd"}
    for t in range(20):
        name = "abcd"[t % 4]
        chosen = rank(name, replicas, sticky_replica=sticky.get(name, t), adapters_sent=sticky.adapters_per_replica(t))[0]
        sticky.note(name, chosen, t)
        served[name][chosen] += 1
    assert all(len(counts) == 1 for counts in served.values())
    assert Counter(next(iter(c)) for c in served.values()) == Counter(r0=2, r1=2)


@pytest.mark.parametrize("bad", [dict(replicas=0), dict(spill_in_flight=0), dict(router="random"),
                                 dict(replica_num_cpus=-1), dict(train_num_gpus=-1), dict(max_attempts=0)])
def test_scaleout_config_refuses_nonsense(bad):
    with pytest.raises(ValueError):
        ScaleoutConfig(**bad)


def test_serve_refuses_a_replica_count_below_one_in_one_line(model_dir, tmp_path):
    done = subprocess.run([sys.executable, "-m", "loraplex.cli", "serve", "--model", str(model_dir),
                           "--data-dir", str(tmp_path), "--replicas", "0"], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr.strip()) == (1, "error: --replicas: replicas must be a positive integer, got 0")
