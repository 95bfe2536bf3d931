"""Decoder parity with Hugging Face, fp32: greedy generation token for token (alone, in a mixed
continuous batch, under preemption, chunked prefill and prefix-cache hits), yes/no reranking,
sequence classification, last-token embeddings; then sampling behaviour."""
import gc
import math
import weakref

import numpy as np
import pytest
import torch
import transformers as T

from conftest import assert_pool_free, require_c_kernels, sentence, update_config
from engine import LLM, PoolingParams, SamplingParams, cpu_layer_ops
from engine.compiled_model import CompiledModel
from engine.context import get_context
from engine.layer_ops import CPUFusedLayerOps, LayerOps
from engine.loader import resolve_model
from engine.params import RequestOutputKind

SMOLLM = "HuggingFaceTB/SmolLM2-135M-Instruct"
pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = ["llama", "llama3-gqa", "qwen2", "qwen3", "gemma", "mistral"]
N_NEW = 16
# With the word-level tokenizer 5, 19, 33 and 47 tokens (BOS included): inside one block, and
# across two to six blocks of 8 (Qwen2's byte-level BPE makes them about twice as long).
PROMPTS = [sentence(100 + i, n) for i, n in enumerate((4, 18, 32, 46))]
# Share a 40-word prefix (at least five full blocks of 8), then differ.
SHARED = [sentence(7, 40) + " " + sentence(200 + i, 3 + 2 * i) for i in range(3)]


def greedy(max_tokens: int = N_NEW) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


class Reference:
    """A Hugging Face model on the same dir; greedy continuations cached by prompt ids."""

    def __init__(self, model_dir: str):
        self.model = T.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.cache: dict[tuple, list[int]] = {}

    @torch.no_grad()
    def greedy(self, ids: list[int], n: int) -> list[int]:
        key = (tuple(ids), n)
        if key not in self.cache:
            x = torch.tensor([ids])
            out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False)
            self.cache[key] = out[0, len(ids):].tolist()
        return self.cache[key]

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        return self.model(torch.tensor([ids])).logits[0].float()

    def check(self, out, n: int = N_NEW) -> None:
        """The engine's greedy tokens equal Hugging Face's. A divergence is accepted only at a genuine
        near-tie of Hugging Face's own logits (fp32 summation order may break it either way)."""
        got, want = out.outputs[0].token_ids, self.greedy(out.prompt_token_ids, n)
        if got == want:
            return
        i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        assert i < min(len(got), len(want)), f"lengths differ without a token difference: {got} vs {want}"
        row = self.logits(out.prompt_token_ids + want[:i])[-1]
        gap = abs(row[got[i]] - row[want[i]]).item()
        assert gap < 1e-4, f"diverged at {i}: engine {got} vs HF {want} (logit gap {gap:.2e})"


@pytest.fixture(scope="module")
def ref(tiny_model):
    refs: dict[str, Reference] = {}

    def get(name: str) -> Reference:
        if name not in refs:
            # The bundled model's converted dir, as the engine loads it (llm.engine.model_dir).
            refs[name] = Reference(resolve_model(name) if name == SMOLLM else tiny_model(name))
        return refs[name]
    return get


def run_staggered(llm: LLM, prompts: list, params: list[SamplingParams], every: int = 2) -> list:
    """Add one request every `every` steps, so steps mix prefills (or chunks) with decodes."""
    eng, pending, done, step = llm.engine, list(enumerate(prompts)), {}, 0
    while pending or eng.has_unfinished():
        if pending and step % every == 0:
            i, p = pending.pop(0)
            eng.add_generation(f"stagger-{i}", p, params[i])
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
    return [done[f"stagger-{i}"] for i in range(len(prompts))]


def spy_steps(llm: LLM) -> list[list[tuple[int, int, int]]]:
    """Record every step as (num_computed_tokens, scheduled tokens, num_tokens) per request."""
    steps, schedule = [], llm.engine.scheduler.schedule

    def wrapped():
        out = schedule()
        steps.append([(r.num_computed_tokens, n, r.num_tokens) for r, n in zip(out.requests, out.num_tokens)])
        return out
    llm.engine.scheduler.schedule = wrapped
    return steps


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def count_preemptions(llm: LLM) -> list[str]:
    victims, preempt = [], llm.engine.scheduler._preempt

    def wrapped(req):
        victims.append(req.request_id)
        preempt(req)
    llm.engine.scheduler._preempt = wrapped
    return victims


