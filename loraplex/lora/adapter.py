"""PEFT LoRA folders → validated, scaled float32 factors (`LoraAdapter`), or `AdapterInvalid`.

Only `adapter_config.json` and `adapter_model.safetensors` are read; nothing is ever unpickled. The
safetensors header is checked by `safetensors_check` before the bytes reach the safetensors
library. Module targeting (`target_modules`, `exclude_modules`, `layers_to_transform` /
`layers_pattern`) and `rank_pattern` / `alpha_pattern` lookups follow PEFT's matching rules, applied
to module names as PEFT saves them (`model.layers.{i}.self_attn.q_proj`).

Tenant files are hostile until checked: reads are capped by size (json.loads can take ~25 bytes of memory per
byte of JSON), and every regex a config carries has a bounded backtracking cost (see `_paths`) before it runs.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from dataclasses import dataclass
from pathlib import Path
from re import _constants as _sre, _parser as _sre_parser  # the stdlib's regex parse tree, for _paths

import numpy as np
import torch

from loraplex.config import DEFAULT_MAX_ADAPTER_BYTES, DEFAULT_MAX_LORA_RANK
from loraplex.errors import AdapterFilesMissing, AdapterInvalid
from loraplex.lora.safetensors_check import SafetensorsFormatError, TensorInfo, check_header
from loraplex.models.hf_config import ModelArgs

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_FAMILIES = ("llama", "mistral", "gemma", "qwen")
# base model types whose layers hold more modules than Llama's (a target_modules regex must not hit them)
_QK_NORMED = ("qwen3", "gemma3", "gemma3_text")
_SANDWICH_NORMED = ("gemma2", "gemma3", "gemma3_text")
_FLOAT_BYTES = {"F32": 4, "F16": 2, "BF16": 2}  # the dtypes an adapter may use, and their sizes
# config flags whose truthy value changes the forward pass in ways plain LoRA cannot serve
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)", "lora_bias": "a bias on lora_B (lora_bias)",
    "target_parameters": "target_parameters", "trainable_token_indices": "trainable_token_indices",
    "layer_replication": "layer_replication", "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)", "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)", "arrow_config": "Arrow routing (arrow_config)",
}
_QUANT_KEYS = ("loftq_config", "use_qalora", "quantization_config", "quant_method", "bits", "load_in_4bit", "load_in_8bit")
_QUANT_PARTS = {"absmax", "quant_state", "quant_map", "nested_absmax", "nested_quant_map", "qweight", "qzeros",
                "scales", "g_idx", "SCB", "weight_format", "weight_scale", "input_scale"}
# init_lora_weights values under which PEFT rewrites the *base* weights: unusable on the original base
_BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
_TENSOR_RE = re.compile(r"(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<ab>[AB])(?:\.[\w\-]+)?\.weight")
# layer numbers as PEFT writes them: no leading zeros, ASCII digits only (int() accepts '٣' and 5000 digits)
_MODULE_RE = re.compile(r"(?:model\.)?layers\.(?P<layer>0|[1-9][0-9]{0,8})\.(?P<block>self_attn|mlp)\.\w+")
MAX_CONFIG_BYTES = 2**18  # PEFT writes ~1 KiB; rank_pattern and alpha_pattern for every module of 80 layers ~60 KiB
_NAME_LEN = 64  # longer than any module name a config regex is matched against (base names, _MODULE_RE keys)
# a tenant's layers_pattern inside a group of its own: a top-level `|` in it must not split the
# whole expression (one branch would match without the layer index)
_LAYERS_PATTERN_TEMPLATE = r"(?:^|.*?\.)(?:{})\.(?P<idx>\d+)\."
_MAX_REGEX_PATHS = 100_000  # per module name, summed over a config's regexes: ~10 ms of re per name at worst


def _invalid(message: str) -> AdapterInvalid:
    return AdapterInvalid(message)


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """A loaded adapter. `modules[(layer, target)] = (A [r, in], B [out, r])`: float32, CPU,
    contiguous, with the module's scaling already folded into B, so that delta_W = B @ A."""

    name: str
    path: str
    rank: int  # the largest rank over its modules
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def size_bytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.modules.values())


# a Hugging Face model_type of a family, with its generation: qwen2, qwen3, gemma2, gemma3_text
_MODEL_TYPE_RE = re.compile(r"(?P<family>llama|mistral|gemma|qwen)(?P<version>[0-9]{1,2})?(?:_text)?")


