"""Encoder-only transformers: BERT, RoBERTa and XLM-RoBERTa as one implementation.

The differences are config: RoBERTa-style position ids start after the padding index, and the
sequence-classification head is BERT's pooler + linear or RoBERTa's dense + out_proj."""
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import Attention
from engine.context import get_context
from engine.layer_ops import EncoderLayerOps
from engine.models.jina import jina_to_hf
from engine.models.weights import load_into

ROBERTA_TYPES = ("roberta", "xlm-roberta", "camembert")
ENCODER_ARCHITECTURES = {f"{family}{head}" for family in ("Bert", "Roberta", "XLMRoberta")
                         for head in ("Model", "ForSequenceClassification")}
STACKED = (("qkv", "query", 0), ("qkv", "key", 1), ("qkv", "value", 2))
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass(slots=True, frozen=True)
class EncoderSpec:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    eps: float
    act: str
    roberta: bool
    position_offset: int
    num_labels: int | None

    @classmethod
    def from_hf(cls, c) -> "EncoderSpec":
        roberta = c.model_type in ROBERTA_TYPES
        arch = (c.architectures or [""])[0]
        if getattr(c, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type {c.position_embedding_type!r} is not supported (absolute)")
        if c.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {c.hidden_act!r} is not supported ({', '.join(ACTIVATIONS)})")
        return cls(hidden_size=c.hidden_size, num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
                   intermediate_size=c.intermediate_size, eps=c.layer_norm_eps, act=c.hidden_act,
                   roberta=roberta, position_offset=c.pad_token_id + 1 if roberta else 0,
                   num_labels=c.num_labels if arch.endswith("SequenceClassification") else None)

    @property
    def activation(self):
        return ACTIVATIONS[self.act]


def named_module(**children: nn.Module) -> nn.Module:
    m = nn.Module()
    for name, child in children.items():
        m.add_module(name, child)
    return m


class EncoderLayer(nn.Module):
    def __init__(self, s: EncoderSpec):
        super().__init__()
        h, self.s = s.hidden_size, s
        qkv = nn.Linear(h, 3 * h)
        qkv.shard_sizes = (h, h, h)
        # Module names follow Hugging Face's, so checkpoints load by name.
        self.attention = named_module(self=named_module(qkv=qkv),
                                 output=named_module(dense=nn.Linear(h, h), LayerNorm=nn.LayerNorm(h, s.eps)))
        self.intermediate = named_module(dense=nn.Linear(h, s.intermediate_size))
        self.output = named_module(dense=nn.Linear(s.intermediate_size, h), LayerNorm=nn.LayerNorm(h, s.eps))
        self.attn = Attention(s.num_heads, s.num_heads, h // s.num_heads, (h // s.num_heads) ** -0.5)

    def forward(self, x: torch.Tensor, ops: EncoderLayerOps, rows: torch.Tensor | None = None) -> torch.Tensor:
        """rows: only those go past attention (the last layer, Context.output_rows)."""
        s, head_dim = self.s, self.s.hidden_size // self.s.num_heads
        q, k, v = self.attention.self.qkv(x).view(-1, 3, s.num_heads, head_dim).unbind(1)
        out, attended = self.attention.output, self.attn(q, k, v)
        if rows is not None:
            x, attended = x[rows], attended[rows]
        x = ops.add_layer_norm(out.dense(attended), x, out.LayerNorm)
        h = ops.activation(self.intermediate.dense(x), s.activation)
        return ops.add_layer_norm(self.output.dense(h), x, self.output.LayerNorm)


class EncoderModel(nn.Module):
    is_decoder = False
    computes_output_rows_only = True  # its last layer honours Context.output_rows
    layer_ops = EncoderLayerOps()  # the model runner sets the device's (engine.kernels)

    def __init__(self, config, max_model_len: int):
        super().__init__()
        s = self.spec = EncoderSpec.from_hf(config)
        h = s.hidden_size
        self.embeddings = named_module(
            word_embeddings=nn.Embedding(config.vocab_size, h),
            position_embeddings=nn.Embedding(config.max_position_embeddings, h),
            token_type_embeddings=nn.Embedding(config.type_vocab_size, h),
            LayerNorm=nn.LayerNorm(h, s.eps))
        self.encoder = named_module(layer=nn.ModuleList(EncoderLayer(s) for _ in range(s.num_layers)))
        if s.num_labels is not None and s.roberta:
            self.classifier = named_module(dense=nn.Linear(h, h), out_proj=nn.Linear(h, s.num_labels))
        elif s.num_labels is not None:
            self.pooler = named_module(dense=nn.Linear(h, h))
            self.classifier = nn.Linear(h, s.num_labels)

    @property
    def attention_layers(self) -> list[Attention]:
        return [layer.attn for layer in self.encoder.layer]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        e = self.embeddings
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = (e.word_embeddings(input_ids) + e.position_embeddings(positions + self.spec.position_offset)
             + e.token_type_embeddings(token_type_ids))
        x = e.LayerNorm(x)
        rows, last = get_context().output_rows, len(self.encoder.layer) - 1
        for i, layer in enumerate(self.encoder.layer):
            x = layer(x, self.layer_ops, rows if i == last else None)
        return x

    def classify(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        if self.spec.roberta:
            return self.classifier.out_proj(torch.tanh(self.classifier.dense(cls_hidden)))
        return self.classifier(torch.tanh(self.pooler.dense(cls_hidden)))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def rename(name: str) -> str:
            for prefix in ("bert.", "roberta.", "model."):
                name = name.removeprefix(prefix)
            return jina_to_hf(name.replace(".gamma", ".weight").replace(".beta", ".bias"))
        load_into(self, weights, rename, STACKED)
