"""Validates a safetensors file's header from its raw bytes, before any library parses it.

Layout: an 8-byte little-endian header length N, N bytes of JSON (an object mapping tensor name
to {"dtype", "shape", "data_offsets": [begin, end]}, plus an optional "__metadata__" object),
then the data section; offsets are relative to the data section's start.
"""

from __future__ import annotations

import json
import math
import struct
from typing import BinaryIO, NamedTuple

MAX_HEADER_BYTES = 100 * 2**20
MAX_DIMS = 8

# bits per element of every dtype the safetensors format defines
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}


class SafetensorsFormatError(ValueError):
    """The bytes are not a well-formed safetensors file; the message says where."""


class TensorInfo(NamedTuple):
    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offsets into the data section
    end: int


def _is_uint(x) -> bool:
    """A u64, as the format stores them: larger JSON integers would make sizes that overflow a float."""
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**64


def _check_entry(name: str, entry) -> TensorInfo:
    if not isinstance(entry, dict):
        raise SafetensorsFormatError(f"header entry for tensor '{name}' is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise SafetensorsFormatError(f"tensor '{name}' has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise SafetensorsFormatError(f"tensor '{name}' has invalid shape {shape!r}")
    if len(shape) > MAX_DIMS:
        raise SafetensorsFormatError(f"tensor '{name}' has {len(shape)} dimensions (at most {MAX_DIMS})")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)):
        raise SafetensorsFormatError(f"tensor '{name}' has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if end < begin:
        raise SafetensorsFormatError(f"tensor '{name}' has data_offsets ending before they begin: {offsets}")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != end - begin:
        raise SafetensorsFormatError(
            f"tensor '{name}': shape {shape} of {dtype} needs {bits / 8:g} bytes but data_offsets span {end - begin}"
        )
    return TensorInfo(dtype, tuple(shape), begin, end)


def check_header(data: bytes | memoryview, max_header_bytes: int = MAX_HEADER_BYTES) -> dict[str, TensorInfo]:
    """Parse and validate the header of the safetensors file held in `data`.

    Checks: the length prefix fits the file and `max_header_bytes` (json.loads may take ~25 bytes of memory
    per header byte); the header is a UTF-8 JSON object; every tensor has a known dtype, u64 shape and
    offsets, a byte size equal to shape × dtype, and the tensors tile the data section exactly (no overlap,
    gap, or overrun).
    Returns name → TensorInfo (without "__metadata__"); raises SafetensorsFormatError otherwise.
    """
    n = _header_length(bytes(data[:8]), len(data), max_header_bytes)
    return _check_tensors(bytes(data[8 : 8 + n]), len(data) - 8 - n)


def check_file(file: BinaryIO, max_header_bytes: int = MAX_HEADER_BYTES) -> dict[str, TensorInfo]:
    """`check_header` of an open file, reading only its length prefix and header (at most
    8 + `max_header_bytes` bytes, whatever the file's size); the file is left positioned anywhere.
    Nothing it reads outlives the call, not even in the traceback of a SafetensorsFormatError."""
    file.seek(0, 2)
    size = file.tell()
    file.seek(0)
    n = _header_length(file.read(8), size, max_header_bytes)
    header = file.read(n)
    if len(header) != n:
        raise SafetensorsFormatError(f"file shrank to {8 + len(header)} bytes while its header was read")
    return _check_tensors(header, size - 8 - n)


def _header_length(prefix: bytes, size: int, max_header_bytes: int) -> int:
    """The header length N the 8-byte `prefix` of a `size`-byte file declares, once checked."""
    if size < 8 or len(prefix) < 8:
        raise SafetensorsFormatError(f"file is {size} bytes, too short for a safetensors header")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > size - 8:
        raise SafetensorsFormatError(f"header length {n} exceeds the file size {size} (truncated or corrupt)")
    if n > max_header_bytes:
        raise SafetensorsFormatError(f"header length {n} exceeds the cap of {max_header_bytes} bytes")
    return n


def _check_tensors(raw_header: bytes, data_len: int) -> dict[str, TensorInfo]:
    """Parse the header JSON and check its tensors tile a data section of `data_len` bytes."""
    try:
        header = json.loads(raw_header.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, 4300+ digit numbers, deep nesting
        raise SafetensorsFormatError(f"header is not valid UTF-8 JSON ({str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"header is a JSON {type(header).__name__}, not an object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not isinstance(meta, dict):
        raise SafetensorsFormatError("header '__metadata__' is not an object")
    tensors = {name: _check_entry(name, entry) for name, entry in header.items()}
    position, previous = 0, None
    for name, info in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin < position:
            raise SafetensorsFormatError(f"tensor '{name}' overlaps tensor '{previous}' (data_offsets {info.begin}..{info.end})")
        if info.begin > position:
            raise SafetensorsFormatError(f"gap in the data section before tensor '{name}' (offset {position}..{info.begin})")
        if info.end > data_len:
            raise SafetensorsFormatError(
                f"tensor '{name}' data_offsets end at {info.end}, beyond the {data_len}-byte data section (truncated?)"
            )
        position, previous = info.end, name
    if position != data_len:
        raise SafetensorsFormatError(f"data section has {data_len} bytes but the tensors cover {position}")
    return tensors