# ---------------------------------------------------------------- greedy parity, tiny models


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_alone(arch, tiny_model, ref):
    llm = LLM(tiny_model(arch), dtype="float32", block_size=8, enable_prefix_caching=False)
    for p in PROMPTS:
        out = llm.generate(p, greedy())[0]
        assert out.prompt_token_ids == llm.get_tokenizer()(p)["input_ids"]
        ref(arch).check(out)
    assert_pool_free(llm)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_mixed_continuous_batch(arch, tiny_model, ref):
    llm = LLM(tiny_model(arch), dtype="float32", block_size=8, enable_prefix_caching=False)
    for out in llm.generate(PROMPTS, greedy()):
        ref(arch).check(out)
    # Staggered arrivals and different lengths: prefills join steps full of decodes.
    steps = spy_steps(llm)
    outs = run_staggered(llm, PROMPTS[::-1], [greedy(N_NEW - 3 * i) for i in range(len(PROMPTS))])
    for i, out in enumerate(outs):
        ref(arch).check(out, N_NEW - 3 * i)
    assert any(any(n > 1 for _, n, _ in s) and any(n == 1 for _, n, _ in s) for s in steps)
    assert_pool_free(llm)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_under_preemption(arch, tiny_model, ref):
    # Short prompts, long outputs: all four are admitted, then their decodes outgrow the pool,
    # which holds the longest request alone but nowhere near all four.
    prompts, n = [sentence(400 + i, 3 + 2 * i) for i in range(4)], 24
    tok = T.AutoTokenizer.from_pretrained(tiny_model(arch))
    need = [cdiv(len(tok(p)["input_ids"]) + n, 8) for p in prompts]
    llm = LLM(tiny_model(arch), dtype="float32", block_size=8, num_blocks=max(need) + 2)
    assert sum(need) > 2 * llm.engine.kv.pool.num_blocks
    victims = count_preemptions(llm)
    for out in llm.generate(prompts, greedy(n)):
        ref(arch).check(out, n)
    assert victims, "the pool was meant to run out"
    assert_pool_free(llm)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_with_chunked_prefill(arch, tiny_model, ref):
    llm = LLM(tiny_model(arch), dtype="float32", block_size=8, max_num_batched_tokens=12,
              long_prefill_token_threshold=7)
    steps = spy_steps(llm)
    for out in llm.generate(PROMPTS, greedy()):
        ref(arch).check(out)
    for out in run_staggered(llm, PROMPTS[2:] + PROMPTS[:2], [greedy()] * len(PROMPTS), every=3):
        ref(arch).check(out)
    assert all(sum(n for _, n, _ in s) <= 12 and all(n <= 7 for _, n, _ in s) for s in steps)
    # Chunks that start after earlier chunks, and chunks that end a prompt mid-step.
    assert any(c > 0 and c + n < total for s in steps for c, n, total in s)
    assert_pool_free(llm)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_with_prefix_cache_hits(arch, tiny_model, ref):
    llm = LLM(tiny_model(arch), dtype="float32", block_size=8)
    first = llm.generate(PROMPTS, greedy())
    again = llm.generate(PROMPTS, greedy())
    for a, b in zip(first, again):
        ref(arch).check(b)
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        # Every full block but the one holding the last prompt token is a hit.
        assert b.num_cached_tokens == (len(b.prompt_token_ids) - 1) // 8 * 8
    assert again[-1].num_cached_tokens > 0
    # Prompts sharing a long prefix: in one batch (hits on blocks written in the same step) and later.
    outs = llm.generate(SHARED[:2], greedy()) + llm.generate(SHARED[2:], greedy(N_NEW - 4))
    for out, n in zip(outs, (N_NEW, N_NEW, N_NEW - 4)):
        ref(arch).check(out, n)
    shared = common_prefix(outs[0].prompt_token_ids, outs[1].prompt_token_ids)
    assert shared >= 40
    assert outs[1].num_cached_tokens == outs[2].num_cached_tokens == shared // 8 * 8
    assert_pool_free(llm)


