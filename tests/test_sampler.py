import math
from typing import NamedTuple

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from engine.params import SamplingParams
from engine.request import Request
from engine.sampler import RACE_CANDIDATES, TOP_P_CANDIDATES, Sampler, apply_penalties, greedy_ids, uniform

V = 64
EOS = 3


def req(prompt=(1, 2), output=(), seed=None, **params) -> Request:
    return Request("r", list(prompt) + list(output), SamplingParams(**params),
                   num_prompt_tokens=len(prompt), seed=seed)


class SampledToken(NamedTuple):
    token_id: int
    logprob: float | None
    logprobs: dict | None


class HostSampler(Sampler):
    """The draws read back on the host at once, as the engine reads a step's when it is done, one row each."""
    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> list[SampledToken]:
        token_ids, logprobs = super().__call__(logits, requests).read()
        return [SampledToken(t, lp and lp.logprob, lp and lp.top)
                for t, lp in zip(token_ids, logprobs or [None] * len(token_ids))]


def ids(out: list[SampledToken]) -> list[int]:
    return [t.token_id for t in out]


@pytest.fixture(params=[True, False], ids=["cpu-decisions", "accelerator-decisions"])
def sampler(request) -> Sampler:
    """As the CPU runs it (rare branches chosen on the host) and as an accelerator does (taken for every row)."""
    return HostSampler({EOS}, request.param)


def test_greedy_is_argmax(sampler):
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(0))
    out = sampler(logits, [req(temperature=0.0) for _ in range(5)])
    assert ids(out) == logits.argmax(-1).tolist()
    assert all(t.logprob is None and t.logprobs is None for t in out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_callers_logits_are_never_written(sampler, dtype):
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(1)).to(dtype)
    before = logits.clone()
    sampler(logits, [req(temperature=0.0, repetition_penalty=1.5, output=(5,)), req(temperature=0.0),
                     req(temperature=0.8, top_p=0.9, min_p=0.1, top_k=10),
                     req(temperature=1.0, min_tokens=3)])
    sampler(logits, [req(temperature=1.0, logprobs=3) for _ in range(4)])
    assert torch.equal(logits, before)


def test_top_k_1_is_greedy(sampler):
    logits = torch.randn(8, V, generator=torch.Generator().manual_seed(2))
    out = sampler(logits, [req(temperature=1.5, top_k=1, seed=i) for i in range(8)])
    assert ids(out) == logits.argmax(-1).tolist()


def test_mixed_batch_greedy_rows_stay_argmax(sampler):
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(3))
    out = sampler(logits, [req(temperature=0.0), req(temperature=1.0), req(temperature=0.0, seed=1),
                           req(temperature=0.7, top_p=0.5)])
    assert [ids(out)[0], ids(out)[2]] == [logits[0].argmax().item(), logits[2].argmax().item()]


def test_seeded_request_is_reproducible_in_any_batch():
    gen = torch.Generator().manual_seed(4)
    target_logits = torch.randn(1, V, generator=gen)
    target = dict(temperature=0.9, top_p=0.95, top_k=40, min_p=0.01)

    def run(others) -> list[int]:
        sampler, r, picked = HostSampler({EOS}), req(seed=1234, **target), []
        for _ in range(30):
            batch = others[:2] + [r] + others[2:]
            logits = torch.cat([torch.randn(2, V, generator=gen), target_logits,
                                torch.randn(len(others) - 2, V, generator=gen)]) if others else target_logits
            picked.append(sampler(logits, batch)[len(others[:2])].token_id)
            r.token_ids.append(picked[-1])  # as the engine does: the next draw is the next position
        return picked

    alone = run([])
    crowded = run([req(temperature=1.0), req(seed=7, temperature=0.5, top_k=5), req(temperature=0.0),
                   req(temperature=1.3, repetition_penalty=1.2, output=(4, 5)),
                   req(temperature=2.0, top_p=0.5)])
    assert alone == crowded
    assert len(set(alone)) > 1  # it really sampled


def test_a_seeded_draw_depends_only_on_seed_position_and_logits():
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(8))
    once = HostSampler({EOS})(logits, [req(seed=99, temperature=1.0, output=(4, 5))])
    # Other samplers, other draws before it, other rows beside it: the same token.
    busy = HostSampler({EOS})
    for _ in range(5):
        busy(torch.randn(3, V), [req(temperature=1.0), req(seed=99, temperature=1.0), req(seed=5, temperature=1.0)])
    crowd = busy(torch.cat([torch.randn(2, V), logits]),
                 [req(temperature=1.0), req(seed=3, temperature=0.7), req(seed=99, temperature=1.0, output=(9, 9))])
    assert crowd[2].token_id == once[0].token_id


