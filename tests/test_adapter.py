"""PEFT adapter loading: parity with real `peft` adapters, and one refusal per unservable folder."""

from __future__ import annotations

import json
import pickle
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.api.errors import wire_of
from loraplex.errors import AdapterInvalid
from loraplex.lora.adapter import TARGETS, LoraAdapter, load_adapter
from loraplex.models.hf_config import read_model_args
from tiny_models import make_peft_adapter, make_tiny_model

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """family → (HF model, ModelArgs), each tiny model built once for the whole module."""
    out = {}
    for family in ("llama", "gemma", "qwen2", "qwen3", "gemma2", "gemma3"):
        folder = tmp_path_factory.mktemp(f"base-{family}")
        out[family] = (make_tiny_model(family, folder), read_model_args(folder))
    return out


def check_matches(adapter: LoraAdapter, deltas) -> None:
    assert set(adapter.modules) == set(deltas)
    assert adapter.size_bytes == sum(a.nbytes + b.nbytes for a, b in adapter.modules.values())
    ranks = []
    for (layer, target), (a, b) in adapter.modules.items():
        assert a.dtype == b.dtype == torch.float32 and a.is_contiguous() and b.is_contiguous()
        assert a.device.type == b.device.type == "cpu"
        out_features, in_features = deltas[layer, target].shape
        assert a.shape[1] == in_features and b.shape[0] == out_features and a.shape[0] == b.shape[1]
        torch.testing.assert_close(b @ a, deltas[layer, target], rtol=1e-5, atol=1e-6)
        ranks.append(a.shape[0])
    assert adapter.rank == max(ranks)


VALID_CONFIGS = {
    "list-all-seven": ("llama", dict(r=4, lora_alpha=8, target_modules=list(TARGETS))),
    "regex": ("llama", dict(r=8, lora_alpha=16, target_modules=r".*\.(q_proj|v_proj)")),
    "patterns": ("llama", dict(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "down_proj"],
                               rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 8},
                               alpha_pattern={"down_proj": 3, r"layers\.0\.self_attn\.k_proj": 7})),
    "rslora-gemma": ("gemma", dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "o_proj", "gate_proj"])),
    "layers-list-qwen2": ("qwen2", dict(r=2, lora_alpha=5, target_modules=["up_proj", "o_proj"],
                                        layers_to_transform=[1], layers_pattern="layers")),
    "all-qwen3": ("qwen3", dict(r=4, lora_alpha=8, target_modules="all-linear")),  # head_dim 32 * 4 heads != hidden
    "regex-gemma2": ("gemma2", dict(r=2, lora_alpha=4, target_modules=r".*\.(k_proj|o_proj|up_proj)")),
    "layers-gemma3": ("gemma3", dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], layers_to_transform=[1, 2])),
    "layers-int": ("llama", dict(r=4, lora_alpha=4, target_modules=["v_proj", "down_proj"], layers_to_transform=0)),
    "exclude": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                              exclude_modules=["model.layers.1.self_attn.v_proj"])),
}


@pytest.mark.parametrize("case", VALID_CONFIGS)
def test_matches_peft(case, bases, tmp_path):
    family, kwargs = VALID_CONFIGS[case]
    model, args = bases[family]
    deltas = make_peft_adapter(model, tmp_path, **kwargs)
    adapter = load_adapter(tmp_path, args, name="t1/ft")
    assert adapter.name == "t1/ft" and adapter.path == str(tmp_path)
    check_matches(adapter, deltas)


@pytest.fixture(scope="module")
def good(bases, tmp_path_factory):
    """A valid llama adapter (all seven targets, r=4) and PEFT's deltas for it."""
    folder = tmp_path_factory.mktemp("good")
    return folder, make_peft_adapter(bases["llama"][0], folder, r=4, lora_alpha=8, target_modules=list(TARGETS))


@pytest.fixture
def bad(good, tmp_path):
    """A writable copy of the good adapter, to be broken by the test."""
    folder = tmp_path / "adapter"
    shutil.copytree(good[0], folder)
    return folder


