"""Attention over the paged KV cache.

Layout of one step's tokens (flat, no padding): the decode rows first (one token each, row i is
token i), then the prefill segments (a chunk of one sequence's prompt each, laid end to end).

KV cache of one layer: `(k_cache, v_cache)`, each `[num_blocks, block_size, num_kv_heads, head_dim]`.
Slot `s` is token `s % block_size` of block `s // block_size`. The model runner owns the cache and
the block tables; attention writes this step's K/V into their slots and reads the rest in place.

Three decode backends with one signature, chosen once by the model runner (`decode_backend()`)
and named in every AttentionBatch:
- "triton": Triton kernels (`triton_attention.py`) that read K/V in place through the block
  tables, GQA groups per program, split-K over long contexts; never waits on the host, so decode
  steps can replay CUDA graphs. The CUDA default when Triton is importable;
- "cpu_inplace": a numba kernel that walks each sequence's block table and reads K/V where they
  lie: no copy of the history (float32 on CPU);
- "torch": the reference; gathers each sequence's history into a padded tensor, then SDPA.
Prefill segments use SDPA on the gathered context (prefill is compute-bound and runs once).

Per layer, attention may have a sliding window (`sliding_window`: a query at position p sees keys
at p - window + 1 .. p, as Hugging Face's masks) and a logit soft-cap (`softcap`, Gemma 2: scores
become tanh(score / softcap) * softcap before the softmax, score = q.k * scale); every decode
backend and the prefill path take both.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from loraplex import env


def block_slots(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slots of token `positions` ([..., P]) of sequences whose block tables are
    `block_table` ([..., max_blocks], matching leading dims) → int64 [..., P]."""
    blocks = torch.gather(block_table.long(), -1, positions // block_size)
    return blocks * block_size + positions % block_size


@dataclass
class PrefillSegment:
    """One sequence's chunk of new tokens.

    token_start/num_tokens: where the chunk lies in the step's flat tokens.
    context_slots: [context_len] int64 cache slots of the whole context, this chunk included
    (the chunk's tokens are the last `num_tokens` of them).
    """

    token_start: int
    num_tokens: int
    context_slots: torch.Tensor


@dataclass
class AttentionBatch:
    """Everything attention needs about one step; built by the model runner, read-only here.

    slot_mapping: [T] int64, the cache slot each new token's K/V is written to.
    block_tables: [num_decode, max_blocks] int32, context_lens: [num_decode] int32 (the new token
    included) for the decode rows, which are tokens 0..num_decode-1.
    Attention only reads it, except `decode_slots()`, which computes once per step and caches.
    """

    slot_mapping: torch.Tensor
    block_size: int
    decode_backend: str = "torch"  # a key of _DECODE_BACKENDS
    num_decode: int = 0
    block_tables: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    prefills: list[PrefillSegment] = field(default_factory=list)
    _decode_slots: torch.Tensor | None = None

    def decode_slots(self) -> torch.Tensor:
        """[num_decode, max_context] int64: every decode row's history slots; positions past a
        row's end point at its first slot (always written), so never-written memory is not read."""
        if self._decode_slots is None:
            positions = torch.arange(int(self.context_lens.max()), device=self.block_tables.device)
            positions = positions.expand(self.num_decode, -1)
            inside = positions < self.context_lens[:, None]
            slots = block_slots(self.block_tables, torch.where(inside, positions, 0), self.block_size)
            self._decode_slots = slots
        return self._decode_slots


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: tuple[torch.Tensor, torch.Tensor],
    batch: AttentionBatch,
    scale: float,
    sliding_window: int | None,
    softcap: float | None = None,
) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [T, Hkv, D] (this step's new tokens) → [T, Hq, D].

    scale multiplies q.k; sliding_window (None: full causal) and softcap (None: no cap) as above.

    Side effect: writes k, v into `kv_cache` at `batch.slot_mapping`.
    """
    k_cache, v_cache = kv_cache
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    k_cache.view(num_slots, *k_cache.shape[2:]).index_copy_(0, batch.slot_mapping, k)
    v_cache.view(num_slots, *v_cache.shape[2:]).index_copy_(0, batch.slot_mapping, v)
    out = torch.empty_like(q)
    if batch.num_decode:
        n = batch.num_decode
        _DECODE_BACKENDS[batch.decode_backend](q[:n], k_cache, v_cache, batch, scale, sliding_window, out[:n], softcap)
    for seg in batch.prefills:
        rows = slice(seg.token_start, seg.token_start + seg.num_tokens)
        out[rows] = _prefill(q[rows], k_cache, v_cache, seg, scale, sliding_window, softcap)
    return out


def _window_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """query_pos: [..., Q, 1], key_pos: [..., 1, K] → bool mask, True where the key is visible."""
    mask = key_pos <= query_pos
    if window:
        mask &= key_pos > query_pos - window
    return mask


def _attend(q, keys, values, mask, scale, softcap) -> torch.Tensor:
    """q: [..., Hq, Q, D]; keys, values: [..., Hkv, K, D]; mask: bool, broadcast to [..., Hq, Q, K]
    → [..., Hq, Q, D]. SDPA without a soft-cap; with one, the scores are capped explicitly (in the
    dtype of q, softmax in float32, as Hugging Face's eager attention)."""
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, scale=scale, enable_gqa=q.shape[-3] != keys.shape[-3]
        )
    group = q.shape[-3] // keys.shape[-3]
    keys = keys.repeat_interleave(group, dim=-3)
    values = values.repeat_interleave(group, dim=-3)
    scores = torch.tanh(q @ keys.transpose(-1, -2) * scale / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ values


def _prefill(q, k_cache, v_cache, seg: PrefillSegment, scale, window, softcap=None) -> torch.Tensor:
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    keys = flat_k[seg.context_slots].transpose(0, 1)  # [Hkv, ctx, D]
    values = flat_v[seg.context_slots].transpose(0, 1)
    ctx = seg.context_slots.shape[0]
    query_pos = torch.arange(ctx - seg.num_tokens, ctx, device=q.device)[:, None]
    key_pos = torch.arange(ctx, device=q.device)[None, :]
    mask = _window_mask(query_pos, key_pos, window)
    return _attend(q.transpose(0, 1), keys, values, mask, scale, softcap).transpose(0, 1)


def _decode_torch(q, k_cache, v_cache, batch: AttentionBatch, scale, window, out, softcap=None) -> None:
    """Reference decode: gathers every row's history (a copy), then one batched SDPA."""
    slots = batch.decode_slots()
    positions = torch.arange(slots.shape[1], device=q.device)
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    keys = flat_k[slots].transpose(1, 2)  # [B, Hkv, max_ctx, D]
    values = flat_v[slots].transpose(1, 2)
    query_pos = (batch.context_lens.long() - 1)[:, None, None, None]
    mask = _window_mask(query_pos, positions[None, None, None, :], window)
    out.copy_(_attend(q.unsqueeze(2), keys, values, mask, scale, softcap).squeeze(2))


def _decode_cpu_inplace(q, k_cache, v_cache, batch: AttentionBatch, scale, window, out, softcap=None) -> None:
    from loraplex.kvcache.cpu_kernels import paged_decode

    paged_decode(
        q.numpy(), k_cache.numpy(), v_cache.numpy(), batch.block_tables.numpy(), batch.context_lens.numpy(),
        float(scale), int(window or 0), out.numpy(), float(softcap or 0.0),
    )


def _decode_triton(q, k_cache, v_cache, batch: AttentionBatch, scale, window, out, softcap=None) -> None:
    from loraplex.kvcache import triton_attention  # imported on first use: CPU never loads Triton

    triton_attention.decode(q, k_cache, v_cache, batch, scale, window, out, softcap)


_DECODE_BACKENDS = {"torch": _decode_torch, "cpu_inplace": _decode_cpu_inplace, "triton": _decode_triton}


def decode_backend(dtype: torch.dtype, device: torch.device) -> str:
    """"triton" on CUDA (when Triton imports), "cpu_inplace" for float32 on CPU, else "torch";
    LORAPLEX_ATTENTION overrides."""
    forced = env.attention_backend()
    if forced:
        if forced not in _DECODE_BACKENDS:
            raise ValueError(f"LORAPLEX_ATTENTION={forced!r}: expected one of {sorted(_DECODE_BACKENDS)}")
        return forced
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "cpu_inplace" if device.type == "cpu" and dtype == torch.float32 else "torch"
