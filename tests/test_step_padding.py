"""The CPU's steps (but all-decode ones) padded to a few token counts (engine.step_padding): the sizes, the
padding spans and decodes, and engines whose steps are padded giving what the same engines unpadded give, with
every padding token's key and value in the pool's scratch block (no block left, prefix hits and chunks read what
the real tokens wrote)."""
import pytest
import torch

from conftest import assert_pool_free, sentence
from engine import LLM, PoolingParams, SamplingParams
from engine.context import Context, PrefillSpan
from engine.step_padding import PADDING_SPAN, pad_context, pad_inputs, padded_size

from test_decoders import PROMPTS, spy_steps

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sizes_are_eight_an_octave_and_at_most_the_largest_step():
    sizes = {padded_size(n, 8192) for n in range(1, 8193)}
    assert sizes == {padded_size(n, 8192) for n in sizes}  # a size pads to itself
    assert len([s for s in sizes if 4096 <= s < 8192]) == 8 and max(sizes) == 8192
    assert len(sizes) < 100
    for n in range(1, 8193):
        assert n <= padded_size(n, 8192) <= max(n + 7, n * 9 // 8)
    assert padded_size(7300, 7500) == 7500 and padded_size(7600, 7500) == 7600  # capped, never below the step
    assert padded_size(300, 0) == 300  # no padding (the engine's default off the CPU)


def rows_seen(llm: LLM) -> list[int]:
    """The row count of every step's first linear layer (what oneDNN builds its products for), appended as they run."""
    model, seen = llm.engine.runner.model, []
    first = model.layers[0].self_attn.qkv_proj if model.is_decoder else model.encoder.layer[0].attention.self.qkv
    first.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    return seen


def unpadded(llm: LLM) -> LLM:
    llm.engine.runner.pad_steps_to = 0
    return llm


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_embeddings_of_padded_steps_are_the_unpadded_ones(dtype, tiny_model):
    texts = [sentence(900 + i, n) for i, n in enumerate((3, 17, 9, 30, 5, 61, 2))]
    params = PoolingParams(normalize=False)
    for pooling in ("mean", "cls"):
        padded = LLM(tiny_model("bert"), task="embed", pooling=pooling, dtype=dtype, max_num_batched_tokens=64)
        rows = rows_seen(padded)
        got = torch.tensor([o.outputs.embedding for o in padded.embed(texts, pooling_params=params)])
        plain = unpadded(LLM(tiny_model("bert"), task="embed", pooling=pooling, dtype=dtype,
                             max_num_batched_tokens=64))
        want = torch.tensor([o.outputs.embedding for o in plain.embed(texts, pooling_params=params)])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert rows and all(n == padded_size(n, 64) for n in rows) and any(n % 8 == 0 and n > 0 for n in rows)


def test_generation_on_padded_steps_is_the_unpadded_engines(tiny_model):
    """Chunked prompts, prefix hits (the second batch shares the first's prompts) and steps mixing decodes with
    chunks (padded by decodes; all-decode steps not padded): the same greedy tokens and logprobs; padding keys and
    values go to the scratch block only, so no cached block is overwritten and none is left."""
    kwargs = dict(dtype="float32", block_size=8, max_num_batched_tokens=40, long_prefill_token_threshold=13)
    padded, plain = LLM(tiny_model("llama3-gqa"), **kwargs), unpadded(LLM(tiny_model("llama3-gqa"), **kwargs))
    rows, steps = rows_seen(padded), spy_steps(padded)
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=2, ignore_eos=True)
    run = lambda llm: llm.generate(PROMPTS[:3], params) + llm.generate(PROMPTS, params)  # noqa: E731
    got, want = run(padded), run(plain)
    assert padded.engine.kv.prefix_cache_hits > 0
    for a, b in zip(got, want, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert x.keys() == y.keys()
            assert all(abs(x[t].logprob - y[t].logprob) < 1e-4 for t in x)
    steps = [step for step in steps if step]
    totals = [sum(n for _, n, _ in step) for step in steps]
    decoding = [[n == 1 and computed > 0 for computed, n, _ in step] for step in steps]
    assert rows == [t if all(d) else padded_size(t, 40) for t, d in zip(totals, decoding, strict=True)]
    mixed = [any(d) and not all(d) for d in decoding]
    assert any(n > t for n, t, m in zip(rows, totals, mixed) if m)  # a step with decodes padded
    assert any(n > t for n, t, m in zip(rows, totals, decoding) if not any(m))  # a step of prefills only padded
    assert_pool_free(padded)


def test_a_padded_span_is_split_so_its_attention_stays_small():
    ctx = Context(causal=True, prefills=[PrefillSpan(0, 5, 5)], num_prefill_tokens=5,
                  slot_mapping=torch.tensor([3, 4, 5, 6, 7]))
    pad_context(ctx, 5 + PADDING_SPAN + 9, PADDING_SPAN, scratch_block=10, block_size=8)
    assert [(s.start, s.end, s.context_len) for s in ctx.prefills[1:]] == [(5, 69, 64), (69, 78, 9)]
    assert ctx.num_prefill_tokens == 78 and ctx.decode_block_table is None
    assert ctx.slot_mapping[:5].tolist() == [3, 4, 5, 6, 7]
    assert all(80 <= s < 88 for s in ctx.slot_mapping[5:].tolist()) and len(ctx.slot_mapping) == 78


def test_a_step_with_decodes_is_padded_by_decodes_of_one_scratch_key():
    """Decodes sit last in a step: padding goes after them as decodes reading the scratch block's first key."""
    ctx = Context(causal=True, prefills=[PrefillSpan(0, 5, 9)], num_prefill_tokens=5,
                  slot_mapping=torch.arange(7), decode_block_table=torch.tensor([[1, 2], [3, 0]], dtype=torch.int32),
                  decode_context_lens=torch.tensor([12, 4], dtype=torch.int32))
    pad_context(ctx, 10, PADDING_SPAN, scratch_block=10, block_size=8)
    assert len(ctx.prefills) == 1 and ctx.num_prefill_tokens == 5
    assert ctx.decode_block_table.tolist() == [[1, 2], [3, 0], [10, 10], [10, 10], [10, 10]]
    assert ctx.decode_context_lens.tolist() == [12, 4, 1, 1, 1] and ctx.decode_context_lens.dtype == torch.int32
    assert ctx.slot_mapping.tolist() == list(range(7)) + [80, 81, 82]


def test_padding_tokens_sit_at_their_place_in_their_span():
    ids, pos, types = pad_inputs(5 + PADDING_SPAN + 3, PADDING_SPAN, torch.tensor([7, 8, 9, 10, 11]),
                                 torch.tensor([0, 1, 2, 0, 1]), torch.tensor([0, 0, 1, 0, 1]))
    assert ids.tolist() == [7, 8, 9, 10, 11] + [0] * (PADDING_SPAN + 3)
    assert pos.tolist() == [0, 1, 2, 0, 1] + list(range(PADDING_SPAN)) + [0, 1, 2]
    assert types.tolist() == [0, 0, 1, 0, 1] + [0] * (PADDING_SPAN + 3)
    assert pad_inputs(6, PADDING_SPAN, ids[:4], pos[:4], None)[2] is None


def test_a_model_with_attention_of_its_own_is_not_padded(tiny_model):
    """DeBERTa lays a step out as a padded batch of the sequences its positions delimit: padding spans would each
    cost a whole padded sequence there."""
    assert LLM(tiny_model("deberta-v3-cls1"), task="classify").engine.runner.pad_steps_to == 0
    assert LLM(tiny_model("bert"), task="embed").engine.runner.pad_steps_to > 0


def test_padding_spans_stay_inside_a_short_max_model_len(tiny_model):
    """max_model_len 16: padding spans of 16 tokens, positions 0..15 (a decoder's rotary table holds 16); a step of
    18 prompts of 15 tokens (270) pads by 18."""
    llm = LLM(tiny_model("llama3-gqa"), dtype="float32", block_size=8, max_model_len=16, max_num_batched_tokens=512)
    assert llm.engine.runner.padding_span == 16
    rows = rows_seen(llm)
    outs = llm.generate([[5 + i] * 15 for i in range(18)], SamplingParams(temperature=0.0, max_tokens=1))
    assert all(len(o.outputs[0].token_ids) == 1 for o in outs) and rows == [padded_size(270, 512)] == [288]
    assert_pool_free(llm)
