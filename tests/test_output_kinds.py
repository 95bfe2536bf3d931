"""Generation outputs as vLLM's RequestOutputKind asks: DELTA streams only what is new, FINAL_ONLY emits
once, CUMULATIVE everything so far; the three agree on the result."""
import dataclasses

import pytest

from conftest import assert_pool_free, sentence
from engine import LLM, SamplingParams
from engine.params import RequestOutputKind

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(tiny_model("llama"), dtype="float32", block_size=8)


def run(llm: LLM, prompt: str, params: SamplingParams) -> list:
    eng, rid, outs = llm.engine, llm.engine.new_id(), []
    eng.add_generation(rid, prompt, params)
    while eng.has_unfinished():
        outs += [o for o in eng.step() if o.request_id == rid]
    return outs


def assert_logprobs_close(got: list[dict], want: list[dict]) -> None:
    """The later runs hit the prefix cache, which moves fp32 logprobs in the last digits."""
    assert [list(d) for d in got] == [list(d) for d in want]
    for g, w in zip(got, want):
        for t in g:
            assert (g[t].rank, g[t].decoded_token) == (w[t].rank, w[t].decoded_token)
            assert g[t].logprob == pytest.approx(w[t].logprob, abs=1e-5)


PARAMS = [SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=14, logprobs=2, ignore_eos=True),
          # a stop string cuts the text and ends the request early; held-back text still arrives
          SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=0, stop=["w1", "the"])]


@pytest.mark.parametrize("params", PARAMS)
def test_deltas_concatenate_to_the_final_output(llm, params):
    prompt = sentence(3, 9)
    final = run(llm, prompt, dataclasses.replace(params, output_kind=RequestOutputKind.FINAL_ONLY))
    assert len(final) == 1 and final[0].finished
    deltas = run(llm, prompt, dataclasses.replace(params, output_kind=RequestOutputKind.DELTA))
    assert len(deltas) > 1 and deltas[-1].finished and not any(o.finished for o in deltas[:-1])
    for want in final[0].outputs:
        pieces = [c for o in deltas for c in o.outputs if c.index == want.index]
        assert all(len(p.token_ids) == 1 for p in pieces)  # one new token per step, nothing re-sent
        assert "".join(p.text for p in pieces) == want.text
        assert [t for p in pieces for t in p.token_ids] == want.token_ids
        assert_logprobs_close([lp for p in pieces for lp in p.logprobs], want.logprobs)
        assert pieces[-1].finish_reason == want.finish_reason and pieces[-1].stop_reason == want.stop_reason
        assert all(p.finish_reason is None for p in pieces[:-1])
        assert pieces[-1].cumulative_logprob == pytest.approx(want.cumulative_logprob)
    cumulative = run(llm, prompt, params)
    assert [(c.text, c.token_ids) for c in cumulative[-1].outputs] == [(c.text, c.token_ids) for c in final[0].outputs]
    for got, want in zip(cumulative[-1].outputs, final[0].outputs):
        assert_logprobs_close(got.logprobs, want.logprobs)
    assert all(len(o.outputs) == params.n for o in cumulative)
    assert_pool_free(llm)


def test_offline_generate_returns_one_final_output_per_prompt(llm):
    steps, step = [], llm.engine.step
    llm.engine.step = lambda: steps.append(outs := step()) or outs
    try:
        outs = llm.generate([sentence(4, 5), sentence(5, 7)], SamplingParams(temperature=0.0, max_tokens=6,
                                                                             ignore_eos=True))
    finally:
        llm.engine.step = step
    assert [len(o.outputs[0].token_ids) for o in outs] == [6, 6] and all(o.finished for o in outs)
    assert sum(len(s) for s in steps) == 2  # FINAL_ONLY: nothing emitted until each request ended
    assert_pool_free(llm)


def test_a_stop_token_is_no_text_in_any_kind(llm):
    """FINAL_ONLY without stop strings decodes its text once, at the end: the stop token that ended it is
    left out there as the incremental path (DELTA, CUMULATIVE) leaves it out."""
    prompt = sentence(3, 9)
    free = run(llm, prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                           output_kind=RequestOutputKind.FINAL_ONLY))[0].outputs[0]
    stop_id = free.token_ids[4]
    ended = {}
    for kind in RequestOutputKind:
        outs = run(llm, prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_id],
                                               output_kind=kind))
        pieces = [o.outputs[0] for o in outs] if kind is RequestOutputKind.DELTA else [outs[-1].outputs[0]]
        ended[kind] = ("".join(p.text for p in pieces), [t for p in pieces for t in p.token_ids],
                       pieces[-1].finish_reason, pieces[-1].stop_reason)
    want = ended[RequestOutputKind.DELTA]
    assert want[1][-1] == stop_id and want[2:] == ("stop", stop_id)
    assert want[0] and free.text.startswith(want[0]) and len(want[0]) < len(free.text)
    assert ended[RequestOutputKind.FINAL_ONLY] == want == ended[RequestOutputKind.CUMULATIVE]
    assert_pool_free(llm)
