"""Packs a scheduled step into flat tensors, runs the model, pools or samples the results."""
import torch

from engine.context import Context, PrefillSpan, set_context
from engine.models import model_class
from engine.request import Request
from engine.sampler import SampledToken, Sampler
from engine.scheduler import SchedulerOutput


class ModelRunner:
    def __init__(self, hf_config, weights, max_model_len: int, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        model = model_class(hf_config)(hf_config, max_model_len)
        model.load_weights(weights)
        # Parameters in the serving dtype; rotary tables stay float32 for exact positions.
        for p in model.parameters():
            p.data = p.data.to(device=device, dtype=dtype)
        self.model = model.to(device).eval()
        self.is_decoder = model.is_decoder
        self.block_size = 0
        self.num_blocks = 0
        self.pooling: str = "last"
        self.score_weight: torch.Tensor | None = None  # [1, hidden] for yes/no rerankers
        self.sampler: Sampler | None = None

    def kv_bytes_per_block(self, block_size: int) -> int:
        s = self.model.spec
        return 2 * s.num_layers * block_size * s.num_kv_heads * s.head_dim * self.dtype.itemsize

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        s = self.model.spec
        self.num_blocks, self.block_size = num_blocks, block_size
        cache = torch.zeros(2, s.num_layers, num_blocks * block_size, s.num_kv_heads, s.head_dim,
                            dtype=self.dtype, device=self.device)
        for i, attn in enumerate(self.model.attention_layers):
            attn.k_cache, attn.v_cache, attn.block_size = cache[0, i], cache[1, i], block_size
        self.kv_cache = cache

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> tuple[list[tuple[Request, SampledToken]],
                                                       list[tuple[Request, torch.Tensor]]]:
        # Prefill chunks first, then single-token decodes, so decodes form one batch at the end.
        pairs = sorted(zip(sched.requests, sched.num_tokens), key=lambda rn: self._is_decode(*rn))
        reqs, counts = [r for r, _ in pairs], [n for _, n in pairs]
        ids, types, positions, ends = [], [], [], []
        for req, n in zip(reqs, counts):
            c = req.num_computed_tokens
            ids.extend(req.token_ids[c:c + n])
            positions.extend(range(c, c + n))
            if req.token_type_ids is not None:
                types.extend(req.token_type_ids[c:c + n])
            ends.append(len(ids))
        dev = self.device
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        token_types = torch.tensor(types, dtype=torch.long, device=dev) if types else None
        set_context(self._context(reqs, counts, ends, pos))
        try:
            hidden = self.model(input_ids, pos, token_types)
        finally:
            set_context(Context())
        return self._outputs(hidden, reqs, counts, ends)

    def _is_decode(self, req: Request, n: int) -> bool:
        return self.is_decoder and n == 1 and req.num_computed_tokens > 0

    def _context(self, reqs: list[Request], counts: list[int], ends: list[int], pos: torch.Tensor) -> Context:
        ctx = Context(causal=self.is_decoder)
        if not self.is_decoder:
            ctx.prefills = [PrefillSpan(end - n, end) for n, end in zip(counts, ends)]
            ctx.num_prefill_tokens = ends[-1]
            return ctx
        # One padded block table for the step; every slot below is looked up in it, vectorised.
        dev, bs = self.device, self.block_size
        width = max(len(r.block_ids) for r in reqs)
        table = torch.tensor([r.block_ids + [0] * (width - len(r.block_ids)) for r in reqs], dtype=torch.long,
                             device=dev)
        rows = torch.repeat_interleave(torch.arange(len(reqs), device=dev), torch.tensor(counts, device=dev))
        ctx.slot_mapping = table[rows, pos // bs] * bs + pos % bs
        decodes, lengths = [], []
        for i, (req, n, end) in enumerate(zip(reqs, counts, ends)):
            c = req.num_computed_tokens
            if self._is_decode(req, n):
                decodes.append(i)
                lengths.append(c + 1)
                continue
            span = PrefillSpan(end - n, end)
            if c > 0:  # chunk after cached or earlier-computed tokens: read the context from the cache
                p = torch.arange(c + n, device=dev)
                span.context_slots = table[i, p // bs] * bs + p % bs
                span.mask = p.unsqueeze(0) <= torch.arange(n, device=dev).unsqueeze(1) + c
            ctx.prefills.append(span)
            ctx.num_prefill_tokens = end
        if decodes:
            decode_width = -(-max(lengths) // bs)
            ctx.decode_block_table = table[decodes, :decode_width]
            p = torch.arange(decode_width * bs, device=dev)
            ctx.decode_mask = (p.unsqueeze(0) < torch.tensor(lengths, device=dev).unsqueeze(1))[:, None, None, :]
        return ctx

    def _outputs(self, hidden, reqs, counts, ends):
        sample_rows, sample_reqs, pooled = [], [], []
        for req, n, end in zip(reqs, counts, ends):
            if req.num_computed_tokens + n < req.num_tokens:
                continue  # a prefill chunk with more to come
            if req.is_pooling:
                pooled.append((req, self._pool(hidden[end - n:end], req)))
            else:
                sample_rows.append(end - 1)
                sample_reqs.append(req)
        sampled = []
        if sample_reqs:
            logits = self.model.compute_logits(hidden[sample_rows]).float()
            sampled = list(zip(sample_reqs, self.sampler(logits, sample_reqs)))
        if pooled:
            vectors = torch.stack([v for _, v in pooled])
            heads = self._head(vectors).float().cpu()
            pooled = [(req, heads[i]) for i, (req, _) in enumerate(pooled)]
        return sampled, pooled

    def _pool(self, h: torch.Tensor, req: Request) -> torch.Tensor:
        # Decoders pool only the last token: with chunked prefill earlier chunks are gone.
        if self.pooling == "cls" and not self.is_decoder:
            return h[0]
        if self.pooling == "mean" and not self.is_decoder:
            return h.float().mean(0)
        return h[-1]

    def _head(self, vectors: torch.Tensor) -> torch.Tensor:
        """Embeddings stay as they are; scores and classes become logits."""
        if self.score_weight is not None:
            return vectors.to(self.dtype) @ self.score_weight.T
        if self.model.spec.num_labels is not None:
            return self.model.classify(vectors.to(self.dtype))
        return vectors
