"""Sampler against transformers' logits processors composed in the same order."""

from __future__ import annotations

import pytest
import torch

from fate.runtime.sampling import Sampler, SamplingParams

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import (  # noqa: E402
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def _reference_probs(logits: torch.Tensor, previous: list[int], p: SamplingParams) -> torch.Tensor:
    """transformers' processors in fate's order: penalty, top-k, top-p, min-p, temperature."""
    chain = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(float(p.repetition_penalty)))
    if p.top_k > 0:
        chain.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        chain.append(TopPLogitsWarper(p.top_p))
    if p.min_p > 0.0:
        chain.append(MinPLogitsWarper(p.min_p))
    chain.append(TemperatureLogitsWarper(float(p.temperature)))
    input_ids = torch.tensor([previous if previous else [0]], dtype=torch.long)
    if not previous:
        chain = LogitsProcessorList([c for c in chain if not isinstance(c, RepetitionPenaltyLogitsProcessor)])
    scores = chain(input_ids, logits.clone().unsqueeze(0))
    return torch.softmax(scores[0], dim=-1)


PARAMS = [
    SamplingParams(),
    SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
    SamplingParams(temperature=0.7, top_k=0, top_p=0.9, min_p=0.0),
    SamplingParams(temperature=1.3, top_k=5, top_p=1.0, min_p=0.0),
    SamplingParams(temperature=0.5, top_k=0, top_p=1.0, min_p=0.1),
    SamplingParams(temperature=1.0, top_k=100, top_p=0.5, min_p=0.02, repetition_penalty=1.3),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.8, min_p=0.2, repetition_penalty=0.8),
    SamplingParams(temperature=2.0, top_k=1000, top_p=0.99, min_p=0.0, repetition_penalty=1.1),
    SamplingParams(temperature=1.0, top_k=1, top_p=0.9, min_p=0.5),
]


def _param_id(p: SamplingParams) -> str:
    return f"T{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}-r{p.repetition_penalty}"


@pytest.mark.parametrize("params", PARAMS, ids=_param_id)
def test_distribution_matches_transformers(params):
    gen = torch.Generator().manual_seed(1234)
    sampler = Sampler(params)
    for trial in range(20):
        vocab = [50, 1000, 4096][trial % 3]
        scale = [0.05, 3.0, 8.0][(trial // 3) % 3]
        logits = torch.randn(vocab, generator=gen) * scale
        previous = torch.randint(0, vocab, (trial * 3,), generator=gen).tolist()
        ours = sampler.probs(logits, previous)
        ref = _reference_probs(logits, previous, params)
        assert torch.allclose(ours, ref, atol=1e-6, rtol=0), (trial, (ours - ref).abs().max())
        # the same tokens survive
        assert torch.equal(ours > 0, ref > 0), trial
        # and the draw only ever picks survivors
        for _ in range(5):
            assert ref[sampler(logits, previous)] > 0


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.999])
def test_top_p_over_a_large_vocabulary(top_p):
    """Both top-p routes (most likely prefix / full sort) agree with transformers."""
    gen = torch.Generator().manual_seed(5)
    params = SamplingParams(temperature=0.9, top_k=0, top_p=top_p, min_p=0.0)
    sampler = Sampler(params)
    for scale in (0.02, 1.0, 4.0, 12.0):
        logits = torch.randn(32000, generator=gen) * scale
        ours, ref = sampler.probs(logits, []), _reference_probs(logits, [], params)
        assert torch.equal(ours > 0, ref > 0), scale
        assert torch.allclose(ours, ref, atol=1e-6, rtol=0), scale


def test_top_k_keeps_ties_like_transformers():
    logits = torch.tensor([1.0, 5.0, 3.0, 3.0, 3.0, 0.0, 3.0])
    for k in (1, 2, 3, 5, 7, 10):
        params = SamplingParams(temperature=1.0, top_k=k, top_p=1.0, min_p=0.0)
        ours, ref = Sampler(params).probs(logits, []), _reference_probs(logits, [], params)
        assert torch.allclose(ours, ref, atol=1e-6, rtol=0), k


