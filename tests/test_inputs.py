"""Input rules, vLLM's: score pairing, truncate_prompt_tokens, token-id prompts, and every error a
caller can trigger, each leaving the KV pool completely free."""
import pytest
import transformers as T

from conftest import assert_pool_free, sentence
from engine import LLM, ModelNotFoundError, SamplingParams
from engine.params import MAX_STOP_STRINGS
from engine.tokenizer import pair_texts

pytestmark = pytest.mark.usefixtures("one_thread")

LONG = sentence(900, 120)


@pytest.fixture(scope="module")
def scorer(tiny_model):
    return LLM(tiny_model("bert-cls1"), dtype="float32", max_model_len=32)


@pytest.fixture(scope="module")
def embedder(tiny_model):
    return LLM(tiny_model("bert"), task="embed", dtype="float32", max_model_len=16, pooling="mean")


@pytest.fixture(scope="module")
def generator(tiny_model):
    return LLM(tiny_model("llama"), dtype="float32", max_model_len=64, block_size=8, num_blocks=16)


@pytest.fixture(scope="module")
def reranker(tiny_model):
    return LLM(tiny_model("qwen3"), task="score", dtype="float32", max_model_len=48, block_size=8, num_blocks=8,
               score_tokens=("no", "yes"), score_template="question : {query} document : {document} answer :")


# ---------------------------------------------------------------- score pairing


def test_pairing_rules():
    assert pair_texts("q", "d") == [("q", "d")]
    assert pair_texts("q", ["d1", "d2"]) == [("q", "d1"), ("q", "d2")]
    assert pair_texts(["q"], ["d1", "d2"]) == [("q", "d1"), ("q", "d2")]
    assert pair_texts(["q1", "q2"], ["d1", "d2"]) == [("q1", "d1"), ("q2", "d2")]
    with pytest.raises(ValueError, match="same length"):
        pair_texts(["q1", "q2"], ["d1", "d2", "d3"])
    with pytest.raises(ValueError, match="same length"):
        pair_texts(["q1", "q2"], "d")  # N:1 is not a vLLM pairing
    with pytest.raises(ValueError, match="text_1 must not be empty"):
        pair_texts([], ["d"])
    with pytest.raises(ValueError, match="text_2 must not be empty"):
        pair_texts("q", [])


@pytest.mark.parametrize("model", ["scorer", "reranker"])
def test_score_pairing_through_the_api(model, request):
    llm = request.getfixturevalue(model)
    q, docs = "the cat sat", ["on the mat", "a dog runs", "the bird sings"]
    one = [llm.score(q, d)[0].outputs.score for d in docs]
    assert [o.outputs.score for o in llm.score(q, docs)] == pytest.approx(one, abs=1e-6)  # 1:N
    assert [o.outputs.score for o in llm.score([q], docs)] == pytest.approx(one, abs=1e-6)
    zipped = llm.score(["on the mat", q], ["the cat sat", docs[1]])  # N:N, zipped
    assert [o.outputs.score for o in zipped] == pytest.approx(
        [llm.score("on the mat", "the cat sat")[0].outputs.score, one[1]], abs=1e-6)
    for bad in ((["a", "b"], ["c", "d", "e"]), ([], ["c"]), ("a", [])):
        with pytest.raises(ValueError):
            llm.score(*bad)
        assert_pool_free(llm)


# ---------------------------------------------------------------- truncation and token ids


def test_truncate_prompt_tokens_for_encoders(embedder):
    tok = embedder.get_tokenizer()
    with pytest.raises(ValueError, match=r"maximum context length is 16 tokens"):
        embedder.embed(LONG)
    assert_pool_free(embedder)
    full = embedder.embed(LONG, truncate_prompt_tokens=-1)[0]
    assert full.prompt_token_ids == tok(LONG, truncation=True, max_length=16)["input_ids"]
    five = embedder.embed(LONG, truncate_prompt_tokens=5)[0]
    # Encoders keep the beginning, as Hugging Face tokenizers truncate (and end with [SEP]).
    assert five.prompt_token_ids == tok(LONG, truncation=True, max_length=5)["input_ids"]
    assert five.prompt_token_ids[-1] == tok.sep_token_id
    for bad in (0, 17, -2):
        with pytest.raises(ValueError, match="truncate_prompt_tokens"):
            embedder.embed(LONG, truncate_prompt_tokens=bad)


