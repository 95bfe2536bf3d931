"""DeBERTa-v2 / v3: disentangled attention over relative positions.

Every layer adds to q.k two relative-position terms: content-to-position q_i.pk[r(i,j)] and
position-to-content k_j.pq[r(i,j)], where r(i,j) is the (log-bucketed) distance i - j and pk, pq
are projections of one relative-embedding table shared by all layers. The bias depends on each
sequence's own positions, so a packed step is laid out as a padded batch [sequences, longest]
and attended in one call with the bias (plus the key-padding mask) as an additive mask."""
import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.encoder import ACTIVATIONS, named_module
from engine.models.weights import load_into

DEBERTA_ARCHITECTURES = {"DebertaV2Model", "DebertaV2ForSequenceClassification"}
STACKED = (("qkv_proj", "query_proj", 0), ("qkv_proj", "key_proj", 1), ("qkv_proj", "value_proj", 2))


@dataclass(slots=True, frozen=True)
class DebertaSpec:
    hidden_size: int
    embedding_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    intermediate_size: int
    eps: float
    act: str
    pooler_act: str
    type_vocab_size: int
    position_biased_input: bool
    relative_attention: bool
    c2p: bool
    p2c: bool
    share_att_key: bool
    att_span: int  # relative distances map to rows [0, 2 * att_span) of rel_embeddings
    position_buckets: int  # > 0: log buckets beyond +-buckets/2
    max_relative_positions: int
    norm_rel_ebd: bool
    num_labels: int | None

    @classmethod
    def from_hf(cls, c) -> "DebertaSpec":
        if getattr(c, "conv_kernel_size", 0) > 0:
            raise ValueError("DeBERTa-v2 checkpoints with a convolution layer (conv_kernel_size > 0) are not supported")
        for name in ("hidden_act", "pooler_hidden_act"):
            if getattr(c, name) not in ACTIVATIONS:
                raise ValueError(f"{name} {getattr(c, name)!r} is not supported ({', '.join(ACTIVATIONS)})")
        arch = (c.architectures or [""])[0]
        pos_att = c.pos_att_type or []
        if isinstance(pos_att, str):
            pos_att = [p.strip() for p in pos_att.lower().split("|")]
        max_rel = c.max_relative_positions if c.max_relative_positions >= 1 else c.max_position_embeddings
        buckets = getattr(c, "position_buckets", -1)
        head_dim = getattr(c, "attention_head_size", None) or c.hidden_size // c.num_attention_heads
        norm_rel = [x.strip() for x in getattr(c, "norm_rel_ebd", "none").lower().split("|")]
        return cls(hidden_size=c.hidden_size, embedding_size=getattr(c, "embedding_size", None) or c.hidden_size,
                   num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads, head_dim=head_dim,
                   intermediate_size=c.intermediate_size, eps=c.layer_norm_eps, act=c.hidden_act,
                   pooler_act=c.pooler_hidden_act, type_vocab_size=c.type_vocab_size,
                   position_biased_input=getattr(c, "position_biased_input", True),
                   relative_attention=getattr(c, "relative_attention", False),
                   c2p="c2p" in pos_att, p2c="p2c" in pos_att, share_att_key=getattr(c, "share_att_key", False),
                   att_span=buckets if buckets > 0 else max_rel, position_buckets=buckets,
                   max_relative_positions=max_rel, norm_rel_ebd="layer_norm" in norm_rel,
                   num_labels=c.num_labels if arch.endswith("SequenceClassification") else None)

    @property
    def scale(self) -> float:
        """q.k and both position terms are divided by sqrt(head_dim * number of terms)."""
        return math.sqrt(self.head_dim * (1 + self.c2p + self.p2c))


def bucket_positions(distance: torch.Tensor, buckets: int, max_position: int) -> torch.Tensor:
    """DeBERTa's log buckets: distances within +-buckets/2 stay exact, longer ones grow logarithmically."""
    if buckets <= 0:
        return distance
    mid = buckets // 2
    sign = torch.sign(distance)
    abs_pos = torch.where((distance < mid) & (distance > -mid), torch.tensor(mid - 1).type_as(distance),
                          distance.abs())
    log_pos = torch.ceil(torch.log(abs_pos / mid) / torch.log(torch.tensor((max_position - 1) / mid))
                         * (mid - 1)) + mid
    return torch.where(abs_pos <= mid, distance.to(log_pos.dtype), log_pos * sign).long()


