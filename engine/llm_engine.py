"""The engine: requests in, one scheduled step at a time, outputs out."""
import itertools
from collections import deque
from collections.abc import Callable
import json
import os

import torch

from engine.checkpoint_quantization import checkpoint_weights
from engine.config import EngineConfig, keep_freed_memory, set_num_threads
from engine.heap import freeze_heap
from engine.input_processor import InputProcessor, InputSpec, PoolingJob
from engine.kv_cache_manager import KVCacheManager
from engine.kv_sizing import num_kv_blocks
from engine.loader import (load_config, read_matryoshka_dims,
                           read_sentence_transformers_max_seq_length, read_sentence_transformers_pooling,
                           resolve_model)
from engine.metrics import Stats
from engine.model_runner import ModelRunner, StepResult
from engine.models import model_class
from engine.output_processor import OutputProcessor
from engine.outputs import PoolingJobOutput, RequestOutput
from engine.params import PoolingParams, SamplingParams
from engine.request import Request, RequestStatus
from engine.sampler import Sampler
from engine.scheduler import Scheduler
from engine.task import resolve_max_model_len, resolve_task
from engine.tokenizer import RerankTemplate, load_tokenizer, rerank_template


class LLMEngine:
    """Owns the model, the scheduler and the KV pool; callers add generations or pooling calls, then
    step. The input processor turns calls into engine requests, the output processor turns each step's
    results into what callers receive: generation outputs of the kind each asked for, and for a pooling
    call one PoolingJobOutput when its last input is done."""

    def __init__(self, config: EngineConfig):
        set_num_threads(config.num_threads)
        torch.manual_seed(config.seed)
        self.config = config
        self.model_dir = resolve_model(config.model)
        hf = self.hf_config = load_config(self.model_dir)
        if config.cutoff_layers is not None:
            if not getattr(model_class(hf), "reranker_only", False):
                raise ValueError("cutoff_layers applies only to layerwise rerankers")
            hf.cutoff_layers = config.cutoff_layers
        self.is_decoder = model_class(hf).is_decoder
        self.tokenizer = load_tokenizer(self.model_dir, hf)
        self.max_model_len = resolve_max_model_len(hf, config, self.is_decoder,
                                                   read_sentence_transformers_max_seq_length(self.model_dir))
        self.task = resolve_task(hf, config)
        device = config.torch_device()
        dtype = config.torch_dtype(device)
        if device.type == "cpu":
            keep_freed_memory()
        weights, quantization = checkpoint_weights(self.model_dir, hf, config.quantization, self.is_decoder, device,
                                                   dtype)
        if config.kv_cache_dtype != "auto" and not self.is_decoder:
            raise ValueError("kv_cache_dtype applies to decoder models only (encoders keep no KV cache)")
        self.runner = ModelRunner(hf, weights, self.max_model_len, device, dtype, quantization, self.task == "generate",
                                  config.kv_torch_dtype(dtype))
        self.vocab_size = self.runner.model.spec.vocab_size if self.is_decoder else hf.vocab_size
        self.id2label = {int(k): v for k, v in (getattr(hf, "id2label", None) or {}).items()}
        self._setup_pooling()
        kv = None
        eos = self._eos_token_ids()
        if self.is_decoder:
            sampled_rows = min(config.max_num_seqs, config.max_num_batched_tokens) if self.task == "generate" else 0
            num_blocks = num_kv_blocks(config, self.runner.kv_bytes_per_block(config.block_size), self.max_model_len,
                                       device, lambda: self.runner.run_largest_step(config.max_num_batched_tokens,
                                                                                    sampled_rows))
            self.runner.allocate_kv_cache(num_blocks, config.block_size)
        if config.torch_compile:  # before the capture: the graphs then replay the compiled model
            self.runner.compile(self.task == "generate", config.max_num_batched_tokens, config.max_num_seqs)
        if self.is_decoder:
            if self.task == "generate" and not config.enforce_eager:  # pooling models never decode
                self.runner.capture_decode_graphs(config.max_num_seqs)
            if config.captures_prefill_graphs(device):
                self.runner.capture_prefill_graphs(config.max_num_batched_tokens)
            kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
            self.runner.sampler = Sampler(eos, decide_on_host=device.type == "cpu")
        self.runner.pad_steps(config.max_num_batched_tokens)  # the CPU's: oneDNN builds a product per row count
        self.kv = kv
        self.scheduler = Scheduler(kv, config.max_num_batched_tokens, config.max_num_seqs,
                                   config.long_prefill_token_threshold)
        self.stats = Stats()
        spec = self.runner.model.spec
        self.input_spec = InputSpec(
            self.task, config.served_name, self.max_model_len, self.vocab_size, self.is_decoder, config.block_size,
            kv.pool.num_blocks if kv else None, spec.hidden_size, self.matryoshka, self.rerank_template,
            bi_encoder=self.task in ("embed", "score") and self.rerank_template is None and spec.num_labels is None,
            auto_truncate=config.auto_truncate)
        self.input_processor = InputProcessor(self.tokenizer, self.input_spec)
        self.output_processor = OutputProcessor(self.tokenizer, eos, self.max_model_len, self.normalize, self.stats)
        # Async scheduling (vLLM's): the next step is scheduled and launched before this one's tokens reach the
        # host, so the host's work overlaps the device's. Steps launched, results not yet processed:
        self.async_scheduling = config.uses_async_scheduling(device)
        self._in_flight: deque[StepResult] = deque()
        # Called with a stats snapshot when a step's batch starts (AsyncLLM publishes it to /metrics).
        self.on_batch_start: Callable[[dict], None] | None = None
        self._ids = itertools.count()
        freeze_heap()

    # ---- set-up -------------------------------------------------------------------------------
    def _setup_pooling(self) -> None:
        r = self.runner
        st = read_sentence_transformers_pooling(self.model_dir)
        self.normalize = True if self.config.normalize is None else self.config.normalize
        if self.is_decoder:
            r.pooling = "last"
        elif self.task in ("embed", "score") and r.model.spec.num_labels is None:
            r.pooling = self.config.pooling or (st[0] if st else "cls")
            if self.config.normalize is None and st is not None:
                self.normalize = st[1]
        else:
            r.pooling = "cls"  # classifier heads read the first token
        self.matryoshka = read_matryoshka_dims(self.model_dir)
        self.rerank_template: RerankTemplate | None = None
        if self.task == "score" and self.is_decoder and r.model.spec.num_labels is None:
            self.rerank_template = rerank_template((self.config.model, self.model_dir),
                                                   self.hf_config.architectures or [], self.config.score_template,
                                                   self.config.score_instruction, self.config.score_tokens)
            if hasattr(r.model, "score_head"):  # its own one-logit head (layerwise rerankers)
                r.score_weight = r.model.score_head.weight
            else:
                ids = [self._single_token(t) for t in self.rerank_template.score_tokens]
                w = r.model.output_embeddings()
                # sigmoid(h.(w_yes - w_no)) is softmax over the two logits: no full-vocabulary head needed.
                r.score_weight = (w[ids[1]] - w[ids[0]] if len(ids) == 2 else w[ids[0]]).unsqueeze(0)

    def _single_token(self, text: str) -> int:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"score_tokens entry {text!r} is {len(ids)} tokens; it must be exactly one")
        return ids[0]

    def _eos_token_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id} - {None}
        path = os.path.join(self.model_dir, "generation_config.json")
        if os.path.exists(path):
            with open(path) as f:
                eos = json.load(f).get("eos_token_id")
            ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return ids

    # ---- requests -----------------------------------------------------------------------------
    def new_id(self) -> str:
        return f"req-{next(self._ids)}"

    def add_generation(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        self.add_generation_requests(request_id, prompt, self.input_processor.generation(request_id, prompt, params))

    def add_generation_requests(self, request_id: str, prompt: str | list[int], children: list[Request]) -> None:
        """A generation whose requests an input processor built (where the caller runs, for AsyncLLM)."""
        self._check_new(request_id)
        self.output_processor.add_generation(request_id, prompt, children)
        for child in children:
            self.scheduler.add(child)

    def add_embed(self, request_id: str, prompts: list[str | list[int]], params: PoolingParams | None = None) -> None:
        self.add_pooling_job(self.input_processor.embed(request_id, prompts, params))

    def add_classify(self, request_id: str, prompts: list[str | list[int]],
                     params: PoolingParams | None = None) -> None:
        self.add_pooling_job(self.input_processor.classify(request_id, prompts, params))

    def add_score(self, request_id: str, text_1: str | list[str], text_2: str | list[str],
                  params: PoolingParams | None = None) -> None:
        self.add_pooling_job(self.input_processor.score(request_id, text_1, text_2, params))

    def add_pooling_job(self, job: PoolingJob) -> None:
        """A pooling call whose requests an input processor built."""
        self._check_new(job.request_id)
        self.output_processor.add_pooling(job)
        for req in job.requests:
            self.scheduler.add(req)

    def _check_new(self, request_id: str) -> None:
        if self.output_processor.has_request(request_id):
            raise ValueError(f"request_id {request_id!r} is already running")

    def abort(self, request_id: str) -> None:
        for req in self.output_processor.abort(request_id):
            if not req.status.finished:
                self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
                self.stats.request_success_total["abort"] += 1

    def abort_all(self) -> None:
        for rid in self.output_processor.request_ids():
            self.abort(rid)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self._in_flight)

    # ---- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput | PoolingJobOutput]:
        """Launches a step and returns the outputs of the one before it (async scheduling) or its own."""
        launched = self._launch()
        if len(self._in_flight) > (1 if launched and self.async_scheduling else 0):
            return self._process(self._in_flight.popleft())
        return []

    def _launch(self) -> bool:
        sched = self.scheduler.schedule()
        if not sched.requests:
            return False
        if self.on_batch_start is not None:
            # A pooling request finishes in the step that runs it: only a snapshot taken now shows it
            # running, as vLLM counts the batch it executes.
            self.on_batch_start(self.stats_snapshot())
        try:
            result = self.runner.execute(sched)
        except BaseException:
            # Blocks were registered in the prefix cache when scheduled; this step wrote none of them.
            if self.kv is not None:
                for req in sched.requests:
                    self.kv.forget_uncomputed(req)
            raise
        for req, n in zip(sched.requests, sched.num_tokens):
            req.num_computed_tokens += n
        for req in result.sampled_reqs:
            req.num_pending_tokens += 1
        for req in result.pooled_reqs:  # done with the scheduler: the next step must not see it running
            self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
        self._in_flight.append(result)
        return True

    def _process(self, result: StepResult) -> list[RequestOutput | PoolingJobOutput]:
        token_ids, logprobs, pooled = result.get()
        for req in result.sampled_reqs:
            req.num_pending_tokens -= 1
        outputs: list[RequestOutput | PoolingJobOutput] = self.output_processor.process_pooled(pooled)
        generated, finished = self.output_processor.process_sampled(result.sampled_reqs, token_ids, logprobs)
        for req, status in finished:
            self.scheduler.finish(req, status)
        outputs.extend(generated)
        return outputs

    def stats_snapshot(self) -> dict:
        pool = self.kv.pool if self.kv else None
        s = self.stats
        return {"num_running": len(self.scheduler.running), "num_waiting": len(self.scheduler.waiting),
                "kv_cache_usage": pool.usage() if pool else 0.0,
                "num_free_blocks": pool.num_free if pool else 0, "num_blocks": pool.num_blocks if pool else 0,
                "prefix_cache_queries_total": self.kv.prefix_cache_queries if self.kv else 0,
                "prefix_cache_hits_total": self.kv.prefix_cache_hits if self.kv else 0,
                "prompt_tokens_total": s.prompt_tokens_total, "generation_tokens_total": s.generation_tokens_total,
                "request_success_total": dict(s.request_success_total),
                "ttft_seconds": s.ttft_seconds.snapshot(), "inter_token_seconds": s.inter_token_seconds.snapshot(),
                "e2e_seconds": s.e2e_seconds.snapshot()}
