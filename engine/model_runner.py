"""Packs a scheduled step into flat tensors, runs the model, pools or samples the results."""
import itertools
import logging
from dataclasses import dataclass

import torch

from engine.block_table import BlockTable
from engine.compiled_model import CompiledModel
from engine.context import Context, PrefillSpan, set_context
from engine.cuda_graphs import DecodeGraphs
from engine.kernels import packs_linears, select_attention_backend, select_encoder_layer_ops, select_layer_ops
from engine.models import model_class
from engine.packed_linear import pack_linears
from engine.pooling import pool_segments
from engine.prefill_graphs import PrefillGraphs, fastest_seconds, largest_faster_size, matches_eager
from engine.quantization import compile_quantized_layers, quantize_decoder
from engine.request import Request
from engine.sampler import Sampler, SamplerOutput, TokenLogprobs
from engine.scheduler import SchedulerOutput
from engine.step_padding import PADDING_SPAN, pad_context, pad_inputs, padded_size
from engine.transfer import to_device, to_host

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StepResult:
    """What a launched step computes, on its way to the host. get() waits for the step: at once without
    async scheduling, one step later with it, while the device runs the next step."""
    sampled_reqs: list[Request]
    sampled: SamplerOutput | None
    pooled_reqs: list[Request]
    pooled: torch.Tensor | None  # [len(pooled_reqs), ...] on the host
    done: torch.cuda.Event | None  # recorded after the copies to the host; None on the CPU

    def get(self) -> tuple[list[int], list[TokenLogprobs | None] | None, list[tuple[Request, torch.Tensor]]]:
        """The sampled requests' token ids and logprobs (SamplerOutput.read), and the pooled requests' vectors."""
        if self.done is not None:
            self.done.synchronize()
        token_ids, logprobs = self.sampled.read() if self.sampled is not None else ([], None)
        return token_ids, logprobs, list(zip(self.pooled_reqs, self.pooled)) if self.pooled is not None else []


