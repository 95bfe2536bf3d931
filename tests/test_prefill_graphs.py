"""Prefill steps through the piecewise CUDA graphs' padded buffers (engine.prefill_graphs), run eagerly here
as on a GPU they are replayed: the same scores, tokens and logprobs as the eager forward, padding that
never touches a real sequence's K/V, and graphs dropped where they differ from the eager forward."""
import logging

import pytest
import torch

from conftest import assert_pool_free, sentence
from engine import LLM, SamplingParams
from engine.context import Context, get_context
from engine import prefill_graphs as PG
from engine.prefill_graphs import PrefillGraphs, capture_sizes
from test_decoders import assert_same_generations, run_staggered

TEMPLATE = "question : {query} document : {document} answer :"
QUERY = "is the cat on the mat"


def test_capture_sizes_pad_a_step_by_at_most_half_from_2048_tokens():
    sizes = capture_sizes(16384)
    assert sizes[0] == 64 and sizes[-1] == 16384 and sizes == sorted(set(sizes))
    assert all(b <= 2 * a for a, b in zip(sizes, sizes[1:]))
    assert all(b <= a + a // 2 for a, b in zip(sizes, sizes[1:]) if a >= 2048)
    assert capture_sizes(100) == [64, 100] and capture_sizes(64) == [64] and capture_sizes(8) == [8]


def through_graph_buffers(llm: LLM) -> list[Context]:
    """Captures the buffers (run eagerly) on the engine; returns the contexts of the steps they take."""
    runner = llm.engine.runner
    runner.capture_prefill_graphs(llm.engine.config.max_num_batched_tokens, capture=False)
    graphs, steps = runner.prefill_graphs, []
    assert graphs is not None, "the buffers' forward differs from the eager one"

    def counted(input_ids, positions, token_type_ids=None):
        steps.append(get_context())
        return PrefillGraphs.__call__(graphs, input_ids, positions, token_type_ids)
    runner.prefill_graphs = counted
    counted.max_tokens, counted.graphs = graphs.max_tokens, graphs
    return steps


@pytest.mark.parametrize("arch", ["qwen3", "llama3-gqa", "gemma"])
def test_yes_no_scores_through_the_buffers_are_eager_ones(arch, tiny_model):
    """Several pairs a step, the query's prefix found in the cache (keys read from the pool), a long pair in
    chunks; then a shorter step after a longer one, whose padding must not write the slots the longer step's
    tokens took (every slot but the step's own and the scratch block's keeps its K/V), and the last pairs (the
    long one's chunks in that longer step) again from the cache."""
    docs = [sentence(300 + i, 4 + 9 * i) for i in range(5)] + [sentence(320, 70)]
    kw = dict(task="score", dtype="float32", block_size=4, score_tokens=("no", "yes"), score_template=TEMPLATE,
              max_num_batched_tokens=96)
    eager = LLM(tiny_model(arch), **kw)
    want = [o.outputs.score for o in eager.score(QUERY, docs)]
    llm = LLM(tiny_model(arch), **kw)
    steps = through_graph_buffers(llm)
    got = [o.outputs.score for o in llm.score(QUERY, docs)]
    runner, before = llm.engine.runner, llm.engine.runner.kv_cache.clone()
    short = llm.score(QUERY, docs[:1])[0]
    kept = torch.ones(before.shape[2], dtype=torch.bool)
    kept[steps[-1].slot_mapping] = False
    kept[runner.scratch_block * runner.block_size:] = False
    assert torch.equal(runner.kv_cache[:, :, kept], before[:, :, kept])
    # (A two-layer model's padding rows recompute the K/V a stale slot held; the buffer says where they went.)
    padding = runner.prefill_graphs.graphs.slot_mapping[steps[-1].num_prefill_tokens:64]
    assert (padding == runner.scratch_block * 4).all()
    again = [o.outputs.score for o in llm.score(QUERY, docs[4:])]  # their blocks from the cache
    assert got == pytest.approx(want, abs=1e-5)
    assert short.outputs.score == pytest.approx(want[0], abs=1e-5) and short.num_cached_tokens > 0
    assert again == pytest.approx(want[4:], abs=1e-5)
    sizes = [ctx.num_prefill_tokens for ctx in steps]
    assert len(sizes) >= 4 and max(sizes) == 96 and min(sizes) < 64  # full, chunked and padded steps
    assert_pool_free(llm)


@pytest.mark.parametrize("options", [{}, {"kv_cache_dtype": "fp8"}, {"quantization": "w8a8"}])
def test_generation_prefills_through_the_buffers_as_eager(tiny_model, options):
    """Prompts prefilled together and in chunks through the buffers, decoded eagerly: eager's tokens and
    logprobs, with a float8 KV cache (the stretches write keys and values quantized) and with w8a8 layers
    (their activations quantized inside the stretches) too."""
    prompts = [sentence(340 + i, n) for i, n in enumerate((3, 20, 45))]
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=1, ignore_eos=True)
    kw = dict(dtype="float32", block_size=8, max_num_batched_tokens=48, **options)
    want = LLM(tiny_model("llama"), **kw).generate(prompts, params)
    llm = LLM(tiny_model("llama"), **kw)
    steps = through_graph_buffers(llm)
    got = llm.generate(prompts, params)
    assert steps
    assert_same_generations(want, got)
    assert_pool_free(llm)


