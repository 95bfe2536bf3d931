"""Async scheduling: each step is scheduled and launched before the previous step's tokens reach the host
(they go from the device's sampled tensor straight into the next step's inputs), and its outputs come
one step later. Forced on here on the CPU, it must give exactly what the synchronous engine gives:
the same tokens, text, finish and stop reasons and logprobs, under preemption, chunked prefill, prefix
hits, n > 1, stops found while the next step is already in flight, and aborts; and leak nothing."""
import pytest
import torch

from conftest import assert_pool_free, sentence
from engine import LLM, SamplingParams
from engine.params import RequestOutputKind
from test_decoders import run_staggered

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [sentence(600 + i, 3 + 7 * i) for i in range(5)]
SHARED = [sentence(9, 30) + " " + sentence(700 + i, 2 + i) for i in range(3)]


def engines(tiny_model, **kwargs) -> tuple[LLM, LLM]:
    return tuple(LLM(tiny_model("llama"), dtype="float32", block_size=8, async_scheduling=a, **kwargs)
                 for a in (False, True))


def generations(llm: LLM, prompts: list[str], params: list[SamplingParams], every: int = 2) -> list[tuple]:
    """Requests arrive one every `every` steps, so steps mix prefills, chunks and decodes."""
    return [summary(out) for out in run_staggered(llm, prompts, params, every)]


def summary(out) -> tuple:
    return out.num_cached_tokens, [(c.token_ids, c.text, c.finish_reason, c.stop_reason, _logprobs(c))
                                   for c in out.outputs]


def _logprobs(c) -> list | None:
    if c.logprobs is None:
        return None
    return [{t: (round(lp.logprob, 4), lp.rank) for t, lp in d.items()} for d in c.logprobs]


def watch_pending(llm: LLM) -> list[int]:
    """How many scheduled requests had a token still in flight, per launched step."""
    seen, execute = [], llm.engine.runner.execute

    def wrapped(sched):
        seen.append(sum(r.num_pending_tokens for r in sched.requests))
        return execute(sched)
    llm.engine.runner.execute = wrapped
    return seen


def test_defaults_on_for_cuda_only(tiny_model):
    llm = LLM(tiny_model("llama"), dtype="float32")
    assert llm.engine.async_scheduling == (llm.engine.runner.device.type == "cuda")


def test_greedy_and_stops_as_synchronous(tiny_model):
    sync, async_ = engines(tiny_model)
    plain = [SamplingParams(temperature=0.0, max_tokens=6 + 3 * i, ignore_eos=True) for i in range(len(PROMPTS))]
    want = generations(sync, PROMPTS, plain)
    assert generations(async_, PROMPTS, plain) == want
    # Blocks filled by generated tokens were registered in the prefix cache as the synchronous engine does.
    tok = sync.get_tokenizer()
    follow = [tok(p)["input_ids"] + w[1][0][0] for p, w in zip(PROMPTS, want)]
    short = [SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)] * len(follow)
    assert generations(async_, follow, short) == generations(sync, follow, short)
    # Stops on the 3rd and 5th tokens, by token id and by string, found while the next step is in flight.
    tokens, text = want[1][1][0][0], want[3][1][0][1]
    params = list(plain)
    params[1] = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop_token_ids=[tokens[2]])
    params[3] = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop=[text.split()[4]])
    params[4] = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True, logprobs=2, n=2)
    want = generations(sync, PROMPTS, params)
    pending = watch_pending(async_)
    assert generations(async_, PROMPTS, params) == want
    assert want[1][1][0][2:4] == ("stop", tokens[2]) and want[3][1][0][2] == "stop"
    assert max(pending) > 0, "async scheduling never launched a step before the previous one's tokens arrived"
    assert_pool_free(async_)


def test_sampling_penalties_and_min_tokens_as_synchronous(tiny_model):
    sync, async_ = engines(tiny_model)
    params = [SamplingParams(temperature=1.0, top_k=20, seed=1, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, min_p=0.05, seed=2, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=7, min_tokens=4, stop_token_ids=list(range(0, 300, 2))),
              SamplingParams(temperature=1.0, seed=4, max_tokens=9, logit_bias={5: 3.0}, logprobs=1),
              SamplingParams(temperature=1.0, seed=5, max_tokens=8, repetition_penalty=1.3,
                             frequency_penalty=0.5, ignore_eos=True),
              # Greedy with token 7 made likely: only the penalties keep it from coming back every step,
              # so the token in flight must count as much as the ones on the host.
              SamplingParams(temperature=0.0, max_tokens=14, logit_bias={7: 6.0}, repetition_penalty=3.0,
                             presence_penalty=2.0, frequency_penalty=2.0, ignore_eos=True)]
    prompts = PROMPTS + [PROMPTS[0]]
    want = generations(sync, prompts, params)
    assert want[-1][1][0][0][0] == 7 and want[-1][1][0][0].count(7) == 1
    pending = watch_pending(async_)
    assert generations(async_, prompts, params) == want
    assert max(pending) > 0
    tokens, _, reason, stop, _ = want[2][1][0]
    assert all(t % 2 for t in tokens[:4]) and reason == "stop" and stop == tokens[-1] and len(tokens) > 4
    assert_pool_free(async_)