def _family(name) -> str | None:
    """The one model family named in `name` (last path component, case-insensitive), else None."""
    if not isinstance(name, str):
        return None
    found = [f for f in _FAMILIES if f in name.rstrip("/\\").replace("\\", "/").split("/")[-1].lower()]
    return found[0] if len(found) == 1 else None


def _generation(model_type, base: bool) -> str | None:
    """The generation a model_type names ('qwen3' → '3', 'gemma3_text' → '3'), else None. Only exact
    model_type values count: repository names are ambiguous (gemma-2b is Gemma 1, Qwen1.5 is qwen2).
    A base's bare 'gemma' is Gemma 1 (HF's model_type); an adapter's bare family name ('gemma',
    'qwen', as Workers AI adapters write it) names no generation and fits every one."""
    match = _MODEL_TYPE_RE.fullmatch(model_type.lower()) if isinstance(model_type, str) else None
    if match is None:
        return None
    if match["version"] is None and base and match["family"] == "gemma":
        return "1"
    return match["version"]


_SHORT = reprlib.Repr()  # renders only the first levels and items: repr() of a deep list costs depth**2
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 3, 80, 80


def _show(value) -> str:
    """A config value for an error message, cut short (before rendering: values come from tenant files)."""
    text = _SHORT.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _all_finite(a: np.ndarray) -> bool:
    """No NaN/Inf in `a`. One reduction in the common case (a NaN or Inf anywhere makes the sum
    non-finite); the exact element check only when the sum is not finite (it may overflow)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(a.sum())) or bool(np.isfinite(a).all())


def _positive(value, label: str, integer: bool):
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    try:
        ok = ok and value > 0 and math.isfinite(float(value))  # float() of a huge int overflows
    except OverflowError:
        ok = False
    if not ok:
        kind = "a positive integer" if integer else "a positive number"
        raise _invalid(f"adapter_config.json {label} must be {kind}, got {_show(value)}")
    return value


def _paths(items) -> int:
    """An upper bound, capped just past _MAX_REGEX_PATHS, on the backtracking paths (and steps) of a parsed regex
    over a name of at most _NAME_LEN characters: a sequence multiplies, a branch adds, a repeat of a one-way body
    costs its iteration count, of a k-way body k**iterations. So re's time on a module name is bounded whatever
    the pattern; nested or stacked quantifiers (ReDoS: '(.|.)*x', '.*.*.*.*x', '((a{60}){60}){60}') and repeats
    needing more iterations than a name has characters ('(?:){100000000}') exceed the cap."""
    total = 1
    for op, av in items:
        if op == _sre.BRANCH:
            n = sum(_paths(p) for p in av[1])
        elif op == _sre.GROUPREF_EXISTS:
            n = _paths(av[1]) + (_paths(av[2]) if av[2] else 1)
        elif op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT, _sre.POSSESSIVE_REPEAT):
            lo, hi, body = av
            top, w = min(hi, _NAME_LEN), _paths(body)
            if lo > top:
                n = _MAX_REGEX_PATHS + 1
            else:
                n = top + 1 if w == 1 else sum(w**k for k in range(lo, top + 1))
        elif op == _sre.ATOMIC_GROUP:
            n = _paths(av)
        elif op in (_sre.SUBPATTERN, _sre.ASSERT, _sre.ASSERT_NOT):
            n = _paths(av[-1])
        else:  # one character, an anchor, a backreference
            n = 1
        total = min(total * max(n, 1), _MAX_REGEX_PATHS + 1)
    return total


def _compile(pattern, label: str, template: str = "{}") -> int:
    """Refuse a pattern that is not a string, does not compile inside PEFT's `template`, or could backtrack for too
    long; returns its cost (see _paths)."""
    try:
        regex = template.format(pattern)
        re.compile(regex)
        paths = _paths(_sre_parser.parse(regex))
    except (re.error, TypeError, AttributeError, OverflowError, RecursionError) as e:
        raise _invalid(f"adapter_config.json {label} has an invalid regex {_show(pattern)} ({e})") from None
    if paths > _MAX_REGEX_PATHS:
        raise _invalid(f"adapter_config.json {label} {_show(pattern)} is too costly a regex to match (nested, "
                       "stacked or long repeats)")
    return paths


def _base_module_names(args: ModelArgs) -> list[str]:
    """Every module name of the base model that a target_modules regex might hit."""
    names = ["model", "model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head"]
    for i in range(args.num_layers):
        p = f"model.layers.{i}"
        names += [p, f"{p}.self_attn", f"{p}.mlp", f"{p}.mlp.act_fn", f"{p}.input_layernorm",
                  f"{p}.post_attention_layernorm"] + [f"{p}.{_BLOCK[t]}.{t}" for t in TARGETS]
        if args.model_type in _QK_NORMED:
            names += [f"{p}.self_attn.q_norm", f"{p}.self_attn.k_norm"]
        if args.model_type in _SANDWICH_NORMED:
            names += [f"{p}.pre_feedforward_layernorm", f"{p}.post_feedforward_layernorm"]
    return names


def _check_config(cfg, args: ModelArgs) -> dict:
    """Validate adapter_config.json's content; returns it with defaults filled in."""
    if not isinstance(cfg, dict):
        raise _invalid(f"adapter_config.json holds a JSON {type(cfg).__name__}, not an object")
    cfg = {"r": 8, "lora_alpha": 8, "use_rslora": False, "bias": "none", "rank_pattern": {}, "alpha_pattern": {}} | {
        k: v for k, v in cfg.items() if v is not None}
    if cfg.get("peft_type", "LORA") != "LORA":
        raise _invalid(f"adapter_config.json 'peft_type' is {_show(cfg['peft_type'])}; only 'LORA' is supported")
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            raise _invalid(f"adapter_config.json '{key}': {what} is not supported")
    for key in _QUANT_KEYS:
        if cfg.get(key):
            raise _invalid(f"adapter_config.json '{key}': quantized adapters are not supported")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise _invalid(f"adapter_config.json 'init_lora_weights' is {_show(init)}: such adapters need PEFT's modified "
                       "base weights; save them with path_initial_model_for_weight_conversion")
    if cfg.get("modules_to_save"):
        raise _invalid(f"adapter_config.json 'modules_to_save' is {_show(cfg['modules_to_save'])}; full-weight modules "
                       "are not supported")
    if cfg["bias"] != "none":
        raise _invalid(f"adapter_config.json 'bias' is {_show(cfg['bias'])}; only 'none' is supported")
    _positive(cfg["r"], "'r'", integer=True)
    _positive(cfg["lora_alpha"], "'lora_alpha'", integer=False)
    if not isinstance(cfg["use_rslora"], bool):
        raise _invalid(f"adapter_config.json 'use_rslora' must be true or false, got {_show(cfg['use_rslora'])}")
    cost = 0  # backtracking paths per module name, over every regex below
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg[key], dict):
            raise _invalid(f"adapter_config.json '{key}' must be an object")
        for pattern in cfg[key]:
            label = f"'{key}' entry {_show(pattern)}"
            cost += _compile(pattern, label, r"(.*\.)?({})$")
            if cost > _MAX_REGEX_PATHS:
                raise _too_many_regexes()
            _positive(cfg[key][pattern], label, integer=key == "rank_pattern")
    want = _family(args.model_type)
    for key in ("model_type", "base_model_name_or_path"):
        got = _family(cfg.get(key))
        if want and got and got != want:
            raise _invalid(f"adapter_config.json '{key}' is {_show(cfg[key])} ({got} family) but the base model is "
                           f"{args.model_type!r}")
    want_gen, got_gen = _generation(args.model_type, base=True), _generation(cfg.get("model_type"), base=False)
    if want and want == _family(cfg.get("model_type")) and want_gen and got_gen and want_gen != got_gen:
        raise _invalid(f"adapter_config.json 'model_type' is {_show(cfg['model_type'])} but the base model is "
                       f"{args.model_type!r}")
    if cost + _check_targets(cfg, args) > _MAX_REGEX_PATHS:
        raise _too_many_regexes()
    return cfg


