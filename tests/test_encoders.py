"""Encoder parity with Hugging Face, fp32: BERT, RoBERTa and XLM-RoBERTa as embedding models
(cls / mean pooling), cross-encoder scorers (num_labels=1) and classifiers (num_labels=3); the
bundled all-MiniLM-L6-v2 against sentence-transformers."""
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as T

from conftest import sentence, update_config
from engine import LLM, PoolingParams

pytestmark = pytest.mark.usefixtures("one_thread")

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
FAMILIES = ["bert", "roberta", "xlmr"]
# Mixed lengths, and words outside every tiny vocabulary (split into pieces or unknown).
TEXTS = [sentence(500 + i, n) for i, n in enumerate((1, 3, 7, 12, 20, 35))] + ["zebra xylophone 42, quickly!"]
QUERY = "where does the cat sleep"
DOCS = [sentence(600 + i, 4 + 6 * i) for i in range(4)]


def assert_close(got, want: torch.Tensor) -> None:
    got = torch.as_tensor(got, dtype=torch.float32)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4
    if got.numel() > 1:
        assert F.cosine_similarity(got, want, dim=0).item() >= 0.9999


@torch.no_grad()
def hf_hidden(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).last_hidden_state[0]


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("family", FAMILIES)
def test_base_model_embeddings_match_hf(family, pooling, tiny_model):
    path = tiny_model(family)
    hf = T.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    tok = T.AutoTokenizer.from_pretrained(path)
    llm = LLM(path, task="embed", dtype="float32", pooling=pooling)
    raw = llm.embed(TEXTS, pooling_params=PoolingParams(normalize=False))
    normalized = llm.embed(TEXTS)
    for text, r, n in zip(TEXTS, raw, normalized):
        assert r.prompt_token_ids == tok(text)["input_ids"]
        h = hf_hidden(hf, r.prompt_token_ids)
        want = h[0] if pooling == "cls" else h.mean(0)
        assert_close(r.outputs.embedding, want)
        assert_close(n.outputs.embedding, F.normalize(want, dim=0))
        assert r.outputs.data.dtype == np.float32 and r.outputs.hidden_size == len(r.outputs.embedding)


@pytest.mark.parametrize("family", FAMILIES)
def test_longest_input_uses_every_position(family, tiny_model):
    # BERT's table has 128 positions; RoBERTa-style positions start after the padding index (1),
    # so their table of 130 also holds 128 tokens.
    path = tiny_model(family)
    llm = LLM(path, task="embed", dtype="float32", pooling="mean")
    limit = llm.engine.max_model_len
    assert limit == 128
    tok = llm.get_tokenizer()
    g = torch.Generator().manual_seed(0)
    ids = [tok.cls_token_id] + torch.randint(5, len(tok) - 1, (limit - 2,), generator=g).tolist() + [tok.sep_token_id]
    out = llm.embed([ids], pooling_params=PoolingParams(normalize=False))[0]
    hf = T.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    assert_close(out.outputs.embedding, hf_hidden(hf, ids).mean(0))
    with pytest.raises(ValueError, match=str(limit)):
        llm.embed([ids + [tok.sep_token_id]])


