"""The trainer (peft + transformers) on a tiny model: loss falls, a PEFT folder is written,
the same seed gives the same weights, each step reports its progress (epoch, tokens so far, ETA),
and a cancel (on_step → False) writes nothing."""

import json

import torch
from safetensors.torch import load_file

from loraplex.tokenizer import Tokenizer
from loraplex.training.hyperparameters import DEFAULTS
from loraplex.training.trainer import StepReport, examples_from_jsonl, train_lora

DATA = ("\n".join(json.dumps({"messages": [{"role": "user", "content": f"say {w}"},
                                           {"role": "assistant", "content": f"ARR {w} ARR"}]})
                  for w in ("one", "two", "three", "four")) + "\n").encode()
HP = DEFAULTS | {"n_epochs": 4, "batch_size": 2, "learning_rate_multiplier": 50.0, "rank": 4}


def test_training_is_deterministic_and_learns(model_dir, tmp_path):
    torch.set_num_threads(1)
    reports = []
    result = train_lora(model_dir, DATA, tmp_path / "a", HP, seed=3, on_step=reports.append)
    losses = [r.loss for r in reports]
    train_lora(model_dir, DATA, tmp_path / "b", HP, seed=3)
    assert len(losses) == 8 and losses[-1] < losses[0] and result.loss == losses[-1]
    assert [(r.step, r.total_steps, r.epoch) for r in reports] == [(s, 8, (s + 1) // 2) for s in range(1, 9)]
    tokens_per_epoch = sum(len(ids) for ids, _ in examples_from_jsonl(DATA, Tokenizer.from_dir(model_dir)))
    assert [r.trained_tokens for r in reports[1::2]] == [tokens_per_epoch * e for e in range(1, 5)]
    assert result.trained_tokens == 4 * tokens_per_epoch
    assert reports[-1].eta_s == 0 and all(r.elapsed_s >= 0 for r in reports)
    assert {p.name for p in (tmp_path / "a").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cancel_writes_nothing(model_dir, tmp_path):
    assert train_lora(model_dir, DATA, tmp_path / "c", HP, seed=0, on_step=lambda *a: False) is None
    assert not (tmp_path / "c").exists()


def test_eta_is_the_mean_pace_times_the_steps_left():
    report = StepReport(step=2, total_steps=8, epoch=1, loss=1.0, learning_rate=1e-4, elapsed_s=10.0, trained_tokens=0)
    assert report.eta_s == 30.0