def test_chat_prompt_has_one_bos_and_matches(tiny_model, ref):
    llm = LLM(tiny_model("llama"), dtype="float32")
    messages = [{"role": "system", "content": "the model answers"}, {"role": "user", "content": sentence(5, 12)}]
    out = llm.chat(messages, greedy())[0]
    tok = llm.get_tokenizer()
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert out.prompt_token_ids == tok(text, add_special_tokens=False)["input_ids"]
    assert out.prompt_token_ids[0] == tok.bos_token_id and out.prompt_token_ids[1] != tok.bos_token_id
    ref("llama").check(out)


def test_the_engine_moves_what_it_built_out_of_the_collectors_reach(tiny_model):
    """Frozen after start-up, as vLLM's heap is: a full collection, which steps' garbage triggers now and
    then, no longer walks the model and tokenizer (one took ~230 ms at 1,024 running on CPU). Frozen
    objects are never collected, so an engine must hold no reference cycle: dropped, it goes at once."""
    llm = LLM(tiny_model("llama"), dtype="float32", async_scheduling=True)
    llm.generate(["a b c"], SamplingParams(max_tokens=4))
    engine = llm.engine
    tracked = {id(o) for o in gc.get_objects()}
    assert id(engine.runner.model) not in tracked and id(engine.tokenizer) not in tracked
    assert id(next(iter(engine.runner.model.modules()))) not in tracked
    model = weakref.ref(engine.runner.model)
    del llm, engine
    assert model() is None


def test_steady_decoding_triggers_no_garbage_collection(tiny_model):
    """A step's outputs die young; with 320 running (half streams, half whole responses) Python's default
    threshold ran a collection every step, walking everything young mid-decode."""
    engine = LLM(tiny_model("llama"), dtype="float32", block_size=8, max_num_seqs=320).engine
    for kind in (RequestOutputKind.FINAL_ONLY, RequestOutputKind.DELTA):
        for i in range(160):
            engine.add_generation(f"{kind.name}{i}", sentence(i, 6),
                                  SamplingParams(max_tokens=60, ignore_eos=True, output_kind=kind))
    for _ in range(3):  # prefills
        engine.step()
    collections = []

    def count(phase: str, info: dict) -> None:
        if phase == "start":
            collections.append(info["generation"])
    gc.callbacks.append(count)
    try:
        for _ in range(30):
            engine.step()
    finally:
        gc.callbacks.remove(count)
    assert collections == []
    engine.abort_all()


def test_a_failed_step_leaves_no_unwritten_blocks_in_the_prefix_cache(tiny_model, ref):
    llm = LLM(tiny_model("llama"), dtype="float32", block_size=8)
    eng, execute = llm.engine, llm.engine.runner.execute

    def fail_once(sched):
        eng.runner.execute = execute
        raise RuntimeError("device lost")

    def finish_all() -> dict:
        done = {}
        while eng.has_unfinished():
            done.update((o.request_id, o) for o in eng.step() if o.finished)
        return done

    # b hits blocks that a registered in the same (failed) step; a caller that carries on.
    eng.runner.execute = fail_once
    eng.add_generation("a", SHARED[0], greedy())
    eng.add_generation("b", SHARED[1], greedy())
    with pytest.raises(RuntimeError, match="device lost"):
        eng.step()
    for out in finish_all().values():
        ref("llama").check(out)
    # A server aborts what the failed step held; later prompts must not hit its unwritten blocks.
    eng.runner.execute = fail_once
    eng.add_generation("c", SHARED[2] + " cold rain", greedy())
    with pytest.raises(RuntimeError):
        eng.step()
    eng.abort("c")
    out = llm.generate(SHARED[2] + " cold rain", greedy())[0]
    ref("llama").check(out)
    assert_pool_free(llm)


# ---------------------------------------------------------------- SmolLM2-135M-Instruct

CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "user", "content": "Write a haiku about rain."}],
         [{"role": "user", "content": "Name three colors of the rainbow."}]]