def test_steps_mixing_prefills_with_decodes_go_through_the_buffers_as_eager(tiny_model):
    """Continuous batching: requests arriving while others decode make steps of prefill chunks and decodes,
    which go through the buffers too (the eager attention takes both); eager's tokens and logprobs."""
    prompts = [sentence(390 + i, 4 + 9 * i) for i in range(4)]
    params = [SamplingParams(temperature=0.0, max_tokens=8, logprobs=1, ignore_eos=True)] * len(prompts)
    kw = dict(dtype="float32", block_size=8, max_num_batched_tokens=32)
    want = run_staggered(LLM(tiny_model("llama"), **kw), prompts, params)
    llm = LLM(tiny_model("llama"), **kw)
    steps = through_graph_buffers(llm)
    assert_same_generations(want, run_staggered(llm, prompts, params))
    assert any(ctx.prefills and ctx.decode_block_table is not None for ctx in steps)
    assert_pool_free(llm)


def test_graphs_that_differ_from_the_eager_forward_are_dropped(tiny_model, monkeypatch, caplog):
    llm = LLM(tiny_model("llama"), dtype="float32", block_size=8)
    runner = llm.engine.runner
    call = PrefillGraphs.__call__
    monkeypatch.setattr(PrefillGraphs, "__call__", lambda self, *args: call(self, *args) * 1.01)
    with caplog.at_level(logging.WARNING, logger="engine.model_runner"):
        runner.capture_prefill_graphs(64, capture=False)
    assert runner.prefill_graphs is None and "prefill stays eager" in caplog.text
    monkeypatch.setattr(PrefillGraphs, "__call__", call)
    monkeypatch.setattr(PrefillGraphs, "_stretch", lambda *args: 1 / 0)  # as an op a device cannot capture
    with caplog.at_level(logging.WARNING, logger="engine.model_runner"):
        runner.capture_prefill_graphs(64, capture=False)
    assert runner.prefill_graphs is None and "failed to capture: ZeroDivisionError" in caplog.text
    monkeypatch.undo()
    runner.capture_prefill_graphs(64, capture=False)
    assert runner.prefill_graphs is not None and PG.matches_eager(runner, runner.prefill_graphs)
    out = llm.generate([sentence(380, 9)], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 2
    assert_pool_free(llm)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs: a GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_captured_prefill_graphs_score_as_eager(dtype, tiny_model):
    """On a GPU the engine captures the graphs by default: replayed, they give enforce_eager's scores."""
    docs = [sentence(360 + i, 4 + 9 * i) for i in range(5)] + [sentence(370, 70)]
    kw = dict(task="score", dtype=dtype, block_size=16, score_tokens=("no", "yes"), score_template=TEMPLATE,
              max_num_batched_tokens=256)
    want = [o.outputs.score for o in LLM(tiny_model("qwen3"), enforce_eager=True, **kw).score(QUERY, docs)]
    llm = LLM(tiny_model("qwen3"), **kw)
    assert llm.engine.runner.prefill_graphs is not None
    got = [o.outputs.score for o in llm.score(QUERY, docs) + llm.score(QUERY, docs[:2])]
    assert got == pytest.approx(want + want[:2], abs=1e-5 if dtype == "float32" else 2e-2)
    assert_pool_free(llm)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs: a GPU")
def test_captured_graphs_generate_as_eager_under_continuous_batching(tiny_model):
    """Replayed around the attention of steps that mix prefill chunks with decodes: enforce_eager's tokens."""
    prompts = [sentence(395 + i, 4 + 9 * i) for i in range(4)]
    params = [SamplingParams(temperature=0.0, max_tokens=8, logprobs=1, ignore_eos=True)] * len(prompts)
    kw = dict(dtype="float32", block_size=16, max_num_batched_tokens=32)
    want = run_staggered(LLM(tiny_model("llama"), enforce_eager=True, **kw), prompts, params)
    llm = LLM(tiny_model("llama"), **kw)
    assert llm.engine.runner.prefill_graphs is not None
    assert_same_generations(want, run_staggered(llm, prompts, params))
    assert_pool_free(llm)


def test_graphs_are_kept_up_to_the_largest_step_size_they_replay_faster(tiny_model):
    """The start-up timing's search, on a clock where replaying costs less than the eager forward for short steps
    and more for long ones (a larger model's long steps): timed from the largest size down, midway between
    sizes, it stops at the first size that wins; a clock where the graphs never win keeps none."""
    llm = LLM(tiny_model("llama"), dtype="float32", block_size=8, max_num_batched_tokens=1024)
    runner = llm.engine.runner
    graphs = PrefillGraphs(runner, 1024, capture=False)
    timed = []

    def clock(replay_per_token: float):
        def seconds(fn) -> float:
            calls = []
            graphs.forward = lambda ids, positions, replay: calls.append(ids.shape[0]) or ids.new_zeros(1)
            runner_model, runner.model = runner.model, lambda ids, positions: ids.new_zeros(1)
            try:
                fn()
            finally:
                runner.model = runner_model
                del graphs.forward
            tokens = get_context().num_prefill_tokens
            timed.append((tokens, bool(calls)))
            return 0.5 + replay_per_token * tokens if calls else 2.0 + 0.01 * tokens
        return seconds

    assert graphs.sizes == [64, 128, 256, 512, 1024]
    assert PG.largest_faster_size(runner, graphs, clock(0.02)) == 128  # replay wins below 150 tokens
    assert [t for t, replayed in timed if replayed] == [769, 385, 193, 97]
    assert PG.largest_faster_size(runner, graphs, clock(1.0)) is None
    real = PG.largest_faster_size(runner, graphs, PG.fastest_seconds(lambda: None))  # the start-up's own clock
    assert real is None or real in graphs.sizes


def test_steps_above_the_kept_size_run_eagerly(tiny_model, monkeypatch, caplog):
    """Where the timing keeps the graphs up to a size (the capture stubbed out: a CPU), steps up to it go through
    the buffers and longer ones through the eager forward, with eager's tokens; where it keeps none, none."""
    prompts = [sentence(400 + i, n) for i, n in enumerate((3, 20, 45, 70))]
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=1, ignore_eos=True)
    kw = dict(dtype="float32", block_size=8, max_num_batched_tokens=256)
    want = LLM(tiny_model("llama"), **kw).generate(prompts, params)
    llm = LLM(tiny_model("llama"), **kw)
    runner = llm.engine.runner
    monkeypatch.setattr(PrefillGraphs, "_capture", lambda self: None)  # buffers run eagerly, as uncaptured
    monkeypatch.setattr("engine.model_runner.largest_faster_size", lambda *args: 64)
    with caplog.at_level(logging.INFO, logger="engine.model_runner"):
        runner.capture_prefill_graphs(256)
    graphs = runner.prefill_graphs
    assert graphs.max_tokens == 64 and graphs.sizes == [64] and "up to 64 tokens" in caplog.text
    through = []
    monkeypatch.setattr(PrefillGraphs, "__call__", lambda self, ids, pos, tt=None: through.append(ids.shape[0])
                        or self.forward(ids, pos, replay=True))
    got = llm.generate(prompts[:1], params) + llm.generate(prompts[1:], params)
    assert_same_generations(want, got)
    long_prefill = sum(len(o.prompt_token_ids) for o in got[1:])  # the second call's first step
    assert long_prefill > 64 and through and max(through) <= 64  # it ran eagerly; the short steps did not
    monkeypatch.setattr("engine.model_runner.largest_faster_size", lambda *args: None)
    runner.capture_prefill_graphs(256)
    assert runner.prefill_graphs is None and "no faster than the eager forward" in caplog.text
    assert_pool_free(llm)
