"""Training one LoRA with peft + transformers on a chat JSONL (the body the worker process runs).

`train_lora(model_dir, jsonl, out_dir, hp, seed, on_step)` writes a PEFT folder
(`adapter_config.json` + `adapter_model.safetensors`) to `out_dir` and returns a `TrainResult`
(final loss, trained tokens: the tokens of every example seen, padding excluded, summed over epochs).
Contracts: the base model's own folder and the server's chat template (`Tokenizer.encode_chat`);
loss on the tokens of each example's last assistant message only (the prompt's labels are -100);
deterministic for a seed (torch seeded, fixed example order per epoch from that seed); CPU in
float32 with torch at 1 thread unless the caller set otherwise. `on_step(StepReport)` is called
after each optimizer step; if it returns False training stops (cancel), nothing is written and
`train_lora` returns None. Blocking and heavy: run it in the trainer worker process, never in the server.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BASE_LEARNING_RATE = 2e-4  # OpenAI's learning_rate_multiplier scales this


@dataclass(frozen=True)
class StepReport:
    """After optimizer step `step` of `total_steps` (1-based), in epoch `epoch` (1-based)."""
    step: int
    total_steps: int
    epoch: int
    loss: float
    learning_rate: float
    elapsed_s: float  # since the first step began (model loading excluded)
    trained_tokens: int  # so far

    @property
    def eta_s(self) -> float:
        """Seconds left at the mean pace of the steps done so far."""
        return self.elapsed_s / self.step * (self.total_steps - self.step)


@dataclass(frozen=True)
class TrainResult:
    loss: float
    trained_tokens: int


def examples_from_jsonl(data: bytes, tokenizer) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per line: labels are -100 except on the last assistant reply."""
    out = []
    for line in data.decode("utf-8").splitlines():
        if not line.strip():
            continue
        messages = json.loads(line)["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = tokenizer.encode_chat(messages[:last], add_generation_prompt=True)
        full = tokenizer.encode_chat(messages[:last + 1], add_generation_prompt=False)
        if full[:len(prompt)] != prompt:  # a template that re-renders the prefix: learn the whole reply
            prompt = []
        out.append((full, [-100] * len(prompt) + full[len(prompt):]))
    return out


def train_lora(model_dir: Path, data: bytes, out_dir: Path, hp: dict, seed: int,
               on_step: Callable[[StepReport], bool | None] | None = None) -> TrainResult | None:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from loraplex.tokenizer import Tokenizer

    torch.manual_seed(seed)
    examples = examples_from_jsonl(data, Tokenizer.from_dir(model_dir))
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=hp["rank"], lora_alpha=hp["alpha"], lora_dropout=0.0,
                                            target_modules=hp["target_modules"], task_type="CAUSAL_LM"))
    lr = BASE_LEARNING_RATE * hp["learning_rate_multiplier"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch, epochs = hp["batch_size"], hp["n_epochs"]
    steps_per_epoch = (len(examples) + batch - 1) // batch
    total, step, loss_value, tokens = steps_per_epoch * epochs, 0, None, 0
    order = random.Random(seed)
    model.train()
    started = time.monotonic()
    for epoch in range(1, epochs + 1):
        shuffled = examples[:]
        order.shuffle(shuffled)
        for start in range(0, len(shuffled), batch):
            chunk = shuffled[start:start + batch]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.tensor([i + [0] * (width - len(i)) for i, _ in chunk])
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chunk])
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in chunk])
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step, loss_value, tokens = step + 1, float(loss.detach()), tokens + int(mask.sum())
            report = StepReport(step, total, epoch, loss_value, lr, time.monotonic() - started, tokens)
            if on_step is not None and on_step(report) is False:
                return None
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    return TrainResult(loss_value, tokens)
