"""The trainer (peft + transformers) on a tiny model: loss falls, a PEFT folder is written,
the same seed gives the same weights, and a cancel (on_step → False) writes nothing."""

import json

import torch
from safetensors.torch import load_file

from loraplex.training.hyperparameters import DEFAULTS
from loraplex.training.trainer import train_lora

DATA = ("\n".join(json.dumps({"messages": [{"role": "user", "content": f"say {w}"},
                                           {"role": "assistant", "content": f"ARR {w} ARR"}]})
                  for w in ("one", "two", "three", "four")) + "\n").encode()
HP = DEFAULTS | {"n_epochs": 4, "batch_size": 2, "learning_rate_multiplier": 50.0, "rank": 4}


def test_training_is_deterministic_and_learns(model_dir, tmp_path):
    torch.set_num_threads(1)
    losses = []
    train_lora(model_dir, DATA, tmp_path / "a", HP, seed=3, on_step=lambda s, t, loss, lr: losses.append(loss))
    train_lora(model_dir, DATA, tmp_path / "b", HP, seed=3)
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert {p.name for p in (tmp_path / "a").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cancel_writes_nothing(model_dir, tmp_path):
    assert train_lora(model_dir, DATA, tmp_path / "c", HP, seed=0, on_step=lambda *a: False) is None
    assert not (tmp_path / "c").exists()