SMOL_NEW = 20


@pytest.fixture(scope="module")
def smollm():
    return LLM(SMOLLM, dtype="float32", max_model_len=512, block_size=16, num_blocks=64)


def test_smollm_greedy_alone_batched_and_cached(smollm, ref):
    params = greedy(SMOL_NEW)
    tok = smollm.get_tokenizer()
    alone = [smollm.chat(c, params)[0] for c in CHATS]
    for c, out in zip(CHATS, alone):
        text = tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
        assert out.prompt_token_ids == tok(text, add_special_tokens=False)["input_ids"]
        ref(SMOLLM).check(out, SMOL_NEW)
    # The chats share the default system prompt: later ones hit its blocks.
    batched = smollm.chat(CHATS, params)
    for a, b in zip(alone, batched):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        assert b.num_cached_tokens > 0
    assert_pool_free(smollm)


def test_smollm_greedy_under_preemption_and_chunked_prefill(ref):
    # ~37-token prompts + 20 new tokens need 4 blocks each; 6 blocks hold one and a half.
    llm = LLM(SMOLLM, dtype="float32", max_model_len=512, block_size=16, num_blocks=6,
              max_num_batched_tokens=24, long_prefill_token_threshold=16)
    victims, steps = count_preemptions(llm), spy_steps(llm)
    for out in llm.chat(CHATS, greedy(SMOL_NEW)):
        ref(SMOLLM).check(out, SMOL_NEW)
    assert victims
    assert any(c > 0 and c + n < total for s in steps for c, n, total in s)
    assert_pool_free(llm)


# ---------------------------------------------------------------- pooling on decoders

YES_NO_TEMPLATE = "question : {query} document : {document} answer :"
QUERY = "is the cat on the mat"
DOCS = [sentence(300 + i, 6 + 5 * i) for i in range(4)]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_yes_no_reranker_matches_hf(arch, tiny_model, ref):
    scores = {}
    for caching in (True, False):
        llm = LLM(tiny_model(arch), task="score", dtype="float32", block_size=4, score_tokens=("no", "yes"),
                  score_template=YES_NO_TEMPLATE, enable_prefix_caching=caching)
        tok = llm.get_tokenizer()
        no, yes = (tok(t, add_special_tokens=False)["input_ids"][0] for t in ("no", "yes"))
        outs = llm.score(QUERY, DOCS)
        for doc, out in zip(DOCS, outs):
            ids = tok(YES_NO_TEMPLATE.format(query=QUERY, document=doc), add_special_tokens=False)["input_ids"]
            assert out.prompt_token_ids == ids
            want = ref(arch).logits(ids)[-1][[no, yes]].softmax(-1)[1].item()
            assert abs(out.outputs.score - want) <= 1e-4
        if caching:
            assert outs[-1].num_cached_tokens > 0  # the question's blocks are shared
            assert llm.score(QUERY, DOCS)[0].num_cached_tokens > 0
        scores[caching] = [o.outputs.score for o in outs]
        assert_pool_free(llm)
    assert scores[True] == pytest.approx(scores[False], abs=1e-5)


def test_decoder_sequence_classification_matches_hf(tiny_model):
    path = tiny_model("qwen2-cls1")
    hf = T.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(path, dtype="float32", block_size=8, max_num_batched_tokens=16)
    assert llm.engine.task == "score"
    pairs = [(QUERY, d) for d in DOCS]
    for (q, d), out in zip(pairs, llm.score(QUERY, DOCS)):
        with torch.no_grad():
            logit = hf(torch.tensor([out.prompt_token_ids])).logits[0, 0]
        assert abs(out.outputs.score - logit.sigmoid().item()) <= 1e-4
    assert_pool_free(llm)

    path = tiny_model("llama-cls3")
    hf = T.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(path, dtype="float32", block_size=8)
    assert llm.engine.task == "classify"
    for out in llm.classify(DOCS):
        with torch.no_grad():
            probs = hf(torch.tensor([out.prompt_token_ids])).logits[0].softmax(-1)
        assert torch.allclose(torch.tensor(out.outputs.probs), probs, atol=1e-4)
    assert_pool_free(llm)


