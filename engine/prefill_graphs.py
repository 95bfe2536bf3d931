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
import math
import time

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

    def keep_up_to(self, size: int) -> None:
        """Steps of more than `size` tokens run eagerly (the model runner asks max_tokens); their graphs go."""
        self.sizes = [s for s in self.sizes if s <= size]
        self.graphs = {s: g for s, g in self.graphs.items() if s <= size}
        self.max_tokens = size

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids=None) -> torch.Tensor:
        """The model's forward for a step of at most max_tokens tokens, its Context set."""
        return self.forward(input_ids, positions, replay=True)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, replay: bool) -> torch.Tensor:
        """The step padded to its capture size, its stretches replayed (where captured) or run eagerly."""
        ctx, t = get_context(), input_ids.shape[0]
        size = next(s for s in self.sizes if s >= t)
        self.input_ids[:t], self.positions[:t], self.slot_mapping[:t] = input_ids, positions, ctx.slot_mapping
        self.slot_mapping[t:size] = self.scratch_slot  # a longer step's slots must not be written again
        layers, graphs = self.model.layers, self.graphs.get(size) if replay else None
        for i, layer in enumerate(layers):
            if graphs is not None:
                graphs[i].replay()
            else:  # the same stretches run eagerly (buffers without a capture: tests on CPU)
                self._stretch(size, i)
            out = layer.attn(self.q[:t], self.k[:t], self.v[:t])
            if i < len(layers) - 1:
                self.attn_out[:t] = out
        residual = self.residual[:t]
        if ctx.output_rows is not None:
            out, residual = out[ctx.output_rows], residual[ctx.output_rows]
        return self.model.final_norm(*layers[-1].feed_forward(out, residual, self.model.layer_ops))


def random_step(runner, tokens: int) -> tuple[Context, torch.Tensor, torch.Tensor]:
    """A prefill step of `tokens` random tokens (runner.largest_prefill's spans, K/V to the scratch block): its
    context, ids and positions."""
    ctx, positions = runner.largest_prefill(tokens)
    gen = torch.Generator(device=runner.device).manual_seed(0)
    ids = torch.randint(0, runner.model.spec.vocab_size, (tokens,), generator=gen, device=runner.device)
    return ctx, ids, positions


@torch.inference_mode()
def matches_eager(runner, graphs: PrefillGraphs) -> bool:
    """A step of random tokens between two capture sizes (so padded), replayed, gives the hidden states of the same
    padded stretches run eagerly, to the dtype's rounding: the capture holds the step's work. Not checked against
    the unpadded forward: a padded matmul may take another GEMM kernel, and a deep bf16 model drifts past a fixed
    tolerance from that alone (an H200 refused a 16-layer random-weight 1B Llama's graphs so); that padding
    changes nothing else is tests/test_prefill_graphs.py's to show."""
    ctx, ids, positions = random_step(runner, min(graphs.sizes[0] + 7, graphs.max_tokens))
    set_context(ctx)
    try:
        want, got = graphs.forward(ids, positions, replay=False), graphs(ids, positions)
    finally:
        set_context(Context())
    tol = 1e-4 if runner.dtype == torch.float32 else 2e-2
    return got.shape == want.shape and bool((got - want).abs().max() <= tol * want.abs().max())


def fastest_seconds(sync, repeats: int = 3):
    """largest_faster_size's clock: a call's fastest time of `repeats` after a warm-up, `sync` waiting for the
    device around each."""
    def seconds(fn) -> float:
        fn()
        sync()
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - start)
        return best
    return seconds


@torch.inference_mode()
def largest_faster_size(runner, graphs: PrefillGraphs, seconds) -> int | None:
    """The largest capture size whose steps replay faster than the eager forward runs them (None: none), timed
    from the largest size down at a step midway between a size and the one below (padded as a typical step).
    A small model's steps are bound by launching ~10 kernels a layer from Python, so the graphs win at every
    size; a larger model's long steps are bound by the device, where the stretches' copies into the static
    buffers cost more than the launches saved (an H200, 16,384-token steps: SmolLM2-135M's shape 1.30x faster
    replayed, Qwen3-Reranker-0.6B's 14% slower). Shorter steps only make launches weigh more, so the search
    stops at the first size that wins."""
    for low, size in reversed(list(zip([0] + graphs.sizes[:-1], graphs.sizes))):
        ctx, ids, positions = random_step(runner, (low + size) // 2 + 1)
        set_context(ctx)
        try:
            won = seconds(lambda: graphs(ids, positions)) < seconds(lambda: runner.model(ids, positions))
        finally:
            set_context(Context())
        if won:
            return size
    return None
