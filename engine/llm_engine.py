"""The synchronous engine: requests in, one scheduled step at a time, outputs out."""
import dataclasses
import itertools
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from engine.config import EngineConfig, keep_freed_memory, set_num_threads
from engine.detokenizer import IncrementalDetokenizer
from engine.kv_cache_manager import KVCacheManager, cdiv
from engine.metrics import Stats
from engine.loader import (iter_weights, load_config, read_matryoshka_dims,
                           read_sentence_transformers_max_seq_length, read_sentence_transformers_pooling,
                           resolve_model)
from engine.model_runner import ModelRunner
from engine.models import model_class
from engine.outputs import (ClassificationOutput, CompletionOutput, EmbeddingOutput, Logprob,
                            PoolingRequestOutput, RequestOutput, ScoringOutput)
from engine.params import PoolingParams, SamplingParams
from engine.request import FINISH_REASONS, Request, RequestStatus
from engine.sampler import Sampler
from engine.scheduler import Scheduler
from engine.tokenizer import YesNoPrompt, encode, encode_pair, load_tokenizer, pair_texts, rerank_template

@dataclass(slots=True)
class Generation:
    """One user request; n > 1 runs as n engine requests that share its prompt."""
    request_id: str
    prompt: str | None
    children: list[Request]
    detokenizers: list[IncrementalDetokenizer]
    texts: list[str]
    logprobs: list[list[dict[int, Logprob]] | None]
    cumulative_logprobs: list[float]
    last_token_time: float = 0.0


@dataclass(slots=True)
class Pooled:
    request_id: str
    data: torch.Tensor
    prompt_token_ids: list[int]
    num_cached_tokens: int


@dataclass(slots=True)
class PoolingJob:
    """The engine requests behind one embed / score / classify call and how to combine their results."""
    requests: list[Request]
    combine: Callable[[list[Pooled]], list[PoolingRequestOutput]]


