"""Pick one token per sequence for a decode step.

Per row, in this order:

    raw logits -> (logprobs read here) -> repetition penalty -> frequency/presence penalties
    -> greedy: argmax
    -> else:   temperature -> top-k -> top-p -> sample

Everything runs as batched tensor ops; the only per-row loop that touches tensors is the
random draw of rows that carry their own seeded `torch.Generator`, so that a seeded row's
output depends only on its own logits and generator, never on the rest of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import NamedTuple, Sequence

import torch

from loraplex.core import SamplingParams


@dataclass
class SamplingRow:
    """One sequence that samples a token this step.

    `generator` is the request's own generator when `params.seed` is set (on the logits'
    device); None draws from the device's default RNG.
    """

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None = None


class SamplerOutput(NamedTuple):
    """`token_ids[i]` is row i's token; `logprobs[i]` is log_softmax(raw logits)[token] or None
    when row i did not ask for logprobs; `top_logprobs[i]` is {token: log_softmax(raw logits)}
    of row i's `params.top_logprobs` most likely tokens (most likely first), or None when it
    asked for none. Both are computed only for the rows that ask (off the hot path otherwise)."""

    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[dict[int, float] | None] | None = None


def _distinct_tokens(
    pieces: list[tuple[int, Sequence[int]]], vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct (row, token) pairs among `pieces` [(row, token ids), ...].

    Returns (keys, counts), both int64 [pairs] on `device`: key = row * vocab + token, indexing
    the flattened [rows, vocab] logits; counts = occurrences. Ids outside [0, vocab) are dropped.
    """
    ids = torch.tensor(list(chain.from_iterable(seq for _, seq in pieces)), dtype=torch.int64)
    rows = torch.repeat_interleave(
        torch.tensor([row for row, _ in pieces], dtype=torch.int64),
        torch.tensor([len(seq) for _, seq in pieces], dtype=torch.int64),
    )
    valid = (ids >= 0) & (ids < vocab)
    keys, counts = torch.unique(rows[valid] * vocab + ids[valid], return_counts=True)
    return keys.to(device), counts.to(device)


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Apply repetition, then frequency/presence penalties, in place; returns `logits`.

    logits: contiguous float32 [len(rows), vocab]. Repetition penalty (HF/CTRL) over prompt +
    output tokens: a seen token's logit is divided by the penalty when >= 0, multiplied when < 0.
    Frequency/presence (OpenAI) over output tokens: logit -= f * count + p * (count > 0).
    Cost is O(tokens seen), independent of vocab size.
    """
    vocab = logits.shape[1]
    flat = logits.view(-1)
    params = [r.params for r in rows]

    rep = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if rep:
        pieces = [(i, rows[i].prompt_token_ids) for i in rep] + [(i, rows[i].output_token_ids) for i in rep]
        keys, _ = _distinct_tokens(pieces, vocab, logits.device)
        penalty = torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32, device=logits.device)
        penalty = penalty[keys // vocab]
        seen = flat[keys]
        flat[keys] = torch.where(seen < 0, seen * penalty, seen / penalty)

    freq = [i for i, p in enumerate(params) if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0]
    if freq:
        keys, counts = _distinct_tokens([(i, rows[i].output_token_ids) for i in freq], vocab, logits.device)
        row = keys // vocab
        f = torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32, device=logits.device)[row]
        pr = torch.tensor([p.presence_penalty for p in params], dtype=torch.float32, device=logits.device)[row]
        flat[keys] -= f * counts + pr
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask everything outside each row's top-k, then outside its top-p nucleus, with -inf.

    logits: float32 [m, vocab] (temperature already applied); top_k: int64 [m], a value <= 0
    or >= vocab keeps all; top_p: float32 [m] in (0, 1], 1 keeps all. The nucleus is the
    smallest prefix (by descending probability, renormalised after top-k) whose cumulative
    probability reaches top_p; it always holds at least the top token. One sort; returns a
    new [m, vocab] tensor.
    """
    vocab = logits.shape[1]
    values, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    values.masked_fill_(rank >= k[:, None], float("-inf"))
    probs = values.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # exclusive cumsum: 0 for the top token
    p = torch.where(top_p < 1, top_p, float("inf"))
    # rank > 0: the top token stays even when top_p underflowed to 0 in float32
    values.masked_fill_((mass_before >= p[:, None]) & (rank > 0), float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, values)