def test_one_batched_call_encodes_as_one_call_per_input(embedder):
    """Texts go through the tokenizer in one batch: short, cut and token-id inputs come out as alone."""
    tok = embedder.get_tokenizer()
    inputs = ["a short one", LONG, tok("two words")["input_ids"], list(range(5, 40)), LONG[:40]]
    batch = embedder.embed(inputs, truncate_prompt_tokens=-1)
    for x, out in zip(inputs, batch):
        alone = embedder.embed([x], truncate_prompt_tokens=-1)[0]
        assert out.prompt_token_ids == alone.prompt_token_ids
        assert out.outputs.embedding == pytest.approx(alone.outputs.embedding, abs=1e-6)
    assert batch[3].prompt_token_ids == list(range(24, 40))  # token ids over the limit keep their end
    with pytest.raises(ValueError, match=r"maximum context length is 16 tokens"):
        embedder.embed(["fine", LONG])  # one input too long fails the call, nothing left running
    assert_pool_free(embedder)


def test_truncate_prompt_tokens_for_decoders(generator):
    tok = generator.get_tokenizer()
    ids = tok(LONG)["input_ids"]
    params = dict(temperature=0.0, max_tokens=4)
    with pytest.raises(ValueError, match=r"maximum context length is 64 tokens"):
        generator.generate(LONG, SamplingParams(**params))
    assert_pool_free(generator)
    out = generator.generate(LONG, SamplingParams(truncate_prompt_tokens=20, **params))[0]
    assert out.prompt_token_ids == ids[-20:]  # decoders keep the end, what the model continues from
    with pytest.raises(ValueError, match="no room to generate"):
        generator.generate(LONG, SamplingParams(truncate_prompt_tokens=-1, **params))
    assert_pool_free(generator)


def test_token_id_prompts(embedder, generator):
    tok = embedder.get_tokenizer()
    text = "the cat sat on the mat"
    ids = tok(text)["input_ids"]
    by_text, by_ids, by_dict = embedder.embed([text, ids, {"prompt_token_ids": ids}])
    assert by_ids.prompt_token_ids == by_dict.prompt_token_ids == ids
    assert by_ids.outputs.embedding == pytest.approx(by_text.outputs.embedding, abs=1e-6)
    gids = generator.get_tokenizer()(text)["input_ids"]
    a = generator.generate(text, SamplingParams(temperature=0.0, max_tokens=5))[0]
    b = generator.generate({"prompt_token_ids": gids}, SamplingParams(temperature=0.0, max_tokens=5))[0]
    assert a.prompt_token_ids == b.prompt_token_ids == gids
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert b.prompt is None and a.prompt == text


@pytest.mark.parametrize("bad", [[5, 10_000], [-1, 5]])
def test_unknown_token_id(bad, embedder, generator):
    with pytest.raises(ValueError, match=r"token ids must be in \[0, "):
        embedder.embed([bad])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 256\)"):
        generator.generate([bad], SamplingParams(max_tokens=2))
    assert_pool_free(embedder)
    assert_pool_free(generator)


def test_empty_prompt(embedder, generator):
    with pytest.raises(ValueError, match="must not be empty"):
        embedder.embed([])
    with pytest.raises(ValueError, match="must not be empty"):
        generator.generate([[]], SamplingParams(max_tokens=2))
    assert_pool_free(generator)


# ---------------------------------------------------------------- models


def test_unknown_model_path(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        LLM(missing)


def test_unsupported_architecture(tmp_path):
    path = str(tmp_path / "gpt2")
    T.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, architectures=["GPT2LMHeadModel"]).save_pretrained(path)
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as e:
        LLM(path)
    for arch in ("BertModel", "XLMRobertaForSequenceClassification", "LlamaForCausalLM", "Qwen3ForCausalLM"):
        assert arch in str(e.value)


def test_unsupported_task_and_too_long_max_model_len(tiny_model):
    with pytest.raises(ValueError, match="supports embed, generate, score"):
        LLM(tiny_model("llama"), task="classify")
    with pytest.raises(ValueError, match="larger than the model's limit 256"):
        LLM(tiny_model("llama"), max_model_len=1000)


def test_wrong_task_calls(embedder, generator, scorer):
    with pytest.raises(ValueError, match="not generation"):
        embedder.generate("hi")
    with pytest.raises(ValueError, match="not embeddings"):
        scorer.embed("hi")
    with pytest.raises(ValueError, match="not classification"):
        generator.classify("hi")
    with pytest.raises(ValueError, match="not embeddings"):
        generator.embed("hi")
    with pytest.raises(ValueError, match="not scoring"):
        generator.score("a", "b")
    assert_pool_free(generator)


