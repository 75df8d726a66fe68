"""The logits processors and the sampler, checked on random logits.

Properties are checked with probabilities computed here in float64 (numpy), not
with the processors' own arithmetic; Hugging Face's processors are the oracle
where their definition is the same as ours (repetition penalty, top-k without
ties); the sampler is checked with a chi-square test against the filtered
distribution computed here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2.errors import GPT2Error
from gpt2.generate import (
    SamplingOptions,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    choose_next,
    process_logits,
    sample_from,
)

TOL = 1e-5  # float32 softmax inside the processors vs float64 here


pytestmark = pytest.mark.usefixtures("one_thread")

# Logits with many ties (few distinct values) or with none in practice (continuous).
tied_values = st.sampled_from([-3.0, -1.0, 0.0, 0.5, 2.0])
continuous = st.floats(-8.0, 8.0, allow_nan=False, width=32)
rows = st.one_of(
    st.lists(tied_values, min_size=1, max_size=40),
    st.lists(continuous, min_size=1, max_size=40),
)


def as_logits(row: list[float]) -> torch.Tensor:
    return torch.tensor([row], dtype=torch.float32)  # (1, V)


def probs64(row) -> np.ndarray:
    x = np.asarray(row, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def kept(out: torch.Tensor) -> np.ndarray:
    return torch.isfinite(out[0]).numpy()


# --------------------------------------------------------------------------- top-k


@settings(max_examples=200, deadline=None)
@given(row=rows, k=st.integers(1, 50))
def test_top_k_keeps_exactly_k_of_the_largest(row, k):
    out = apply_top_k(as_logits(row), k)
    keep = kept(out)
    assert keep.sum() == min(k, len(row))  # ties at the k-th value do not widen the set
    x = np.asarray(row, dtype=np.float32)
    if (~keep).any():
        assert x[keep].min() >= x[~keep].max()
    assert np.array_equal(out[0].numpy()[keep], x[keep])  # kept logits are untouched


def test_top_k_with_ties_at_the_kth_value():
    out = apply_top_k(torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]]), 2)
    assert kept(out).sum() == 2
    assert set(np.flatnonzero(kept(out))) <= {1, 2, 3}


def test_top_k_at_least_vocab_keeps_everything():
    x = torch.randn(3, 7)
    assert torch.equal(apply_top_k(x, 7), x)
    assert torch.equal(apply_top_k(x, 100), x)


def test_top_k_matches_transformers_without_ties():
    from transformers import TopKLogitsWarper

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 300, generator=g)
    ours = apply_top_k(x, 17)
    theirs = TopKLogitsWarper(top_k=17)(torch.zeros(4, 1, dtype=torch.long), x.clone())
    assert torch.equal(ours, theirs)


# --------------------------------------------------------------------------- top-p


@settings(max_examples=300, deadline=None)
@given(row=rows, p=st.floats(0.01, 0.999))
def test_top_p_keeps_the_minimal_nucleus(row, p):
    keep = kept(apply_top_p(as_logits(row), p))
    prob = probs64(row)
    assert keep.any()
    assert prob[keep].sum() >= p - TOL  # the nucleus reaches p ...
    # ... and is minimal: without its least likely token it falls short of p
    assert prob[keep].sum() - prob[keep].min() < p + TOL
    if (~keep).any():  # and it is made of the most likely tokens
        assert prob[keep].min() >= prob[~keep].max() - TOL  # (float32 ties allowed)


@settings(max_examples=200, deadline=None)
@given(row=st.lists(tied_values, min_size=2, max_size=300), p=st.floats(0.01, 0.999))
def test_top_p_without_host_read_back_keeps_the_same_tokens(row, p):
    x = as_logits(row)
    assert torch.equal(apply_top_p(x, p, adaptive=False), apply_top_p(x, p))


@settings(max_examples=100, deadline=None)
@given(row=st.lists(tied_values, min_size=2, max_size=40), p=st.floats(0.01, 0.999))
def test_top_p_breaks_ties_at_the_edge_by_lowest_id(row, p):
    keep = kept(apply_top_p(as_logits(row), p))
    x = np.asarray(row)
    edge = x[keep].min()
    tied = np.flatnonzero(x == edge)
    kept_tied, dropped_tied = tied[keep[tied]], tied[~keep[tied]]
    if len(dropped_tied):
        assert kept_tied.max() < dropped_tied.min()


def test_top_p_worked_example():
    x = torch.log(torch.tensor([[0.1, 0.5, 0.15, 0.25]]))
    assert kept(apply_top_p(x, 0.5)).tolist() == [False, True, False, False]  # 0.5 reaches 0.5
    assert kept(apply_top_p(x, 0.6)).tolist() == [False, True, False, True]  # 0.75
    assert kept(apply_top_p(x, 0.76)).tolist() == [False, True, True, True]  # 0.9


def test_top_p_one_keeps_everything_and_wide_rows_use_the_slow_path():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5000, generator=g) * 0.01  # nearly flat: the nucleus is > 64 tokens
    assert torch.equal(apply_top_p(x, 1.0), x)
    keep = torch.isfinite(apply_top_p(x, 0.9))
    prob = torch.softmax(x.double(), dim=-1)
    for b in range(2):
        mass = prob[b][keep[b]].sum().item()
        assert 0.9 - TOL <= mass < 0.9 + prob[b][keep[b]].min().item() + TOL
        assert keep[b].sum() > 4000


def test_top_p_never_drops_every_token():
    x = torch.tensor([[10.0, -10.0, -10.0]])
    assert kept(apply_top_p(x, 1e-9)).tolist() == [True, False, False]


# --------------------------------------------------------------------------- temperature


@settings(max_examples=100, deadline=None)
@given(row=st.lists(continuous, min_size=2, max_size=30, unique=True))
def test_low_temperature_approaches_argmax(row):
    x = np.asarray(row, dtype=np.float64)
    gap = np.sort(x)[-1] - np.sort(x)[-2]
    t = gap / 50.0  # the runner-up is then exp(-50) times as likely as the winner
    if t == 0.0:
        return
    prob = torch.softmax(apply_temperature(as_logits(row).double(), t), dim=-1)[0]
    assert prob.argmax().item() == int(np.argmax(x))
    assert prob.max().item() > 1 - 1e-15 * len(row)
    greedy = choose_next(as_logits(row), SamplingOptions(temperature=0.0))
    assert greedy.item() == int(np.argmax(x))


def test_temperature_scales_the_logits():
    """Divided by the temperature, less each row's largest (which softmax ignores)."""
    x = torch.tensor([[2.0, -4.0, 1.0]])
    assert torch.equal(apply_temperature(x, 2.0), torch.tensor([[0.0, -3.0, -0.5]]))
    torch.testing.assert_close(torch.softmax(apply_temperature(x, 2.0), -1),
                               torch.softmax(x / 2.0, -1))