@pytest.mark.parametrize("chunk", [8192, 8])
def test_decoder_last_token_embeddings_match_hf(chunk, tiny_model):
    path = tiny_model("qwen3")
    hf = T.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(path, task="embed", dtype="float32", block_size=8, max_num_batched_tokens=chunk)
    texts = PROMPTS + SHARED
    for _ in range(2):  # the second round hits the prefix cache
        outs = llm.embed(texts)
        for out in outs:
            with torch.no_grad():
                h = hf(torch.tensor([out.prompt_token_ids])).last_hidden_state[0, -1]
            got = torch.tensor(out.outputs.embedding)
            want = torch.nn.functional.normalize(h, dim=0)
            assert (got - want).abs().max() <= 1e-4
            assert torch.nn.functional.cosine_similarity(got, want, dim=0) >= 0.9999
    assert outs[-1].num_cached_tokens > 0
    raw = llm.embed(PROMPTS[1], pooling_params=PoolingParams(normalize=False))[0]
    with torch.no_grad():
        h = hf(torch.tensor([raw.prompt_token_ids])).last_hidden_state[0, -1]
    assert torch.allclose(torch.tensor(raw.outputs.embedding), h, atol=1e-4)
    assert_pool_free(llm)


@pytest.mark.parametrize("ops", ["op by op", "fused C"])
@pytest.mark.parametrize("arch", ["gemma", "llama3-gqa", "qwen3"])
def test_bfloat16_hidden_states_as_close_to_float32_as_hf_bfloat16(arch, ops, tiny_model):
    """bf16 op by op: rotary in the activations' dtype as Hugging Face casts it, fused RMSNorm. Gemma's norm runs
    in float32 in both, so its hidden states are Hugging Face's bit for bit; the others round the norm once
    where Hugging Face rounds twice, which may move them by an ulp but no further from float32. The CPU's fused C
    ops (engine.cpu_layer_ops, the default in bf16 where they build) round each group once: no further either."""
    path = tiny_model(arch)
    hf = {dt: T.AutoModel.from_pretrained(path, dtype=dt).eval() for dt in (torch.bfloat16, torch.float32)}
    llm = LLM(path, task="embed", dtype="bfloat16", block_size=8)
    if ops == "op by op":
        llm.engine.runner.model.layer_ops = LayerOps()
    else:
        require_c_kernels(cpu_layer_ops.library())
        assert isinstance(llm.engine.runner.model.layer_ops, CPUFusedLayerOps)
    for out in llm.embed(PROMPTS, pooling_params=PoolingParams(normalize=False)):
        with torch.no_grad():
            h16, h32 = (hf[dt](torch.tensor([out.prompt_token_ids])).last_hidden_state[0, -1].float()
                        for dt in (torch.bfloat16, torch.float32))
        got = torch.tensor(out.outputs.embedding)
        if arch == "gemma" and ops == "op by op":
            assert torch.equal(got, h16)
        distance = [1 - torch.nn.functional.cosine_similarity(a, h32, dim=0).item() for a in (got, h16)]
        assert distance[0] <= 2 * distance[1] + 1e-5, distance


# ---------------------------------------------------------------- sampling


@pytest.fixture(scope="module")
def llama(tiny_model):
    return LLM(tiny_model("llama"), dtype="float32", block_size=8)


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(llama):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=12, ignore_eos=True)
    alone = llama.generate(PROMPTS[1], params)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.8, max_tokens=12), SamplingParams(temperature=1.2, seed=7, max_tokens=9),
              greedy(12)]
    batch = llama.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[3]], [others[0], params, others[1], others[2]])
    assert batch[1].outputs[0].token_ids == alone
    staggered = run_staggered(llama, [PROMPTS[3], PROMPTS[1]], [others[0], params], every=3)
    assert staggered[1].outputs[0].token_ids == alone
    assert_pool_free(llama)