def test_preemption_chunked_prefill_and_prefix_hits_as_synchronous(tiny_model):
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)] * 3 + \
             [SamplingParams(temperature=1.0, seed=8, max_tokens=20, ignore_eos=True)] * 3
    prompts = [sentence(800 + i, 3 + 2 * i) for i in range(3)] + SHARED
    results = []
    for async_scheduling in (False, True):
        llm = LLM(tiny_model("llama"), dtype="float32", block_size=8, num_blocks=16, max_num_batched_tokens=12,
                  long_prefill_token_threshold=7, async_scheduling=async_scheduling)
        victims, preempt = [], llm.engine.scheduler._preempt
        llm.engine.scheduler._preempt = lambda req: (victims.append(req.request_id), preempt(req))
        results.append(generations(llm, prompts, params, every=3))
        assert victims, "the pool was meant to run out"
        assert_pool_free(llm)
    assert results[1] == results[0]
    assert any(cached for cached, _ in results[0])


def test_abort_with_a_step_in_flight_leaks_nothing(tiny_model):
    _, llm = engines(tiny_model)
    eng = llm.engine
    for i, p in enumerate(PROMPTS):
        eng.add_generation(f"a{i}", p, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    for _ in range(4):
        eng.step()
    assert eng._in_flight
    for i in range(0, len(PROMPTS), 2):
        eng.abort(f"a{i}")
    finished = set()
    while eng.has_unfinished():
        finished |= {o.request_id for o in eng.step() if o.finished}
    assert finished == {f"a{i}" for i in range(1, len(PROMPTS), 2)}
    assert_pool_free(llm)


@pytest.mark.parametrize("n", [1, 2])
def test_a_request_id_reused_right_after_its_abort_gets_none_of_the_old_tokens(tiny_model, n):
    """The aborted request's token from the step in flight arrives after a new request took its id: it is the
    old request's, and the new one's output is exactly what it gives alone."""
    sync, llm = engines(tiny_model)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, n=n, seed=1,
                            output_kind=RequestOutputKind.DELTA)
    want = [summary(o) for o in sync.generate([PROMPTS[1]], SamplingParams(
        temperature=0.0, max_tokens=6, ignore_eos=True, n=n, seed=1))]
    eng = llm.engine
    eng.add_generation("x", PROMPTS[0], params)
    for _ in range(3):
        eng.step()
    assert eng._in_flight
    eng.abort("x")
    eng.add_generation("x", PROMPTS[1], params)
    deltas = []
    while eng.has_unfinished():
        deltas += [o for o in eng.step() if o.request_id == "x"]
    tokens, texts = {}, {}
    for o in deltas:
        for c in o.outputs:
            tokens.setdefault(c.index, []).extend(c.token_ids)
            texts[c.index] = texts.get(c.index, "") + c.text
    assert [(tokens[i], texts[i]) for i in range(n)] == [c[:2] for c in want[0][1]]
    assert_pool_free(llm)


def test_pooling_as_synchronous(tiny_model):
    scores = []
    for async_scheduling in (False, True):
        llm = LLM(tiny_model("llama"), task="score", dtype="float32", block_size=4, score_tokens=("no", "yes"),
                  score_template="question : {query} document : {document} answer :",
                  max_num_batched_tokens=40, async_scheduling=async_scheduling)
        scores.append([o.outputs.score for o in llm.score("is the cat on the mat", PROMPTS)])
        assert_pool_free(llm)
    assert scores[1] == scores[0]
    embed = [LLM(tiny_model("bert"), dtype="float32", max_num_batched_tokens=30, async_scheduling=a).embed(PROMPTS)
             for a in (False, True)]
    assert [o.outputs.embedding for o in embed[1]] == [o.outputs.embedding for o in embed[0]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device-to-host copies it overlaps need CUDA")
def test_cuda_async_greedy_equals_synchronous(tiny_model):
    outs = [LLM(tiny_model("llama"), dtype="float32", block_size=8, device="cuda", async_scheduling=a)
            .generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1))
            for a in (False, True)]
    assert [summary(o) for o in outs[1]] == [summary(o) for o in outs[0]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host waits for the device exist only on CUDA")
def test_cuda_decode_steps_launch_without_waiting_for_the_device(tiny_model):
    """Launching a decode step (schedule, inputs, graph replay, sampling with penalties, top_p and
    min_tokens, the copies back) never waits for the GPU: torch's sync debug mode raises if it does."""
    llm = LLM(tiny_model("llama"), dtype="float32", block_size=8, device="cuda", async_scheduling=True)
    eng = llm.engine
    params = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=3, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=1.0, min_tokens=10, presence_penalty=0.5, max_tokens=20, logprobs=2)]
    for i, p in enumerate(params):
        eng.add_generation(f"s{i}", PROMPTS[i], p)
    for _ in range(3):  # prefills, and the first decode steps (kernels compiled)
        eng.step()
    for _ in range(5):  # step() by hand: only the launch must not wait, taking the results does
        torch.cuda.set_sync_debug_mode("error")
        try:
            assert eng._launch()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        eng._process(eng._in_flight.popleft())
    while eng.has_unfinished():
        eng.step()
    assert_pool_free(llm)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host waits for the device exist only on CUDA")
