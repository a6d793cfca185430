"""A tiny random model of a family with several PEFT adapters, saved as served folders, and the
peft model that serves as their reference."""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_models import make_tiny_model


def make_peft_family(family: str, folder: Path, adapters: dict[str, dict], seed: int = 1):
    """Write a tiny `family` model to folder/base and one PEFT folder per entry of `adapters`
    (name → LoraConfig kwargs), with every LoRA weight random (peft zero-inits B).
    Returns (base folder, the peft model holding every adapter (eval mode), name → folder)."""
    from peft import LoraConfig, get_peft_model

    hf_model = make_tiny_model(family, folder / "base")
    peft_model = None
    for name, kwargs in adapters.items():
        config = LoraConfig(**kwargs)
        if peft_model is None:
            peft_model = get_peft_model(hf_model, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if "lora_" in pname:
                p.normal_(0.0, 0.3)
    paths = {}
    for name in adapters:
        peft_model.save_pretrained(folder / "adapters", selected_adapters=[name])
        paths[name] = next((folder / "adapters").rglob(f"{name}/adapter_config.json")).parent
    peft_model.eval()
    return folder / "base", peft_model, paths


def reference_logits(peft_model, ids: torch.Tensor, adapter: str | None) -> torch.Tensor:
    """peft's logits [T, V] for token ids [1, T] with `adapter` active (None: base model)."""
    with torch.no_grad():
        if adapter is None:
            with peft_model.disable_adapter():
                return peft_model(ids).logits[0].float()
        peft_model.set_adapter(adapter)
        return peft_model(ids).logits[0].float()


def assert_matches_peft(peft_model, prompt: list[int], adapter: str | None, out) -> None:
    """Every greedy token of `out` is peft's argmax and its logprobs agree to 1e-4."""
    ids = torch.tensor([prompt + out.token_ids])
    logits = reference_logits(peft_model, ids, adapter)[len(prompt) - 1 : -1]
    assert out.token_ids == logits.argmax(-1).tolist(), f"adapter {adapter}"
    expected = torch.log_softmax(logits, -1)[torch.arange(len(out.token_ids)), ids[0, len(prompt) :]]
    assert torch.allclose(torch.tensor(out.logprobs), expected, atol=1e-4, rtol=0), f"adapter {adapter}"
