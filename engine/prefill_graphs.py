"""Steps with prefills replayed from CUDA graphs, piece by piece around the attention (vLLM's piecewise graphs).

A prefill step of a small decoder is bound by the host on a GPU: ~10 kernels a layer launched from Python
(an H200 ran a SmolLM2-shape rerank's kernels for a quarter of its wall time, README). All but the
attention depend only on the step's token count, so for each capture size one graph holds each stretch
between two attentions: the embedding and layer 0 up to its attention, then a layer's output projection
and MLP with the next layer up to its attention. A step copies its inputs into static buffers, pads its
tokens up to the next size (padding tokens write their K/V into the pool's scratch block) and replays the
stretches, running each layer's attention eagerly on the real tokens in between, as their span lengths
differ every step; a step that mixes prefill chunks with decodes goes the same way, its attention taking
both. (All-decode steps replay whole-model graphs, engine.cuda_graphs.) Rows never mix outside attention,
so padding rows change nothing in the real ones. The last layer's MLP and the final norm run eagerly too:
they take only the step's output rows."""
import torch

from engine.context import Context, get_context, set_context


def capture_sizes(max_tokens: int) -> list[int]:
    """Token counts a step is padded to: powers of two from 64, and 1.5 times each from 2,048 on (a step pads by
    at most half), up to max_tokens."""
    sizes, n = [], 64
    while n < max_tokens:
        sizes.append(n)
        if n >= 2048 and n + n // 2 < max_tokens:
            sizes.append(n + n // 2)
        n *= 2
    return sizes + [max_tokens]


class PrefillGraphs:
    @torch.inference_mode()  # buffers as every step's tensors (engine.cuda_graphs)
    def __init__(self, runner, max_tokens: int, capture: bool = True):
        model, dev, dtype = runner.model, runner.device, runner.dtype
        s = model.spec
        self.model, self.sizes, self.max_tokens = model, capture_sizes(max_tokens), max_tokens
        self.scratch_slot = runner.scratch_block * runner.block_size
        self.input_ids = torch.zeros(max_tokens, dtype=torch.long, device=dev)
        self.positions = torch.zeros(max_tokens, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((max_tokens,), self.scratch_slot, dtype=torch.long, device=dev)
        # What one stretch hands the attention and the next stretch, shared by every layer and size.
        self.q = torch.zeros(max_tokens, s.num_heads, s.head_dim, dtype=dtype, device=dev)
        self.k = torch.zeros(max_tokens, s.num_kv_heads, s.head_dim, dtype=dtype, device=dev)
        self.v = torch.zeros_like(self.k)
        self.residual = torch.zeros(max_tokens, s.hidden_size, dtype=dtype, device=dev)
        self.attn_out = torch.zeros(max_tokens, s.num_heads * s.head_dim, dtype=dtype, device=dev)
        self._rotary: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # each size's tables, made by its first stretch
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        if capture:
            self._capture()

    def _stretch(self, size: int, i: int) -> None:
        """Layer i's input (the embedding, or layer i - 1's MLP on its attention's output) up to its attention."""
        model, ops, step = self.model, self.model.layer_ops, get_context()
        set_context(Context(slot_mapping=self.slot_mapping[:size]))  # where the stretch's K/V writes go
        try:
            if i == 0:
                x, self._rotary[size] = model.embed(self.input_ids[:size], self.positions[:size])
                residual = None
            else:
                x, residual = model.layers[i - 1].feed_forward(self.attn_out[:size], self.residual[:size], ops)
            q, k, v, residual = model.layers[i].attention_inputs(self._rotary[size], x, residual, ops)
        finally:
            set_context(step)
        for buffer, t in ((self.q, q), (self.k, k), (self.v, v), (self.residual, residual)):
            buffer[:size].copy_(t)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for size in reversed(self.sizes):  # largest first, so smaller sizes reuse its memory
            graphs = []
            for i in range(len(self.model.layers)):
                self._stretch(size, i)  # warm-up: kernels built outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool):
                    self._stretch(size, i)
                pool = graph.pool()
                graphs.append(graph)
            self.graphs[size] = graphs
        torch.cuda.synchronize()

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids=None) -> torch.Tensor:
        """The model's forward for a step of at most max_tokens tokens, its Context set."""
        ctx, t = get_context(), input_ids.shape[0]
        size = next(s for s in self.sizes if s >= t)
        self.input_ids[:t], self.positions[:t], self.slot_mapping[:t] = input_ids, positions, ctx.slot_mapping
        self.slot_mapping[t:size] = self.scratch_slot  # a longer step's slots must not be written again
        layers, graphs = self.model.layers, self.graphs.get(size)
        for i, layer in enumerate(layers):
            if graphs is not None:
                graphs[i].replay()
            else:  # buffers without a capture (tests on CPU): the same stretches, run eagerly
                self._stretch(size, i)
            out = layer.attn(self.q[:t], self.k[:t], self.v[:t])
            if i < len(layers) - 1:
                self.attn_out[:t] = out
        residual = self.residual[:t]
        if ctx.output_rows is not None:
            out, residual = out[ctx.output_rows], residual[ctx.output_rows]
        return self.model.final_norm(*layers[-1].feed_forward(out, residual, self.model.layer_ops))


@torch.inference_mode()
def matches_eager(runner, graphs: PrefillGraphs) -> bool:
    """A step of random tokens between two capture sizes (so padded), replayed and eager, gives the same hidden
    states to the dtype's rounding (a padded matmul may take another kernel); its K/V go to the scratch block."""
    tokens = min(graphs.sizes[0] + 7, graphs.max_tokens)
    ctx, positions = runner.largest_prefill(tokens)
    gen = torch.Generator(device=runner.device).manual_seed(0)
    ids = torch.randint(0, runner.model.spec.vocab_size, (tokens,), generator=gen, device=runner.device)
    set_context(ctx)
    try:
        want, got = runner.model(ids, positions), graphs(ids, positions)
    finally:
        set_context(Context())
    tol = 1e-4 if runner.dtype == torch.float32 else 2e-2
    return got.shape == want.shape and bool((got - want).abs().max() <= tol * want.abs().max())