@pytest.mark.parametrize("arch,task", [("llama", "score"), ("llama", "generate"), ("bert", "embed")])
def test_cuda_prefill_steps_launch_without_waiting_for_the_device(tiny_model, arch, task):
    """Prefill steps (chunks, prefix hits on a shared query, pooling of finished inputs) in bf16, where CUDA
    takes the flash varlen kernel: launching one never waits for the GPU either, so a reranker's or an
    embedder's steps overlap the host's next step with the device's current one."""
    kwargs = dict(score_tokens=("no", "yes"), score_template="question : {query} document : {document} answer :"
                  ) if task == "score" else {}
    llm = LLM(tiny_model(arch), task=task, dtype="bfloat16", block_size=4, device="cuda", async_scheduling=True,
              max_num_batched_tokens=24, **kwargs)
    eng = llm.engine

    def add(rid: str) -> None:
        if task == "score":
            eng.add_score(rid, "is the cat on the mat", PROMPTS)
        elif task == "embed":
            eng.add_embed(rid, PROMPTS)
        else:
            eng.add_generation(rid, SHARED[0], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    for rid in ("warm-up", "timed"):
        add(rid)
        while eng.has_unfinished():
            if rid == "timed":
                torch.cuda.set_sync_debug_mode("error")
            try:
                launched = eng._launch()
            finally:
                torch.cuda.set_sync_debug_mode(0)
            if len(eng._in_flight) > (1 if launched else 0):
                eng._process(eng._in_flight.popleft())
    assert_pool_free(llm)


def test_no_step_is_launched_past_max_tokens_or_max_model_len(tiny_model):
    sync, async_ = engines(tiny_model, max_model_len=40)
    params = [SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)] * 2 + \
             [SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)]
    counted, execute = [], async_.engine.runner.execute

    def wrapped(sched):
        counted.extend(r.num_computed_tokens + n for r, n in zip(sched.requests, sched.num_tokens)
                       if r.request_id == "stagger-2")
        return execute(sched)
    async_.engine.runner.execute = wrapped
    want = generations(sync, PROMPTS[:3], params)
    assert generations(async_, PROMPTS[:3], params) == want
    assert [len(w[1][0][0]) + len(async_.get_tokenizer()(p)["input_ids"]) for w, p in zip(want[:2], PROMPTS)] == [40] * 2
    # stagger-2's prompt, then one decode per output token but the last, which nothing reads.
    assert counted[-1] == len(async_.get_tokenizer()(PROMPTS[2])["input_ids"]) + 2
    assert_pool_free(async_)



def test_a_failed_launch_with_a_step_in_flight_loses_no_token(tiny_model):
    sync, async_ = engines(tiny_model)
    params = [SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)] * 3
    want = generations(sync, PROMPTS[:3], params, every=1)
    eng, execute = async_.engine, async_.engine.runner.execute

    def fail_once(sched):
        eng.runner.execute = execute
        raise RuntimeError("device lost")
    for i, p in enumerate(PROMPTS[:3]):
        eng.add_generation(f"stagger-{i}", p, params[i])
    done = {}
    for _ in range(3):
        done.update((o.request_id, o) for o in eng.step() if o.finished)
    assert eng._in_flight
    eng.runner.execute = fail_once
    with pytest.raises(RuntimeError, match="device lost"):
        eng.step()
    while eng.has_unfinished():  # a caller that carries on: the step in flight lands, the failed one reruns
        done.update((o.request_id, o) for o in eng.step() if o.finished)
    assert [summary(done[f"stagger-{i}"]) for i in range(3)] == want
    assert_pool_free(async_)