def _too_many_regexes() -> AdapterInvalid:
    return _invalid("adapter_config.json holds too many regexes (rank_pattern, alpha_pattern, target_modules, "
                    "exclude_modules, layers_pattern) to match them in bounded time")


def _check_targets(cfg: dict, args: ModelArgs) -> int:
    """Validate the targeting keys; returns the cost of their regexes (see _paths)."""
    targets, cost = cfg.get("target_modules"), 0
    if targets == "all-linear":
        cfg["target_modules"] = targets = list(TARGETS)
    if isinstance(targets, str):
        cost += _compile(targets, "'target_modules'")
        for name in _base_module_names(args):
            if re.fullmatch(targets, name) and name.rsplit(".", 1)[-1] not in TARGETS:
                raise _invalid(f"adapter_config.json 'target_modules' regex {_show(targets)} matches '{name}'; only "
                               f"{', '.join(TARGETS)} can be adapted")
    elif isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        for t in targets:
            if t.rsplit(".", 1)[-1] not in TARGETS:
                raise _invalid(f"adapter_config.json 'target_modules' names '{t}'; only {', '.join(TARGETS)} "
                               "can be adapted")
    else:
        raise _invalid(f"adapter_config.json 'target_modules' must be a list of names or a regex, got {_show(targets)}")
    layers = cfg.get("layers_to_transform", [])
    for i in layers if isinstance(layers, list) else [layers]:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < args.num_layers:
            raise _invalid(f"adapter_config.json 'layers_to_transform' has {_show(i)}; the base model has layers "
                           f"0..{args.num_layers - 1}")
    patterns = cfg.get("layers_pattern", [])
    for p in patterns if isinstance(patterns, list) else [patterns]:
        if not isinstance(p, str):
            raise _invalid(f"adapter_config.json 'layers_pattern' has {_show(p)}, not a string")
        cost += _compile(p, "'layers_pattern'", _LAYERS_PATTERN_TEMPLATE)
    excluded = cfg.get("exclude_modules")
    if isinstance(excluded, str):
        cost += _compile(excluded, "'exclude_modules'")
    elif excluded is not None and not (isinstance(excluded, list) and all(isinstance(e, str) for e in excluded)):
        raise _invalid(f"adapter_config.json 'exclude_modules' must be a list of names or a regex, got "
                       f"{_show(excluded)}")
    return cost


