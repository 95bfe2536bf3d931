"""Decoder rerankers with a published prompt, fp32: bge-reranker-v2-gemma (recognised by name; its
prompt and the logit of "Yes" by default, transformers' Gemma as the reference)."""
import pytest
import torch
import transformers as T

from conftest import assert_pool_free, sentence
from engine import LLM, PoolingParams
from engine.tokenizer import BGE_RERANKER_INSTRUCTION

pytestmark = pytest.mark.usefixtures("one_thread")

QUERY = "is the cat on the mat"
DOCS = [sentence(800 + i, 5 + 9 * i) for i in range(4)]


def flag_embedding_ids(tok, query: str, doc: str, prompt: str = BGE_RERANKER_INSTRUCTION) -> list[int]:
    """FlagEmbedding's LLM reranker input: [BOS] + "A: q" + "\\n" + "B: d" + "\\n" + prompt, each tokenized alone."""
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    return [tok.bos_token_id] + ids(f"A: {query}") + ids("\n") + ids(f"B: {doc}") + ids("\n") + ids(prompt)


def test_bge_gemma_prompt_and_yes_logit_by_default(tiny_model):
    path = tiny_model("bge-reranker-v2-gemma")
    hf = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(path, task="score", dtype="float32", block_size=4)
    tok = llm.get_tokenizer()
    yes = tok("Yes", add_special_tokens=False)["input_ids"][0]
    outs = llm.score(QUERY, DOCS, pooling_params=PoolingParams(activation=False))
    for doc, out in zip(DOCS, outs):
        ids = flag_embedding_ids(tok, QUERY, doc)
        assert out.prompt_token_ids == ids
        with torch.no_grad():
            want = hf(torch.tensor([ids])).logits[0, -1, yes].item()
        assert abs(out.outputs.score - want) <= 1e-4
    # The query's blocks are computed once and shared by the later documents.
    assert outs[-1].num_cached_tokens >= 4
    # Default activation: sigmoid of the same logit (FlagEmbedding's normalize=True).
    for raw, out in zip(outs, llm.score(QUERY, DOCS)):
        assert abs(out.outputs.score - torch.tensor(raw.outputs.score).sigmoid().item()) <= 1e-5
    assert_pool_free(llm)


def test_bge_gemma_prompt_can_be_overridden(tiny_model):
    path = tiny_model("bge-reranker-v2-gemma")
    hf = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    instruction = "Is B an answer to A ? Yes or No ."
    llm = LLM(path, task="score", dtype="float32", score_instruction=instruction, score_tokens=("No", "Yes"))
    tok = llm.get_tokenizer()
    no, yes = (tok(t, add_special_tokens=False)["input_ids"][0] for t in ("No", "Yes"))
    out = llm.score(QUERY, DOCS[1])[0]
    ids = flag_embedding_ids(tok, QUERY, DOCS[1], instruction)
    assert out.prompt_token_ids == ids
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0, -1, [no, yes]].softmax(-1)[1].item()
    assert abs(out.outputs.score - want) <= 1e-4
    template = "question : {query} document : {document} answer :"
    llm = LLM(path, task="score", dtype="float32", score_template=template)
    out = llm.score(QUERY, DOCS[1])[0]
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    assert out.prompt_token_ids == ids(f"question : {QUERY} document : ") + ids(DOCS[1]) + ids(" answer :")
