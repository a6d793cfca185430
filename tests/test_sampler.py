"""Sampler: greedy, logprobs, penalties, top-k/top-p, seeded sampling, input immutability."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from loraplex.core import SamplingParams
from loraplex.sampling.sampler import Sampler, SamplingRow, apply_penalties

sampler = Sampler()


def _row(prompt=(), output=(), generator=None, **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), list(prompt), list(output), generator)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=_gen(seed)) * 3


def _penalized(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    return apply_penalties(logits.float().clone(), rows)


def _filtered_probs(logits: list[float], temperature=1.0, top_k=0, top_p=1.0) -> dict[int, float]:
    """Float64 reference: the renormalised distribution after temperature, top-k, top-p."""
    probs = torch.tensor(logits, dtype=torch.float64).div(temperature).softmax(-1)
    order = probs.argsort(descending=True).tolist()
    keep = order[:top_k] if top_k > 0 else order
    total = sum(probs[t].item() for t in keep)
    nucleus, mass = [], 0.0
    for t in keep:
        if top_p < 1 and mass >= top_p:
            break
        nucleus.append(t)
        mass += probs[t].item() / total
    z = sum(probs[t].item() for t in nucleus)
    return {t: probs[t].item() / z for t in nucleus}


def _chi_square(counts: Counter, expected: dict[int, float], n: int) -> float:
    return sum((counts[t] - n * p) ** 2 / (n * p) for t, p in expected.items())


# ---------------------------------------------------------------------------- greedy / logprobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_equals_argmax(dtype):
    logits = _logits(7, 301).to(dtype)
    out = sampler(logits, [_row(temperature=0) for _ in range(7)])
    assert out.token_ids == logits.float().argmax(-1).tolist()
    assert out.logprobs == [None] * 7


def test_empty_batch_and_row_count_mismatch():
    out = sampler(torch.empty(0, 10), [])
    assert (out.token_ids, out.logprobs, out.top_logprobs) == ([], [], None)
    with pytest.raises(ValueError):
        sampler(torch.zeros(2, 10), [_row()])


def test_logprobs_are_raw_log_softmax_at_sampled_token():
    logits = _logits(6, 97, seed=1).to(torch.bfloat16)
    rows = [
        _row(temperature=0, logprobs=True, repetition_penalty=1.8, prompt=[1, 2, 3], output=[4]),
        _row(temperature=0.3, top_k=5, logprobs=True, frequency_penalty=1.5, output=[7, 7, 8]),
        _row(temperature=2.0, top_p=0.5, logprobs=False, presence_penalty=-1.0, output=[9]),
        _row(temperature=1.0, logprobs=True, generator=_gen(3)),
        _row(temperature=0, logprobs=False),
        _row(temperature=0.7, logprobs=True, top_k=3, top_p=0.9, repetition_penalty=0.5, prompt=[5, 6]),
    ]
    out = sampler(logits, rows)
    reference = torch.log_softmax(logits.float(), dim=-1)
    for i, (row, token, logprob) in enumerate(zip(rows, out.token_ids, out.logprobs)):
        if row.params.logprobs:
            assert logprob == pytest.approx(reference[i, token].item(), abs=1e-5)
        else:
            assert logprob is None


# ---------------------------------------------------------------------------- penalties


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = _logits(4, 64, seed=2)
    rows = [
        _row(repetition_penalty=1.3, prompt=[0, 5, 5, 9], output=[10, 0, 63]),
        _row(repetition_penalty=0.7, prompt=[1, 2], output=[3, 3, 3]),
        _row(repetition_penalty=1.0, prompt=[4, 5], output=[6]),  # disabled
        _row(repetition_penalty=2.5, prompt=list(range(0, 64, 3)), output=[]),
    ]
    ours = _penalized(logits, rows)
    for i, row in enumerate(rows):
        ids = torch.tensor([list(row.prompt_token_ids) + list(row.output_token_ids)])
        theirs = RepetitionPenaltyLogitsProcessor(row.params.repetition_penalty)(ids, logits[i : i + 1].clone())
        torch.testing.assert_close(ours[i], theirs[0], rtol=1e-6, atol=1e-6)
        assert sampler(logits[i : i + 1], [_row(temperature=0, **_penalty_kwargs(row))]).token_ids == [
            theirs[0].argmax().item()
        ]


def _penalty_kwargs(row: SamplingRow) -> dict:
    p = row.params
    return dict(
        prompt=row.prompt_token_ids,
        output=row.output_token_ids,
        repetition_penalty=p.repetition_penalty,
        frequency_penalty=p.frequency_penalty,
        presence_penalty=p.presence_penalty,
    )


def _reference_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Float64, one token at a time: repetition (prompt+output), then frequency/presence (output)."""
    ref = logits.double().clone()
    for i, row in enumerate(rows):
        p = row.params
        for t in set(row.prompt_token_ids) | set(row.output_token_ids):
            v = ref[i, t].item()
            ref[i, t] = v / p.repetition_penalty if v >= 0 else v * p.repetition_penalty
        for t, count in Counter(row.output_token_ids).items():
            ref[i, t] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
    return ref


