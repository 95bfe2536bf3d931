"""A step's last layer computes, past its attention, only the rows the step's outputs read (Context.output_rows):
each sampled row and one row per pooled request (its first token for cls pooling, its last for last pooling).
Every output must be the engine's with every row computed, and the last layer must have seen only those rows."""
import pytest
import torch

from conftest import sentence
from engine import LLM, PoolingParams, SamplingParams
from engine.step_padding import padded_size

from test_decoders import PROMPTS

pytestmark = pytest.mark.usefixtures("one_thread")


def engines(path: str, **kwargs) -> tuple[LLM, LLM]:
    """The same engine twice: pruning its last layer, and computing every row."""
    pruned, full = LLM(path, dtype="float32", **kwargs), LLM(path, dtype="float32", **kwargs)
    full.engine.runner.model.computes_output_rows_only = False
    return pruned, full


def last_layer_rows(llm: LLM) -> list[int]:
    """The rows each step's last layer runs its MLP on, appended as the steps run."""
    model, seen = llm.engine.runner.model, []
    last = model.layers[-1].mlp.down_proj if model.is_decoder else model.encoder.layer[-1].output.dense
    last.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    return seen


@pytest.mark.parametrize("family", ["bert", "xlmr"])
def test_cls_pooling_computes_one_last_layer_row_per_input_and_mean_pooling_all(family, tiny_model):
    texts = [sentence(800 + i, n) for i, n in enumerate((3, 17, 9, 30))]
    params = PoolingParams(normalize=False)
    for pooling in ("cls", "mean"):
        pruned, full = engines(tiny_model(family), task="embed", pooling=pooling)
        rows = last_layer_rows(pruned)
        got = [o.outputs.embedding for o in pruned.embed(texts, pooling_params=params)]
        want = [o.outputs.embedding for o in full.embed(texts, pooling_params=params)]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=1e-5)
        num_tokens = sum(len(o.prompt_token_ids) for o in full.embed(texts))
        # One step: mean pooling computes every row of it, the CPU's padding rows too (engine.step_padding).
        every_row = padded_size(num_tokens, pruned.engine.runner.pad_steps_to)
        assert sum(rows) == (len(texts) if pooling == "cls" else every_row)


@pytest.mark.parametrize("arch", ["llama3-gqa", "qwen3"])
def test_generation_samples_from_the_last_layer_rows_it_computed(arch, tiny_model):
    """Chunked prompts (a chunk that does not end its prompt reads no row), prefix hits, decodes mixed with
    prefill chunks: the same tokens and logprobs, one last-layer row per sampled token."""
    pruned, full = engines(tiny_model(arch), block_size=8, max_num_batched_tokens=24, long_prefill_token_threshold=13)
    rows = last_layer_rows(pruned)
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=2, ignore_eos=True)
    prompts = PROMPTS[1:] + PROMPTS[3:]
    run = lambda llm: llm.generate(prompts[:3], params) + llm.generate(prompts[3:], params)  # noqa: E731 (a hit)
    got, want = run(pruned), run(full)
    assert pruned.engine.kv.prefix_cache_hits > 0
    for a, b in zip(got, want, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for tok, la, lb in zip(a.outputs[0].token_ids, a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert abs(la[tok].logprob - lb[tok].logprob) < 1e-5
    assert sum(rows) == 6 * len(prompts)


def test_a_decoder_reranker_scores_from_each_pairs_last_row(tiny_model):
    """Last-token pooling with the query's blocks hit by every document after the first."""
    pruned, full = engines(tiny_model("qwen3"), task="score", block_size=8, score_tokens=("no", "yes"))
    rows = last_layer_rows(pruned)
    docs = [sentence(900 + i, 6 + 5 * i) for i in range(5)]
    got = [o.outputs.score for o in pruned.score("where does the cat sleep", docs)]
    want = [o.outputs.score for o in full.score("where does the cat sleep", docs)]
    assert pruned.engine.kv.prefix_cache_hits > 0
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=1e-5)
    assert sum(rows) == len(docs)
