"""What several benchmarks need: random PEFT adapters, popularity cases, prompts, results files.

Benchmarks import this module (Python puts the script's folder on sys.path) and the package,
never each other."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

CASES = ["distinct", "uniform", "zipf", "identical"]
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


def make_peft_adapters(model_dir: Path, folder: Path, count: int = 16, rank: int = 8):
    """`count` peft adapters (rank `rank`, N(0, 0.02) weights on LORA_TARGETS), saved as PEFT folders
    under `folder`; returns (the peft model holding them all, names adapter-0…, their folders)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS)
    names = [f"adapter-{i}" for i in range(count)]
    peft_model = get_peft_model(base, config, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if "lora_" in pname:
                p.normal_(0.0, 0.02)
    paths = []
    for name in names:
        peft_model.save_pretrained(folder, selected_adapters=[name])
        paths.append(next(folder.rglob(f"{name}/adapter_config.json")).parent)
    return peft_model.eval(), names, paths


def assignment(case: str, seed: int = 0, num_adapters: int = 16, num_requests: int = 64) -> list[int]:
    """Adapter index per request for one of Punica's popularity CASES: distinct (round robin),
    uniform, zipf(1.5), identical (all adapter 0)."""
    rng = random.Random(seed)
    if case == "distinct":
        return [i % num_adapters for i in range(num_requests)]
    if case == "uniform":
        return [rng.randrange(num_adapters) for _ in range(num_requests)]
    if case == "zipf":
        weights = [1 / (k + 1) ** 1.5 for k in range(num_adapters)]
        return rng.choices(range(num_adapters), weights=weights, k=num_requests)
    return [0] * num_requests


def prompts_for(tokenizer, num_requests: int = 64) -> list[list[int]]:
    """`num_requests` short chat prompts, encoded with `tokenizer.encode_chat`."""
    topics = ["rivers", "stars", "bread", "trains", "music", "forests", "robots", "oceans"]
    return [
        tokenizer.encode_chat([{"role": "user", "content": f"Write about {topics[i % 8]}, note {i}."}])
        for i in range(num_requests)
    ]


def save_results(rows: list[dict], out: Path, name: str, plot_rows) -> None:
    """rows as out/NAME.json, and `plot_rows(rows, path)` drawn to out/NAME.png."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=2))
    plot_rows(rows, out / f"{name}.png")
    print(f"wrote {out / name}.json and .png")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS's pick; another process may take it before use)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def thread_env(threads: int | None) -> dict[str, str]:
    """This process's environment, with the thread-count variables set to `threads` (if given)."""
    env = dict(os.environ)
    if threads is not None:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
            env[name] = str(threads)
    return env


def loraplex_executable() -> str:
    candidate = Path(sys.executable).parent / "loraplex"
    return str(candidate) if candidate.exists() else "loraplex"


def create_loraplex_account(data_dir: Path) -> tuple[str, str]:
    """`loraplex accounts create bench` (before the server starts); returns (account_id, token)."""
    done = subprocess.run(
        [loraplex_executable(), "accounts", "create", "bench", "--data-dir", str(data_dir)],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent,
    )
    if done.returncode != 0:
        raise RuntimeError(f"`loraplex accounts create` failed ({done.returncode}): {done.stderr[-2000:]}")
    out = done.stdout
    for line in reversed(out.splitlines()):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "account_id" in record:
            return record["account_id"], record["token"]
    raise RuntimeError(f"`loraplex accounts create` printed no account: {out!r}")