def _is_targeted(cfg: dict, key: str) -> bool:
    """PEFT's check_target_module_exists, for a module `key` such as 'model.layers.0.mlp.up_proj'."""
    excluded = cfg.get("exclude_modules")
    if isinstance(excluded, str) and re.fullmatch(excluded, key):
        return False
    if isinstance(excluded, list) and (key in excluded or any(key.endswith(f".{e}") for e in excluded)):
        return False
    targets = cfg["target_modules"]
    if isinstance(targets, str):  # PEFT ignores layers_to_transform for a regex
        return re.fullmatch(targets, key) is not None
    if key in targets:  # an exact name also bypasses layers_to_transform in PEFT
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    layers = cfg.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    patterns = cfg.get("layers_pattern")
    patterns = [patterns] if isinstance(patterns, str) else (patterns or [])
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    for p in patterns:
        match = re.match(_LAYERS_PATTERN_TEMPLATE.format(p), key)
        if match:
            break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def _pattern_value(patterns: dict, key: str, default):
    """PEFT's get_pattern_key: the first pattern (in file order) that matches a suffix of `key`."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _read_file(file: Path, limit: int) -> bytearray:
    """The bytes of `file`, refused from its size alone when over `limit`. Reads what stat reported (plus one byte,
    to notice growth), never `limit` bytes: a buffer sized by the limit would be allocated in full. A bytearray,
    so that tensors can be made over it without a copy."""
    size = file.stat().st_size
    if size > limit:
        raise _invalid(f"{file.name} is {size} bytes, over the limit of {limit}")
    data = bytearray(size + 1)
    with open(file, "rb") as f:
        read = f.readinto(data)
    if read > size:
        raise _invalid(f"{file.name} grew while it was read")
    del data[read:]
    return data


def max_header_bytes(args: ModelArgs) -> int:
    """The longest safetensors header an adapter for `args` may have: 256 KiB (metadata, long names) plus 512 bytes
    per possible lora_A/lora_B tensor. Bounds what json.loads makes of it (up to ~25 bytes per byte)."""
    return 2**18 + 2**9 * 2 * len(TARGETS) * args.num_layers


def _read_config(folder: Path, args: ModelArgs) -> dict:
    return check_config_file(folder / "adapter_config.json", args)


def check_config_file(file: Path, args: ModelArgs) -> dict:
    """Read and validate an adapter_config.json on its own (no weights needed): size, JSON, every
    key's value, targets and regexes for the base model `args`. Returns the config with defaults
    filled in; raises AdapterInvalid naming the offending key."""
    data = _read_file(file, MAX_CONFIG_BYTES)
    try:
        cfg = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, 4300+ digit numbers, deep nesting
        raise _invalid(f"adapter_config.json is not valid JSON ({str(e)[:200]})") from None
    return _check_config(cfg, args)


def _read_safetensors(file: Path, max_file_bytes: int, args: ModelArgs) -> tuple[bytearray, dict[str, TensorInfo]]:
    data = _read_file(file, max_file_bytes)
    try:
        return data, check_header(data, max_header_bytes=max_header_bytes(args))
    except SafetensorsFormatError as e:
        raise _invalid(f"adapter_model.safetensors is corrupt: {e}") from None


def _to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Little-endian F32 / F16 / BF16 bytes (an aligned uint8 array) → float32; F32 is the same memory."""
    if dtype == "F32":
        return raw.view(np.float32)
    if dtype == "F16":
        return raw.view(np.float16).astype(np.float32)
    return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)  # BF16: a float32's high half


