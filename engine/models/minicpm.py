"""bge-reranker-v2-minicpm-layerwise: a MiniCPM decoder with a one-logit score head per layer.

MiniCPM is Llama with scalings: token embeddings times `scale_emb`, and every residual branch
(attention and MLP output) times `scale_depth / sqrt(num_hidden_layers)`. Both are folded into the
weights at load time (the embedding table feeds no LM head here), so the layers are the Llama ones.
(MiniCPM's third scaling, LM-head inputs over hidden_size / dim_model_base, belongs to its vocabulary
heads; the layerwise reranker's "simple" score heads read the hidden state as it is.)

The score of a pair at cutoff layer c (start_layer <= c <= num_hidden_layers) is
head[c - start_layer](norm(hidden after c layers)) at the last token: only the first c layers are
built, loaded and run, and the KV cache holds only them."""
import copy
import math
from typing import Iterable

import torch
from torch import nn

from engine.models.decoder import STACKED, DecoderModel
from engine.models.weights import load_into

LAYERWISE_ARCHITECTURES = {"LayerWiseMiniCPMForCausalLM"}
MODEL_CARD_CUTOFF = 28  # the layer the model card scores with (of 40)


def cutoff_layer(config) -> int:
    """The configured cutoff (engine option cutoff_layers), else the model card's 28 where the model has it,
    else the last layer (the remote code's own default)."""
    start, last = config.start_layer, config.num_hidden_layers
    cutoff = getattr(config, "cutoff_layers", None)
    if cutoff is None:
        return MODEL_CARD_CUTOFF if start <= MODEL_CARD_CUTOFF <= last else last
    if not start <= cutoff <= last:
        raise ValueError(f"cutoff_layers must be between start_layer {start} and num_hidden_layers {last}, got {cutoff}")
    return cutoff


class LayerwiseMiniCPMModel(DecoderModel):
    reranker_only = True  # its heads give one relevance logit, not next-token logits

    def __init__(self, config, max_model_len: int):
        if getattr(config, "head_type", "simple") != "simple" or not getattr(config, "head_multi", True):
            raise ValueError("only the layerwise reranker's per-layer one-logit heads (head_type 'simple', "
                             "head_multi true) are supported")
        self.cutoff, self.start_layer = cutoff_layer(config), config.start_layer
        truncated = copy.copy(config)
        truncated.num_hidden_layers = self.cutoff
        truncated.tie_word_embeddings = True  # no vocabulary head to build
        super().__init__(truncated, max_model_len)
        self.score_head = nn.Linear(self.spec.hidden_size, 1, bias=False)
        self.scale_emb = config.scale_emb
        self.residual_scale = config.scale_depth / math.sqrt(config.num_hidden_layers)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        head = f"lm_head.{self.cutoff - self.start_layer}.linear_head.weight"

        def rename(name: str) -> str | None:
            if name == head:
                return "score_head.weight"
            if name.startswith("lm_head."):
                return None  # the other layers' heads
            name = name.removeprefix("model.")
            if name.startswith("layers.") and int(name.split(".")[1]) >= self.cutoff:
                return None  # layers past the cutoff never run
            return name
        load_into(self, weights, rename, STACKED)
        with torch.no_grad():
            self.embed_tokens.weight.mul_(self.scale_emb)
            for layer in self.layers:
                for branch_out in (layer.self_attn.o_proj, layer.mlp.down_proj):
                    branch_out.weight.mul_(self.residual_scale)
                    if branch_out.bias is not None:
                        branch_out.bias.mul_(self.residual_scale)