def test_seeds_and_positions_give_different_draws():
    logits = torch.zeros(1, V)  # uniform: every draw is the noise alone
    by_seed = {HostSampler(set())(logits, [req(seed=s, temperature=1.0)])[0].token_id for s in range(40)}
    by_position = {HostSampler(set())(logits, [req(seed=1, temperature=1.0, output=(5,) * n)])[0].token_id
                   for n in range(40)}
    assert len(by_seed) > 20 and len(by_position) > 20


def test_a_rounding_difference_in_the_logits_rarely_changes_a_seeded_draw():
    """The failure behind issue 11: bf16 logits of a prefix-cache hit differ from a miss's by a rounding
    step. The race changes its winner only in near ties (3 of these 400; an inverse-CDF draw: 156)."""
    g = torch.Generator().manual_seed(9)
    vocab = 4096
    logits = torch.randn(400, vocab, generator=g) * 2.0
    nudged = (logits + 0.02 * torch.randn(400, vocab, generator=g)).to(torch.bfloat16).float()
    reqs = [req(seed=1000 + i, temperature=1.0) for i in range(400)]
    a, b = ids(HostSampler(set())(logits, reqs)), ids(HostSampler(set())(nudged, reqs))
    assert len(set(a)) > 200  # it really sampled
    assert sum(x != y for x, y in zip(a, b)) <= 12


@pytest.mark.parametrize("decide_on_host", [True, False])
def test_the_draw_beyond_the_race_candidates_is_exact(decide_on_host):
    """Most of the mass outside the raced tokens: tokens there come out at their probabilities, whether the
    host picks the rows that race the rest (CPU) or every row does (accelerators)."""
    vocab = RACE_CANDIDATES * 8
    logits = torch.zeros(4000, vocab)
    logits[:, 0] = math.log(vocab)  # token 0 holds about half of the mass
    reqs = [req(seed=i, temperature=1.0) for i in range(4000)]
    got = torch.tensor(ids(HostSampler(set(), decide_on_host)(logits, reqs)))
    if not decide_on_host:
        assert got.tolist() == ids(HostSampler(set())(logits, reqs))  # the same draws either way
    p0 = vocab / (vocab + vocab - 1)
    assert abs((got == 0).float().mean().item() - p0) < 0.03
    assert (got >= RACE_CANDIDATES).float().mean().item() == pytest.approx((1 - p0) * (vocab - RACE_CANDIDATES)
                                                                          / (vocab - 1), abs=0.03)


def forced(probs: list[float]) -> torch.Tensor:
    """One row whose softmax is `probs` on the first tokens and 0 elsewhere."""
    x = torch.full((1, V), float("-inf"))
    x[0, :len(probs)] = torch.tensor(probs).log()
    return x


@pytest.mark.parametrize("params, allowed", [
    (dict(top_k=2), {0, 1}),
    (dict(top_k=3), {0, 1, 2}),
    (dict(top_p=0.6), {0, 1}),  # 0.4 + 0.3 reaches 0.6, 0.4 alone does not
    (dict(top_p=0.3), {0}),
    (dict(top_p=0.75), {0, 1, 2}),
    (dict(min_p=0.6), {0, 1}),  # 0.2 < 0.6 * 0.4
    (dict(min_p=0.9), {0}),
    (dict(top_k=3, top_p=0.5), {0, 1}),
    (dict(top_k=2, min_p=0.5), {0, 1}),
])
def test_truncation_never_picks_an_excluded_token(sampler, params, allowed):
    logits = forced([0.4, 0.3, 0.2, 0.1]).expand(300, V).clone()
    out = sampler(logits, [req(temperature=1.0, **params) for _ in range(300)])
    assert set(ids(out)) == allowed