class ModelRunner:
    def __init__(self, hf_config, weights, max_model_len: int, device: torch.device, dtype: torch.dtype,
                 quantization: str | None = None, generates: bool = True, kv_dtype: torch.dtype | None = None):
        self.device, self.dtype = device, dtype
        self.kv_dtype = kv_dtype or dtype  # the paged pool's (kv_cache_dtype)
        self.max_model_len = max_model_len
        model = model_class(hf_config)(hf_config, max_model_len)
        model.load_weights(weights)
        # Parameters in the serving dtype; rotary tables stay float32 for exact positions.
        for p in model.parameters():
            p.data = p.data.to(device=device, dtype=dtype)
        self.model = model.to(device).eval()
        if quantization is not None:
            quantize_decoder(self.model, quantization, logits_head=generates)  # config checked the method
        elif packs_linears(device, dtype):
            pack_linears(self.model, logits_head=generates)
        self.is_decoder = model.is_decoder
        layers = self.model.attention_layers
        self.attention_backend = select_attention_backend(device, dtype, layers[0].head_dim if layers else None,
                                                          self.kv_dtype, decodes=generates and self.is_decoder)
        for attn in layers:
            attn.backend = self.attention_backend
        if hasattr(self.model, "layer_ops"):  # decoders, and encoders of the BERT family
            self.model.layer_ops = (select_layer_ops(device, dtype, self.model.spec, self.kv_dtype) if self.is_decoder
                                    else select_encoder_layer_ops(device, dtype, self.model.spec))
        self.block_size = 0
        self.num_blocks = 0
        self.pooling: str = "last"
        self.score_weight: torch.Tensor | None = None  # [1, hidden] for yes/no rerankers
        self.sampler: Sampler | None = None
        self.decode_graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        self.compiled: CompiledModel | None = None
        self.pad_steps_to = 0  # pad_steps: steps padded to sizes of at most this many tokens; 0: not padded
        self.padding_span = PADDING_SPAN  # tokens a padding span holds (positions stay inside max_model_len)
        # The latest step's sampled tokens, still on the device, and the requests of its rows: with async
        # scheduling the next step takes its inputs from there before the host has them.
        self._last_sampled: torch.Tensor | None = None
        self._last_reqs: list[Request] = []
        self.block_table = BlockTable()

    @property
    def kv_scaled(self) -> bool:
        """A float8 pool keeps a float32 scale per (slot, kv head) beside its values (engine.attention.quantize_kv)."""
        return self.kv_dtype.itemsize == 1

    def kv_bytes_per_block(self, block_size: int) -> int:
        s = self.model.spec
        per_head = s.head_dim * self.kv_dtype.itemsize + (4 if self.kv_scaled else 0)
        return 2 * s.num_layers * block_size * s.num_kv_heads * per_head

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        s = self.model.spec
        self.num_blocks, self.block_size = num_blocks, block_size
        # One block more than the manager hands out: padded rows of a replayed decode graph write there.
        slots = (num_blocks + 1) * block_size
        cache = torch.zeros(2, s.num_layers, slots, s.num_kv_heads, s.head_dim, dtype=self.kv_dtype, device=self.device)
        scales = (torch.zeros(2, s.num_layers, slots, s.num_kv_heads, dtype=torch.float32, device=self.device)
                  if self.kv_scaled else None)
        for i, attn in enumerate(self.model.attention_layers):
            attn.k_cache, attn.v_cache, attn.block_size = cache[0, i], cache[1, i], block_size
            if scales is not None:
                attn.k_scale, attn.v_scale = scales[0, i], scales[1, i]
        self.kv_cache = cache

    @property
    def scratch_block(self) -> int:
        return self.num_blocks

    def capture_decode_graphs(self, max_num_seqs: int, capture: bool | None = None) -> None:
        """CUDA graphs for decode steps (vLLM's padded batch sizes). Only where the device has them and
        the decode kernel's shapes depend on the batch size alone; capture=False keeps the padded static
        buffers but runs them eagerly (how tests check the padding on CPU)."""
        if capture is None:
            capture = self.device.type == "cuda" and self.attention_backend.decode_is_graphable
            if not capture:
                return
        self.decode_graphs = DecodeGraphs(self, max_num_seqs, capture)

    def capture_prefill_graphs(self, max_tokens: int, capture: bool = True) -> None:
        """Piecewise CUDA graphs for a decoder's steps with prefills (engine.prefill_graphs), kept only where they
        capture, a padded step replayed from them gives what its stretches give run eagerly, and up to the
        largest step size where they are faster than the eager forward (timed here where captured); capture=False
        keeps the padded buffers and runs the pieces eagerly (how tests check them on CPU)."""
        size = max_tokens
        try:
            graphs = PrefillGraphs(self, max_tokens, capture)
            if not matches_eager(self, graphs):
                why = "differ from their stretches run eagerly"
            else:
                if capture:  # timed only where replayed
                    size = largest_faster_size(self, graphs, fastest_seconds(torch.cuda.synchronize))
                why = None if size else "are no faster than the eager forward at any size"
        except Exception as e:  # noqa: BLE001 (an op this device cannot capture: eager is still correct)
            why = f"failed to capture: {type(e).__name__}: {e}"
        self.prefill_graphs = graphs if why is None else None  # a failed recapture keeps no earlier graphs
        if why is not None:
            log.warning("prefill steps replayed from CUDA graphs %s: prefill stays eager", why)
        elif size < max_tokens:
            graphs.keep_up_to(size)
            log.info("prefill steps of up to %d tokens replay CUDA graphs; longer ones run eagerly, faster there", size)

    def pad_steps(self, max_tokens: int) -> None:
        """On the CPU, steps (but all-decode ones) padded to a few sizes of at most max_tokens tokens
        (engine.step_padding). Not a model with attention of its own (DeBERTa: it lays a step out as a padded
        batch of the sequences its positions delimit, so each padding span would cost a whole padded sequence)."""
        if self.device.type == "cpu" and self.model.attention_layers:
            self.pad_steps_to, self.padding_span = max_tokens, min(PADDING_SPAN, self.max_model_len)

    def compile(self, decode: bool, prefill_tokens: int, decode_rows: int) -> None:
        """Engine option torch_compile, compiled here rather than on the first request: quantized layers take
        their fused kernels for prefill-sized inputs, and prefill steps and (where the model generates)
        decode steps each run one compiled graph of the whole model (decode replayed from CUDA graphs where
        they are captured afterwards)."""
        compile_quantized_layers(self.model)
        self.compiled = CompiledModel(self.model)
        self.compiled.warm_up(self, decode, prefill_tokens, decode_rows)

    def largest_prefill(self, tokens: int) -> tuple[Context, torch.Tensor]:
        """A prefill step of `tokens` tokens for warm-ups and memory profiling, and its positions: spans of at most
        max_model_len (positions stay inside the model's tables), each one's last row an output row where the
        model prunes rows, keys and values written to the pool's scratch block where there is a pool."""
        dev = self.device
        span = min(tokens, self.max_model_len)
        bounds = [(start, min(start + span, tokens)) for start in range(0, tokens, span)]
        ctx = Context(causal=self.is_decoder, prefills=[PrefillSpan(s, e, e - s) for s, e in bounds],
                      num_prefill_tokens=tokens)
        if self.prunes_output_rows:
            ctx.output_rows = torch.tensor([e - 1 for _, e in bounds], device=dev)
        if self.num_blocks:
            ctx.slot_mapping = torch.arange(tokens, device=dev) % self.block_size + self.scratch_block * self.block_size
        self.attention_backend.prepare(ctx, self.block_size)
        return ctx, torch.arange(tokens, device=dev) % span

    @torch.inference_mode()
    def run_largest_step(self, tokens: int, sampled_rows: int) -> None:
        """The eager forward of the largest prefill step, before the KV pool exists, and where the model
        generates the logits of sampled_rows rows with a sort of them (the sampler's top-p on an accelerator):
        what the device holds at most while it runs is what the pool must leave room for (vLLM's profile run)."""
        ctx, positions = self.largest_prefill(tokens)
        ctx.output_rows = None  # every row: the most a step's last layer can carry
        set_context(ctx)
        try:
            hidden = self.model(torch.zeros_like(positions), positions)
        finally:
            set_context(Context())
        if sampled_rows:
            self.model.compute_logits(hidden[:sampled_rows]).float().sort(-1)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> StepResult:
        """Launches the step; the device may still be running it when this returns."""
        reqs, counts = sched.requests, sched.num_tokens
        # Steady decoding: the latest step sampled exactly these requests, row for row. Each now computes that
        # draw (sampling happens only once a request's computed tokens reach its end) and samples again.
        steady = bool(reqs) and reqs == self._last_reqs
        decodes = [True] * len(reqs) if steady else self._decodes(reqs, counts)
        all_decode = steady or all(decodes)
        if not all_decode:  # prefill chunks first, then single-token decodes, so decodes form one batch at the end
            order = sorted(range(len(reqs)), key=decodes.__getitem__)
            reqs, counts, decodes = [reqs[i] for i in order], [counts[i] for i in order], [decodes[i] for i in order]
        ends = list(itertools.accumulate(counts))
        rows = torch.arange(len(reqs), device=self.device)
        if steady:
            input_ids, token_types = self._last_sampled, None
        else:
            input_ids, token_types = self._inputs(reqs, counts)
        if all_decode:  # one token each, at its computed count
            pos = self._tensor([r.num_computed_tokens for r in reqs])
        else:  # positions without a per-token Python loop: each request's run starts at its computed count
            offsets = self._tensor([r.num_computed_tokens - (e - n) for r, n, e in zip(reqs, counts, ends)])
            rows = rows.repeat_interleave(self._tensor(counts), output_size=ends[-1])
            pos = torch.arange(ends[-1], device=self.device) + offsets[rows]
        finished = None if steady else self._finished_rows(reqs, counts, ends)
        output_rows = None
        if self.decode_graphs is not None and all_decode and len(reqs) <= self.decode_graphs.max_batch:
            hidden = self.decode_graphs.run(input_ids, pos, *self._decode_inputs(reqs, rows, pos))
        else:
            # Piecewise graphs take any step (its attention runs eagerly between them, prefills and decodes alike);
            # compiled graphs all-decode and all-prefill steps; a mixed step otherwise runs eagerly.
            one_kind = all_decode or not any(decodes)
            if self.prefill_graphs is not None and ends[-1] <= self.prefill_graphs.max_tokens:
                forward = self.prefill_graphs
            else:
                forward = self.compiled if one_kind and self.compiled is not None else self.model
            pad_to = padded_size(ends[-1], self.pad_steps_to) if self.pad_steps_to and not all_decode else 0
            ctx = self._context(reqs, counts, decodes, rows, pos, pad_to)
            if pad_to > ends[-1]:
                input_ids, pos, token_types = pad_inputs(pad_to, self.padding_span, input_ids, pos, token_types)
            # A compiled graph's step kind always takes the rows or never does (its warm-up's), so no recompile.
            compiled = forward is self.compiled
            if finished is not None and self.prunes_output_rows and not (compiled and all_decode):
                ctx.output_rows = output_rows = self._output_rows(finished, ends[-1], every_row_too=compiled)
            set_context(ctx)
            try:
                hidden = forward(input_ids, pos, token_types)
            finally:
                set_context(Context())
            assert output_rows is None or hidden.shape[0] == len(output_rows), "the model ignored Context.output_rows"
        return self._outputs(hidden, input_ids, reqs, finished, output_rows)

    def _inputs(self, reqs: list[Request], counts: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The step's input tokens and (encoder text pairs) token types. A token the step in flight is still
        sampling (async scheduling) is taken from its draws on the device."""
        ids, types, pending_at, pending_reqs = [], [], [], []
        for req, n in zip(reqs, counts):
            c = req.num_computed_tokens
            ids.extend(req.token_ids[c:c + n])
            if req.num_pending_tokens and c + n > req.num_tokens:  # its last token is the latest step's draw
                pending_at.append(len(ids))
                pending_reqs.append(req)
                ids.append(0)
            if req.token_type_ids is not None:
                types.extend(req.token_type_ids[c:c + n])
        input_ids = self._tensor(ids)
        if pending_at:
            row_of = {r: i for i, r in enumerate(self._last_reqs)}
            input_ids[self._tensor(pending_at)] = self._last_sampled[self._tensor([row_of[r] for r in pending_reqs])]
        return input_ids, self._tensor(types) if types else None

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return to_device(values, self.device)

    def _decodes(self, reqs: list[Request], counts: list[int]) -> list[bool]:
        """Which scheduled requests decode one token after computed ones (the rest run prefill chunks)."""
        if not self.is_decoder:
            return [False] * len(reqs)
        return [n == 1 and r.num_computed_tokens > 0 for r, n in zip(reqs, counts)]

    def _block_table(self, reqs: list[Request]) -> torch.Tensor:
        return to_device(torch.from_numpy(self.block_table.build(reqs)), self.device)

    def _decode_inputs(self, reqs: list[Request], rows: torch.Tensor, pos: torch.Tensor):
        """slot mapping, block table and context lengths of an all-decode step (rows: 0..len(reqs) - 1)."""
        table = self._block_table(reqs)
        return self._slots(table, rows, pos), table, (pos + 1).int()

    def _slots(self, table: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Pool slots of tokens at positions of the block table's rows."""
        bs = self.block_size
        return table[rows, positions // bs] * bs + positions % bs

    def _context(self, reqs: list[Request], counts: list[int], decodes: list[bool], rows: torch.Tensor,
                 pos: torch.Tensor, pad_to: int) -> Context:
        """The step's attention context, padded up to pad_to tokens (engine.step_padding; 0: not padded)."""
        ctx = Context(causal=self.is_decoder)
        if self.is_decoder:
            self._decoder_spans(ctx, reqs, counts, decodes, rows, pos)
        else:
            for start, n in zip(itertools.accumulate(counts, initial=0), counts):
                ctx.prefills.append(PrefillSpan(start, start + n, n))
            ctx.num_prefill_tokens = sum(counts)
        pad_context(ctx, pad_to, self.padding_span, self.scratch_block, self.block_size)
        self.attention_backend.prepare(ctx, self.block_size)
        return ctx

    def _decoder_spans(self, ctx: Context, reqs: list[Request], counts: list[int], decodes: list[bool],
                       rows: torch.Tensor, pos: torch.Tensor) -> None:
        """A decoder step's slots, prefill spans (with the context slots of those after cached or computed tokens)
        and decode block table, into ctx."""
        # One padded block table for the step; every slot below is looked up in it, vectorised.
        dev, bs, start = self.device, self.block_size, 0
        table = self._block_table(reqs)
        ctx.slot_mapping = self._slots(table, rows, pos)
        num_prefills = decodes.index(True) if decodes[-1] else len(reqs)  # decodes come last
        cached, cached_rows, cached_lens = [], [], []
        for i in range(num_prefills):
            c, n = reqs[i].num_computed_tokens, counts[i]
            span = PrefillSpan(start, start + n, c + n)
            if c > 0:  # chunk after cached or earlier-computed tokens: read the context from the cache
                cached.append(span)
                cached_rows.append(i)
                cached_lens.append(c + n)
            ctx.prefills.append(span)
            start += n
        ctx.num_prefill_tokens = start
        if cached:  # every such span's context slots at once (a reranker's documents all hit the query's blocks)
            lens = self._tensor(cached_lens)
            total = sum(cached_lens)
            span_rows = torch.arange(len(cached), device=dev).repeat_interleave(lens, output_size=total)
            positions = torch.arange(total, device=dev) - (lens.cumsum(0) - lens)[span_rows]
            slots = self._slots(table, self._tensor(cached_rows)[span_rows], positions)
            for span, span_slots in zip(cached, slots.split(cached_lens)):
                span.context_slots = span_slots
        if num_prefills < len(reqs):
            lengths = [r.num_computed_tokens + 1 for r in reqs[num_prefills:]]
            ctx.decode_block_table = table[num_prefills:, :-(-max(lengths) // bs)]
            ctx.decode_context_lens = to_device(lengths, dev, torch.int32)

    def _outputs(self, hidden, input_ids, reqs, finished, output_rows: torch.Tensor | None) -> StepResult:
        """finished: _finished_rows of the step (None: steady decoding, every row samples); output_rows: the rows
        hidden holds (_output_rows), None: every row."""
        if finished is None:
            sample_rows, sample_reqs, pool_reqs, pool_spans = None, reqs, [], []
        else:
            sample_rows, sample_reqs, pool_reqs, pool_spans = finished
        sampled = pooled = None
        if sample_reqs:
            # An all-decode step samples every row; otherwise the rows go over as a pinned copy (indexing with
            # a list would copy from pageable memory and wait for the GPU before the head is even launched).
            if output_rows is not None:  # the sampled rows come first, already on the device
                rows, last_inputs = hidden[:len(sample_reqs)], input_ids[output_rows[:len(sample_reqs)]]
            elif len(sample_reqs) == hidden.shape[0]:
                rows, last_inputs = hidden, input_ids
            else:
                rows_t = self._tensor(sample_rows)
                rows, last_inputs = hidden[rows_t], input_ids[rows_t]
            logits = self.model.compute_logits(rows).float()
            sampled = self.sampler(logits, sample_reqs, last_inputs)
        if pool_reqs:
            if output_rows is not None:  # one row per pooled request, after the sampled ones
                vectors = hidden[len(sample_reqs):]
            else:
                starts, ends = self._tensor([s for s, _ in pool_spans]), self._tensor([e for _, e in pool_spans])
                vectors = pool_segments(hidden, starts, ends, self._pooling_method, sum(e - s for s, e in pool_spans))
            pooled = to_host(self._head(vectors).float())
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        if sampled is not None:  # only once nothing of the step can fail: a failed step leaves no draws behind
            self._last_sampled, self._last_reqs = sampled.token_ids, sample_reqs
        return StepResult(sample_reqs, sampled, pool_reqs, pooled, done)

    @staticmethod
    def _finished_rows(reqs: list[Request], counts: list[int], ends: list[int]):
        """The rows whose request this step brings to its end: the last row of each one to sample, and the
        span of each one to pool (a prefill chunk with more to come does neither)."""
        sample_rows, sample_reqs, pool_reqs, pool_spans = [], [], [], []
        for req, n, end in zip(reqs, counts, ends):
            # Properties spelled out (num_tokens_with_pending, is_pooling): this runs for every row every step.
            if req.num_computed_tokens + n < len(req.token_ids) + req.num_pending_tokens:
                continue
            if req.pooling_params is not None:
                pool_reqs.append(req)
                pool_spans.append((end - n, end))
            else:
                sample_rows.append(end - 1)
                sample_reqs.append(req)
        return sample_rows, sample_reqs, pool_reqs, pool_spans

    @property
    def prunes_output_rows(self) -> bool:
        """Prefill steps name their output rows (Context.output_rows): the model's last layer computes only those,
        unless it pools the mean of every row."""
        return getattr(self.model, "computes_output_rows_only", False) and self._pooling_method != "mean"

    def _output_rows(self, finished, num_tokens: int, every_row_too: bool) -> torch.Tensor | None:
        """The rows the step's outputs read (finished: _finished_rows), the sampled ones first, then one per pooled
        request (its first or last token): past its attention the model's last layer computes only these. None
        where that is every row, unless every_row_too."""
        sample_rows, _, _, pool_spans = finished
        rows = sample_rows + [start if self._pooling_method == "cls" else end - 1 for start, end in pool_spans]
        return self._tensor(rows) if every_row_too or len(rows) < num_tokens else None

    @property
    def _pooling_method(self) -> str:
        # Decoders pool only the last token: with chunked prefill earlier chunks are gone.
        return "last" if self.is_decoder else self.pooling

    def _head(self, vectors: torch.Tensor) -> torch.Tensor:
        """Embeddings stay as they are; scores and classes become logits."""
        if self.score_weight is not None:
            return vectors.to(self.dtype) @ self.score_weight.T
        if self.model.spec.num_labels is not None:
            return self.model.classify(vectors.to(self.dtype))
        return vectors