def test_frequency_and_presence_penalties_match_reference():
    logits = _logits(5, 50, seed=3)
    rows = [
        _row(frequency_penalty=0.5, output=[1, 1, 1, 2, 49]),
        _row(presence_penalty=1.2, prompt=[7, 8], output=[3, 3, 4]),  # prompt tokens untouched
        _row(frequency_penalty=-0.4, presence_penalty=0.3, output=[0, 0, 5, 6, 6, 6, 6]),
        _row(frequency_penalty=2.0, presence_penalty=-2.0, repetition_penalty=1.4, prompt=[10, 11], output=[11, 12, 12]),
        _row(),  # no penalties
    ]
    torch.testing.assert_close(_penalized(logits, rows), _reference_penalties(logits, rows).float(), rtol=1e-6, atol=1e-5)


def test_penalties_ignore_out_of_range_ids():
    logits = _logits(1, 10)
    out = _penalized(logits, [_row(repetition_penalty=2.0, frequency_penalty=1.0, prompt=[-1, 99], output=[10, 3])])
    expected = _reference_penalties(logits, [_row(repetition_penalty=2.0, frequency_penalty=1.0, output=[3])])
    torch.testing.assert_close(out, expected.float())


# ---------------------------------------------------------------------------- filters


def test_top_k_one_and_tiny_top_p_pick_argmax_of_processed_logits():
    logits = _logits(8, 400, seed=4)
    penalties = dict(prompt=[1, 2, 3], output=[4, 4, 5], repetition_penalty=1.5, frequency_penalty=0.8)
    rows = [_row(temperature=t, top_k=1, **penalties) for t in (0.1, 1.0, 5.0, 50.0)]
    rows += [_row(temperature=t, top_p=1e-6, generator=_gen(i), **penalties) for i, t in enumerate((0.1, 1.0, 5.0, 50.0))]
    expected = _penalized(logits, rows).argmax(-1).tolist()
    for _ in range(5):
        assert sampler(logits, rows).token_ids == expected


def test_mixed_batch_greedy_rows_take_processed_argmax():
    logits = _logits(6, 128, seed=5)
    rows = [
        _row(temperature=0, repetition_penalty=3.0, prompt=list(range(128))),
        _row(temperature=1.0, top_k=10),
        _row(temperature=0, presence_penalty=2.0, output=logits[2].topk(3).indices.tolist()),
        _row(temperature=0.5, generator=_gen(1)),
        _row(temperature=0),
        _row(temperature=3.0, top_p=0.3),
    ]
    out = sampler(logits, rows)
    processed = _penalized(logits, rows)
    for i in (0, 2, 4):
        assert out.token_ids[i] == processed[i].argmax().item()


KNOWN = [2.0, 1.5, 1.2, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -3.0]
FILTERS = [
    dict(),
    dict(top_k=3),
    dict(top_p=0.7),
    dict(top_k=5, top_p=0.8),
    dict(temperature=0.5, top_p=0.9),
    dict(temperature=2.0, top_k=6),
]