class LLMEngine:
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
        self.max_model_len = self._max_model_len(hf)
        self.task = self._task(hf)
        device = config.torch_device()
        if device.type == "cpu":
            keep_freed_memory()
        self.runner = ModelRunner(hf, iter_weights(self.model_dir), self.max_model_len, device,
                                  config.torch_dtype(device))
        self.vocab_size = self.runner.model.spec.vocab_size if self.is_decoder else hf.vocab_size
        self.id2label = {int(k): v for k, v in (getattr(hf, "id2label", None) or {}).items()}
        self._setup_pooling()
        kv = None
        if self.is_decoder:
            num_blocks = config.num_blocks or self._num_blocks(device)
            self.runner.allocate_kv_cache(num_blocks, config.block_size)
            kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
            self.runner.sampler = Sampler(self._eos_token_ids())
        self.kv = kv
        self.scheduler = Scheduler(kv, config.max_num_batched_tokens, config.max_num_seqs,
                                   config.long_prefill_token_threshold)
        self.generations: dict[str, Generation] = {}
        self.parent_of: dict[str, str] = {}
        self.stats = Stats()
        # Called with a stats snapshot when a step's batch starts (AsyncLLM publishes it to /metrics).
        self.on_batch_start: Callable[[dict], None] | None = None
        self._ids = itertools.count()

    # ---- set-up -------------------------------------------------------------------------------
    def _max_model_len(self, hf) -> int:
        limit = getattr(hf, "max_position_embeddings", None) or 2048
        if not self.is_decoder and hf.model_type in ("roberta", "xlm-roberta", "camembert"):
            limit -= hf.pad_token_id + 1  # their positions start after the padding index
        if getattr(hf, "sliding_window", None) and getattr(hf, "use_sliding_window", True):
            limit = min(limit, hf.sliding_window)  # full attention is exact only inside the window
        st_limit = read_sentence_transformers_max_seq_length(self.model_dir)
        if st_limit:  # what the model was trained and is evaluated at, as vLLM reads it
            limit = min(limit, st_limit)
        want = self.config.max_model_len
        if want is not None and want > limit:
            raise ValueError(f"max_model_len {want} is larger than the model's limit {limit}")
        return want or limit

    def _task(self, hf) -> str:
        archs = hf.architectures or []
        classifier = any(a.endswith("SequenceClassification") for a in archs)
        causal = any(a.endswith("CausalLM") for a in archs)
        allowed = {"embed"}
        if classifier:
            allowed |= {"classify"} | ({"score"} if hf.num_labels == 1 else set())
        elif causal:
            allowed |= {"generate", "score"}  # score: yes/no reranking from the LM head
        else:
            allowed |= {"score"}  # bi-encoder: cosine of the two embeddings
        reranker_only = getattr(model_class(hf), "reranker_only", False)
        if reranker_only:
            allowed = {"score"}
        task = self.config.task
        if task == "auto":
            task = ("score" if reranker_only else "generate" if causal else "score" if classifier and hf.num_labels == 1
                    else "classify" if classifier else "embed")
        if task not in allowed:
            raise ValueError(f"task {task!r} is not supported by {self.config.model} "
                             f"({', '.join(archs)}); it supports {', '.join(sorted(allowed))}")
        return task

    def _setup_pooling(self) -> None:
        r, hf = self.runner, self.hf_config
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
        self.yes_no: YesNoPrompt | None = None
        if self.task == "score" and self.is_decoder and r.model.spec.num_labels is None:
            template = rerank_template((self.config.model, self.model_dir), hf.architectures or [],
                                       self.config.score_template, self.config.score_instruction,
                                       self.config.score_tokens)
            if hasattr(r.model, "score_head"):  # its own one-logit head (layerwise rerankers)
                r.score_weight = r.model.score_head.weight
            else:
                ids = [self._single_token(t) for t in template.score_tokens]
                w = r.model.output_embeddings()
                # sigmoid(h.(w_yes - w_no)) is softmax over the two logits: no full-vocabulary head needed.
                r.score_weight = (w[ids[1]] - w[ids[0]] if len(ids) == 2 else w[ids[0]]).unsqueeze(0)
            self.yes_no = YesNoPrompt(self.tokenizer, template)

    def _single_token(self, text: str) -> int:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"score_tokens entry {text!r} is {len(ids)} tokens; it must be exactly one")
        return ids[0]

    def _num_blocks(self, device: torch.device) -> int:
        per_block = self.runner.kv_bytes_per_block(self.config.block_size)
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            budget = free - (1 - self.config.gpu_memory_utilization) * total
        else:
            budget = self.config.kv_cache_memory_bytes
        # No use in a pool larger than every sequence at full length.
        most = cdiv(self.max_model_len, self.config.block_size) * self.config.max_num_seqs
        num_blocks = min(int(budget // per_block), most)
        if num_blocks < cdiv(self.max_model_len, self.config.block_size):
            raise ValueError(f"the KV-cache budget holds {num_blocks} blocks of {self.config.block_size} tokens, "
                             f"less than one sequence of max_model_len {self.max_model_len}; raise "
                             f"kv_cache_memory_bytes / gpu_memory_utilization or lower max_model_len")
        return num_blocks

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

    def encode_prompt(self, prompt: str | list[int], truncate_prompt_tokens: int | None = None,
                      add_special_tokens: bool = True) -> list[int]:
        return encode(self.tokenizer, prompt, self.max_model_len, truncate_prompt_tokens, self.vocab_size,
                      add_special_tokens, keep_end=self.is_decoder)

    def add_generation(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        if self.task != "generate":
            raise ValueError(f"model {self.config.served_name} serves task {self.task!r}, not generation")
        if request_id in self.generations:
            raise ValueError(f"request_id {request_id!r} is already running")
        bad = [t for t in params.logit_bias or {} if t >= self.vocab_size]
        if bad:
            raise ValueError(f"logit_bias keys must be token ids in [0, {self.vocab_size}), got {bad[:5]}")
        ids = self.encode_prompt(prompt, params.truncate_prompt_tokens,
                                 add_special_tokens=not self._has_bos(prompt))
        room = self.max_model_len - len(ids)
        if room < 1:
            raise ValueError(f"the prompt has {len(ids)} tokens, which leaves no room to generate within "
                             f"max_model_len {self.max_model_len}")
        max_tokens = room if params.max_tokens is None else params.max_tokens
        if max_tokens > room:
            raise ValueError(f"max_tokens is too large: {max_tokens}; the prompt has {len(ids)} tokens and "
                             f"max_model_len is {self.max_model_len}, so at most {room} tokens can be generated")
        need = params.n * cdiv(len(ids) + max_tokens, self.config.block_size)
        if need > self.kv.pool.num_blocks:
            raise ValueError(f"n={params.n} sequences of {len(ids) + max_tokens} tokens need {need} KV-cache "
                             f"blocks; the pool has {self.kv.pool.num_blocks}")
        children = []
        for i in range(params.n):
            child = Request(f"{request_id}#{i}" if params.n > 1 else request_id, list(ids),
                            sampling_params=params, max_tokens=max_tokens)
            if params.seed is not None:
                child.generator = torch.Generator(self.runner.device).manual_seed(params.seed + i)
            children.append(child)
        self.generations[request_id] = Generation(
            request_id, prompt if isinstance(prompt, str) else None, children,
            [IncrementalDetokenizer(self.tokenizer, ids, params) for _ in children], [""] * params.n,
            [[] if params.logprobs is not None else None for _ in children], [0.0] * params.n)
        for child in children:
            self.parent_of[child.request_id] = request_id
            self.scheduler.add(child)

    def _has_bos(self, prompt: str | list[int]) -> bool:
        # Chat templates already write the BOS token; adding another changes the model's input.
        bos = self.tokenizer.bos_token
        return isinstance(prompt, list) or (bos is not None and prompt.startswith(bos))

    def abort(self, request_id: str) -> None:
        gen = self.generations.pop(request_id, None)
        reqs = gen.children if gen else [r for r in [self.scheduler.requests.get(request_id)] if r]
        for req in reqs:
            if not req.status.finished:
                self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
                self.stats.request_success_total["abort"] += 1
            self.parent_of.pop(req.request_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- pooling ------------------------------------------------------------------------------
    def embed_job(self, prompts: list[str | list[int]], params: PoolingParams | None = None) -> PoolingJob:
        params = self._pooling_params(params)
        if not prompts:
            raise ValueError("input must not be empty")
        if self.task != "embed" and not self._bi_encoder:
            raise ValueError(f"model {self.config.served_name} serves task {self.task!r}, not embeddings")
        self._check_dimensions(params.dimensions)
        reqs = [self._pooling_request(self.encode_prompt(p, params.truncate_prompt_tokens), params) for p in prompts]
        return PoolingJob(reqs, lambda done: [self._embedding_output(p, params) for p in done])

    def classify_job(self, prompts: list[str | list[int]], params: PoolingParams | None = None) -> PoolingJob:
        params = self._pooling_params(params)
        if self.task != "classify":
            raise ValueError(f"model {self.config.served_name} serves task {self.task!r}, not classification")
        if not prompts:
            raise ValueError("input must not be empty")
        reqs = [self._pooling_request(self.encode_prompt(p, params.truncate_prompt_tokens), params) for p in prompts]

        def combine(done: list[Pooled]) -> list[PoolingRequestOutput]:
            return [self._output(p, ClassificationOutput(
                (p.data.softmax(-1) if params.activation else p.data).tolist())) for p in done]
        return PoolingJob(reqs, combine)

    def score_job(self, text_1: str | list[str], text_2: str | list[str],
                  params: PoolingParams | None = None) -> PoolingJob:
        params = self._pooling_params(params)
        if self.task not in ("score", "embed"):
            raise ValueError(f"model {self.config.served_name} serves task {self.task!r}, not scoring")
        pairs = pair_texts(text_1, text_2)
        t = params.truncate_prompt_tokens
        if self._bi_encoder:
            return self._bi_encoder_score(pairs, params)
        if self.yes_no is not None:
            reqs = [self._pooling_request(self.yes_no.encode(q, d, self.max_model_len, t), params) for q, d in pairs]
        else:
            reqs = []
            for q, d in pairs:
                ids, types = encode_pair(self.tokenizer, q, d, self.max_model_len, t)
                reqs.append(self._pooling_request(ids, params, types))

        def combine(done: list[Pooled]) -> list[PoolingRequestOutput]:
            return [self._output(p, ScoringOutput(float(p.data[0].sigmoid() if params.activation else p.data[0])))
                    for p in done]
        return PoolingJob(reqs, combine)

    def _pooling_params(self, params: PoolingParams | None) -> PoolingParams:
        params = params or PoolingParams()
        if params.truncate_prompt_tokens is None and self.config.auto_truncate:
            return dataclasses.replace(params, truncate_prompt_tokens=-1)  # -1: to max_model_len
        return params

    @property
    def _bi_encoder(self) -> bool:
        """Embedding models score a pair as the cosine of its two embeddings, as vLLM does."""
        return (self.task in ("embed", "score") and self.yes_no is None
                and self.runner.model.spec.num_labels is None)

    def _bi_encoder_score(self, pairs: list[tuple[str, str]], params: PoolingParams) -> PoolingJob:
        texts = [t for pair in pairs for t in pair]
        reqs = [self._pooling_request(self.encode_prompt(x, params.truncate_prompt_tokens), params) for x in texts]

        def combine(done: list[Pooled]) -> list[PoolingRequestOutput]:
            out = []
            for a, b in zip(done[::2], done[1::2]):
                score = torch.nn.functional.cosine_similarity(a.data, b.data, dim=0)
                merged = Pooled(a.request_id, a.data, a.prompt_token_ids + b.prompt_token_ids,
                                a.num_cached_tokens + b.num_cached_tokens)
                out.append(self._output(merged, ScoringOutput(float(score))))
            return out
        return PoolingJob(reqs, combine)

    def _pooling_request(self, ids: list[int], params: PoolingParams, types: list[int] | None = None) -> Request:
        if self.kv is not None and cdiv(len(ids), self.config.block_size) > self.kv.pool.num_blocks:
            raise ValueError(f"the input of {len(ids)} tokens does not fit the KV-cache pool")
        return Request(self.new_id(), ids, pooling_params=params, token_type_ids=types)

    def _check_dimensions(self, dims: int | None) -> None:
        if dims is None:
            return
        hidden = self.runner.model.spec.hidden_size
        if self.matryoshka is None:
            raise ValueError(f"model {self.config.served_name} does not support Matryoshka embeddings, "
                             f"so dimensions must not be set")
        if not 1 <= dims <= hidden or (self.matryoshka and dims not in self.matryoshka):
            allowed = self.matryoshka or f"1..{hidden}"
            raise ValueError(f"dimensions must be one of {allowed}, got {dims}")

    def _embedding_output(self, p: Pooled, params: PoolingParams) -> PoolingRequestOutput:
        v = p.data.float()
        if params.dimensions is not None:
            v = v[:params.dimensions]
        if self.normalize if params.normalize is None else params.normalize:
            v = torch.nn.functional.normalize(v, dim=0)
        return self._output(p, EmbeddingOutput(v.tolist()))

    def _output(self, p: Pooled, outputs) -> PoolingRequestOutput:
        return PoolingRequestOutput(p.request_id, outputs, p.prompt_token_ids, num_cached_tokens=p.num_cached_tokens)

    def add_pooling_requests(self, job: PoolingJob) -> None:
        for req in job.requests:
            self.scheduler.add(req)

    # ---- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput | Pooled]:
        sched = self.scheduler.schedule()
        if not sched.requests:
            return []
        if self.on_batch_start is not None:
            # A pooling request finishes in the step that runs it: only a snapshot taken now shows it
            # running, as vLLM counts the batch it executes.
            self.on_batch_start(self.stats_snapshot())
        try:
            sampled, pooled = self.runner.execute(sched)
        except BaseException:
            # Blocks were registered in the prefix cache when scheduled; this step wrote none of them.
            if self.kv is not None:
                for req in sched.requests:
                    self.kv.forget_uncomputed(req)
            raise
        for req, n in zip(sched.requests, sched.num_tokens):
            req.num_computed_tokens += n
        now = time.monotonic()
        outputs: list[RequestOutput | Pooled] = []
        for req, data in pooled:
            self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
            self.stats.prompt_tokens_total += req.num_prompt_tokens
            outputs.append(Pooled(req.request_id, data, req.prompt_token_ids, req.num_cached_tokens))
        touched: dict[str, Generation] = {}
        for req, tok in sampled:
            gen = self.generations[self.parent_of[req.request_id]]
            self._append_token(gen, req, tok, now)
            touched[gen.request_id] = gen
        outputs.extend(self._request_output(gen, now) for gen in touched.values())
        return outputs

    def _append_token(self, gen: Generation, req: Request, tok, now: float) -> None:
        i = gen.children.index(req)
        params = req.sampling_params
        req.token_ids.append(tok.token_id)
        self.stats.generation_tokens_total += 1
        if req.first_token_time is None:
            req.first_token_time = now
            self.stats.prompt_tokens_total += req.num_prompt_tokens
            self.stats.ttft_seconds.observe(now - req.arrival_time)
        if gen.logprobs[i] is not None:
            for token_id, lp in tok.logprobs.items():
                lp.decoded_token = self.tokenizer.decode([token_id])
            gen.logprobs[i].append(tok.logprobs)
            gen.cumulative_logprobs[i] += tok.logprob
        status = None
        # The sampler masks stop and EOS tokens until min_tokens are out.
        if tok.token_id in params.stop_token_ids:
            status, req.stop_reason = RequestStatus.FINISHED_STOPPED, tok.token_id
        elif not params.ignore_eos and tok.token_id in self.runner.sampler.eos_token_ids:
            status = RequestStatus.FINISHED_STOPPED
        # Stop tokens are not text: hand the detokenizer only what the user sees.
        stop = None if status else gen.detokenizers[i].update([tok.token_id])
        if stop is not None and req.num_output_tokens >= params.min_tokens:
            status, req.stop_reason = RequestStatus.FINISHED_STOPPED, stop
        elif status is None and (req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.max_model_len):
            status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            self.scheduler.finish(req, status)
            self.stats.request_success_total[FINISH_REASONS[status]] += 1
            self.stats.e2e_seconds.observe(now - req.arrival_time)
        gen.texts[i] += gen.detokenizers[i].take_delta(status is not None)

    def _request_output(self, gen: Generation, now: float) -> RequestOutput:
        if gen.last_token_time:
            self.stats.inter_token_seconds.observe(now - gen.last_token_time)
        gen.last_token_time = now
        outs = [CompletionOutput(i, gen.texts[i], list(c.output_token_ids),
                                 gen.cumulative_logprobs[i] if gen.logprobs[i] is not None else None,
                                 list(gen.logprobs[i]) if gen.logprobs[i] is not None else None,
                                 FINISH_REASONS.get(c.status), c.stop_reason)
                for i, c in enumerate(gen.children)]
        finished = all(c.status.finished for c in gen.children)
        if finished:
            self.generations.pop(gen.request_id, None)
            for c in gen.children:
                self.parent_of.pop(c.request_id, None)
        first = gen.children[0]
        return RequestOutput(gen.request_id, gen.prompt, first.prompt_token_ids, outs, finished,
                             first.num_cached_tokens)

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
