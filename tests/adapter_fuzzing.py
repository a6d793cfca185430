"""Hypothesis strategies that generate hostile PEFT adapter files, shared by the loader's fuzz
tests (test_fuzz_adapter.py) and the upload route's (test_upload_fuzz_http.py): byte-level
mutations of a real adapter, edited safetensors headers, and the `fuzz(examples)` settings (the
"deep" profile runs many random examples instead)."""

from __future__ import annotations

import json
import math
import struct

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from loraplex.lora.safetensors_check import DTYPE_BITS

# No hypothesis deadline: it measures wall time, which a busy 2-core machine stretches; run_load bounds each
# example's CPU time instead (a runaway regex or loop burns CPU).
settings.register_profile("deep", max_examples=50_000, deadline=None, derandomize=False, database=None,
                          suppress_health_check=list(HealthCheck))
_DEEP = settings.get_current_profile_name() == "deep"


def fuzz(examples: int) -> settings:
    """`examples` deterministic examples; under the deep profile, the profile's many random ones."""
    if _DEEP:
        return settings(settings.get_profile("deep"))
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example])


class Raw(str):
    """JSON text spliced in verbatim (nesting too deep for json.dumps, numbers it would not write)."""


class Pairs(list):
    """A JSON object written from (key, value) pairs: keys may repeat."""


def dumps(value) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, (dict, Pairs)):
        items = value.items() if isinstance(value, dict) else value
        return "{" + ",".join(f"{json.dumps(str(k))}:{dumps(v)}" for k, v in items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    return json.dumps(value)


def nested(depth: int, inner: str = "1") -> Raw:
    return Raw("[" * depth + inner + "]" * depth)


HUGE = [2**31, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**40, 10**400, -(2**63)]


huge_ints = st.sampled_from(HUGE)


deep = st.one_of(st.integers(1, 3000).map(nested), st.integers(1, 3000).map(lambda n: Raw('{"a":' * n + "1" + "}" * n)))


raw_numbers = st.sampled_from([Raw("1" * 4299), Raw("9" * 4301), Raw("1e999"), Raw("-1e999"), Raw("NaN"),
                               Raw("Infinity"), Raw("1e-999"), Raw("-0"), Raw("4.0"), Raw("0x10")])


scalars = st.one_of(st.none(), st.booleans(), st.integers(), huge_ints, st.floats(), st.text(max_size=12))


json_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=3)
                           | st.dictionaries(st.text(max_size=6), kids, max_size=3), max_leaves=8)


garbage = st.one_of(json_values, deep, raw_numbers)


def split_file(data: bytes) -> tuple[Pairs, bytes]:
    """A valid safetensors file → its header as (name, entry) pairs and its data section."""
    (n,) = struct.unpack("<Q", data[:8])
    return Pairs(json.loads(data[8 : 8 + n]).items()), data[8 + n :]


offsets = st.one_of(st.lists(st.one_of(st.integers(-5, 5000), huge_ints), max_size=3), garbage)


FIELD_VALUES = {
    "dtype": st.one_of(st.sampled_from([*DTYPE_BITS, "I4", "f32", "", "F32 ", "float32", "Q4_0"]), garbage),
    "shape": st.one_of(st.lists(st.one_of(st.integers(-1, 70), huge_ints), max_size=9), garbage),
    "data_offsets": offsets,
}


EDITS = ["field", "field", "huge", "drop", "dup", "swap", "entry", "meta", "rename", "shift"]


