"""Decode steps replayed from CUDA graphs, one per padded batch size (vLLM's 1, 2, 4, 8, 16, 24, ...).

A decode step's kernels depend only on the batch size when attention reads the paged pool in place,
so each size is captured once over static input buffers; a step copies its inputs into them, pads the
batch up to the next captured size and replays. Padding rows write their K/V into the pool's scratch
block and attend to one slot of it, so they never touch a real sequence. With torch_compile the graphs capture
the compiled model (vLLM's default): its fused kernels, the paged attention an opaque op among them."""
import torch

from engine.context import Context, set_context


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs] + list(range(16, max_num_seqs, 8))
    return sizes + [max_num_seqs]


class DecodeGraphs:
    # Inference tensors, as every step's inputs: a buffer made outside inference mode carries another dispatch
    # key, and the compiled model (torch_compile) recompiled for it at every captured size until dynamo's
    # recompile limit left the rest eager (an H200's log: the compiled decode no faster than eager).
    @torch.inference_mode()
    def __init__(self, runner, max_num_seqs: int, capture: bool = True):
        self.runner, self.sizes, self.max_batch = runner, capture_sizes(max_num_seqs), max_num_seqs
        dev, n = runner.device, max_num_seqs
        width = -(-runner.max_model_len // runner.block_size)
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slot_mapping = torch.zeros(n, dtype=torch.long, device=dev)
        self.block_table = torch.zeros(n, width, dtype=torch.long, device=dev)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.hidden = torch.zeros(n, runner.model.spec.hidden_size, dtype=runner.dtype, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pad_rows(0)
        if capture:
            self._capture()

    def _context(self, size: int) -> Context:
        ctx = Context(causal=True, slot_mapping=self.slot_mapping[:size], decode_block_table=self.block_table[:size],
                      decode_context_lens=self.context_lens[:size])
        self.runner.attention_backend.prepare(ctx, self.runner.block_size)
        return ctx

    def _forward(self, size: int) -> None:
        forward = self.runner.compiled or self.runner.model
        self.hidden[:size] = forward(self.input_ids[:size], self.positions[:size])

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for size in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            set_context(self._context(size))
            try:
                self._forward(size)  # warm-up: kernels compiled (and the model, with torch_compile) outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool):
                    self._forward(size)
            finally:
                set_context(Context())
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def _pad_rows(self, start: int) -> None:
        scratch, bs = self.runner.scratch_block, self.runner.block_size
        self.slot_mapping[start:] = scratch * bs
        self.block_table[start:, 0] = scratch
        self.context_lens[start:] = 1

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            block_table: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[0]
        size = next(s for s in self.sizes if s >= n)
        self.input_ids[:n], self.positions[:n], self.slot_mapping[:n] = input_ids, positions, slot_mapping
        self.block_table[:n, :block_table.shape[1]] = block_table
        self.context_lens[:n] = context_lens
        self._pad_rows(n)
        if size in self.graphs:
            self.graphs[size].replay()
        else:  # buffers without a capture (tests on CPU): the same padded step, run eagerly
            set_context(self._context(size))
            try:
                self._forward(size)
            finally:
                set_context(Context())
        return self.hidden[:n]
