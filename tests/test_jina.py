"""jina-reranker-v2-base-multilingual's checkpoint layout and config on the engine's XLM-RoBERTa, fp32,
against a reference written from its published modeling code; its whole 1,024-position context."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import sentence
from engine import LLM, PoolingParams

pytestmark = pytest.mark.usefixtures("one_thread")

QUERY = "where does the cat sleep"
DOCS = [sentence(900 + i, n) for i, n in enumerate((2, 9, 25, 50))]


class JinaRerankerReference:
    """XLMRobertaForSequenceClassification of jina-reranker-v2's modeling_xlm_roberta.py (with its
    embedding.py, block.py, mha.py, mlp.py), for one sequence, on the checkpoint's own names."""

    def __init__(self, model_dir: str):
        with open(os.path.join(model_dir, "config.json")) as f:
            self.c = json.load(f)
        self.w = {k.removeprefix("roberta."): v for k, v in load_file(os.path.join(model_dir, "model.safetensors")).items()}

    def ln(self, x, name):
        return F.layer_norm(x, x.shape[-1:], self.w[f"{name}.weight"], self.w[f"{name}.bias"], self.c["layer_norm_eps"])

    def linear(self, x, name):
        return x @ self.w[f"{name}.weight"].T + self.w[f"{name}.bias"]

    @torch.no_grad()
    def logit(self, ids: list[int]) -> float:
        c, w = self.c, self.w
        ids_t = torch.tensor(ids)
        # create_position_ids_from_input_ids: positions count from padding_idx + 1 over non-pad tokens
        positions = torch.cumsum(ids_t != c["pad_token_id"], 0) * (ids_t != c["pad_token_id"]) + c["pad_token_id"]
        x = (w["embeddings.word_embeddings.weight"][ids_t] + w["embeddings.position_embeddings.weight"][positions]
             + w["embeddings.token_type_embeddings.weight"][torch.zeros_like(ids_t)])
        x = self.ln(x, "emb_ln")
        heads = c["num_attention_heads"]
        d = c["hidden_size"] // heads
        for i in range(c["num_hidden_layers"]):
            p = f"encoder.layers.{i}."
            # MHA: fused Wqkv, softmax(q k^T / sqrt(d)) v, out_proj; post-norm Block (prenorm=False)
            q, k, v = self.linear(x, p + "mixer.Wqkv").view(len(ids), 3, heads, d).unbind(1)
            attn = torch.einsum("qhd,khd->hqk", q, k) / d ** 0.5
            out = torch.einsum("hqk,khd->qhd", attn.softmax(-1), v).reshape(len(ids), heads * d)
            x = self.ln(self.linear(out, p + "mixer.out_proj") + x, p + "norm1")
            mlp = self.linear(F.gelu(self.linear(x, p + "mlp.fc1")), p + "mlp.fc2")
            x = self.ln(mlp + x, p + "norm2")
        # XLMRobertaClassificationHead on <s>
        return self.linear(torch.tanh(self.linear(x[0], "classifier.dense")), "classifier.out_proj").item()


def test_jina_reranker_v2_scores_match_reference(tiny_model):
    path = tiny_model("jina-reranker-v2")
    ref = JinaRerankerReference(path)
    llm = LLM(path, dtype="float32")
    assert llm.engine.task == "score" and llm.engine.max_model_len == 1024
    tok = llm.get_tokenizer()
    outs = llm.score(QUERY, DOCS, pooling_params=PoolingParams(activation=False))
    for doc, out in zip(DOCS, outs):
        assert out.prompt_token_ids == tok(QUERY, doc)["input_ids"]
        assert abs(out.outputs.score - ref.logit(out.prompt_token_ids)) <= 1e-4
    # compute_score's sigmoid is the default activation.
    out = llm.score(QUERY, DOCS[1])[0]
    assert abs(out.outputs.score - torch.tensor(ref.logit(out.prompt_token_ids)).sigmoid().item()) <= 1e-4


def test_jina_reranker_v2_serves_1024_positions(tiny_model):
    path = tiny_model("jina-reranker-v2")
    ref = JinaRerankerReference(path)
    llm = LLM(path, dtype="float32")
    long_doc = " ".join(sentence(950 + i, 40) for i in range(40))
    out = llm.score(QUERY, long_doc, truncate_prompt_tokens=-1, pooling_params=PoolingParams(activation=False))[0]
    assert len(out.prompt_token_ids) == 1024
    assert abs(out.outputs.score - ref.logit(out.prompt_token_ids)) <= 1e-4
    with pytest.raises(ValueError, match="1024"):
        llm.score(QUERY, long_doc)