@dataclass(slots=True)
class PaddedBatch:
    """Where each packed token sits in the padded [num_seqs, longest] layout, and what it may attend."""
    index: torch.Tensor  # [tokens] flat padded slot of each packed token
    num_seqs: int
    longest: int
    key_mask: torch.Tensor  # [num_seqs, 1, 1, longest] additive: 0 for real keys, -inf-ish for padding
    rel_rows: torch.Tensor | None  # [U] rows of rel_embeddings that this step's distances use
    rel_index: torch.Tensor | None  # [longest, longest] r(i, j) as an index into rel_rows

    @classmethod
    def from_positions(cls, positions: torch.Tensor, s: DebertaSpec, dtype: torch.dtype) -> "PaddedBatch":
        # Encoder sequences are packed whole, each starting at position 0.
        seq = torch.cumsum(positions == 0, 0) - 1
        num_seqs, longest = int(seq[-1]) + 1, int(positions.max()) + 1
        lengths = torch.bincount(seq, minlength=num_seqs)
        real = torch.arange(longest, device=positions.device) < lengths[:, None]
        key_mask = torch.zeros(real.shape, dtype=dtype, device=positions.device)
        key_mask.masked_fill_(~real, torch.finfo(dtype).min)
        rows = index = None
        if s.relative_attention:
            # Only 2 * longest - 1 distances occur; bucket them once and keep the rows they reach.
            distance = torch.arange(1 - longest, longest, device=positions.device)
            row = (bucket_positions(distance, s.position_buckets, s.max_relative_positions) + s.att_span)
            rows, inverse = torch.unique(row.clamp(0, 2 * s.att_span - 1), return_inverse=True)
            i = torch.arange(longest, device=positions.device)
            index = inverse[i[:, None] - i[None, :] + longest - 1]
        return cls(seq * longest + positions, num_seqs, longest, key_mask[:, None, None, :], rows, index)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[tokens, ...] -> [num_seqs, longest, ...], zeros in the padding."""
        out = x.new_zeros((self.num_seqs * self.longest,) + x.shape[1:])
        out.index_copy_(0, self.index, x)
        return out.view((self.num_seqs, self.longest) + x.shape[1:])

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape((self.num_seqs * self.longest,) + x.shape[2:])[self.index]


class DebertaLayer(nn.Module):
    def __init__(self, s: DebertaSpec):
        super().__init__()
        self.s = s
        h, inner = s.hidden_size, s.num_heads * s.head_dim
        qkv = nn.Linear(h, 3 * inner)
        qkv.shard_sizes = (inner, inner, inner)
        attn = named_module(qkv_proj=qkv)
        if s.relative_attention and not s.share_att_key:
            if s.c2p:
                attn.pos_key_proj = nn.Linear(h, inner)
            if s.p2c:
                attn.pos_query_proj = nn.Linear(h, inner)
        # Module names follow Hugging Face's, so checkpoints load by name.
        self.attention = named_module(self=attn, output=named_module(dense=nn.Linear(inner, h), LayerNorm=nn.LayerNorm(h, s.eps)))
        self.intermediate = named_module(dense=nn.Linear(h, s.intermediate_size))
        self.output = named_module(dense=nn.Linear(s.intermediate_size, h), LayerNorm=nn.LayerNorm(h, s.eps))

    def forward(self, x: torch.Tensor, batch: PaddedBatch, rel: torch.Tensor | None) -> torch.Tensor:
        s, proj = self.s, self.attention.self
        # [seqs, heads, longest, dim] each
        q, k, v = batch.pad(proj.qkv_proj(x)).view(batch.num_seqs, batch.longest, 3, s.num_heads,
                                                   s.head_dim).permute(2, 0, 3, 1, 4)
        mask = batch.key_mask
        if rel is not None:
            mask = mask + self._position_bias(q, k, rel, batch.rel_index)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / s.scale)
        out = batch.unpad(out.transpose(1, 2).flatten(2))
        o = self.attention.output
        x = o.LayerNorm(x + o.dense(out))
        return self.output.LayerNorm(x + self.output.dense(ACTIVATIONS[s.act](self.intermediate.dense(x))))

    def _position_bias(self, q, k, rel, index) -> torch.Tensor:
        """c2p[i, j] = q_i . pk[r(i, j)] and p2c[i, j] = k_j . pq[r(i, j)], over sqrt(dim * terms)."""
        s, proj = self.s, self.attention.self
        inner = s.num_heads * s.head_dim

        def heads(p: torch.Tensor) -> torch.Tensor:  # [U, inner] -> [heads, dim, U]
            return p.view(-1, s.num_heads, s.head_dim).permute(1, 2, 0)
        if s.share_att_key:
            # Through the layer (its values' columns too: rel has a few hundred rows), not its weight: a packed
            # layer's (engine.packed_linear) would be unpacked every step.
            pq, pk = proj.qkv_proj(rel)[..., :2 * inner].split(inner, -1)
        else:
            pq = proj.pos_query_proj(rel) if s.p2c else None
            pk = proj.pos_key_proj(rel) if s.c2p else None
        b, _, n, _ = q.shape
        index = index.expand(b, s.num_heads, n, n)
        bias = 0
        if s.c2p:
            bias = torch.gather(q @ heads(pk), -1, index)
        if s.p2c:  # gathered as [j, i], then transposed
            bias = bias + torch.gather(k @ heads(pq), -1, index.transpose(-1, -2)).transpose(-1, -2)
        return bias / s.scale


class DebertaModel(nn.Module):
    is_decoder = False

    def __init__(self, config, max_model_len: int):
        super().__init__()
        s = self.spec = DebertaSpec.from_hf(config)
        h, e = s.hidden_size, s.embedding_size
        emb = named_module(word_embeddings=nn.Embedding(config.vocab_size, e), LayerNorm=nn.LayerNorm(h, s.eps))
        if s.position_biased_input:
            emb.position_embeddings = nn.Embedding(config.max_position_embeddings, e)
        if s.type_vocab_size > 0:
            emb.token_type_embeddings = nn.Embedding(s.type_vocab_size, e)
        if e != h:
            emb.embed_proj = nn.Linear(e, h, bias=False)
        self.embeddings = emb
        self.encoder = named_module(layer=nn.ModuleList(DebertaLayer(s) for _ in range(s.num_layers)))
        if s.relative_attention:
            self.encoder.rel_embeddings = nn.Embedding(2 * s.att_span, h)
            if s.norm_rel_ebd:
                self.encoder.LayerNorm = nn.LayerNorm(h, s.eps)
        if s.num_labels is not None:
            self.pooler = named_module(dense=nn.Linear(h, h))  # ContextPooler: first token, dense, activation
            self.classifier = nn.Linear(h, s.num_labels)

    @property
    def attention_layers(self) -> list:
        return []  # its own attention (relative-position bias): no shared backend, no KV cache

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        s, e = self.spec, self.embeddings
        x = e.word_embeddings(input_ids)
        if s.position_biased_input:
            x = x + e.position_embeddings(positions)
        if s.type_vocab_size > 0:
            x = x + e.token_type_embeddings(torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids)
        if s.embedding_size != s.hidden_size:
            x = e.embed_proj(x)
        x = e.LayerNorm(x)
        batch = PaddedBatch.from_positions(positions, s, x.dtype)
        rel = None
        if s.relative_attention:  # the rows this step uses, normalised once for all layers
            rel = self.encoder.rel_embeddings(batch.rel_rows)
            if s.norm_rel_ebd:
                rel = self.encoder.LayerNorm(rel)
        for layer in self.encoder.layer:
            x = layer(x, batch, rel)
        return x

    def classify(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(ACTIVATIONS[self.spec.pooler_act](self.pooler.dense(cls_hidden)))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def rename(name: str) -> str:
            return name.removeprefix("deberta.").replace(".gamma", ".weight").replace(".beta", ".bias")
        load_into(self, weights, rename, STACKED)