@pytest.mark.parametrize("family", FAMILIES)
def test_cross_encoder_score_matches_hf(family, tiny_model):
    path = tiny_model(f"{family}-cls1")
    hf = T.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    tok = T.AutoTokenizer.from_pretrained(path)
    llm = LLM(path, dtype="float32")
    assert llm.engine.task == "score"
    outs = llm.score(QUERY, DOCS)
    assert len(outs) == len(DOCS)
    for doc, out in zip(DOCS, outs):
        enc = tok(QUERY, doc, return_tensors="pt")
        assert out.prompt_token_ids == enc["input_ids"][0].tolist()
        with torch.no_grad():
            logit = hf(**enc).logits[0, 0]
        assert abs(out.outputs.score - logit.sigmoid().item()) <= 1e-4
    raw = llm.score(QUERY, DOCS[0], pooling_params=PoolingParams(activation=False))[0]
    with torch.no_grad():
        assert abs(raw.outputs.score - hf(**tok(QUERY, DOCS[0], return_tensors="pt")).logits[0, 0].item()) <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_classifier_probs_match_hf(family, tiny_model):
    path = tiny_model(f"{family}-cls3")
    hf = T.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(path, dtype="float32")
    assert llm.engine.task == "classify"
    assert llm.engine.id2label == {0: "neg", 1: "neu", 2: "pos"}
    for out in llm.classify(TEXTS):
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([out.prompt_token_ids])).logits[0]
        assert out.outputs.num_classes == 3
        assert_close(out.outputs.probs, logits.softmax(-1))
        assert sum(out.outputs.probs) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_length_batch_equals_one_by_one(family, tiny_model):
    path = tiny_model(family)
    # A budget smaller than the longer prompts: one call runs over several steps.
    llm = LLM(path, task="embed", dtype="float32", pooling="mean", max_num_batched_tokens=16)
    steps, step = [], llm.engine.step
    llm.engine.step = lambda: steps.append(1) or step()
    batch = llm.embed(TEXTS)
    assert len(steps) >= 4
    for text, b in zip(TEXTS, batch):
        alone = llm.embed(text)[0]
        assert alone.prompt_token_ids == b.prompt_token_ids
        assert torch.allclose(torch.tensor(b.outputs.embedding), torch.tensor(alone.outputs.embedding), atol=1e-6)
    cls_llm = LLM(tiny_model(f"{family}-cls3"), dtype="float32", max_num_batched_tokens=16)
    for text, b in zip(TEXTS, cls_llm.classify(TEXTS)):
        assert b.outputs.probs == pytest.approx(cls_llm.classify(text)[0].outputs.probs, abs=1e-6)


def test_matryoshka_dimensions(tiny_model, tmp_path):
    path = str(tmp_path / "matryoshka")
    shutil.copytree(tiny_model("bert"), path)
    update_config(path, matryoshka_dimensions=[16, 32])
    llm = LLM(path, task="embed", dtype="float32", pooling="mean")
    full = llm.embed(TEXTS[3], pooling_params=PoolingParams(normalize=False))[0].outputs.embedding
    short = llm.embed(TEXTS[3], pooling_params=PoolingParams(dimensions=16))[0].outputs.embedding
    assert len(short) == 16
    assert_close(short, F.normalize(torch.tensor(full[:16]), dim=0))
    with pytest.raises(ValueError, match=r"dimensions must be one of \[16, 32\]"):
        llm.embed(TEXTS[3], pooling_params=PoolingParams(dimensions=20))


# ---------------------------------------------------------------- all-MiniLM-L6-v2

SENTENCES = ["A man is eating food.", "A man is riding a horse.", "The new movie is awesome!",
             "Paris is the capital of France.", "Transformers turn text into vectors, one token at a time.",
             "short", "A much longer sentence that goes on and on about embeddings, caches, batches, "
             "schedulers and everything else a small serving engine needs to do well on a CPU."]


@pytest.fixture(scope="module")
def minilm():
    return LLM(MINILM, dtype="float32")


@pytest.fixture(scope="module")
def st_minilm(minilm):
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(minilm.engine.model_dir, device="cpu")


def test_minilm_matches_sentence_transformers(minilm, st_minilm):
    want = st_minilm.encode(SENTENCES, convert_to_tensor=True, batch_size=4).float()
    outs = minilm.embed(SENTENCES)
    for out, w in zip(outs, want):
        assert len(out.outputs.embedding) == 384
        assert_close(out.outputs.embedding, w)


