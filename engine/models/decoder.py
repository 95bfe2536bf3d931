"""Decoder-only transformers: Llama, Mistral, Qwen2, Qwen3, Gemma as one implementation.

Their differences are config: QKV bias (Qwen2), per-head q/k RMSNorm (Qwen3), scaled embeddings,
`1 + weight` RMSNorm and GeGLU (Gemma), RoPE scaling (Llama 3), GQA, tied embeddings."""
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import Attention
from engine.context import get_context
from engine.layer_ops import LayerOps
from engine.models.rotary import RotaryEmbedding, rope_parameters
from engine.models.weights import load_into

DECODER_ARCHITECTURES = {f"{family}For{head}" for family in ("Llama", "Mistral", "Qwen2", "Qwen3", "Gemma")
                         for head in ("CausalLM", "SequenceClassification")}
# Hugging Face keeps q/k/v and gate/up apart; one fused matmul each is faster.
STACKED = (("qkv_proj", "q_proj", 0), ("qkv_proj", "k_proj", 1), ("qkv_proj", "v_proj", 2),
           ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1))


@dataclass(slots=True, frozen=True)
class DecoderSpec:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    eps: float
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    gemma: bool  # scaled embeddings, 1 + weight norms
    gelu: bool
    tie_word_embeddings: bool
    num_labels: int | None  # set for *ForSequenceClassification

    @classmethod
    def from_hf(cls, c) -> "DecoderSpec":
        heads = c.num_attention_heads
        attention_bias = bool(getattr(c, "attention_bias", False))
        act = getattr(c, "hidden_activation", None) or c.hidden_act
        arch = (c.architectures or [""])[0]
        return cls(
            hidden_size=c.hidden_size, num_layers=c.num_hidden_layers, num_heads=heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
            intermediate_size=c.intermediate_size, vocab_size=c.vocab_size, eps=c.rms_norm_eps,
            qkv_bias=attention_bias or c.model_type == "qwen2", o_bias=attention_bias,
            qk_norm=c.model_type == "qwen3", gemma=c.model_type == "gemma", gelu="gelu" in act,
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            num_labels=c.num_labels if arch.endswith("SequenceClassification") else None)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, gemma: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if gemma else torch.ones(dim))
        self.eps, self.gemma = eps, gemma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel instead of seven elementwise ones. In float32 bit for bit Hugging Face's steps; in
        # bf16 / fp16 it rounds once where Hugging Face rounds before the weight's multiply too (an ulp).
        if self.gemma:  # Gemma scales by (1 + w) in float32, then casts: exactly Hugging Face's
            return F.rms_norm(x.float(), self.weight.shape, 1.0 + self.weight.float(), self.eps).to(x.dtype)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class DecoderLayer(nn.Module):
    def __init__(self, s: DecoderSpec):
        super().__init__()
        self.s = s
        q_size, kv_size = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        self.input_layernorm = RMSNorm(s.hidden_size, s.eps, s.gemma)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.eps, s.gemma)
        self.self_attn = nn.Module()
        self.self_attn.qkv_proj = nn.Linear(s.hidden_size, q_size + 2 * kv_size, bias=s.qkv_bias)
        self.self_attn.qkv_proj.shard_sizes = (q_size, kv_size, kv_size)
        self.self_attn.o_proj = nn.Linear(q_size, s.hidden_size, bias=s.o_bias)
        if s.qk_norm:
            self.self_attn.q_norm = RMSNorm(s.head_dim, s.eps, False)
            self.self_attn.k_norm = RMSNorm(s.head_dim, s.eps, False)
        self.attn = Attention(s.num_heads, s.num_kv_heads, s.head_dim, s.head_dim ** -0.5)
        self.mlp = nn.Module()
        self.mlp.gate_up_proj = nn.Linear(s.hidden_size, 2 * s.intermediate_size, bias=False)
        self.mlp.gate_up_proj.shard_sizes = (s.intermediate_size, s.intermediate_size)
        self.mlp.down_proj = nn.Linear(s.intermediate_size, s.hidden_size, bias=False)

    def attention_inputs(self, rotary: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor,
                         residual: torch.Tensor | None, ops: LayerOps
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: the previous layer's MLP output (the embeddings for the first), not yet added to the residual
        stream -> this layer's queries, keys and values (keys and values written to the cache) and the stream:
        each add is fused with the norm after it."""
        s, attn = self.s, self.self_attn
        h, residual = ops.add_rms_norm(x, residual, self.input_layernorm)
        # Heads first, then split: no reshape of split columns, which a compiled graph would specialise
        # on a batch of one.
        qkv = attn.qkv_proj(h).view(-1, s.num_heads + 2 * s.num_kv_heads, s.head_dim)
        norms = (attn.q_norm, attn.k_norm) if s.qk_norm else ()
        q, k, v = ops.attention_inputs(qkv, s.num_heads, s.num_kv_heads, rotary, *norms, cache=self.attn.cache_write())
        return q, k, v, residual

    def feed_forward(self, out: torch.Tensor, residual: torch.Tensor,
                     ops: LayerOps) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention's output [tokens, heads * dim] -> this layer's MLP output and the residual stream."""
        h, residual = ops.add_rms_norm(self.self_attn.o_proj(out), residual, self.post_attention_layernorm)
        return self.mlp.down_proj(ops.gated_activation(self.mlp.gate_up_proj(h), self.s.gelu)), residual


class DecoderModel(nn.Module):
    is_decoder = True
    computes_output_rows_only = True  # its last layer honours Context.output_rows
    layer_ops = LayerOps()  # the model runner sets the device's (engine.kernels)

    def __init__(self, config, max_model_len: int):
        super().__init__()
        s = self.spec = DecoderSpec.from_hf(config)
        self.rotary = RotaryEmbedding(s.head_dim, max_model_len, rope_parameters(config))
        self.embed_tokens = nn.Embedding(s.vocab_size, s.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(s) for _ in range(s.num_layers))
        self.norm = RMSNorm(s.hidden_size, s.eps, s.gemma)
        if s.num_labels is not None:
            self.score = nn.Linear(s.hidden_size, s.num_labels, bias=False)
        elif not s.tie_word_embeddings:
            self.lm_head = nn.Linear(s.hidden_size, s.vocab_size, bias=False)

    @property
    def attention_layers(self) -> list[Attention]:
        return [layer.attn for layer in self.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids=None) -> torch.Tensor:
        x, rotary = self.embed(input_ids, positions)
        ops, residual = self.layer_ops, None
        rows, last = get_context().output_rows, len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            q, k, v, residual = layer.attention_inputs(rotary, x, residual, ops)
            out = layer.attn(q, k, v)
            if i == last and rows is not None:  # only the rows the step's outputs read go on
                out, residual = out[rows], residual[rows]
            x, residual = layer.feed_forward(out, residual, ops)
        return self.final_norm(x, residual)

    # The forward's pieces, which engine.prefill_graphs also replays one by one around the attention.
    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """The first layer's input and the rotary tables every layer takes."""
        x = self.embed_tokens(input_ids)
        if self.spec.gemma:
            x = x * torch.tensor(self.spec.hidden_size ** 0.5, dtype=x.dtype)
        return x, self.rotary.tables(positions, x.dtype)

    def final_norm(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.layer_ops.add_rms_norm(x, residual, self.norm)[0]

    def output_embeddings(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.spec.tie_word_embeddings else self.lm_head.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # A tied model gets an lm_head of its own only when quantized (engine.quantization).
        head = getattr(self, "lm_head", None)
        return head(hidden) if head is not None else F.linear(hidden, self.embed_tokens.weight)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.score(pooled)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def rename(name: str) -> str | None:
            name = name.removeprefix("model.")
            if name == "lm_head.weight" and not hasattr(self, "lm_head"):
                return None  # tied, or a classifier checkpoint that still carries it
            return name
        load_into(self, weights, rename, STACKED)