# ---------------------------------------------------------------- sampling params and capacity


@pytest.mark.parametrize("kwargs, name", [
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=-3), "max_tokens"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(temperature=-0.1), "temperature"),
    (dict(stop=["x"] * (MAX_STOP_STRINGS + 1)), "stop"), (dict(stop=[""]), "stop"),
    (dict(n=0), "n"), (dict(logprobs=21), "logprobs"), (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    (dict(logit_bias={-1: 5.0}), "logit_bias"), (dict(logit_bias={"7": 5.0}), "logit_bias"),
])
def test_bad_sampling_params(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_logit_bias_steers_sampling_and_checks_the_vocabulary(generator):
    word = generator.get_tokenizer()("river", add_special_tokens=False)["input_ids"][0]
    for temperature in (0.0, 1.0):
        params = SamplingParams(temperature=temperature, seed=3, max_tokens=4, ignore_eos=True,
                                logit_bias={word: 100.0})
        assert generator.generate("the cat sat on", params)[0].outputs[0].token_ids == [word] * 4
    banned = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    first = generator.generate("the cat sat on", banned)[0].outputs[0].token_ids[0]
    banned.logit_bias = {first: -100.0}
    assert generator.generate("the cat sat on", banned)[0].outputs[0].token_ids[0] != first
    with pytest.raises(ValueError, match=r"logit_bias keys must be token ids in \[0, 256\), got \[256\]"):
        generator.generate("the cat", SamplingParams(logit_bias={256: 1.0}))
    assert_pool_free(generator)


def test_n_too_large_for_the_pool(generator):
    # 16 blocks of 8 tokens; 8 sequences of 5 + 20 tokens need 32.
    with pytest.raises(ValueError, match="n=8 sequences .* need 32 KV-cache blocks; the pool has 16"):
        generator.generate("the cat sat on", SamplingParams(n=8, max_tokens=20))
    assert_pool_free(generator)


def test_prompt_longer_than_max_model_len(generator, embedder):
    too_long = list(range(10, 80))
    with pytest.raises(ValueError, match="maximum context length is 64"):
        generator.generate([too_long], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="max_tokens is too large"):
        generator.generate("the cat", SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="maximum context length is 16"):
        embedder.embed([list(range(10, 30))])
    assert_pool_free(generator)


def test_a_bad_request_in_a_batch_leaks_nothing(generator, reranker):
    ok = SamplingParams(temperature=0.0, max_tokens=4)
    with pytest.raises(ValueError):
        generator.generate(["the cat", "a dog", LONG], ok)  # the third is too long: the first two go too
    assert_pool_free(generator)
    with pytest.raises(ValueError, match="got 1 sampling_params for 2 prompts"):
        generator.generate(["the cat", "a dog"], [ok])
    assert_pool_free(generator)
    with pytest.raises(ValueError, match="maximum context length is 48"):
        reranker.score("the cat", ["the dog", LONG])
    assert_pool_free(reranker)
    # And the engine still works afterwards, from an empty pool.
    assert len(generator.generate(["the cat", "a dog"], ok)) == 2
    assert len(reranker.score("the cat", ["the dog", "the bird"])) == 2
    assert_pool_free(generator)
    assert_pool_free(reranker)


def test_abort_mid_generation_frees_everything(generator):
    eng = generator.engine
    eng.add_generation("x", "the cat sat on the mat", SamplingParams(n=2, max_tokens=20, seed=1))
    eng.add_generation("y", sentence(3, 30), SamplingParams(temperature=0.0, max_tokens=20))
    for _ in range(3):
        eng.step()
    assert eng.kv.pool.num_free < eng.kv.pool.num_blocks
    eng.abort("x")
    eng.abort("y")
    eng.abort("never-added")
    assert_pool_free(generator)


def test_truncate_prompt_tokens_on_the_decoder_reranker(reranker):
    with pytest.raises(ValueError, match="maximum context length is 48"):
        reranker.score("the cat", LONG)
    out = reranker.score("the cat", LONG, truncate_prompt_tokens=-1)[0]
    assert len(out.prompt_token_ids) == 48
    tok = reranker.get_tokenizer()
    # The document is cut; the question before it and the answer cue after it stay.
    head = tok("question : the cat document :", add_special_tokens=False)["input_ids"]
    assert out.prompt_token_ids[:len(head)] == head
    assert out.prompt_token_ids[-2:] == tok(" answer :", add_special_tokens=False)["input_ids"]
    assert 0.0 <= out.outputs.score <= 1.0
    assert_pool_free(reranker)
