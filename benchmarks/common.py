"""What several benchmarks need: random PEFT adapters for a model folder."""

from __future__ import annotations

from pathlib import Path

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(model_dir: Path, folder: Path, count: int, rank: int = 8, seed: int = 0,
                  targets: list[str] = LORA_TARGETS) -> list[str]:
    """`count` random PEFT LoRA adapters of `model_dir` (weights N(0, 0.02) on `targets`), made
    with peft and saved as folder/<name>/; returns the names (adapter-00, adapter-01, …)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
    names = [f"adapter-{i:02d}" for i in range(count)]
    model = get_peft_model(base, config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "lora_" in pname:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:  # peft writes a non-"default" adapter into <dir>/<name>/
        model.save_pretrained(folder, selected_adapters=[name])
        assert (folder / name / "adapter_model.safetensors").is_file(), f"peft did not write {folder / name}"
    return names