def test_seeded_sampling_is_the_same_cached_chunked_and_preempted(tiny_model):
    """Issue 11: a seeded draw depends only on (seed, output position, logits), so the same seed gives
    the same tokens after a prefix-cache hit, in chunks, when preempted and recomputed; other seeds differ."""
    prompts, n = [sentence(400 + i, 3 + 2 * i) for i in range(3)] + [SHARED[0]], 24
    seeded = [SamplingParams(temperature=1.0, top_k=60, seed=50 + i, max_tokens=n, ignore_eos=True)
              for i in range(len(prompts))]
    fresh = LLM(tiny_model("llama"), dtype="float32", block_size=8, enable_prefix_caching=False)
    alone = [fresh.generate(p, sp)[0].outputs[0].token_ids for p, sp in zip(prompts, seeded)]
    assert len({tuple(t) for t in alone}) == len(prompts)
    other_seed = fresh.generate(prompts[3], SamplingParams(temperature=1.0, top_k=60, seed=7, max_tokens=n,
                                                           ignore_eos=True))[0].outputs[0].token_ids
    assert other_seed != alone[3]

    cached = LLM(tiny_model("llama"), dtype="float32", block_size=8)
    cached.generate(SHARED[0], greedy(2))
    hit = cached.generate(prompts[3], seeded[3])[0]
    assert hit.num_cached_tokens > 0 and hit.outputs[0].token_ids == alone[3]

    chunked = LLM(tiny_model("llama"), dtype="float32", block_size=8, max_num_batched_tokens=12,
                  long_prefill_token_threshold=7)
    assert [o.outputs[0].token_ids for o in chunked.generate(prompts, seeded)] == alone

    tok = T.AutoTokenizer.from_pretrained(tiny_model("llama"))
    need = [cdiv(len(tok(p)["input_ids"]) + n, 8) for p in prompts]
    tight = LLM(tiny_model("llama"), dtype="float32", block_size=8, num_blocks=max(need) + 2)
    victims = count_preemptions(tight)
    assert [o.outputs[0].token_ids for o in tight.generate(prompts, seeded)] == alone
    assert victims, "the pool was meant to run out"
    for llm in (fresh, cached, chunked, tight):
        assert_pool_free(llm)


def test_greedy_n_children_share_the_prompt_and_match_hf(llama, ref):
    out = llama.generate(PROMPTS[3], SamplingParams(n=3, temperature=0.0, max_tokens=N_NEW))[0]
    assert len(out.outputs) == 3
    for c in out.outputs:
        ref("llama").check(type(out)(out.request_id, out.prompt, out.prompt_token_ids, [c], True))
    assert_pool_free(llama)


def test_n_returns_n_outputs(llama):
    out = llama.generate(PROMPTS[0], SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=10, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1]
    assert all(len(c.token_ids) == 10 and c.finish_reason == "length" for c in out.outputs)
    assert out.outputs[0].token_ids != out.outputs[1].token_ids  # seeds seed and seed + 1
    assert_pool_free(llama)


def test_stop_string_is_cut(llama):
    full = llama.generate(PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    words = full.text.split()
    assert len(words) >= 6
    stop = " " + words[5]
    cut = llama.generate(PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=[stop]))
    out = cut[0].outputs[0]
    assert out.text == full.text[:full.text.find(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert stop not in out.text
    assert_pool_free(llama)


def test_max_tokens_finishes_with_length(llama):
    out = llama.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].finish_reason == "length"
    assert out.finished


def test_logprobs_match_hf(llama, ref):
    out = llama.generate(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=6, logprobs=3, ignore_eos=True))[0]
    c = out.outputs[0]
    assert len(c.logprobs) == len(c.token_ids) == 6
    lp = ref("llama").logits(out.prompt_token_ids + c.token_ids).log_softmax(-1)
    start = len(out.prompt_token_ids) - 1
    for k, (tok, entry) in enumerate(zip(c.token_ids, c.logprobs)):
        row = lp[start + k]
        assert entry[tok].rank == 1  # greedy picks the top token
        top = row.topk(3)
        assert set(entry) == set(top.indices.tolist())
        for t, v in entry.items():
            assert abs(v.logprob - row[t].item()) <= 1e-4
    assert math.isclose(c.cumulative_logprob, sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs)),
                        abs_tol=1e-5)


