"""Steps through torch.compile graphs of the whole model (engine option torch_compile).

On CPU a small batch's decode step is a thousand tiny ops (norms, rotary, activation quantization,
attention bookkeeping) whose dispatch costs more than their arithmetic. Compiled as one graph, they
become a few dozen fused loops and the host pays for one call and one guard check per step instead of
one per op (README: measured). On a GPU a prefill step of a small-hidden model is the same story in
device time: its norms, rotary, activation and residual adds are a dozen memory passes a layer,
fused by the compiled graph into a few. The decode graphs capture this compiled model, so they replay
its fused kernels too. Steps mixing prefill and decode stay eager.

One graph per step kind (decode, prefill) serves every step: token count, batch size and block-table
width are symbolic, without the 0/1 specialisation that would compile again for a batch of one or a
context inside one block; the prefill kernel is an opaque op (engine.attention), so span lengths
never reach the graph; float attributes (norm eps, attention scale) are constants, so tracing never
restarts."""
import torch
import torch.fx.experimental._config as fx_config

from engine.context import Context, set_context

_SHAPES = fx_config.patch(backed_size_oblivious=True, use_duck_shape=False)
_FLOATS = torch._dynamo.config.patch(specialize_float=True)
# Dynamo keeps the graphs of one forward function (DecoderModel.forward) for every model class instance in the
# process, two for each distinct model (prefill and decode): at its default limit of 8 a process's fifth
# compiled decoder ran eager without failing (bench/gpu.py, several decoders in one process, hit it on an H200).
_GRAPHS = torch._dynamo.config.patch(recompile_limit=64)


class CompiledModel:
    def __init__(self, model: torch.nn.Module):
        self._forward = torch.compile(model.forward)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids=None) -> torch.Tensor:
        with _SHAPES, _FLOATS, _GRAPHS:
            return self._forward(input_ids, positions, token_type_ids)

    @torch.inference_mode()
    def warm_up(self, runner, decode: bool, prefill_tokens: int, decode_rows: int) -> None:
        """Compile now, not on the first request: a prefill step of prefill_tokens tokens and, for a model that
        decodes, a decode step of decode_rows rows, into the pool's scratch block where there is a pool. The
        largest steps the engine runs, as vLLM's compile run: Inductor generates (and on a GPU autotunes once)
        each kernel's launch configuration for the sizes of the first inputs it sees, so a tiny warm-up step
        leaves every later large step with a tiny step's block sizes and reduction splits."""
        dev = runner.device
        prefill, pos = runner.largest_prefill(prefill_tokens)
        contexts, positions = [prefill], [pos]
        if runner.num_blocks and decode:
            bs, scratch = runner.block_size, runner.scratch_block
            contexts.append(Context(
                causal=True, slot_mapping=torch.full((decode_rows,), scratch * bs, device=dev),
                decode_block_table=torch.full((decode_rows, 1), scratch, device=dev),
                decode_context_lens=torch.ones(decode_rows, dtype=torch.int32, device=dev)))
            positions.append(torch.zeros(decode_rows, dtype=torch.long, device=dev))
            runner.attention_backend.prepare(contexts[1], bs)
        for ctx, pos in zip(contexts, positions):
            input_ids = torch.zeros_like(pos)
            # Every dimension of every step input the graph sees is symbolic; weights and the pool keep
            # static shapes.
            for t in (input_ids, pos, ctx.slot_mapping, ctx.decode_block_table, ctx.decode_context_lens,
                      ctx.decode_meta, ctx.output_rows):
                if isinstance(t, torch.Tensor):
                    torch._dynamo.mark_dynamic(t, list(range(t.dim())))
            set_context(ctx)
            try:
                self(input_ids, pos)
            finally:
                set_context(Context())