def test_top_p_beyond_the_candidates_looks_at_the_whole_vocabulary(sampler):
    vocab = 2000
    flat = torch.linspace(0, -0.5, vocab)  # sorted; half the mass takes 877 tokens, not 256
    peaky = torch.zeros(vocab)
    peaky[7] = 30.0
    logits = torch.stack([flat, peaky] * 100)
    probs = flat.double().softmax(-1)
    allowed = int((probs.cumsum(-1) - probs < 0.5).sum())
    assert allowed > TOP_P_CANDIDATES
    got = ids(sampler(logits, [req(temperature=1.0, top_p=0.5, seed=i) for i in range(200)]))
    assert set(got[1::2]) == {7}
    assert max(got[::2]) < allowed and max(got[::2]) >= TOP_P_CANDIDATES


def allowed_by_hand(row: list[float], temperature, top_k, top_p, min_p) -> set[int] | None:
    """temperature -> top_k -> top_p -> min_p in float64; None when a threshold is too close to call."""
    z = [v / temperature for v in row]
    order = sorted(range(len(z)), key=lambda i: -z[i])[:top_k]
    weights = [math.exp(z[i] - z[order[0]]) for i in order]
    total, mass, kept = sum(weights), 0.0, []
    for i, w in zip(order, weights):
        if abs(mass - top_p) < 1e-4:
            return None
        if mass >= top_p:
            break
        kept.append((i, w))
        mass += w / total
    threshold = min_p * kept[0][1]
    if any(abs(w - threshold) < 1e-4 for _, w in kept):
        return None
    return {i for i, w in kept if w >= threshold}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-500, 500), min_size=8, max_size=8, unique=True), st.integers(1, 8),
       st.floats(0.05, 1.0), st.floats(0.0, 1.0), st.floats(0.2, 3.0), st.integers(0, 2**32 - 1))
def test_sampled_token_is_always_inside_the_truncated_set(row, top_k, top_p, min_p, temperature, seed):
    row = [v / 100 for v in row]  # distinct logits, so no ties decide anything
    allowed = allowed_by_hand(row, temperature, top_k, top_p, min_p)
    assume(allowed is not None)
    sampler = HostSampler(set())
    params = dict(top_k=top_k, top_p=top_p, min_p=min_p, temperature=temperature)
    logits = torch.tensor([row] * 20)
    got = ids(sampler(logits, [req(seed=seed + i, **params) for i in range(10)]
                      + [req(**params) for _ in range(10)]))
    assert set(got) <= allowed


def test_penalties_match_hand_computation(sampler):
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 1.0, 3.0]])
    r = req(prompt=(0, 1), output=(2, 2, 3), temperature=0.0, repetition_penalty=2.0,
            presence_penalty=0.5, frequency_penalty=0.25)
    got = logits.clone()
    apply_penalties(got, [0], [r])
    # repetition over prompt+output (0, 1, 2, 3); frequency/presence over output (2 twice, 3 once).
    want = torch.tensor([[2.0 / 2, -1.0 * 2, 0.5 / 2 - 2 * 0.25 - 0.5, -0.5 * 2 - 0.25 - 0.5, 1.0, 3.0]])
    torch.testing.assert_close(got, want)


def test_penalties_only_touch_their_own_rows(sampler):
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(5))
    reqs = [req(temperature=0.0, output=(1, 2)), req(temperature=0.0, output=(1, 2), frequency_penalty=1.0),
            req(temperature=0.0, output=(7,))]
    logits[1, 1] = logits[1].max() + 0.5  # the best token until the penalty applies
    out = sampler(logits, reqs)
    assert ids(out)[0] == logits[0].argmax() and ids(out)[2] == logits[2].argmax()
    assert ids(out)[1] == logits[1].topk(2).indices[1]


def test_penalty_changes_the_greedy_choice(sampler):
    logits = torch.tensor([[1.0, 5.0, 4.0]])

    def pick(prompt, output=(), **params) -> int:
        return sampler(logits, [req(prompt, output, temperature=0.0, **params)])[0].token_id

    assert pick((0,), (1,)) == 1
    assert pick((0,), (1,), repetition_penalty=2.0) == 2
    assert pick((0,), (1,), presence_penalty=1.5) == 2
    assert pick((1,), repetition_penalty=2.0) == 2  # repetition counts the prompt too
    assert pick((1,), frequency_penalty=2.0) == 1  # the OpenAI penalties do not