class Sampler:
    """Stateless; call once per step with every row that samples a token this step."""

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        """logits: [len(rows), vocab], any float dtype and device; never modified."""
        n, vocab = logits.shape
        if n != len(rows):
            raise ValueError(f"logits has {n} rows but {len(rows)} SamplingRows were given")
        if n == 0:
            return SamplerOutput([], [])
        device = logits.device
        params = [r.params for r in rows]

        if any(p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params):
            x = torch.empty((n, vocab), dtype=torch.float32, device=device).copy_(logits)
            apply_penalties(x, rows)
        else:
            x = logits  # read-only from here on

        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if len(sampled) == n:
            tokens = self._sample(x if x is not logits else logits.to(torch.float32, copy=True), rows)
        else:
            tokens = x.argmax(dim=-1)  # float32 conversion is exact, so argmax on any dtype agrees
            if sampled:
                idx = torch.tensor(sampled, device=device)
                tokens[idx] = self._sample(x[idx].float(), [rows[i] for i in sampled])  # x[idx] copies

        logprobs: list[float | None] = [None] * n
        top: list[dict[int, float] | None] | None = None
        wanted = [i for i, p in enumerate(params) if p.logprobs]
        if wanted:
            idx = torch.tensor(wanted, device=device)
            raw = logits[idx].float()
            log_z = raw.logsumexp(dim=-1)
            values = raw.gather(1, tokens[idx, None]).squeeze(1) - log_z
            for i, value in zip(wanted, values.tolist()):
                logprobs[i] = value
            k = max(params[i].top_logprobs for i in wanted)
            if k:
                top = [None] * n
                top_values, top_ids = raw.topk(min(k, vocab), dim=-1)
                top_values -= log_z[:, None]
                for j, (ids, vals) in enumerate(zip(top_ids.tolist(), top_values.tolist())):
                    i = wanted[j]
                    keep = params[i].top_logprobs
                    if keep:
                        top[i] = dict(zip(ids[:keep], vals[:keep]))
        return SamplerOutput(tokens.tolist(), logprobs, top)

    @staticmethod
    def _sample(x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Temperature, top-k/top-p and a random draw for non-greedy rows.

        x: float32 [len(rows), vocab], penalties applied; a private copy, overwritten here.
        Returns int64 [len(rows)].
        Draws by exponential race: argmax(probs / q), q ~ Exp(1) i.i.d., which picks token t
        with probability probs[t]. A seeded row fills its q from its own generator with shape
        [vocab], so its draw does not depend on the batch around it.
        """
        m, vocab = x.shape
        device = x.device
        params = [r.params for r in rows]
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
        x.sub_(x.amax(dim=-1, keepdim=True)).div_(temperature[:, None])  # shifted first: no overflow at tiny T

        filtered = [j for j, p in enumerate(params) if 0 < p.top_k < vocab or p.top_p < 1]
        if filtered:
            top_k = torch.tensor([params[j].top_k for j in filtered], dtype=torch.int64, device=device)
            top_p = torch.tensor([params[j].top_p for j in filtered], dtype=torch.float32, device=device)
            if len(filtered) == m:
                x = filter_top_k_top_p(x, top_k, top_p)
            else:
                idx = torch.tensor(filtered, device=device)
                x[idx] = filter_top_k_top_p(x[idx], top_k, top_p)

        probs = x.softmax(dim=-1)
        q = torch.empty_like(probs)
        unseeded = [j for j, r in enumerate(rows) if r.generator is None]
        if len(unseeded) == m:
            q.exponential_()
        elif unseeded:
            q[torch.tensor(unseeded, device=device)] = torch.empty((len(unseeded), vocab), device=device).exponential_()
        for j, row in enumerate(rows):
            if row.generator is not None:
                q[j].exponential_(generator=row.generator)
        q.clamp_(min=torch.finfo(torch.float32).tiny)  # q == 0 would turn a masked 0/0 into NaN
        return probs.div_(q).argmax(dim=-1)
