"""DeBERTa-v2/v3 parity with Hugging Face, fp32: cross-encoder scores (v3 layout), classification
(v2 layout), base-model embeddings; alone and packed with sequences of other lengths."""
import pytest
import torch
import transformers as T

from conftest import sentence
from engine import LLM, PoolingParams

pytestmark = pytest.mark.usefixtures("one_thread")

QUERY = "where does the cat sleep"
# From 1 to 60 words: short pairs stay inside the exact buckets, long ones reach the log buckets
# (v3) and the distance clamp (v2).
DOCS = [sentence(700 + i, n) for i, n in enumerate((1, 6, 15, 30, 60))]
TEXTS = DOCS + ["zebra xylophone 42, quickly!"]


@torch.no_grad()
def hf_logits(model, ids: list[int], types: list[int] | None = None) -> torch.Tensor:
    kwargs = {} if types is None else {"token_type_ids": torch.tensor([types])}
    return model(input_ids=torch.tensor([ids]), **kwargs).logits[0]


def test_v3_cross_encoder_scores_match_hf(tiny_model):
    path = tiny_model("deberta-v3-cls1")
    hf = T.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    tok = T.AutoTokenizer.from_pretrained(path)
    llm = LLM(path, dtype="float32")
    assert llm.engine.task == "score"
    # One call packs all pairs into one step: one padded batch with per-sequence relative positions.
    outs = llm.score(QUERY, DOCS)
    for doc, out in zip(DOCS, outs):
        assert out.prompt_token_ids == tok(QUERY, doc)["input_ids"]
        want = hf_logits(hf, out.prompt_token_ids)[0]
        assert abs(out.outputs.score - want.sigmoid().item()) <= 1e-4
    raw = llm.score(QUERY, DOCS[3], pooling_params=PoolingParams(activation=False))[0]
    assert abs(raw.outputs.score - hf_logits(hf, raw.prompt_token_ids)[0].item()) <= 1e-4
    # N:N, each pair alone (no padding) equals the packed result.
    alone = [llm.score(QUERY, d)[0].outputs.score for d in DOCS]
    assert alone == pytest.approx([o.outputs.score for o in outs], abs=1e-5)


def test_v2_classifier_matches_hf(tiny_model):
    path = tiny_model("deberta-v2-cls3")
    hf = T.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(path, dtype="float32")
    assert llm.engine.task == "classify"
    for out in llm.classify(TEXTS):
        probs = hf_logits(hf, out.prompt_token_ids).softmax(-1)
        assert torch.allclose(torch.tensor(out.outputs.probs), probs, atol=1e-4)
    # Pairs carry token types, which this layout embeds.
    tok = llm.get_tokenizer()
    enc = tok(QUERY, DOCS[2])
    assert 1 in enc["token_type_ids"]
    got = llm.engine.runner.model
    with torch.no_grad():
        ids, types = torch.tensor(enc["input_ids"]), torch.tensor(enc["token_type_ids"])
        h = got(ids, torch.arange(len(ids)), types)
        logits = got.classify(h[:1])[0]
    assert torch.allclose(logits, hf_logits(hf, enc["input_ids"], enc["token_type_ids"]), atol=1e-4)


def test_v3_base_model_embeddings_match_hf(tiny_model):
    path = tiny_model("deberta-v3")
    hf = T.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(path, task="embed", dtype="float32", pooling="mean")
    for out in llm.embed(TEXTS, pooling_params=PoolingParams(normalize=False)):
        with torch.no_grad():
            want = hf(input_ids=torch.tensor([out.prompt_token_ids])).last_hidden_state[0].mean(0)
        got = torch.tensor(out.outputs.embedding)
        assert (got - want).abs().max() <= 1e-4


def test_bucket_positions_match_hf():
    from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

    from engine.models.deberta import bucket_positions
    d = torch.arange(-600, 601)
    for buckets, max_pos in ((8, 128), (256, 512)):
        assert torch.equal(bucket_positions(d, buckets, max_pos), make_log_bucket_position(d, buckets, max_pos).long())
