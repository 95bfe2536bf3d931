"""jina-reranker-v2's checkpoint layout, mapped onto the names of Hugging Face's XLM-RoBERTa.

Its published code (XLMRobertaFlashConfig, flash-attention BERT blocks) computes what XLM-RoBERTa
computes: absolute positions after the padding index, post-norm blocks, the RoBERTa classification
head. Only the names differ, and q/k/v come fused as one Wqkv, in the engine's own q, k, v order."""
import re

_RENAMES = tuple((re.compile(pattern), repl) for pattern, repl in (
    (r"^emb_ln\.", "embeddings.LayerNorm."),
    (r"^encoder\.layers\.(\d+)\.mixer\.Wqkv\.", r"encoder.layer.\1.attention.self.qkv."),
    (r"^encoder\.layers\.(\d+)\.mixer\.out_proj\.", r"encoder.layer.\1.attention.output.dense."),
    (r"^encoder\.layers\.(\d+)\.norm1\.", r"encoder.layer.\1.attention.output.LayerNorm."),
    (r"^encoder\.layers\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"^encoder\.layers\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
    (r"^encoder\.layers\.(\d+)\.norm2\.", r"encoder.layer.\1.output.LayerNorm."),
))


def jina_to_hf(name: str) -> str:
    """A jina flash-layout weight name (prefix removed) as Hugging Face names it; other names unchanged."""
    for pattern, repl in _RENAMES:
        name, n = pattern.subn(repl, name)
        if n:
            break
    return name