@pytest.fixture
def llama_args(bases):
    return bases["llama"][1]


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / CONFIG).read_text())
    cfg.update(changes)
    (folder / CONFIG).write_text(json.dumps(cfg))


def edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / WEIGHTS)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})


def refused(folder, args, code: int, *needles: str, **kwargs) -> AdapterInvalid:
    with pytest.raises(AdapterInvalid) as info:
        load_adapter(folder, args, **kwargs)
    err = info.value
    assert isinstance(err, ValueError) and wire_of(err)[0] == code, (wire_of(err)[0], err.message)
    for needle in needles:
        assert needle in err.message, (needle, err.message)
    return err


def test_default_name_and_tolerated_tensor_names(good, bad, llama_args):
    # PEFT's own names, minus the base_model.model. prefix and with an adapter-name infix
    edit_tensors(bad, lambda t: t.update({
        k.removeprefix("base_model.model.").replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."):
        t.pop(k) for k in list(t)}))
    adapter = load_adapter(bad, llama_args)
    assert adapter.name == "adapter"
    check_matches(adapter, good[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tensors(bad, llama_args, dtype):
    edit_tensors(bad, lambda t: t.update({k: v.to(dtype) for k, v in t.items()}))
    rounded = {k: v.float() for k, v in load_file(bad / WEIGHTS).items()}
    adapter = load_adapter(bad, llama_args)
    a, b = adapter.modules[0, "q_proj"]
    torch.testing.assert_close(a, rounded[Q_A], rtol=0, atol=0)
    torch.testing.assert_close(b, rounded[Q_B] * 2.0, rtol=0, atol=0)  # alpha 8 / r 4


def write_unaligned_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A valid safetensors file whose data section starts at an odd offset (the format allows any
    header length; safetensors itself pads to 8)."""
    header, offset, blobs = {}, 0, []
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    for name, t in tensors.items():
        blob = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    text = json.dumps(header).encode()
    text += b" " * ((3 - len(text)) % 4 or 4)  # 8 + len(text) is odd
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def test_mixed_dtypes_at_unaligned_offsets(bad, llama_args):
    tensors = {k: v.clone() for k, v in load_file(bad / WEIGHTS).items()}  # not views of the file rewritten below
    dtypes = [torch.float16, torch.bfloat16, torch.float32]
    mixed = {k: v.to(dtypes[i % 3]) for i, (k, v) in enumerate(sorted(tensors.items()))}
    write_unaligned_safetensors(bad / WEIGHTS, mixed)
    assert (8 + int.from_bytes((bad / WEIGHTS).read_bytes()[:8], "little")) % 2 == 1
    adapter = load_adapter(bad, llama_args)
    a, b = adapter.modules[0, "q_proj"]
    torch.testing.assert_close(a, mixed[Q_A].float(), rtol=0, atol=0)
    torch.testing.assert_close(b, mixed[Q_B].float() * 2.0, rtol=0, atol=0)  # alpha 8 / r 4
    (a16, b16) = [t.to(torch.float16) for t in (tensors[Q_A], tensors[Q_B])]
    write_unaligned_safetensors(bad / WEIGHTS, {k: v.to(torch.float16) for k, v in tensors.items()})
    a, b = load_adapter(bad, llama_args).modules[0, "q_proj"]  # one dtype: the whole section converted at once
    torch.testing.assert_close(a, a16.float(), rtol=0, atol=0)
    torch.testing.assert_close(b, b16.float() * 2.0, rtol=0, atol=0)


def test_nan_is_named_in_a_file_of_one_dtype(bad, llama_args):
    edit_tensors(bad, lambda t: t[Q_B].view(-1).__setitem__(3, float("nan")))
    refused(bad, llama_args, 5004, Q_B, "NaN", "scaled by 2")


# ---------------------------------------------------------------- missing files (3039)

def test_missing_folder(tmp_path, llama_args):
    refused(tmp_path / "nope", llama_args, 3039, "does not exist")


def test_missing_config(bad, llama_args):
    (bad / CONFIG).unlink()
    refused(bad, llama_args, 3039, CONFIG)


def test_missing_weights(bad, llama_args):
    (bad / WEIGHTS).unlink()
    refused(bad, llama_args, 3039, WEIGHTS)


class _Trap:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_bin_is_never_loaded(bad, llama_args):
    (bad / WEIGHTS).unlink()
    trap = _Trap()
    trap.marker = str(bad / "unpickled")
    (bad / "adapter_model.bin").write_bytes(pickle.dumps(trap))
    refused(bad, llama_args, 3039, ".bin", "never", "safetensors")
    assert not (bad / "unpickled").exists()


# ---------------------------------------------------------------- adapter_config.json (5004)

CONFIG_REFUSALS = {
    "dora": (dict(use_dora=True), "use_dora"),
    "modules_to_save": (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    "bias": (dict(bias="lora_only"), "bias"),
    "lora_bias": (dict(lora_bias=True), "lora_bias"),
    "peft_type": (dict(peft_type="PREFIX_TUNING"), "peft_type"),
    "embed_tokens": (dict(target_modules=["q_proj", "embed_tokens"]), "embed_tokens"),
    "lm_head": (dict(target_modules=["lm_head", "v_proj"]), "lm_head"),
    "unknown_target": (dict(target_modules=["q_proj", "query_key_value"]), "query_key_value"),
    "regex_lm_head": (dict(target_modules=r".*(q_proj|lm_head)"), "lm_head"),
    "regex_norm": (dict(target_modules=r".*layernorm"), "input_layernorm"),
    "bad_regex": (dict(target_modules="(q_proj"), "target_modules"),
    "no_targets": (dict(target_modules=None), "target_modules"),
    "loftq": (dict(loftq_config={"loftq_bits": 4, "loftq_iter": 1}), "loftq_config"),
    "qalora": (dict(use_qalora=True), "use_qalora"),
    "pissa": (dict(init_lora_weights="pissa_niter_4"), "init_lora_weights"),
    "r_string": (dict(r="4"), "'r'"),
    "r_zero": (dict(r=0), "'r'"),
    "r_negative": (dict(r=-4), "'r'"),
    "r_float": (dict(r=4.0), "'r'"),
    "alpha_string": (dict(lora_alpha="8"), "lora_alpha"),
    "alpha_zero": (dict(lora_alpha=0), "lora_alpha"),
    "alpha_negative": (dict(lora_alpha=-1.5), "lora_alpha"),
    "rank_pattern_value": (dict(rank_pattern={"q_proj": "2"}), "rank_pattern"),
    "rank_pattern_regex": (dict(rank_pattern={"q_proj(": 2}), "q_proj("),
    "layers_out_of_range": (dict(layers_to_transform=[0, 5]), "layers_to_transform"),
    "family_by_name": (dict(base_model_name_or_path="google/gemma-2b"), "base_model_name_or_path"),
    "family_by_type": (dict(model_type="qwen2"), "model_type"),
    "family_case": (dict(base_model_name_or_path="mistralai/MISTRAL-7B-v0.1"), "mistral"),
}


@pytest.mark.parametrize("case", CONFIG_REFUSALS)
def test_config_refusals(case, bad, llama_args):
    changes, needle = CONFIG_REFUSALS[case]
    edit_config(bad, **changes)
    refused(bad, llama_args, 5004, needle)


def test_rank_over_max(bad, llama_args):
    refused(bad, llama_args, 5004, "rank 4", "maximum rank 2", max_rank=2)
    assert load_adapter(bad, llama_args, max_rank=4).rank == 4


@pytest.mark.parametrize(("base", "model_type", "ok"), [
    ("qwen3", "qwen3", True), ("qwen3", "qwen", True), ("qwen3", "qwen2", False), ("qwen2", "qwen3", False),
    ("gemma3", "gemma3_text", True), ("gemma3", "gemma3", True), ("gemma3", "gemma", True),
    ("gemma3", "gemma2", False), ("gemma2", "gemma3_text", False), ("gemma", "gemma2", False),
    ("gemma2", "gemma", True), ("gemma3", "llama", False),
])
def test_model_type_generations(bases, tmp_path, base, model_type, ok):
    """An adapter's model_type must name the base's family and, when it names one, its generation."""
    model, args = bases[base]
    make_peft_adapter(model, tmp_path, r=2, lora_alpha=4, target_modules=["q_proj"])
    edit_config(tmp_path, model_type=model_type)
    if ok:
        assert load_adapter(tmp_path, args).rank == 2
    else:
        refused(tmp_path, args, 5004, "model_type", repr(args.model_type))


def test_adapter_of_another_generation_has_the_wrong_shapes(bases, tmp_path):
    """A qwen2 adapter relabelled for a qwen3 base is still refused: its q_proj shapes do not fit."""
    make_peft_adapter(bases["qwen2"][0], tmp_path, r=2, lora_alpha=4, target_modules=["q_proj"])
    edit_config(tmp_path, base_model_name_or_path="Qwen/Qwen3-0.6B")
    refused(tmp_path, bases["qwen3"][1], 5004, "q_proj", "shape")


@pytest.mark.parametrize(("base", "module"), [("qwen3", "q_norm"), ("gemma3", "k_norm"),
                                              ("gemma2", "pre_feedforward_layernorm")])
def test_regex_hitting_the_new_norms(bases, bad, base, module):
    edit_config(bad, target_modules=rf".*\.{module}|.*\.q_proj")
    refused(bad, bases[base][1], 5004, module)


@pytest.mark.parametrize("name", ["meta-llama/Llama-2-7b-hf", "my-org/custom-7b", "/models/base/", "llama-gemma-merge"])
def test_family_names_that_pass(bad, llama_args, name):
    edit_config(bad, base_model_name_or_path=name)
    assert load_adapter(bad, llama_args).rank == 4


@pytest.mark.parametrize("text, needle", [("{not json", "not valid JSON"), ("[1, 2]", "not an object"), ("\xff", "JSON")])
def test_unreadable_config(bad, llama_args, text, needle):
    (bad / CONFIG).write_bytes(text.encode("latin-1"))
    refused(bad, llama_args, 5004, needle)


# ---------------------------------------------------------------- tensors (5004)

def _renamed(old: str, new: str):
    return lambda t: t.update({new: t.pop(old)})


TENSOR_REFUSALS = {
    "dora_magnitude": (lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(64)}), "lora_magnitude_vector"),
    "lm_head": (lambda t: t.update({"base_model.model.lm_head.lora_A.weight": torch.ones(4, 64)}), "lm_head"),
    "embedding": (lambda t: t.update({"base_model.model.model.embed_tokens.lora_embedding_A": torch.ones(4, 300)}), "embed_tokens"),
    "full_weight": (lambda t: t.update({"base_model.model.lm_head.weight": torch.ones(300, 64)}), "lm_head.weight"),
    "unknown_module": (_renamed(Q_A, Q_A.replace("q_proj", "qkv_proj")), "qkv_proj"),
    "wrong_block": (_renamed(Q_A, Q_A.replace("self_attn", "mlp")), "mlp.q_proj"),
    "layer_out_of_range": (_renamed(Q_A, Q_A.replace("layers.0", "layers.7")), "layers.7"),
    "absmax": (lambda t: t.update({Q_A.replace("weight", "absmax"): torch.ones(4)}), "absmax"),
    "qweight": (lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.qweight": torch.ones(4)}), "qweight"),
    "int8": (lambda t: t.update({Q_A: t[Q_A].to(torch.int8)}), "quantized"),
    "float8": (lambda t: t.update({Q_A: t[Q_A].to(torch.float8_e4m3fn)}), "F8_E4M3"),
    "float64": (lambda t: t.update({Q_A: t[Q_A].double()}), "F64"),
    "wrong_in": (lambda t: t.update({Q_A: torch.ones(4, 65)}), Q_A),
    "wrong_out": (lambda t: t.update({Q_B: torch.ones(63, 4)}), Q_B),
    "rank_mismatch": (lambda t: t.update({Q_B: torch.ones(64, 3)}), Q_B),
    "not_2d": (lambda t: t.update({Q_A: torch.ones(4, 64, 1)}), Q_A),
    "a_without_b": (lambda t: t.pop(Q_B), "no matching lora_B"),
    "b_without_a": (lambda t: t.pop(Q_A), "no matching lora_A"),
    "nan": (lambda t: t[Q_A].__setitem__((1, 2), float("nan")), Q_A),
    "inf": (lambda t: t[Q_B].__setitem__((0, 0), float("-inf")), Q_B),
    "duplicate": (lambda t: t.update({Q_A.replace("lora_A.", "lora_A.other."): t[Q_A].clone()}), "both lora_A"),
    "empty": (lambda t: t.clear(), "no LoRA tensors"),
}


@pytest.mark.parametrize("case", TENSOR_REFUSALS)
def test_tensor_refusals(case, bad, llama_args):
    edit, needle = TENSOR_REFUSALS[case]
    edit_tensors(bad, edit)
    refused(bad, llama_args, 5004, needle)


def test_config_rank_disagrees_with_tensors(bad, llama_args):
    edit_config(bad, r=2)
    refused(bad, llama_args, 5004, "r=2")


def test_layers_pattern_with_an_alternation(bad, llama_args):
    """A top-level `|` in a tenant's layers_pattern stays inside its group (it once split the whole
    expression, matched without a layer index and crashed)."""
    edit_config(bad, layers_to_transform=[0], layers_pattern="layers|blocks")
    refused(bad, llama_args, 5004, "layers.1.", "does not target")


def test_tensor_not_targeted_by_config(bad, llama_args):
    edit_config(bad, target_modules=[t for t in TARGETS if t != "v_proj"])
    refused(bad, llama_args, 5004, "does not target", "v_proj")


def test_scaled_overflow(bad, llama_args):
    edit_config(bad, lora_alpha=1e300)
    refused(bad, llama_args, 5004, "Inf")


def test_file_size_checked_before_reading(bad, llama_args):
    refused(bad, llama_args, 5004, "over the limit of 100", max_file_bytes=100)
    with open(bad / WEIGHTS, "r+b") as f:  # a sparse 400 MiB file (over the 300 MB default): refused from stat alone
        f.truncate(400 * 2**20)
    refused(bad, llama_args, 5004, str(400 * 2**20))


# ---------------------------------------------------------------- corrupt safetensors (5004)

def st_bytes(header: dict, data: bytes, header_len: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


A = {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, 1024]}
B = {"dtype": "F32", "shape": [64, 4], "data_offsets": [1024, 2048]}

CORRUPT = {
    "header_longer_than_file": (st_bytes({Q_A: A, Q_B: B}, bytes(2048), header_len=10**6), "exceeds the file size"),
    "header_len_huge": (st_bytes({Q_A: A}, b"", header_len=2**64 - 1), "exceeds the file size"),
    "too_short": (b"\x01\x02", "too short"),
    "overlap": (st_bytes({Q_A: A, Q_B: dict(B, data_offsets=[1000, 2024])}, bytes(2048)), "overlaps"),
    "out_of_range": (st_bytes({Q_A: A, Q_B: B}, bytes(1500)), "beyond"),
    "gap": (st_bytes({Q_A: A, Q_B: dict(B, data_offsets=[1040, 2064])}, bytes(2064)), "gap"),
    "trailing_bytes": (st_bytes({Q_A: A, Q_B: B}, bytes(2100)), "cover"),
    "unknown_dtype": (st_bytes({Q_A: dict(A, dtype="I4"), Q_B: B}, bytes(2048)), "I4"),
    "huge_shape": (st_bytes({Q_A: dict(A, shape=[2**62, 2**62]), Q_B: B}, bytes(2048)), Q_A),
    "negative_shape": (st_bytes({Q_A: dict(A, shape=[-4, -64]), Q_B: B}, bytes(2048)), "shape"),
    "reversed_offsets": (st_bytes({Q_A: dict(A, data_offsets=[1024, 0]), Q_B: B}, bytes(2048)), "data_offsets"),
    "string_offsets": (st_bytes({Q_A: dict(A, data_offsets=["0", "1024"]), Q_B: B}, bytes(2048)), "data_offsets"),
    "size_mismatch": (st_bytes({Q_A: dict(A, shape=[4, 63]), Q_B: B}, bytes(2048)), "1008 bytes"),
    "header_not_json": (struct.pack("<Q", 5) + b"{abc}", "JSON"),
    "header_list": (st_bytes([1, 2], b""), "not an object"),  # type: ignore[arg-type]
    "entry_not_object": (st_bytes({Q_A: [1, 2]}, b""), Q_A),
    "bad_metadata": (st_bytes({"__metadata__": [1], Q_A: A}, bytes(1024)), "__metadata__"),
}


@pytest.mark.parametrize("case", CORRUPT)
def test_corrupt_safetensors(case, bad, llama_args):
    data, needle = CORRUPT[case]
    (bad / WEIGHTS).write_bytes(data)
    err = refused(bad, llama_args, 5004, needle)
    assert "adapter_model.safetensors" in err.message


def test_truncated_file(bad, llama_args):
    data = (bad / WEIGHTS).read_bytes()
    (bad / WEIGHTS).write_bytes(data[:-10])
    refused(bad, llama_args, 5004, "truncated")


def test_fuzzed_files_never_crash(bad, llama_args):
    """Random byte flips in a valid file: every outcome is a load or an AdapterInvalid."""
    good_bytes = (bad / WEIGHTS).read_bytes()
    rng = random.Random(0)
    outcomes = {"ok": 0, "refused": 0}
    for i in range(150):
        data = bytearray(good_bytes)
        hot = 8 + struct.unpack("<Q", data[:8])[0] if i % 2 else len(data)  # in the header, or anywhere
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(min(hot, len(data)))] = rng.randrange(256)
        if i % 5 == 0:
            data = data[: rng.randrange(len(data))]
        (bad / WEIGHTS).write_bytes(bytes(data))
        try:
            load_adapter(bad, llama_args)
            outcomes["ok"] += 1
        except AdapterInvalid as e:
            assert wire_of(e)[0] == 5004
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0


FUZZ_KEYS = ["r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules", "layers_to_transform",
             "layers_pattern", "rank_pattern", "alpha_pattern", "bias", "modules_to_save", "peft_type",
             "init_lora_weights", "base_model_name_or_path", "model_type", "loftq_config", "use_dora"]
FUZZ_VALUES = [None, 0, -1, 1.5, float("nan"), 10**400, "x", "(", "", [], {}, [1], [None], ["q_proj"], True,
               {"q_proj": 2}, {"(": 1}, {"q_proj": [1]}, [[1]], "LORA"]


def test_fuzzed_configs_never_crash(bad, llama_args):
    """Every odd value of every key the loader reads: a load or an AdapterInvalid, never anything else."""
    base = json.loads((bad / CONFIG).read_text())
    for key in FUZZ_KEYS:
        for value in FUZZ_VALUES:
            (bad / CONFIG).write_text(json.dumps(base | {key: value}))
            try:
                load_adapter(bad, llama_args)
            except AdapterInvalid as e:
                assert wire_of(e)[0] == 5004 and e.message


@pytest.mark.parametrize("text", ['{"r": ' + "1" * 5000 + "}", "[" * 100_000 + "]" * 100_000])
def test_hostile_config_json(bad, llama_args, text):
    (bad / CONFIG).write_text(text)
    refused(bad, llama_args, 5004, "not valid JSON")


@pytest.mark.parametrize("header", [b'{"a": ' + b"1" * 5000 + b"}", b"[" * 100_000 + b"]" * 100_000])
def test_hostile_safetensors_header(bad, llama_args, header):
    (bad / WEIGHTS).write_bytes(struct.pack("<Q", len(header)) + header)
    refused(bad, llama_args, 5004, "adapter_model.safetensors", "JSON")


def test_long_names_are_cut_short(bad, llama_args):
    edit_tensors(bad, lambda t: t.update({"x" * 100_000: torch.ones(1)}))
    assert len(refused(bad, llama_args, 5004, "xxxx").message) <= 1000
