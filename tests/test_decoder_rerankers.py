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


# ---------------------------------------------------------------- bge-reranker-v2-minicpm-layerwise


class MiniCPMLayerwiseReference:
    """The layerwise reranker's score for one sequence, written out from its published modeling code
    (FlagEmbedding, modeling_minicpm_reranker.py: LayerWiseMiniCPMForCausalLM, head_type "simple")."""

    def __init__(self, model_dir: str):
        import json
        import os

        from safetensors.torch import load_file
        with open(os.path.join(model_dir, "config.json")) as f:
            self.c = json.load(f)
        self.w = load_file(os.path.join(model_dir, "model.safetensors"))

    def rms_norm(self, x, weight):
        variance = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(variance + self.c["rms_norm_eps"]) * weight

    def rotate(self, x, positions):
        """Rotary embedding, half-split layout: x * cos + rotate_half(x) * sin."""
        d = x.shape[-1]
        inv_freq = 1.0 / (self.c["rope_theta"] ** (torch.arange(0, d, 2).float() / d))
        freqs = torch.outer(positions.float(), inv_freq)
        emb = torch.cat((freqs, freqs), -1)[:, None, :]
        half = torch.cat((-x[..., d // 2:], x[..., :d // 2]), -1)
        return x * emb.cos() + half * emb.sin()

    def layer(self, i: int, x):
        c, w, p = self.c, self.w, f"model.layers.{i}."
        heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
        d = c["hidden_size"] // heads
        n = x.shape[0]
        branch_scale = c["scale_depth"] / (c["num_hidden_layers"] ** 0.5)
        h = self.rms_norm(x, w[p + "input_layernorm.weight"])
        q = (h @ w[p + "self_attn.q_proj.weight"].T).view(n, heads, d)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).view(n, kv_heads, d)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(n, kv_heads, d)
        pos = torch.arange(n)
        q, k = self.rotate(q, pos), self.rotate(k, pos)
        k = k.repeat_interleave(heads // kv_heads, 1)
        v = v.repeat_interleave(heads // kv_heads, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / d ** 0.5
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, heads * d)
        x = x + (attn @ w[p + "self_attn.o_proj.weight"].T) * branch_scale
        h = self.rms_norm(x, w[p + "post_attention_layernorm.weight"])
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        mlp = (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
        return x + mlp * branch_scale

    @torch.no_grad()
    def score(self, ids: list[int], cutoff: int) -> float:
        """Hidden state after `cutoff` layers, final norm, that layer's head, at the last token."""
        c = self.c
        x = self.w["model.embed_tokens.weight"][ids] * c["scale_emb"]
        for i in range(cutoff):
            x = self.layer(i, x)
        h = self.rms_norm(x, self.w["model.norm.weight"])
        return (h[-1] @ self.w[f"lm_head.{cutoff - c['start_layer']}.linear_head.weight"].T).item()


@pytest.mark.parametrize("cutoff", [None, 3])
def test_minicpm_layerwise_matches_reference(cutoff, tiny_model):
    path = tiny_model("bge-reranker-v2-minicpm-layerwise")
    ref = MiniCPMLayerwiseReference(path)
    llm = LLM(path, dtype="float32", block_size=4, cutoff_layers=cutoff)
    assert llm.engine.task == "score"
    layers = 6 if cutoff is None else cutoff  # 28 (the model card's) is past this model's 6 layers
    assert len(llm.engine.runner.model.layers) == layers
    tok = llm.get_tokenizer()
    outs = llm.score(QUERY, DOCS, pooling_params=PoolingParams(activation=False))
    for doc, out in zip(DOCS, outs):
        ids = flag_embedding_ids(tok, QUERY, doc)
        assert out.prompt_token_ids == ids
        assert abs(out.outputs.score - ref.score(ids, layers)) <= 1e-4
    assert outs[-1].num_cached_tokens >= 4  # the query's blocks are shared
    # N:N, and the sigmoid by default.
    pairs = llm.score([QUERY, "the dog runs"], DOCS[:2])
    assert abs(pairs[0].outputs.score - torch.tensor(outs[0].outputs.score).sigmoid().item()) <= 1e-5
    assert_pool_free(llm)


def test_minicpm_layerwise_options_are_checked(tiny_model):
    path = tiny_model("bge-reranker-v2-minicpm-layerwise")
    with pytest.raises(ValueError, match="cutoff_layers must be between start_layer 2"):
        LLM(path, dtype="float32", cutoff_layers=[7])
    with pytest.raises(ValueError, match="one layer"):
        LLM(path, dtype="float32", cutoff_layers=[3, 4])
    with pytest.raises(ValueError, match="supports score"):
        LLM(path, dtype="float32", task="generate")
    with pytest.raises(ValueError, match="only to layerwise"):
        LLM(tiny_model("bge-reranker-v2-gemma"), task="score", dtype="float32", cutoff_layers=3)
