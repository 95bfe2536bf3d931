"""Turns what a step computed into what callers receive (vLLM v1's output processor): sampled tokens are
detokenized, checked against stop conditions and emitted as the request's output kind asks; pooled
vectors are collected per call and emitted once the call's last input is done.

Nothing is re-copied per step: a DELTA output carries only the step's new tokens, text and logprobs,
a FINAL_ONLY generation builds one output when it ends. Only CUMULATIVE (vLLM's default, for callers
who ask for it) copies everything so far."""
import itertools
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from engine.detokenizer import CallerDetokenizer, FinalDetokenizer, IncrementalDetokenizer, make_detokenizer
from engine.input_processor import PoolingJob
from engine.metrics import Stats
from engine.outputs import (ClassificationOutput, CompletionOutput, EmbeddingOutput, Logprob,
                            PoolingJobOutput, PoolingRequestOutput, RequestOutput, ScoringOutput)
from engine.params import RequestOutputKind
from engine.request import FINISH_REASONS, Request, RequestStatus
from engine.sampler import TokenLogprobs


@dataclass(slots=True)
class _Sequence:
    """One engine request of a generation. text and logprobs hold what is not emitted yet (DELTA)
    or everything (the other kinds)."""
    index: int
    request: Request
    generation: "_Generation"
    detokenizer: IncrementalDetokenizer | FinalDetokenizer | CallerDetokenizer
    # What process_sampled checks for every token, decided once: the token ids that end it (stop tokens, and EOS
    # unless ignored), the token count at which it ends by length, and whether each token needs more than
    # those checks (logprobs to record, text to decode as it comes).
    stop_ids: frozenset[int]
    end: int
    watched: bool
    text: str = ""
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    num_sent: int = 0  # output tokens already emitted (DELTA)
    status: RequestStatus | None = None  # set when it finishes


@dataclass(slots=True)
class _Generation:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    kind: RequestOutputKind
    sequences: list[_Sequence]
    num_unfinished: int
    last_token_time: float = 0.0


