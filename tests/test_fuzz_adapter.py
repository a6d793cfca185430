"""Property-based fuzzing of the adapter parser (`load_adapter`) and the safetensors header check.

Properties: `load_adapter` returns a valid LoraAdapter or raises AdapterInvalid (code 3039 or 5004, a
message of at most 1000 characters), never another exception; each call takes under 2 s of CPU; its Python
allocations stay under 4 x the files' size + 8 MiB (tracemalloc), and the tensors it makes never
outgrow the file (declared sizes are never trusted). `check_header` returns TensorInfo consistent
with the bytes or raises SafetensorsFormatError.

The normal run is deterministic (derandomized, a few thousand examples). A deep, random run:

    .venv/bin/python -m pytest -q tests/test_fuzz_adapter.py -p tests.test_fuzz_adapter --hypothesis-profile=deep

(`-p` imports this file before pytest loads the profile, so that the profile is registered in time.)
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import struct
import sys
import time
import tracemalloc
from unittest import mock

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from safetensors.torch import save as save_safetensors

import loraplex.lora.adapter as adapter_module
from loraplex.api.errors import wire_of
from loraplex.errors import AdapterInvalid
from loraplex.lora.adapter import TARGETS, LoraAdapter, load_adapter
from loraplex.lora.safetensors_check import DTYPE_BITS, SafetensorsFormatError, TensorInfo, check_header
from loraplex.models.hf_config import read_model_args
from adapter_fuzzing import Pairs, Raw, dumps, edited_file, fuzz, garbage, huge_ints, json_values, mutated, nested, raw_numbers, split_file

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
MiB = 2**20
TIME_LIMIT_S = 2.0  # CPU seconds per load_adapter call (under tracemalloc, which slows allocation-heavy code)


# ---------------------------------------------------------------- the base model and valid seed adapters

BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32, "hidden_size": 16,
        "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}
BLOCK = {t: "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp" for t in TARGETS}
SQRT2 = math.sqrt(2)

# name → (config, tensor-name template, dtype, {(layer, target): (rank, scaling)})
SEEDS = {
    "list": (dict(peft_type="LORA", r=2, lora_alpha=4, target_modules=list(TARGETS), bias="none",
                  base_model_name_or_path="meta-llama/Llama-2-7b-hf"),
             "base_model.model.model.layers.{}.{}.{}.lora_{}.weight", torch.float32,
             {(layer, t): (2, 2.0) for layer in (0, 1) for t in TARGETS}),
    "regex": (dict(r=2, lora_alpha=3, use_rslora=True, target_modules=r".*\.(q_proj|v_proj|down_proj)",
                   rank_pattern={"down_proj": 1}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 5}),
              "model.layers.{}.{}.{}.lora_{}.default.weight", torch.bfloat16,
              {(0, "q_proj"): (2, 3 / SQRT2), (1, "q_proj"): (2, 5 / SQRT2), (0, "v_proj"): (2, 3 / SQRT2),
               (1, "v_proj"): (2, 3 / SQRT2), (0, "down_proj"): (1, 3.0), (1, "down_proj"): (1, 3.0)}),
    "layers": (dict(r=3, lora_alpha=6, target_modules=["up_proj", "o_proj", "v_proj"], layers_to_transform=[1],
                    layers_pattern="layers", exclude_modules=["model.layers.1.self_attn.v_proj"]),
               "base_model.model.model.layers.{}.{}.{}.lora_{}.weight", torch.float16,
               {(1, "up_proj"): (3, 2.0), (1, "o_proj"): (3, 2.0)}),
}


@pytest.fixture(scope="module")
def args(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    (folder / "config.json").write_text(json.dumps(BASE))
    return read_model_args(folder)


@pytest.fixture(scope="module")
def seeds(args):
    """name → (config bytes, weights bytes, {tensor name: tensor}) of each valid seed adapter."""
    out = {}
    gen = torch.Generator().manual_seed(0)
    for seed, (cfg, template, dtype, modules) in SEEDS.items():
        tensors = {}
        for (layer, target), (r, _) in modules.items():
            fan_in, fan_out = args.projection_shape(target)
            for ab, shape in (("A", (r, fan_in)), ("B", (fan_out, r))):
                name = template.format(layer, BLOCK[target], target, ab)
                tensors[name] = (torch.randn(shape, generator=gen) * 0.1).to(dtype)
        out[seed] = (json.dumps(cfg).encode(), save_safetensors(tensors, metadata={"format": "pt"}), tensors)
    return out


# ---------------------------------------------------------------- running one example and checking the contract

class Workdir:
    """One adapter folder per test, rewritten for each example (only the files that changed)."""

    def __init__(self, path):
        self.path, self.written = path, {}

    def place(self, config: bytes | None, weights: bytes | None) -> int:
        """Make the folder hold these two files (None: a folder in the file's place); returns their total size."""
        for name, data in ((CONFIG, config), (WEIGHTS, weights)):
            if name in self.written and self.written[name] == data:
                continue
            path = self.path / name
            if path.is_dir():
                path.rmdir()
            if data is None:
                path.unlink(missing_ok=True)
                path.mkdir()
            else:
                path.write_bytes(data)
            self.written[name] = data
        return len(config or b"") + len(weights or b"")


class TensorSpy:
    """Wraps the adapter module's tensor decoding to record how far its float32 buffers outgrow twice
    the bytes given (16-bit data doubles; nothing may grow more)."""

    def __init__(self):
        self.excess = 0  # largest (float32 buffer bytes - 2 x file bytes) seen since reset

    @contextlib.contextmanager
    def installed(self):
        real = adapter_module._float32_arrays

        def spy(data, infos):
            tensors, buffers = real(data, infos)
            self.excess = max(self.excess, sum(t.nbytes for t in buffers) - 2 * (len(data) - 8))
            return tensors, buffers

        with mock.patch.object(adapter_module, "_float32_arrays", spy):
            yield self


def check_error(err: AdapterInvalid) -> None:
    assert isinstance(err, AdapterInvalid) and wire_of(err)[0] in (3039, 5004), (type(err), err)
    assert isinstance(err.message, str) and 0 < len(err.message) <= 1000 and str(err) == err.message


def check_adapter(adapter: LoraAdapter, args, max_rank: int, weights_size: int) -> None:
    assert isinstance(adapter, LoraAdapter) and adapter.modules
    ranks = []
    for (layer, target), (a, b) in adapter.modules.items():
        assert 0 <= layer < args.num_layers and target in TARGETS
        fan_in, fan_out = args.projection_shape(target)
        r = a.shape[0]
        assert 1 <= r <= max_rank and tuple(a.shape) == (r, fan_in) and tuple(b.shape) == (fan_out, r)
        for t in (a, b):
            assert t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
            assert bool(torch.isfinite(t).all())
        ranks.append(r)
    assert adapter.rank == max(ranks)
    assert adapter.size_bytes <= 2 * weights_size  # at most F16 → F32 of what the file holds


def run_load(work: Workdir, args, spy: TensorSpy, config: bytes | None, weights: bytes | None, *, max_rank: int = 8,
             max_file_bytes: int = 100 * MiB) -> LoraAdapter | AdapterInvalid:
    """One fuzz example: write the files, load them under tracemalloc, check every part of the contract."""
    size = work.place(config, weights)
    spy.excess = 0
    tracemalloc.start()
    start, start_cpu = time.perf_counter(), time.process_time()
    try:
        try:
            result = load_adapter(work.path, args, max_rank=max_rank, max_file_bytes=max_file_bytes)
        except AdapterInvalid as e:
            result = e
        elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert cpu < TIME_LIMIT_S and elapsed < 10 * TIME_LIMIT_S, f"load took {cpu:.2f} s of CPU, {elapsed:.2f} s"
    assert peak <= 4 * size + 8 * MiB, f"peak Python allocation {peak} bytes for {size} bytes of files"
    assert spy.excess <= 0, f"float32 tensors {spy.excess} bytes larger than twice the file's data section"
    if isinstance(result, AdapterInvalid):
        check_error(result)
        assert (wire_of(result)[0] == 3039) == (config is None or weights is None), (wire_of(result)[0], result.message)
    else:
        check_adapter(result, args, max_rank, len(weights))
    return result


def test_seeds_load_exactly(args, seeds, tmp_path):
    """The fuzzers' starting points are valid: each seed loads with the expected ranks and scalings."""
    spy, work = TensorSpy(), Workdir(tmp_path)
    with spy.installed():
        for seed, (_, _, _, modules) in SEEDS.items():
            cfg, weights, tensors = seeds[seed]
            adapter = run_load(work, args, spy, cfg, weights)
            assert set(adapter.modules) == set(modules)
            template = SEEDS[seed][1]
            for (layer, target), (r, scaling) in modules.items():
                a, b = adapter.modules[layer, target]
                name = template.format(layer, BLOCK[target], target, "{}")
                assert a.shape[0] == r
                torch.testing.assert_close(a, tensors[name.format("A")].float(), rtol=0, atol=0)
                torch.testing.assert_close(b, tensors[name.format("B")].float() * scaling, rtol=1e-6, atol=0)


# ---------------------------------------------------------------- JSON building blocks


REGEX_ATOMS = [".*", ".", r"\.", "(", ")", "|", "*", "+", "?", "{2}", "{0,40}", "{,3}", "q_proj", "v_proj", "mlp",
               "layers", "self_attn", r"\d+", "[a-z_]", "[", "]", "^", "$", "(?:", "(?P<idx>", "(?=", "(?!", r"\1",
               "(?i)", "ü", "\\", "0", "1", "model", "_proj", "(?>", "*+"]
REDOS = [r"(.*)*x", r"(.|.)*x", r"(a|a)*b", ".*" * 12 + "x", r"(\w+\.?)*z", r"((m|m)(o|o)(d|d)(e|e)(l|l))*!",
         "(m|m)(o|o)(d|d)(e|e)(l|l)(.|.)(l|l)(a|a)(y|y)(e|e)(r|r)(s|s)(.|.)(0|0)(.|.)(s|s)(e|e)(l|l)(f|f)x",
         "(" * 1000 + ")" * 1000, "a{99999999999999999999}", "(?P<idx>a)", "(?:){100000000}x", "(?:a?){4000000000}",
         "((((?:){60}){60}){60}){60}x", "(?:x{0,64}){0,64}!"]
REAL_REGEXES = [r".*\.(q_proj|v_proj)", r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj", ".*_proj", "all-linear",
                r".*(q_proj|lm_head)", r".*layernorm", r"^(?!.*mlp).*proj$", r"layers\.[01]\.mlp\..*"]
regexes = st.one_of(st.sampled_from(REAL_REGEXES + REDOS),
                    st.text(alphabet="._*+?|()[]{}^$\\dwqvpkmlo0123", max_size=20),
                    st.lists(st.sampled_from(REGEX_ATOMS), max_size=8).map("".join))
module_names = st.one_of(st.sampled_from([*TARGETS, "lm_head", "embed_tokens", "q", "", "input_layernorm", "ü_proj",
                                          "model.layers.0.self_attn.q_proj", "layers.1.mlp.down_proj", "mlp.q_proj"]),
                         st.text(max_size=10))
targets = st.one_of(st.lists(module_names, max_size=8), regexes, garbage)
pattern_values = st.one_of(st.integers(-2, 5), huge_ints, st.floats(), garbage)
patterns = st.one_of(st.dictionaries(st.one_of(regexes, module_names), pattern_values, max_size=4), garbage)
layer_ids = st.one_of(st.integers(-2, 3), huge_ints, st.booleans())

CONFIG_VALUES = {
    "r": st.one_of(st.integers(-3, 10), huge_ints, st.floats(), raw_numbers, garbage),
    "lora_alpha": st.one_of(st.integers(-3, 10), huge_ints, st.floats(), raw_numbers, garbage),
    "target_modules": targets,
    "exclude_modules": targets,
    "rank_pattern": patterns,
    "alpha_pattern": patterns,
    "layers_to_transform": st.one_of(layer_ids, st.lists(st.one_of(layer_ids, garbage), max_size=4), garbage),
    "layers_pattern": st.one_of(regexes, st.lists(regexes, max_size=3), garbage),
    "use_rslora": st.one_of(st.booleans(), garbage),
    "bias": st.one_of(st.sampled_from(["none", "all", "lora_only"]), garbage),
    "peft_type": st.one_of(st.sampled_from(["LORA", "lora", "ADALORA"]), garbage),
    "init_lora_weights": st.one_of(st.sampled_from([True, False, "gaussian", "pissa", "PiSSA_niter_4", "olora", "eva"]),
                                   garbage),
    "base_model_name_or_path": st.one_of(st.sampled_from(["llama", "google/gemma-2b", "Qwen/Qwen2-0.5B",
                                                          "llama-mistral", "/models/x/", "\\\\server\\gemma"]),
                                         garbage),
    "model_type": st.one_of(st.sampled_from(["llama", "gemma", "qwen2", "mistral", ""]), garbage),
    **{key: garbage for key in ("modules_to_save", "use_dora", "lora_bias", "loftq_config", "quantization_config",
                                "bits", "use_qalora", "target_parameters", "layer_replication",
                                "trainable_token_indices")},
}


@st.composite
def configs(draw, seed_config: bytes) -> bytes:
    """adapter_config.json bytes: the seed's config with a few keys dropped or set to odd values, any JSON, or
    raw bytes."""
    kind = draw(st.sampled_from(["edit"] * 6 + ["json", "raw"]))
    if kind == "json":
        return dumps(draw(st.one_of(garbage, st.lists(json_values, max_size=4)))).encode()
    if kind == "raw":
        return draw(st.one_of(st.binary(max_size=64),
                              st.text(max_size=64).map(lambda s: s.encode("utf-8", "surrogatepass")),
                              st.sampled_from([b"\xef\xbb\xbf{}", b"{}", b"", "{\"r\": 2}".encode("utf-16"),
                                               b'{"r": ' + b"1" * 5000 + b"}", b"[" * 100_000 + b"]" * 100_000])))
    cfg = json.loads(seed_config)
    for key in draw(st.lists(st.sampled_from(list(CONFIG_VALUES)), min_size=1, max_size=4, unique=True)):
        if draw(st.integers(0, 5)) == 0:
            cfg.pop(key, None)
        else:
            cfg[key] = draw(CONFIG_VALUES[key])
    extra = draw(st.dictionaries(st.text(max_size=8), json_values, max_size=2))
    return dumps(extra | cfg).encode()


# ---------------------------------------------------------------- safetensors files


def tile(entries: list[tuple[str, str, list[int]]]) -> tuple[Pairs, int]:
    """Consistent entries (offsets packed in order) for (name, dtype, shape) triples; returns them and the data size."""
    pairs, position = Pairs(), 0
    for name, dtype, shape in entries:
        size = math.prod(shape) * DTYPE_BITS[dtype] // 8
        pairs.append((name, {"dtype": dtype, "shape": shape, "data_offsets": [position, position + size]}))
        position += size
    return pairs, position


@st.composite
def random_tensors(draw) -> tuple[Pairs, bytes]:
    """A valid file of a few small tensors of any dtype, as header pairs and data."""
    entries = []
    for name in draw(st.lists(st.text(max_size=10).filter(lambda s: s != "__metadata__"), max_size=5, unique=True)):
        dtype = draw(st.sampled_from(list(DTYPE_BITS)))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        if math.prod(shape) * DTYPE_BITS[dtype] % 8:
            shape.append(8)
        entries.append((name, dtype, shape))
    pairs, size = tile(entries)
    return pairs, random.Random(draw(st.integers(0, 2**32))).randbytes(size)


def st_file(header: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def check_tensor_infos(data: bytes, infos: dict[str, TensorInfo]) -> None:
    """check_header's answer agrees with the bytes: its own parse of the header, and an exact tiling."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    assert set(infos) == set(header) - {"__metadata__"}
    position = 0
    for name, info in sorted(infos.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        entry = header[name]
        assert isinstance(info, TensorInfo) and info.dtype == entry["dtype"] in DTYPE_BITS
        assert info.shape == tuple(entry["shape"]) and [info.begin, info.end] == entry["data_offsets"]
        assert math.prod(info.shape) * DTYPE_BITS[info.dtype] == 8 * (info.end - info.begin)
        assert info.begin == position
        position = info.end
    assert position == len(data) - 8 - n


def test_check_header_properties():
    outcomes = {"ok": 0, "refused": 0}
    names = ["a", "b", "ü", "__metadata__"]

    @fuzz(800)
    @given(st.one_of(random_tensors().flatmap(lambda base: edited_file(base, names)),
                     st.binary(max_size=64).map(lambda b: (b, True))))
    @example((st_file(b'{"t":{"dtype":"F32","shape":[1' + b"0" * 400 + b'],"data_offsets":[0,4]}}', bytes(4)),
              True))  # once an OverflowError (a byte size too large for a float, in the error message)
    def run(file):
        data, edited = file
        tracemalloc.start()
        start = time.process_time()
        try:
            try:
                infos = check_header(data)
            except SafetensorsFormatError:
                infos = None
            cpu, peak = time.process_time() - start, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert cpu < TIME_LIMIT_S and peak <= 4 * len(data) + 8 * MiB, (cpu, peak)
        if infos is None:
            assert edited, "a well-formed file was refused"
            outcomes["refused"] += 1
        else:
            check_tensor_infos(data, infos)
            outcomes["ok"] += 1

    run()
    assert outcomes["ok"] >= 100 and outcomes["refused"] >= 100, outcomes  # both sides were exercised


# ---------------------------------------------------------------- load_adapter

max_ranks = st.sampled_from([1, 2, 3, 8, 64])
LIMITS = [0, 8, 100, 4096, 64 * MiB, 2**62]


def file_limits(size: int):
    """max_file_bytes around the file's own size, or far from it."""
    return st.one_of(st.just(100 * MiB), st.sampled_from(LIMITS), st.integers(-16, 16).map(lambda d: max(0, size + d)))


def test_fuzzed_configs(args, seeds, tmp_path):
    """Odd values for every key the loader reads, any JSON, raw bytes: with each seed's valid weights."""
    seed_names = list(SEEDS)
    outcomes = {"ok": 0, "refused": 0}
    spy, work = TensorSpy(), Workdir(tmp_path)

    @fuzz(700)
    @given(st.integers(0, len(seed_names) - 1).flatmap(
        lambda i: st.tuples(st.just(i), configs(seeds[seed_names[i]][0]))), max_ranks)
    @example((0, b'{"target_modules": "(.|.)*x"}'), 8)  # ReDoS: once minutes per module name
    @example((0, b'{"target_modules": "(.*)*x"}'), 8)
    @example((0, b'{"target_modules": "(?:){100000000}x"}'), 8)  # once 23 s of re per module name
    @example((0, b'{"target_modules": "((((?:){60}){60}){60}){60}x"}'), 8)
    @example((1, dumps(SEEDS["regex"][0] | {"rank_pattern": {"(.*)*q": 2}}).encode()), 8)
    @example((0, b'{"target_modules": "' + b"(" * 1000 + b")" * 1000 + b'"}'), 8)  # once a RecursionError
    @example((0, b'{"target_modules": "a{99999999999999999999}"}'), 8)  # once an OverflowError
    @example((2, dumps(SEEDS["layers"][0] | {"layers_pattern": "(?P<idx>a)"}).encode()), 8)
    @example((0, dumps(SEEDS["list"][0] | {"exclude_modules": [nested(900, "")] * 100}).encode()), 8)  # once ~3 s
    @example((1, dumps(SEEDS["regex"][0] | {"rank_pattern": {f"layers.{i}.q_proj": 2 for i in range(2000)}}).encode()),
             8)
    def run(case, max_rank):
        i, config = case
        result = run_load(work, args, spy, config, seeds[seed_names[i]][1], max_rank=max_rank)
        outcomes["refused" if isinstance(result, AdapterInvalid) else "ok"] += 1

    with spy.installed():
        run()
    assert outcomes["ok"] >= 20 and outcomes["refused"] >= 200, outcomes


def test_fuzzed_safetensors_headers(args, seeds, tmp_path):
    """Each seed's valid config with its weights' header edited: odd dtypes and shapes, overlapping, shifted,
    swapped and huge offsets, huge declared sizes in a tiny file, duplicate names, metadata, bad length prefixes."""
    seed_names = list(SEEDS)
    names = sorted({name for seed in seeds.values() for name in seed[2]})
    bases = {seed: split_file(seeds[seed][1]) for seed in seed_names}
    outcomes = {"ok": 0, "refused": 0}
    spy, work = TensorSpy(), Workdir(tmp_path)

    @fuzz(500)
    @given(st.sampled_from(seed_names).flatmap(lambda s: st.tuples(st.just(s), edited_file(bases[s], names))),
           max_ranks, st.data())
    def run(case, max_rank, data):
        seed, (weights, edited) = case
        limit = data.draw(file_limits(len(weights)))
        result = run_load(work, args, spy, seeds[seed][0], weights, max_rank=max_rank, max_file_bytes=limit)
        if not edited and limit >= len(weights) and max_rank >= 3:
            assert isinstance(result, LoraAdapter), result  # an untouched seed still loads
        outcomes["refused" if isinstance(result, AdapterInvalid) else "ok"] += 1

    with spy.installed():
        run()
    assert outcomes["ok"] >= 20 and outcomes["refused"] >= 200, outcomes


def test_mutated_adapter_folders(args, seeds, tmp_path):
    seed_names = list(SEEDS)
    outcomes = {"ok": 0, "refused": 0}
    spy, work = TensorSpy(), Workdir(tmp_path)

    @fuzz(600)
    @given(st.sampled_from(seed_names).flatmap(lambda s: mutated(*seeds[s][:2])), max_ranks, st.data())
    def run(files, max_rank, data):
        config, weights = files
        limit = data.draw(file_limits(len(weights or b"")))
        result = run_load(work, args, spy, config, weights, max_rank=max_rank, max_file_bytes=limit)
        outcomes["refused" if isinstance(result, AdapterInvalid) else "ok"] += 1

    with spy.installed():
        run()
    assert outcomes["ok"] >= 10 and outcomes["refused"] >= 200, outcomes


# ---------------------------------------------------------------- deterministic sweeps and worst cases

NESTED_CONFIGS = {key: (lambda v, key=key: {key: v}) for key in (
    "r", "lora_alpha", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "use_rslora",
    "bias", "peft_type", "model_type", "modules_to_save")} | {
    "rank_pattern": lambda v: {"rank_pattern": {"q_proj": v}},
    "alpha_pattern": lambda v: {"alpha_pattern": {"q_proj": v}}}
ONE_TENSOR = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
NESTED_HEADERS = {field: (lambda v, field=field: {"t": ONE_TENSOR | {field: v}})
                  for field in ("dtype", "shape", "data_offsets")} | {
    "entry": lambda v: {"t": v}, "__metadata__": lambda v: {"__metadata__": v, "t": ONE_TENSOR}}


@pytest.mark.parametrize("where", [f"config:{k}" for k in NESTED_CONFIGS] + [f"header:{k}" for k in NESTED_HEADERS])
def test_nesting_just_under_the_json_depth_limit(args, seeds, tmp_path, where):
    """JSON nested just under the depth at which json.loads gives up (found by walking down from the limit): what
    handles the parsed value afterwards (a message, a regex, a comparison) runs a few frames deeper, and must not
    fail with RecursionError (or take long) either."""
    spy, work = TensorSpy(), Workdir(tmp_path)
    cfg, weights, _ = seeds["list"]
    side, key = where.split(":")

    def parses(depth: int) -> bool:
        value = nested(depth, "")
        if side == "config":
            result = run_load(work, args, spy, dumps(json.loads(cfg) | NESTED_CONFIGS[key](value)).encode(), weights)
        else:
            result = run_load(work, args, spy, cfg, st_file(dumps(NESTED_HEADERS[key](value)).encode(), bytes(4)))
        return not (isinstance(result, AdapterInvalid) and "JSON" in result.message)

    with spy.installed():
        deepest, too_deep = 1, sys.getrecursionlimit() + 10
        assert parses(deepest) and not parses(too_deep)
        while too_deep - deepest > 1:  # bisect for the deepest nesting that json.loads takes here
            middle = (deepest + too_deep) // 2
            deepest, too_deep = (middle, too_deep) if parses(middle) else (deepest, middle)
        for depth in range(deepest - 24, deepest + 3):
            parses(depth)


@pytest.mark.parametrize("where", ["config", "header"])
@pytest.mark.parametrize("size", [100 * 2**10, 250 * 2**10, 2 * MiB])
def test_json_heavy_files_stay_within_memory(args, seeds, tmp_path, where, size):
    """JSON that costs the most memory per byte once parsed (empty objects: ~25 bytes per byte) stays within the
    same bound: the config and the header are capped in size (a 2 MiB config once peaked at 150 MB)."""
    cfg, weights, _ = seeds["list"]
    filler = Raw("[" + ",".join(["{}"] * (size // 3)) + "]")
    if where == "config":
        cfg = dumps(json.loads(cfg) | {"x": filler}).encode()
    else:
        weights = st_file(dumps(Pairs([("__metadata__", {}), ("x", filler)])).encode(), b"")
    result = run_load(Workdir(tmp_path), args, TensorSpy(), cfg, weights)
    loads = where == "config" and len(cfg) <= adapter_module.MAX_CONFIG_BYTES  # an unknown key is ignored
    assert isinstance(result, LoraAdapter) == loads, result


@pytest.mark.parametrize("layer", ["1" * 5000, "\u0661", "01", "0001"])  # 5000 digits once escaped as ValueError
def test_layer_numbers_not_as_peft_writes_them(args, seeds, tmp_path, layer):
    """A layer number int() takes but PEFT never writes (5000 digits, an Arabic-Indic one, leading zeros)."""
    cfg, _, tensors = seeds["list"]
    renamed = {name.replace("layers.1.", f"layers.{layer}."): t for name, t in tensors.items()}
    result = run_load(Workdir(tmp_path), args, TensorSpy(), cfg, save_safetensors(renamed))
    assert isinstance(result, AdapterInvalid) and wire_of(result)[0] == 5004, result
    assert "does not name a module" in result.message or len(result.message) == 1000  # cut short: a long name
