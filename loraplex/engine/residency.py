"""Where every adapter is resident right now: device slots, host memory, local disk, loads in
flight. One snapshot function (the operator route calls it; a residency manager may own it later)."""

from __future__ import annotations

from loraplex.engine.engine import LLMEngine


def residency_snapshot(engine: LLMEngine) -> dict:
    """Engine thread only (the slot table is the engine thread's; run it with AsyncEngine.call).

    {"slots": {"total", "occupied", "bytes_per_slot", "bytes" (of the occupied ones),
               "residents": [{"slot", "adapter", "loading", "holders"}]},
     "host": {"bytes", "budget_bytes", "adapters": [{"adapter", "bytes", "pins"}]},
     "disk": {"bytes", "budget_bytes", "adapters": [{"adapter", "bytes"}]},
     "loading": [{"adapter", "state": "downloading" | "loading"}], "waiting_for_room": [names],
     "errored": [names]}
    Adapters are named by the engine's names (the server's finetune ids).
    """
    table = engine.scheduler.slot_table
    per_slot = engine.runner.lora_slots.bytes_per_slot
    slots = {"total": table.num_slots, "occupied": table.num_occupied, "bytes_per_slot": per_slot,
             "bytes": per_slot * table.num_occupied, "residents": table.residents()}
    return {"slots": slots, **engine.adapter_cache.residency()}