@st.composite
def edited_file(draw, base: tuple[Pairs, bytes], names: list[str]) -> tuple[bytes, bool]:
    """A safetensors file built from `base` with 0-3 edits to its header, data length or length prefix;
    returns the bytes and whether anything was edited."""
    pairs = Pairs((k, dict(v) if isinstance(v, dict) else v) for k, v in base[0])
    data, edited = base[1], False
    for _ in range(draw(st.integers(0, 3))):
        edited = True
        edit, i = draw(st.sampled_from(EDITS)), draw(st.integers(0, 99))
        if pairs and edit in ("field", "huge", "entry", "rename", "shift", "swap", "drop", "dup"):
            i %= len(pairs)
            name, entry = pairs[i]
            entry = entry if isinstance(entry, dict) else {}
            if edit == "field":
                field = draw(st.sampled_from(list(FIELD_VALUES)))
                pairs[i] = (name, entry | {field: draw(FIELD_VALUES[field])})
            elif edit == "huge":  # sizes that agree with each other and not with the file
                dims = draw(st.lists(st.sampled_from([2**20, 2**31, 2**40, 2**62]), min_size=1, max_size=3))
                begin = draw(st.sampled_from([0, len(data), 2**62]))
                pairs[i] = (name, {"dtype": "F32", "shape": dims, "data_offsets": [begin, begin + 4 * math.prod(dims)]})
            elif edit == "entry":
                pairs[i] = (name, draw(garbage))
            elif edit == "rename":
                pairs[i] = (draw(st.one_of(st.sampled_from(names), st.text(max_size=12))), entry)
            elif edit == "shift":
                delta, old = draw(st.integers(-3, 3)), entry.get("data_offsets")
                pairs[i] = (name, entry | {"data_offsets": [o + delta if isinstance(o, int) else o
                                                            for o in (old if isinstance(old, list) else [0, 0])]})
            elif edit == "swap":
                j = draw(st.integers(0, len(pairs) - 1))
                other = pairs[j][1] if isinstance(pairs[j][1], dict) else {}
                pairs[i] = (name, entry | {"data_offsets": other.get("data_offsets")})
            elif edit == "drop":
                del pairs[i]
            else:  # a second entry for the same name, or an overlapping one under another name
                pairs.append((draw(st.one_of(st.just(name), st.sampled_from(names))), dict(entry)))
        elif edit == "meta":
            pairs.insert(draw(st.integers(0, len(pairs))), ("__metadata__", draw(st.one_of(
                st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3), garbage))))
        else:
            data = data[: len(data) // 2]
    if draw(st.integers(0, 15)) == 0:  # not a tensor table at all
        pairs, edited = draw(garbage), True
    header = dumps(pairs)
    header = (header + " " * draw(st.integers(0, 3))).encode()
    length = len(header)
    if draw(st.integers(0, 7)) == 0:
        length = draw(st.one_of(st.integers(0, len(header) + 64), st.sampled_from([2**32, 2**63, 2**64 - 1])))
    grow = draw(st.integers(-4, 4)) if draw(st.integers(0, 7)) == 0 else 0
    data = data[: len(data) + grow] if grow < 0 else data + bytes(grow)
    edited = edited or length != len(header) or grow != 0
    return struct.pack("<Q", length) + header + data, edited


MUTATIONS = ["flip", "flip", "flip", "set", "set", "truncate", "delete", "insert", "splice", "repeat", "prefix",
             "missing"]


@st.composite
def mutated(draw, config: bytes, weights: bytes) -> tuple[bytes | None, bytes | None]:
    """1-4 byte-level mutations of a valid folder's two files: bit flips, truncations, deletions, insertions,
    splices (from either file), repeats, a new length prefix, or a file replaced by a folder."""
    files: list[bytes | None] = [config, weights]
    header_end = 8 + struct.unpack("<Q", weights[:8])[0]
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3, 4]))):
        which, op = draw(st.integers(0, 1)), draw(st.sampled_from(MUTATIONS))
        data = files[which]
        if data is None:
            continue
        if op == "missing":
            files[which] = None
            continue
        buf = bytearray(data)
        in_header = which == 1 and draw(st.booleans())  # half the weights mutations land in the header
        span = min(len(buf), header_end) if in_header else len(buf)
        pos = draw(st.integers(0, max(span - 1, 0)))
        length = draw(st.integers(1, 64))
        if op == "flip" and buf:
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and buf:
            buf[pos] = draw(st.integers(0, 255))
        elif op == "truncate":
            del buf[pos:]
        elif op == "delete":
            del buf[pos : pos + length]
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "splice":
            source = files[draw(st.integers(0, 1))] or b""
            start = draw(st.integers(0, max(len(source) - 1, 0)))
            buf[pos:pos] = source[start : start + length]
        elif op == "repeat":
            buf[pos:pos] = bytes(buf[pos : pos + length]) * draw(st.integers(1, 4))
        elif op == "prefix" and which == 1:
            buf[:8] = struct.pack("<Q", draw(st.one_of(st.integers(0, len(buf)), st.integers(0, 2**64 - 1))))
        files[which] = bytes(buf)
    return files[0], files[1]