@pytest.mark.parametrize("temperature", [1e-45, 1e-38, 1e-30])
def test_a_tiny_temperature_samples_the_largest_logit(temperature):
    """x / 1e-45 overflows to inf and softmax of it is NaN, from which the sampler took
    the last id: with the row's largest taken off first, the sample is the argmax."""
    logits = torch.tensor([[2.0, 5.0, -1.0, 4.9], [-3.0, -7.0, -2.5, -9.0]])
    options = SamplingOptions(temperature=temperature)
    for seed in range(5):
        got = choose_next(logits, options, generator=torch.Generator().manual_seed(seed))
        assert got.tolist() == [1, 2]


# --------------------------------------------------------------------------- repetition penalty


@settings(max_examples=100, deadline=None)
@given(row=st.lists(continuous, min_size=1, max_size=30), penalty=st.floats(1.01, 5.0),
       data=st.data())
def test_repetition_penalty_lowers_seen_tokens_only(row, penalty, data):
    seen_ids = data.draw(st.lists(st.integers(0, len(row) - 1), max_size=len(row)))
    seen = torch.zeros(1, len(row), dtype=torch.bool)
    seen[0, seen_ids] = True
    x = as_logits(row)
    out = apply_repetition_penalty(x, seen, penalty)
    s = seen[0].numpy()
    assert torch.equal(out[0][~seen[0]], x[0][~seen[0]])
    assert (out[0].numpy()[s] <= x[0].numpy()[s]).all()  # never more likely
    # strictly lower wherever the result can differ: a subnormal logit divided by the
    # penalty can round back to itself (1.4e-45 / 1.5 is 1.4e-45 in float32)
    strictly = s & (np.abs(x[0].numpy()) >= np.finfo(np.float32).tiny)
    assert (out[0].numpy()[strictly] < x[0].numpy()[strictly]).all()
    # and a penalty below 1 pushes the other way
    assert (apply_repetition_penalty(x, seen, 1 / penalty)[0].numpy()[s] >= x[0].numpy()[s]).all()


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 50, generator=g) * 3
    ids = torch.randint(0, 50, (3, 12), generator=g)  # repeats included
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, ids, True)
    theirs = RepetitionPenaltyLogitsProcessor(penalty=1.7)(ids, x.clone())
    assert torch.allclose(apply_repetition_penalty(x, seen, 1.7), theirs, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- the fixed order


def test_temperature_comes_before_top_p():
    # probabilities 0.5/0.3/0.2; at T = 0.5 they become 0.658/0.237/0.105, and the first
    # token alone reaches p = 0.6 (before the temperature it would take two)
    x = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    out = process_logits(x, SamplingOptions(temperature=0.5, top_p=0.6))
    assert kept(out).tolist() == [True, False, False]


def test_repetition_penalty_comes_before_top_k():
    x = torch.tensor([[3.0, 2.0, 1.0]])
    seen = torch.tensor([[True, False, False]])
    out = process_logits(x, SamplingOptions(top_k=1, repetition_penalty=4.0), seen=seen)
    assert kept(out).tolist() == [False, True, False]  # 3 / 4 = 0.75 < 2


def test_top_k_comes_before_top_p():
    # after top-k = 2 the renormalised probabilities are 0.625/0.375: p = 0.6 keeps one
    x = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    assert kept(process_logits(x, SamplingOptions(top_k=2, top_p=0.6))).tolist() == [
        True, False, False]
    # top-p alone on the full distribution keeps two
    assert kept(process_logits(x, SamplingOptions(top_p=0.6))).tolist() == [True, True, False]


# --------------------------------------------------------------------------- sampling


# 0.999 quantiles of the chi-square distribution, df = 1..12
CHI2_999 = [10.828, 13.816, 16.266, 18.467, 20.515, 22.458, 24.322, 26.124, 27.877, 29.588,
            31.264, 32.909]


def filtered_distribution(logits, *, temperature, top_k, top_p) -> np.ndarray:
    """The distribution the sampler should follow, computed from the definitions."""
    x = np.asarray(logits, dtype=np.float64) / temperature
    order = np.argsort(-x, kind="stable")
    x = np.where(np.isin(np.arange(len(x)), order[:top_k]), x, -np.inf)
    prob = np.exp(x - x.max())
    prob /= prob.sum()
    order = np.argsort(-prob, kind="stable")
    mass_above = np.cumsum(prob[order]) - prob[order]
    keep = np.zeros(len(x), dtype=bool)
    keep[order[mass_above < top_p]] = True
    prob = np.where(keep, prob, 0.0)
    return prob / prob.sum()


def chi_square(counts: np.ndarray, expected_prob: np.ndarray) -> tuple[float, int]:
    support = expected_prob > 0
    n = counts.sum()
    expected = n * expected_prob[support]
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    return stat, int(support.sum()) - 1


def test_sampled_frequencies_follow_the_filtered_distribution():
    logits = [2.0, 1.5, 1.4, 1.0, 0.3, 0.0, -0.5, -1.0, -2.0, 3.0, -4.0, 0.9]
    expected = filtered_distribution(logits, temperature=0.8, top_k=9, top_p=0.95)
    n = 40_000
    x = torch.tensor([logits]).expand(n, -1)  # (n, V): n independent draws in one call
    g = torch.Generator().manual_seed(1234)
    options = SamplingOptions(temperature=0.8, top_k=9, top_p=0.95)
    tokens = choose_next(x, options, generator=g)
    counts = np.bincount(tokens.numpy(), minlength=len(logits))
    assert counts[expected == 0].sum() == 0  # nothing outside the filtered support
    stat, df = chi_square(counts, expected)
    assert 4 <= df <= 11
    assert stat < CHI2_999[df - 1], (stat, df, counts, expected)


def test_sample_from_follows_probabilities_and_never_picks_zero():
    prob = torch.tensor([[0.0, 0.1, 0.0, 0.6, 0.3, 0.0]], dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    tokens = sample_from(prob.expand(30_000, -1), generator=g)
    counts = np.bincount(tokens.numpy(), minlength=6)
    assert counts[[0, 2, 5]].sum() == 0
    stat, df = chi_square(counts, prob[0].numpy())
    assert stat < CHI2_999[df - 1]


def test_sampling_is_reproducible_with_a_seeded_generator():
    x = torch.randn(5, 100)
    a = choose_next(x, SamplingOptions(), generator=torch.Generator().manual_seed(3))
    b = choose_next(x, SamplingOptions(), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- bad values


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"top_k": 0}, "top-k"),
    ({"top_p": 0.0}, "top-p"),
    ({"top_p": 1.5}, "top-p"),
    ({"repetition_penalty": 0.0}, "repetition penalty"),
    ({"repetition_penalty": -1.0}, "repetition penalty"),
])
def test_bad_options_raise_one_line_errors(kwargs, message):
    with pytest.raises(GPT2Error, match=message) as e:
        SamplingOptions(**kwargs)
    assert "\n" not in str(e.value)


def test_processors_validate_their_arguments():
    x = torch.zeros(1, 4)
    with pytest.raises(GPT2Error, match="top-k"):
        apply_top_k(x, 0)
    with pytest.raises(GPT2Error, match="top-p"):
        apply_top_p(x, 0.0)
    with pytest.raises(GPT2Error, match="temperature"):
        apply_temperature(x, -1.0)
    with pytest.raises(GPT2Error, match="repetition penalty"):
        apply_repetition_penalty(x, torch.zeros(1, 4, dtype=torch.bool), 0.0)
