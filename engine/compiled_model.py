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

from engine.context import Context, PrefillSpan, set_context

_SHAPES = fx_config.patch(backed_size_oblivious=True, use_duck_shape=False)
_FLOATS = torch._dynamo.config.patch(specialize_float=True)


class CompiledModel:
    def __init__(self, model: torch.nn.Module):
        self._forward = torch.compile(model.forward)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids=None) -> torch.Tensor:
        with _SHAPES, _FLOATS:
            return self._forward(input_ids, positions, token_type_ids)

    @torch.inference_mode()
    def warm_up(self, runner, decode: bool) -> None:
        """Compile now, not on the first request: a two-token prefill and, for a model that decodes, one
        token decoded, into the pool's scratch block where there is a pool."""
        dev = runner.device
        contexts = [Context(causal=runner.is_decoder, prefills=[PrefillSpan(0, 2, 2)], num_prefill_tokens=2)]
        if runner.prunes_output_rows:  # prefill steps name their output rows (engine.model_runner)
            contexts[0].output_rows = torch.arange(2, device=dev)
        if runner.num_blocks:
            bs, scratch = runner.block_size, runner.scratch_block
            contexts[0].slot_mapping = torch.arange(2, device=dev) + scratch * bs
            if decode:
                contexts.append(Context(causal=True, slot_mapping=torch.tensor([scratch * bs], device=dev),
                                        decode_block_table=torch.tensor([[scratch]], device=dev),
                                        decode_context_lens=torch.ones(1, dtype=torch.int32, device=dev)))
        for ctx in contexts:
            runner.attention_backend.prepare(ctx, runner.block_size)
            n = ctx.num_prefill_tokens or 1
            input_ids, positions = (torch.arange(n, device=dev) for _ in range(2))
            # Every dimension of every step input the graph sees is symbolic; weights and the pool keep
            # static shapes.
            for t in (input_ids, positions, ctx.slot_mapping, ctx.decode_block_table, ctx.decode_context_lens,
                      ctx.decode_meta, ctx.output_rows):
                if isinstance(t, torch.Tensor):
                    torch._dynamo.mark_dynamic(t, list(range(t.dim())))
            set_context(ctx)
            try:
                self(input_ids, positions)
            finally:
                set_context(Context())