@pytest.mark.parametrize("seeded", [False, True], ids=["default-rng", "own-generator"])
@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "none")
def test_samples_stay_in_filter_and_match_filtered_distribution(filters, seeded):
    n = 20000 if not seeded else 4000
    expected = _filtered_probs(KNOWN, **filters)
    logits = torch.tensor([KNOWN]).expand(n, -1)  # non-contiguous input on purpose
    if seeded:
        rows = [_row(generator=_gen(1000 + i), **filters) for i in range(n)]
        tokens = sampler(logits, rows).token_ids
    else:
        with torch.random.fork_rng():
            torch.manual_seed(1234)
            tokens = sampler(logits, [_row(**filters) for _ in range(n)]).token_ids
    counts = Counter(tokens)
    assert set(counts) <= set(expected), f"sampled outside the filter: {set(counts) - set(expected)}"
    # chi-square with <= 9 degrees of freedom; 35 is far beyond p = 0.0001 (27.9)
    assert _chi_square(counts, expected, n) < 35


def test_high_temperature_flattens():
    vocab, n = 8, 16000
    logits = torch.tensor([[6.0, 3.0, 1.0, 0.0, 0.0, -1.0, -2.0, -4.0]]).expand(n, -1)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        cold = Counter(sampler(logits, [_row(temperature=0.5) for _ in range(n)]).token_ids)
        hot = Counter(sampler(logits, [_row(temperature=1000.0) for _ in range(n)]).token_ids)
    assert cold[0] > 0.95 * n
    assert _chi_square(hot, {t: 1 / vocab for t in range(vocab)}, n) < 30


# ---------------------------------------------------------------------------- seeds


def _generate(seed_row_logits: list[torch.Tensor], seed: int, neighbours: str) -> list[int]:
    """Run a seeded row for len(seed_row_logits) steps inside a batch chosen by `neighbours`."""
    tokens: list[int] = []
    gen = _gen(seed)
    others = _gen(99)
    for step, row_logits in enumerate(seed_row_logits):
        me = _row(temperature=0.9, top_p=0.95, generator=gen, output=tokens, repetition_penalty=1.1)
        vocab = row_logits.shape[0]
        if neighbours == "alone":
            batch, position = [me], 0
        elif neighbours == "front":
            batch = [me, _row(temperature=1.0), _row(temperature=0), _row(temperature=1.5, generator=_gen(step), top_k=4)]
            position = 0
        else:  # "middle", with an unseeded row drawing from the default RNG before it
            batch = [_row(temperature=0.8, top_k=2), _row(generator=_gen(seed), temperature=1.2), me, _row(temperature=0)]
            position = 2
        logits = torch.randn(len(batch), vocab, generator=others) * 4
        logits[position] = row_logits
        tokens.append(sampler(logits, batch).token_ids[position])
    return tokens


def test_same_seed_same_tokens_in_any_batch():
    steps = [torch.randn(300, generator=_gen(50 + s)) for s in range(25)]
    runs = {where: _generate(steps, seed=42, neighbours=where) for where in ("alone", "front", "middle")}
    assert runs["alone"] == runs["front"] == runs["middle"]
    assert _generate(steps, seed=42, neighbours="alone") == runs["alone"]


def test_different_seeds_give_different_sequences():
    steps = [torch.randn(300, generator=_gen(50 + s)) * 0.5 for s in range(20)]
    sequences = [tuple(_generate(steps, seed=s, neighbours="alone")) for s in range(8)]
    assert len(set(sequences)) == len(sequences)


# ---------------------------------------------------------------------------- hygiene


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_input_logits_are_not_modified(dtype):
    logits = _logits(5, 200, seed=6).to(dtype)
    before = logits.clone()
    batches = [
        [_row(temperature=0) for _ in range(5)],
        [_row() for _ in range(5)],
        [_row(temperature=0.5, top_k=3, top_p=0.5, generator=_gen(i)) for i in range(5)],
        [_row(temperature=t, repetition_penalty=1.5, frequency_penalty=1.0, presence_penalty=1.0, prompt=[1, 2], output=[2, 3], logprobs=True)
         for t in (0, 0.5, 1.0, 0, 2.0)],
    ]
    for rows in batches:
        sampler(logits, rows)
        assert torch.equal(logits, before)


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-0.1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=2.5),
        dict(repetition_penalty=0.0),
        dict(repetition_penalty=-1.0),
        dict(frequency_penalty=2.5),
        dict(presence_penalty=-3.0),
        dict(seed=1.5),
        dict(max_tokens=0),
    ],
    ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()),
)
def test_invalid_params_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