@dataclass(slots=True)
class _PoolingState:
    job: PoolingJob
    results: dict[str, torch.Tensor]


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: set[int], max_model_len: int, normalize: bool, stats: Stats):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.normalize = normalize  # the model's default for embeddings
        self.stats = stats
        self.generations: dict[str, _Generation] = {}
        self.pooling: dict[str, _PoolingState] = {}
        self.sequence_of: dict[str, _Sequence] = {}  # a generation's engine request id -> its sequence
        self._last_step_time: float | None = None  # when process_sampled last ran (inter-token gaps)
        self.parent_of: dict[str, str] = {}  # a pooling job's engine request id -> the caller's request id
        # DELTA streams without stop strings get no text here: the caller's process detokenizes them (an engine
        # in a process of its own, engine.stream_text), off the process that runs the steps.
        self.caller_detokenizes = False

    def has_request(self, request_id: str) -> bool:
        return request_id in self.generations or request_id in self.pooling

    def add_generation(self, request_id: str, prompt: str | list[int], children: list[Request]) -> None:
        params = children[0].sampling_params
        ids = children[0].prompt_token_ids
        gen = self.generations[request_id] = _Generation(
            request_id, prompt if isinstance(prompt, str) else None, ids, params.output_kind, [], len(children))
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(self.eos_token_ids))
        for i, c in enumerate(children):
            detokenizer = make_detokenizer(self.tokenizer, ids, params, self.caller_detokenizes)
            seq = _Sequence(i, c, gen, detokenizer, stop_ids, min(c.num_prompt_tokens + c.max_tokens, self.max_model_len),
                            detokenizer.per_token or params.logprobs is not None,
                            logprobs=[] if params.logprobs is not None else None)
            gen.sequences.append(seq)
            self.sequence_of[c.request_id] = seq

    def add_pooling(self, job: PoolingJob) -> None:
        self.pooling[job.request_id] = _PoolingState(job, {})
        for r in job.requests:
            self.parent_of[r.request_id] = job.request_id

    def request_ids(self) -> list[str]:
        return [*self.generations, *self.pooling]

    def abort(self, request_id: str) -> list[Request]:
        """Forget the call; returns its engine requests, for the scheduler to drop."""
        gen, job = self.generations.pop(request_id, None), self.pooling.pop(request_id, None)
        if gen is not None:
            return self._forget(gen)
        if job is None:
            return []
        for r in job.job.requests:
            self.parent_of.pop(r.request_id, None)
        return job.job.requests

    def _forget(self, gen: _Generation) -> list[Request]:
        reqs = [s.request for s in gen.sequences]
        for r in reqs:
            self.sequence_of.pop(r.request_id, None)
        return reqs

    # ---- generation ---------------------------------------------------------------------------
    def process_sampled(self, reqs: list[Request], token_ids: list[int], logprobs: list[TokenLogprobs | None] | None
                        ) -> tuple[list[RequestOutput], list[tuple[Request, RequestStatus]]]:
        """Outputs to emit, and the requests that finished (for the scheduler to release), from a step's draws
        (SamplerOutput.read). A token drawn after its sequence ended (aborted, or stopped by the token before it
        while async scheduling had already launched the next step) is dropped. This runs for every running
        request every step: one lookup per token, and a FINAL_ONLY generation is not touched again until it ends."""
        now, previous = time.monotonic(), self._last_step_time
        # Sequences whose generation has an output this step: by themselves (one choice, most), or grouped by
        # generation (n > 1: one output carries every choice's new tokens).
        single, grouped = [], {}
        finished, gaps, num_tokens, num_since_previous = [], Counter(), 0, 0
        # Locals, not attribute lookups: this loop runs for every running request every step.
        sequence_of, final_only = self.sequence_of, RequestOutputKind.FINAL_ONLY
        for req, token_id, token_logprobs in zip(reqs, token_ids, logprobs or itertools.repeat(None)):
            seq = sequence_of.get(req.request_id)
            if seq is None or seq.request is not req or seq.status is not None:
                continue  # aborted (its id maybe taken by a new request since), or ended by an earlier token
            gen = seq.generation
            num_tokens += 1
            last = gen.last_token_time
            if last != now:  # a generation's gap once per step, whatever its n
                gen.last_token_time = now
                if last == previous:
                    num_since_previous += 1  # most generations: a token in every step
                elif last:
                    gaps[now - last] += 1
            ids = req.token_ids
            ids.append(token_id)
            # Most tokens end nothing and have nothing to record or decode: only the others are looked at closely.
            if seq.watched or len(ids) >= seq.end or token_id in seq.stop_ids or req.first_token_time is None:
                status = self._check_token(seq, token_id, token_logprobs, now)
                if status is not None:
                    seq.status = status
                    gen.num_unfinished -= 1
                    finished.append((req, status))
            if gen.num_unfinished == 0 or gen.kind is not final_only:
                if len(gen.sequences) == 1:
                    single.append(seq)
                else:
                    grouped.setdefault(gen.request_id, []).append(seq)
        self.stats.generation_tokens_total += num_tokens
        if num_since_previous:
            gaps[now - previous] += num_since_previous
        self._last_step_time = now
        for gap, count in gaps.items():
            self.stats.inter_token_seconds.observe(gap, count)
        outputs = [self._request_output(seq.generation, (seq,)) for seq in single]
        outputs += [self._request_output(seqs[0].generation, seqs) for seqs in grouped.values()]
        return outputs, finished

    def _check_token(self, seq: _Sequence, token_id: int, logprobs: TokenLogprobs | None,
                     now: float) -> RequestStatus | None:
        """The sequence's status after its latest token (just appended), its logprobs and text recorded."""
        req = seq.request
        params, ids = req.sampling_params, req.token_ids
        if req.first_token_time is None:
            req.first_token_time = now
            self.stats.prompt_tokens_total += req.num_prompt_tokens
            self.stats.ttft_seconds.observe(now - req.arrival_time)
        if logprobs is not None:
            for lp_id, lp in logprobs.top.items():
                lp.decoded_token = self.tokenizer.decode([lp_id])
            seq.logprobs.append(logprobs.top)
            seq.cumulative_logprob += logprobs.logprob
        status = None
        # The sampler masks stop and EOS tokens until min_tokens are out.
        if token_id in params.stop_token_ids:
            status, req.stop_reason = RequestStatus.FINISHED_STOPPED, token_id
        elif not params.ignore_eos and token_id in self.eos_token_ids:
            status = RequestStatus.FINISHED_STOPPED
        # Stop tokens are not text: the detokenizer gets only what the user sees.
        num_text_tokens = len(ids) - req.num_prompt_tokens - (status is not None)
        detokenizer = seq.detokenizer
        if detokenizer.per_token and status is None:
            stop = detokenizer.update([token_id])
            if stop is not None and num_text_tokens >= params.min_tokens:
                status, req.stop_reason = RequestStatus.FINISHED_STOPPED, stop
        if status is None and (len(ids) - req.num_prompt_tokens >= req.max_tokens or len(ids) >= self.max_model_len):
            status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            self.stats.request_success_total[FINISH_REASONS[status]] += 1
            self.stats.e2e_seconds.observe(now - req.arrival_time)
            if not detokenizer.per_token:
                detokenizer.update(ids[req.num_prompt_tokens:req.num_prompt_tokens + num_text_tokens])
        if status is not None or detokenizer.per_token:
            seq.text += detokenizer.take_delta(status is not None)
        return status

    def _request_output(self, gen: _Generation, touched: list[_Sequence] | tuple[_Sequence]) -> RequestOutput:
        """The step's output of a generation that has one (a FINAL_ONLY one only once it finished)."""
        finished = gen.num_unfinished == 0
        if finished:
            self.generations.pop(gen.request_id)
            self._forget(gen)
        kind = gen.kind
        if kind is RequestOutputKind.DELTA:  # every step of every stream: first
            outs = [self._delta(s) for s in touched]
        elif kind is RequestOutputKind.FINAL_ONLY:
            outs = [self._final(s) for s in gen.sequences]
        else:
            outs = [self._cumulative(s) for s in gen.sequences]
        return RequestOutput(gen.request_id, gen.prompt, gen.prompt_token_ids, outs, finished,
                             gen.sequences[0].request.num_cached_tokens)

    def _completion(self, s: _Sequence, token_ids: list[int], text: str,
                    logprobs: list[dict[int, Logprob]] | None) -> CompletionOutput:
        return CompletionOutput(s.index, text, token_ids, s.cumulative_logprob if s.logprobs is not None else None,
                                logprobs, FINISH_REASONS.get(s.status), s.request.stop_reason)

    def _delta(self, s: _Sequence) -> CompletionOutput:
        req = s.request
        new = req.token_ids[req.num_prompt_tokens + s.num_sent:]
        s.num_sent += len(new)
        out = self._completion(s, new, s.text, s.logprobs)
        s.text = ""
        if s.logprobs is not None:
            s.logprobs = []
        return out

    def _cumulative(self, s: _Sequence) -> CompletionOutput:
        return self._completion(s, s.request.output_token_ids, s.text,
                                list(s.logprobs) if s.logprobs is not None else None)

    def _final(self, s: _Sequence) -> CompletionOutput:
        return self._completion(s, s.request.output_token_ids, s.text, s.logprobs)  # the state is gone: no copy

    # ---- pooling ------------------------------------------------------------------------------
    def process_pooled(self, pooled: list[tuple[Request, torch.Tensor]]) -> list[PoolingJobOutput]:
        """One output per call whose last input this step finished (none for a call aborted meanwhile)."""
        done = []
        for req, data in pooled:
            rid = self.parent_of.pop(req.request_id, None)
            if rid is None:
                continue
            self.stats.prompt_tokens_total += req.num_prompt_tokens
            state = self.pooling[rid]
            state.results[req.request_id] = data
            if len(state.results) == len(state.job.requests):
                del self.pooling[rid]
                done.append(PoolingJobOutput(rid, self._combine(state.job, state.results)))
        return done

    def _combine(self, job: PoolingJob, results: dict[str, torch.Tensor]) -> list[PoolingRequestOutput]:
        reqs, params = job.requests, job.params
        data = [results[r.request_id] for r in reqs]
        if job.kind == "embed":
            return [_pooling_output(r, EmbeddingOutput(v)) for r, v in zip(reqs, self._embeddings(data, params))]
        if job.kind == "classify":
            return [_pooling_output(r, ClassificationOutput((v.softmax(-1) if params.activation else v).tolist()))
                    for r, v in zip(reqs, data)]
        if job.kind == "score":
            return [_pooling_output(r, ScoringOutput(float(v[0].sigmoid() if params.activation else v[0])))
                    for r, v in zip(reqs, data)]
        outs = []  # pair_cosine
        for a, b, va, vb in zip(reqs[::2], reqs[1::2], data[::2], data[1::2]):
            score = float(torch.nn.functional.cosine_similarity(va, vb, dim=0))
            outs.append(PoolingRequestOutput(a.request_id, ScoringOutput(score),
                                             a.prompt_token_ids + b.prompt_token_ids,
                                             num_cached_tokens=a.num_cached_tokens + b.num_cached_tokens))
        return outs

    def _embeddings(self, data: list[torch.Tensor], params) -> list[np.ndarray]:
        v = torch.stack(data).float()  # the call's vectors at once: one normalize, rows of one array
        if params.dimensions is not None:
            v = v[:, :params.dimensions]
        if self.normalize if params.normalize is None else params.normalize:
            v = torch.nn.functional.normalize(v, dim=1)
        return list(v.numpy())


def _pooling_output(req: Request, outputs) -> PoolingRequestOutput:
    return PoolingRequestOutput(req.request_id, outputs, req.prompt_token_ids, num_cached_tokens=req.num_cached_tokens)