@pytest.mark.parametrize("graph_buffers", [False, True])
def test_compiled_decode_generates_as_eager_from_one_graph(tiny_model, graph_buffers):
    """torch_compile runs decode steps as one compiled graph: fused float arithmetic may round
    differently, so greedy tokens must match eager and logprobs agree closely, across prefill, decode,
    batch sizes 1..3 and contexts inside one block and across several. The graph compiled at start
    serves all of them: a recompile would stall a server for as long as the first compile. graph_buffers:
    decode steps through the CUDA graphs' padded static buffers (run eagerly here), as on a GPU."""
    model_dir = tiny_model("llama")
    prompts = [sentence(700 + i, n) for i, n in enumerate((4, 17, 9))]
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=1, ignore_eos=True)
    eager = LLM(model_dir, dtype="float32", block_size=8).generate(prompts, params)
    llm = LLM(model_dir, dtype="float32", block_size=8, torch_compile=True)
    if graph_buffers:
        llm.engine.runner.capture_decode_graphs(4, capture=False)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = llm.generate(prompts[:1], params) + llm.generate(prompts[1:], params)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert_same_generations(eager, compiled)
    assert_pool_free(llm)


def assert_same_generations(want: list, got: list) -> None:
    """The same tokens, and logprobs as close as fused or differently blocked float arithmetic leaves them."""
    for a, b in zip(want, got, strict=True):
        ca, cb = a.outputs[0], b.outputs[0]
        assert ca.token_ids == cb.token_ids
        for tok, ea, eb in zip(ca.token_ids, ca.logprobs, cb.logprobs):
            assert abs(ea[tok].logprob - eb[tok].logprob) < 1e-4


