"""Checking a job's hyperparameters (OpenAI's names plus LoRA `rank`, `alpha`, `target_modules`).

`check_hyperparameters(raw, max_rank)` returns a complete dict with defaults filled in, or raises
`InvalidInput` naming the field and its allowed range. "auto" means the default. Pure function.
"""

from __future__ import annotations

from loraplex.errors import InvalidInput

DEFAULTS = {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.0, "rank": 8, "alpha": 16,
            "target_modules": ["q_proj", "v_proj"]}
RANGES = {"n_epochs": (1, 50), "batch_size": (1, 256), "learning_rate_multiplier": (1e-3, 100.0),
          "alpha": (1, 1024)}


def check_hyperparameters(raw: dict | None, max_rank: int) -> dict:
    raw = dict(raw or {})
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise InvalidInput(f"unknown hyperparameters: {', '.join(unknown)}")
    out = dict(DEFAULTS)
    ranges = RANGES | {"rank": (1, max_rank)}
    for name, value in raw.items():
        if value == "auto" or value is None:
            continue
        if name == "target_modules":
            if not (isinstance(value, list) and value and all(isinstance(m, str) and m for m in value)):
                raise InvalidInput("target_modules must be a non-empty list of module names")
            out[name] = value
            continue
        low, high = ranges[name]
        number_ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if name != "learning_rate_multiplier" and not isinstance(value, int):
            number_ok = False
        if not number_ok or not low <= value <= high:
            raise InvalidInput(f"{name} must be {'an integer' if name != 'learning_rate_multiplier' else 'a number'}"
                               f" in [{low}, {high}], not {value!r}")
        out[name] = value
    return out
