"""Decode steps through one torch.compile graph of the whole model (engine option torch_compile).

On CPU a small batch's decode step is a thousand tiny ops (norms, rotary, activation quantization,
attention bookkeeping) whose dispatch costs more than their arithmetic. Compiled as one graph, they
become a few dozen fused loops and the host pays for one call and one guard check per step instead of
one per op (README: measured). On CUDA the decode graphs capture this compiled model, so they replay
its fused kernels instead of one kernel per elementwise op. Prefill and mixed steps stay eager.

One graph serves every decode step: batch size and block-table width are symbolic, without the 0/1
specialisation that would compile again for a batch of one or a context inside one block, and float
attributes (norm eps, attention scale) are constants, so tracing never restarts."""
import torch
import torch.fx.experimental._config as fx_config

from engine.context import Context, set_context

_SHAPES = fx_config.patch(backed_size_oblivious=True, use_duck_shape=False)
_FLOATS = torch._dynamo.config.patch(specialize_float=True)


class CompiledDecode:
    def __init__(self, model: torch.nn.Module):
        self._forward = torch.compile(model.forward)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids=None) -> torch.Tensor:
        with _SHAPES, _FLOATS:
            return self._forward(input_ids, positions)

    @torch.inference_mode()
    def warm_up(self, runner) -> None:
        """Compile now, not on the first request: one token decoded into the pool's scratch block."""
        bs, scratch, dev = runner.block_size, runner.scratch_block, runner.device
        ctx = Context(causal=True, slot_mapping=torch.tensor([scratch * bs], device=dev),
                      decode_block_table=torch.tensor([[scratch]], device=dev),
                      decode_context_lens=torch.ones(1, dtype=torch.int32, device=dev))
        runner.attention_backend.prepare(ctx, bs)
        input_ids, positions = torch.zeros(1, dtype=torch.long, device=dev), torch.zeros(1, dtype=torch.long, device=dev)
        # Every dimension of every step input is symbolic; weights and the pool keep static shapes.
        for t in (input_ids, positions, ctx.slot_mapping, ctx.decode_block_table, ctx.decode_context_lens,
                  ctx.decode_meta):
            if isinstance(t, torch.Tensor):
                torch._dynamo.mark_dynamic(t, list(range(t.dim())))
        set_context(ctx)
        try:
            self(input_ids, positions)
        finally:
            set_context(Context())