def test_each_decoder_in_a_process_gets_its_own_graphs(tiny_model, tmp_path):
    """Dynamo keeps one forward function's graphs for every decoder in the process, two a distinct model; at its
    limit it runs a new model eager without failing. A model only this test builds (its own norm eps, a
    constant of the graph) compiles both its graphs even where the process' limit is already spent."""
    import shutil
    model_dir = shutil.copytree(tiny_model("llama"), tmp_path / "llama", dirs_exist_ok=True)
    update_config(str(model_dir), rms_norm_eps=1.25e-5)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(recompile_limit=1):
        llm = LLM(str(model_dir), dtype="float32", block_size=8, torch_compile=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 2  # prefill and decode
    out = llm.generate([sentence(730, 5)], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 2
    assert_pool_free(llm)


def test_compile_warms_up_with_the_largest_steps(tiny_model, monkeypatch):
    """Inductor sizes each kernel's launch configuration (block sizes, reduction splits; autotuned once on a
    GPU) for the first inputs it sees: the warm-up runs the engine's largest prefill step, in spans the
    model's positions hold, and its largest decode batch, not a token or two."""
    seen, call = [], CompiledModel.__call__

    def spy(self, input_ids, positions, token_type_ids=None):
        ctx = get_context()
        seen.append((len(input_ids), int(positions.max()), len(ctx.prefills), ctx.decode_block_table is not None))
        return call(self, input_ids, positions, token_type_ids)
    monkeypatch.setattr(CompiledModel, "__call__", spy)
    llm = LLM(tiny_model("llama"), dtype="float32", block_size=8, max_model_len=64, max_num_batched_tokens=160,
              max_num_seqs=5, torch_compile=True)
    assert seen == [(160, 63, 3, False), (5, 0, 0, True)]
    out = llm.generate([sentence(720, 9)], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3
    assert_pool_free(llm)


@pytest.mark.parametrize("method", ["int8", "int4", "w8a8", "fp8"])
def test_compiled_quantized_steps_run_one_graph_each(tiny_model, method):
    """With quantized activations the steps are not compared token for token: a ~1e-7 difference of the fused
    float ops can move an activation across a rounding boundary (README), as any perturbation that
    small does in eager. So the first token (from a long prompt through the fused prefill kernel too) is
    eager's with its logprob as close as fused rounding leaves it, and one graph serves every step: prompts
    on both sides of the int8 kernels' row limit (int8 weight-only once compiled again for the long one),
    decodes of one and of two (fp8's _scaled_mm is opaque to the graph, its shape checks would guard on one)."""
    model_dir = tiny_model("llama")
    prompts = [sentence(710 + i, n) for i, n in enumerate((4, 17, 90))]
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=1, ignore_eos=True)
    # The same calls in both: int8 weight-only rounds activations to bf16 in batches of up to 64 rows only,
    # so its numbers depend on how requests are batched, compiled or not.
    run = lambda llm: llm.generate(prompts[:1], params) + llm.generate(prompts[1:], params)  # noqa: E731
    eager = run(LLM(model_dir, dtype="float32", block_size=8, quantization=method))
    llm = LLM(model_dir, dtype="float32", block_size=8, quantization=method, torch_compile=True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = run(llm)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    for a, b in zip(eager, compiled):
        ca, cb = a.outputs[0], b.outputs[0]
        assert len(cb.token_ids) == 6 and ca.token_ids[0] == cb.token_ids[0]
        # fp8 rounds to 3 significand bits: eager alone, activations perturbed by 1e-6 of themselves moved this
        # model's first logprob by up to 0.066 (and fp8 moves it 0.22 from float32's).
        tol = 0.1 if method == "fp8" else 1e-3
        assert abs(ca.logprobs[0][ca.token_ids[0]].logprob - cb.logprobs[0][cb.token_ids[0]].logprob) < tol
    assert_pool_free(llm)


def test_compiled_decode_under_preemption(tiny_model, ref):
    """Preempted requests recompute their prefill eagerly and resume decoding through the compiled
    graph; tokens stay Hugging Face's and no block is left."""
    prompts, n = [sentence(400 + i, 3 + 2 * i) for i in range(4)], 24
    tok = T.AutoTokenizer.from_pretrained(tiny_model("llama"))
    need = [cdiv(len(tok(p)["input_ids"]) + n, 8) for p in prompts]
    llm = LLM(tiny_model("llama"), dtype="float32", block_size=8, num_blocks=max(need) + 2, torch_compile=True)
    victims = count_preemptions(llm)
    for out in llm.generate(prompts, greedy(n)):
        ref("llama").check(out, n)
    assert victims, "the pool was meant to run out"
    assert_pool_free(llm)


def test_compiled_pooling_steps_match_eager_from_one_graph(tiny_model):
    """torch_compile on pooling models: every prefill step runs the graph compiled at start (packed spans,
    a query's prefix found in the cache, a long pair in chunks), the attention an opaque op inside it;
    scores and embeddings as eager's."""
    docs = DOCS + [sentence(330, 60)]  # 60 words: chunked by the 32-token step budget
    kw = dict(task="score", dtype="float32", block_size=4, score_tokens=("no", "yes"), score_template=YES_NO_TEMPLATE,
              max_num_batched_tokens=32)
    want = [o.outputs.score for o in LLM(tiny_model("qwen3"), **kw).score(QUERY, docs)]
    texts = [sentence(340 + i, 3 + 7 * i) for i in range(5)]
    want_embed = [o.outputs.embedding for o in LLM(tiny_model("bert"), task="embed", dtype="float32").embed(texts)]
    reranker = LLM(tiny_model("qwen3"), torch_compile=True, **kw)
    embedder = LLM(tiny_model("bert"), task="embed", dtype="float32", torch_compile=True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled, steps, rows = reranker.engine.runner.compiled, [], []

    def counted(*args):
        steps.append(args[0].shape[0])
        rows.append(len(get_context().output_rows))
        return compiled(*args)
    reranker.engine.runner.compiled = counted
    outs = reranker.score(QUERY, docs[:1]) + reranker.score(QUERY, docs[1:])
    assert len(steps) >= 3 and max(steps) == 32  # every step compiled, the long pair's chunks too
    assert sum(rows) == len(docs) and 0 in rows  # the last layer on each pair's last token; a chunk reads none
    assert outs[-1].num_cached_tokens > 0
    assert [o.outputs.score for o in outs] == pytest.approx(want, abs=1e-5)
    embeddings = [o.outputs.embedding for o in embedder.embed(texts[:1]) + embedder.embed(texts[1:])]
    assert np.allclose(embeddings, want_embed, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert_pool_free(reranker)