def test_min_tokens_blocks_eos_and_stop_ids(sampler):
    logits = torch.zeros(1, V)
    logits[0, EOS] = 10.0
    logits[0, 7] = 9.0
    logits[0, 8] = 8.0
    blocked = dict(temperature=0.0, min_tokens=2, stop_token_ids=[7])
    assert ids(sampler(logits, [req(output=(5,), **blocked)])) == [8]
    assert ids(sampler(logits, [req(output=(5, 5), **blocked)])) == [EOS]  # min_tokens reached
    assert ids(sampler(logits, [req(output=(5,), ignore_eos=True, **blocked)])) == [EOS]
    sampled = sampler(logits.expand(200, V).clone(), [req(output=(), temperature=1.0, min_tokens=1)
                                                      for _ in range(200)])
    assert EOS not in ids(sampled)


def test_logprobs_are_raw_log_softmax_with_ranks(sampler):
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(6))
    reqs = [req(temperature=0.0, logprobs=5), req(temperature=1.0, seed=3, logprobs=2, presence_penalty=1.0,
                                                  output=(int(logits[1].argmax()),)),
            req(temperature=0.0, logprobs=0)]
    out = sampler(logits, reqs)
    raw = torch.log_softmax(logits, -1)
    for row, (t, n) in enumerate(zip(out, (5, 2, 0))):
        assert t.logprob == pytest.approx(raw[row, t.token_id].item(), abs=1e-6)
        assert next(iter(t.logprobs)) == t.token_id  # sampled token first
        rank = int((raw[row] > raw[row, t.token_id]).sum()) + 1
        assert t.logprobs[t.token_id].rank == rank
        top = raw[row].topk(n)
        assert set(t.logprobs) == {t.token_id} | set(top.indices.tolist())
        for r, (v, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
            assert t.logprobs[i].rank == r
            assert t.logprobs[i].logprob == pytest.approx(v, abs=1e-6)
    assert out[0].logprobs[out[0].token_id].rank == 1  # greedy picks rank 1


def test_logprobs_in_the_greedy_fast_path_of_half_logits(sampler):
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    out = sampler(logits, [req(temperature=0.0, logprobs=1), req(temperature=0.0)])
    raw = torch.log_softmax(logits.float(), -1)
    assert out[0].logprob == pytest.approx(raw[0].max().item(), abs=1e-6)
    assert out[1].logprobs is None


def test_temperature_sampling_follows_the_distribution(sampler):
    # p = (0.75, 0.25) at temperature 1; 2000 draws keyed by one seeded generator.
    logits = torch.full((2000, V), float("-inf"))
    logits[:, 0], logits[:, 1] = math.log(0.75), math.log(0.25)
    sampler.generator.manual_seed(0)
    got = ids(sampler(logits, [req(temperature=1.0) for _ in range(2000)]))
    assert set(got) == {0, 1}
    assert abs(got.count(0) / 2000 - 0.75) < 0.05
    # Temperature 0.5 sharpens to 0.9 / 0.1.
    got = ids(sampler(logits, [req(temperature=0.5) for _ in range(2000)]))
    assert abs(got.count(0) / 2000 - 0.9) < 0.04


def test_the_seeded_stream_lives_in_the_request():
    logits = forced([0.5, 0.5])

    def draws() -> list[int]:
        r, out = req(seed=42, temperature=1.0), []
        for _ in range(200):
            out.append(HostSampler(set())(logits, [r])[0].token_id)  # a new sampler each step
            r.token_ids.append(out[-1])
        return out
    draws_a, draws_b = draws(), draws()
    assert draws_a == draws_b
    assert 70 < draws_a.count(0) < 130


def test_uniform_draws_stay_inside_the_open_interval():
    """The extreme bit patterns give u strictly inside (0, 1): an Exp(1) of 0 would make a zero-weight token's
    0 / 0 a NaN that wins the race (a top_k=2 draw once returned token 39)."""
    u = uniform(torch.tensor([-1, 0, (1 << 63) - 1, -(1 << 63)], dtype=torch.long))
    assert ((u > 0) & (u < 1)).all() and (-u.log() > 0).all()



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_ids_are_argmax_first_maxima_and_nan_included(dtype):
    x = torch.randn(8, 1000, generator=torch.Generator().manual_seed(3))
    x[1, 10] = x[1, 20] = x[1].max() + 1  # equal maxima: the first
    x[2, 5] = x[2, 9] = float("nan")  # NaN counts largest: the first
    x[3] = 0.0
    x[4, -1] = float("inf")
    x = x.to(dtype)
    assert torch.equal(greedy_ids(x), x.argmax(-1))
    assert greedy_ids(x)[1:5].tolist() == [10, 5, 0, 999]