def _float32_arrays(data: bytearray, infos: dict[str, TensorInfo]) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """Every tensor of a safetensors file whose header `check_header` accepted, as a float32 array,
    and the buffers they are views of (checking those covers every tensor). When the file holds a
    single dtype (the usual case) its whole data section is converted in one operation and each
    tensor is a view of the result; F32 data is used in place (`data` is ours).

    numpy, not torch: a few large operations instead of hundreds of small ones, so a parse on a
    worker thread barely holds the GIL the engine step needs; and numpy runs them on the calling
    thread alone, where a torch op this large would start an OpenMP team on the worker thread, and
    once threads outnumber cores libgomp stops spin-waiting for every team, which slows the
    engine's later steps (measured in benchmarks/RESULTS.md)."""
    start = 8 + int.from_bytes(data[:8], "little")
    section = np.frombuffer(data, dtype=np.uint8)[start:]
    if start % 4:  # keep every element aligned
        section = section.copy()
    dtypes = {info.dtype for info in infos.values()}
    if len(dtypes) == 1:
        dtype = dtypes.pop()
        whole = _to_float32(section, dtype)
        size = _FLOAT_BYTES[dtype]
        return {name: whole[info.begin // size : info.end // size].reshape(info.shape) for name, info in infos.items()}, [whole]
    arrays = {}
    for name, info in infos.items():
        chunk = section[info.begin : info.end]
        if info.begin % _FLOAT_BYTES[info.dtype]:
            chunk = chunk.copy()
        arrays[name] = _to_float32(chunk, info.dtype).reshape(info.shape)
    return arrays, list(arrays.values())


def _parse_name(name: str, info: TensorInfo, cfg: dict, args: ModelArgs) -> tuple[int, str, str, str]:
    """Validate one tensor's name, dtype and rank; returns (layer, target, 'A' | 'B', module key)."""
    parts = name.split(".")
    if _QUANT_PARTS.intersection(parts) or "quant_state" in name:
        raise _invalid(f"tensor '{name}' holds quantization state; quantized adapters are not supported")
    if "lora_magnitude_vector" in parts:
        raise _invalid(f"tensor '{name}' is a DoRA magnitude; DoRA is not supported")
    if any(p.startswith("lora_embedding") for p in parts):
        raise _invalid(f"tensor '{name}' adapts an embedding; only {', '.join(TARGETS)} can be adapted")
    if "modules_to_save" in parts or name.endswith(("lm_head.weight", "embed_tokens.weight")):
        raise _invalid(f"tensor '{name}' is a full-weight module: modules_to_save is not supported")
    m = _TENSOR_RE.fullmatch(name)
    if m is None:
        raise _invalid(f"tensor '{name}' is not a lora_A/lora_B weight (full-weight or unknown tensors are not supported)")
    key = m["module"]
    target = key.rsplit(".", 1)[-1]
    if target not in TARGETS:
        raise _invalid(f"tensor '{name}' adapts '{target}'; only {', '.join(TARGETS)} can be adapted")
    mm = _MODULE_RE.fullmatch(key)
    if mm is None or mm["block"] != _BLOCK[target]:
        raise _invalid(f"tensor '{name}' does not name a module of the base model")
    layer = int(mm["layer"])
    if layer >= args.num_layers:
        raise _invalid(f"tensor '{name}' is for layer {layer}; the base model has {args.num_layers} layers")
    if not _is_targeted(cfg, key):
        raise _invalid(f"tensor '{name}' is for '{key}', which adapter_config.json does not target")
    if info.dtype not in _FLOAT_BYTES:
        kind = "quantized " if info.dtype.startswith(("I", "U", "F8", "F6", "F4")) else ""
        raise _invalid(f"tensor '{name}' has {kind}dtype {info.dtype}; only F32, F16 and BF16 are supported")
    return layer, target, m["ab"], key


def load_adapter(path: str | Path, args: ModelArgs, *, name: str | None = None, max_rank: int = DEFAULT_MAX_LORA_RANK,
                 max_file_bytes: int = DEFAULT_MAX_ADAPTER_BYTES) -> LoraAdapter:
    """Read and validate the PEFT LoRA folder `path` for the base model described by `args`.

    Every tensor must be the lora_A/lora_B weight of a module the config targets; a targeted
    module with neither tensor is left out (PEFT would leave it a zero delta). Blocking (file I/O,
    parsing): call it from a worker thread. Raises AdapterFilesMissing for a missing or unreadable
    folder/file, AdapterInvalid for anything unservable; never returns a partially checked adapter.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterFilesMissing(f"adapter folder {folder} does not exist (or is not a folder)")
    if not (folder / "adapter_config.json").is_file():
        raise AdapterFilesMissing(f"{folder} has no adapter_config.json")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        if (folder / "adapter_model.bin").exists():
            raise AdapterFilesMissing(f"{folder} has only adapter_model.bin: pickled .bin files are never loaded; "
                                      "convert it to adapter_model.safetensors")
        raise AdapterFilesMissing(f"{folder} has no adapter_model.safetensors")
    try:
        cfg = _read_config(folder, args)
        data, infos = _read_safetensors(weights, max_file_bytes, args)
    except OSError as e:
        raise AdapterFilesMissing(f"{folder}: adapter files cannot be read ({e.strerror or e})") from None

    pairs: dict[tuple[int, str], dict[str, tuple[str, TensorInfo]]] = {}
    keys: dict[tuple[int, str], str] = {}
    for tensor_name, info in infos.items():
        layer, target, ab, keys[layer, target] = _parse_name(tensor_name, info, cfg, args)
        slot = pairs.setdefault((layer, target), {})
        if ab in slot:
            raise _invalid(f"tensors '{slot[ab][0]}' and '{tensor_name}' are both lora_{ab} of one module")
        slot[ab] = (tensor_name, info)
    if not pairs:
        raise _invalid("adapter_model.safetensors holds no LoRA tensors")

    ranks: dict[tuple[int, str], int] = {}
    for (layer, target), slot in pairs.items():
        key = keys[layer, target]
        if set(slot) != {"A", "B"}:
            have, miss = ("A", "B") if "A" in slot else ("B", "A")
            raise _invalid(f"tensor '{slot[have][0]}' has no matching lora_{miss} for module '{key}'")
        r = _pattern_value(cfg["rank_pattern"], key, cfg["r"])
        fan_in, fan_out = args.projection_shape(target)
        for ab, want in (("A", (r, fan_in)), ("B", (fan_out, r))):
            tensor_name, info = slot[ab]
            if info.shape != want:
                raise _invalid(f"tensor '{tensor_name}' has shape {list(info.shape)}; module '{key}' of the base "
                               f"model with r={r} needs {list(want)}")
        if r > max_rank:
            raise _invalid(f"module '{key}' has rank {r}, over the maximum rank {max_rank} (raised by the server "
                           "option --max-lora-rank, or LLM(max_lora_rank=...) offline)")
        ranks[layer, target] = r

    try:
        arrays, buffers = _float32_arrays(data, infos)
    except Exception as e:  # header already checked; anything left is corruption
        raise _invalid(f"adapter_model.safetensors could not be read: {e}") from None
    modules, scalings = {}, {}
    for (layer, target), slot in sorted(pairs.items()):
        key, r = keys[layer, target], ranks[layer, target]
        alpha = _pattern_value(cfg["alpha_pattern"], key, cfg["lora_alpha"])
        scalings[slot["B"][0]] = alpha / math.sqrt(r) if cfg["use_rslora"] else alpha / r
        b = arrays[slot["B"][0]]
        with np.errstate(over="ignore"):  # an overflow to Inf is refused just below
            b *= scalings[slot["B"][0]]
        modules[layer, target] = (torch.from_numpy(arrays[slot["A"][0]]), torch.from_numpy(b))
    if not all(_all_finite(buffer) for buffer in buffers):
        for tensor_name, t in arrays.items():
            if not _all_finite(t):
                note = f" once scaled by {scalings[tensor_name]:g}" if tensor_name in scalings else ""
                raise _invalid(f"tensor '{tensor_name}' holds NaN or Inf values{note}")
    return LoraAdapter(name=name or folder.name, path=str(folder), rank=max(ranks.values()), modules=modules)