def test_minilm_bi_encoder_score_is_cosine(minilm, st_minilm):
    scorer = LLM(MINILM, task="score", dtype="float32")
    outs = scorer.score(SENTENCES[0], SENTENCES[1:])
    q = torch.tensor(minilm.embed(SENTENCES[0])[0].outputs.embedding)
    st = st_minilm.encode(SENTENCES, convert_to_tensor=True).float()
    for i, out in enumerate(outs, start=1):
        d = torch.tensor(minilm.embed(SENTENCES[i])[0].outputs.embedding)
        assert out.outputs.score == pytest.approx(F.cosine_similarity(q, d, dim=0).item(), abs=1e-6)
        assert out.outputs.score == pytest.approx(F.cosine_similarity(st[0], st[i], dim=0).item(), abs=1e-4)


def test_minilm_rejects_matryoshka_dimensions(minilm):
    with pytest.raises(ValueError, match="Matryoshka"):
        minilm.embed("hello", pooling_params=PoolingParams(dimensions=128))


def test_minilm_max_model_len_is_sentence_transformers_max_seq_length(minilm):
    """sentence_bert_config.json says 256 (its positions allow 512), as vLLM and sentence-transformers read it."""
    assert minilm.engine.max_model_len == 256
    with pytest.raises(ValueError, match="256"):
        LLM(MINILM, max_model_len=512)


def test_auto_truncate_matches_sentence_transformers(minilm, st_minilm):
    text = " ".join(SENTENCES * 12)
    assert len(minilm.get_tokenizer()(text)["input_ids"]) >= 300
    with pytest.raises(ValueError, match="maximum context length is 256"):
        minilm.embed(text)  # off (the default): refused, naming the limit
    auto = LLM(MINILM, dtype="float32", auto_truncate=True)
    out = auto.embed(text)[0]
    assert len(out.prompt_token_ids) == 256
    assert_close(out.outputs.embedding, st_minilm.encode([text], convert_to_tensor=True).float()[0])
    # A request's own truncate_prompt_tokens still wins over the model's option.
    assert len(auto.embed(text, truncate_prompt_tokens=10)[0].prompt_token_ids) == 10


def test_pooling_calls_encoded_in_slices_equal_one_call(tiny_model, monkeypatch):
    """LLM.embed / classify / score encode their inputs a slice at a time, a step launched after each: the outputs
    are the same, in input order, as one call's; a bad input in a later slice aborts every slice, nothing left."""
    import engine.llm
    from conftest import assert_pool_free
    texts = TEXTS * 3
    runs = {}
    for first, size in ((1000, 1000), (1, 2)):  # one call; slices of 1, 2, 2, ...
        monkeypatch.setattr(engine.llm, "POOLING_FIRST_SLICE", first)
        monkeypatch.setattr(engine.llm, "POOLING_SLICE", size)
        emb = LLM(tiny_model("bert"), task="embed", dtype="float32", async_scheduling=True, max_num_batched_tokens=24)
        cls = LLM(tiny_model("bert-cls3"), dtype="float32", async_scheduling=True)
        runs[size] = ([o.outputs.embedding for o in emb.embed(texts)], [o.prompt_token_ids for o in emb.embed(texts)],
                      [o.outputs.probs for o in cls.classify(texts)],
                      [o.outputs.score for o in emb.score(texts[0], texts)], [o.outputs.score for o in emb.score(texts, texts)])
        assert_pool_free(emb), assert_pool_free(cls)
    sliced, whole = runs[2], runs[1000]
    assert sliced[1] == whole[1]  # the inputs, in order
    for got, want in zip(sliced[:1] + sliced[2:], whole[:1] + whole[2:]):  # batch shapes differ: last bits may too
        assert np.allclose(np.array(got), np.array(want), atol=1e-6)
    with pytest.raises(ValueError, match="tokens"):  # over max_model_len, not truncated: found in the fourth slice
        emb.embed(texts[:5] + ["word " * 500])
    assert_pool_free(emb)


def test_pooling_slices_grow_from_a_small_first_one():
    """The device starts on the first few inputs' tokens; later slices are as large as POOLING_SLICE."""
    from engine.llm import slices
    assert slices(600) == [(0, 32), (32, 96), (96, 224), (224, 480), (480, 600)]
    assert slices(20) == [(0, 20)] and slices(0) == []