def test_repetition_penalty_semantics():
    logits = torch.tensor([2.0, -2.0, 1.0, -1.0, 0.5])
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=2.0))
    out = sampler.penalized(logits, [0, 1, 1, 1, 99, -3])  # repeats count once; out-of-range ids ignored
    assert out.tolist() == [1.0, -4.0, 1.0, -1.0, 0.5]
    assert logits.tolist() == [2.0, -2.0, 1.0, -1.0, 0.5]  # input untouched


def test_greedy_is_argmax():
    gen = torch.Generator().manual_seed(7)
    sampler = Sampler(SamplingParams(temperature=0.0))
    for _ in range(20):
        logits = torch.randn(3000, generator=gen)
        assert sampler(logits, []) == int(torch.argmax(logits))
    # ties go to the lowest id, like torch.argmax
    tied = torch.tensor([0.0, 5.0, 1.0, 5.0, 5.0])
    assert sampler(tied, []) == 1 == int(torch.argmax(tied))
    # with a penalty, greedy takes the argmax of the penalized logits
    pen = Sampler(SamplingParams(temperature=0.0, repetition_penalty=10.0))
    assert pen(torch.tensor([1.0, 3.0, 2.0]), [1]) == 2
    # other dtypes are accepted
    assert sampler(torch.tensor([0.1, 0.9, 0.3], dtype=torch.bfloat16), []) == 1
    with pytest.raises(ValueError):
        sampler.probs(torch.zeros(3))


def test_same_seed_same_sequence():
    gen = torch.Generator().manual_seed(99)
    steps = [torch.randn(500, generator=gen) * 2 for _ in range(50)]

    def run(seed):
        sampler = Sampler(SamplingParams(temperature=1.2, top_k=0, top_p=1.0, min_p=0.0, seed=seed))
        previous: list[int] = []
        for logits in steps:
            previous.append(sampler(logits, previous))
        return previous

    a, b, c = run(42), run(42), run(43)
    assert a == b
    assert a != c
    assert len(set(a)) > 10  # it really samples
    # reseeding restarts the stream
    sampler = Sampler(SamplingParams(temperature=1.2, top_k=0, top_p=1.0, min_p=0.0, seed=42))
    first = [sampler(steps[0]) for _ in range(10)]
    sampler.reseed(42)
    assert [sampler(steps[0]) for _ in range(10)] == first
    # seed None: independent generators
    draws = {tuple(Sampler(SamplingParams(temperature=5.0, top_k=0, top_p=1.0, min_p=0.0))(steps[0]) for _ in range(1))
             for _ in range(8)}
    assert len(draws) > 1


def test_empirical_frequencies_follow_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -5.0])
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0)
    sampler = Sampler(params)
    counts = torch.zeros(5)
    n = 4000
    for _ in range(n):
        counts[sampler(logits)] += 1
    assert torch.allclose(counts / n, torch.softmax(logits, 0), atol=0.03)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"top_k": 2.5}, "top_k must be an integer"),
        ({"min_p": -0.01}, r"min_p must be in \[0, 1\]"),
        ({"min_p": 1.01}, r"min_p must be in \[0, 1\]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
        ({"repetition_penalty": -1.0}, "repetition_penalty must be > 0"),
        ({"seed": "abc"}, "seed must be an integer or None"),
    ],
)
def test_invalid_params(kwargs, message):
    params = SamplingParams(**kwargs)
    with pytest.raises(ValueError, match=message) as info:
        params.validate()
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=message):
        Sampler(params)


def test_valid_edges():
    for kwargs in ({"temperature": 0.0}, {"top_p": 1.0}, {"top_k": 0}, {"min_p": 0.0}, {"min_p": 1.0},
                   {"repetition_penalty": 0.5}, {"seed": 0}):
        SamplingParams(**kwargs).validate()
    # min_p = 1 keeps only the top token(s)
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=1.0))
    assert sampler(torch.tensor([0.0, 3.0, 1.0]), []) == 1
    with pytest.raises(ValueError, match="1-D"):
        sampler(torch.zeros(2, 3), [])
