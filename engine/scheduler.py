"""Continuous batching: every step spends one token budget on decodes first, then prefill chunks."""
from collections import deque
from dataclasses import dataclass, field

from engine.kv_cache_manager import KVCacheManager
from engine.request import Request, RequestStatus


@dataclass(slots=True)
class SchedulerOutput:
    requests: list[Request] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # tokens scheduled per request

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)


class Scheduler:
    """kv is None for encoder models: no cache, so a prompt runs whole in one step or waits."""

    def __init__(self, kv: KVCacheManager | None, max_num_batched_tokens: int, max_num_seqs: int,
                 long_prefill_token_threshold: int | None = None):
        self.kv = kv
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.chunk_cap = long_prefill_token_threshold or max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}

    def add(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out, budget, preempted = SchedulerOutput(), self.max_num_batched_tokens, False
        # Properties spelled out, attributes held in locals: this loop runs for every running request every step.
        running, kv, cap = self.running, self.kv, min(self.chunk_cap, budget)
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            num_tokens = len(req.token_ids) + req.num_pending_tokens
            if req.num_pending_tokens and num_tokens - req.num_prompt_tokens >= req.max_tokens:
                i += 1  # its last token is being sampled by the step in flight: nothing left to compute
                continue
            n = num_tokens - req.num_computed_tokens
            if n > cap or n > budget:
                n = min(n, budget, cap)
            while not kv.allocate_slots(req, n):
                victim = running.pop()  # the most recently started gives its blocks back
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                out.requests.append(req)
                out.num_tokens.append(n)
                budget -= n
                i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            req = self.waiting[0]
            if self.kv is None:
                n = req.num_tokens
                if n > budget and out.requests:
                    break
            else:
                computed, num_hit = self.kv.get_computed_blocks(req)
                n = min(req.num_tokens - num_hit, budget, self.chunk_cap)
                if not self.kv.allocate_slots(req, n, computed):
                    break
                self.kv.record_prefix_lookup(req, num_hit)
                req.num_computed_tokens = num_hit
                req.num_cached_tokens = max(req.num_cached_tokens, num_hit)
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.requests.append(req), out.num_tokens.append(n)
            budget -= n
        return out

    def _preempt(self, req: Request) -> None:
        # Recompute later: its prompt and outputs so far become the next prefill.
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Finished or aborted: the request leaves at once and its blocks go back to the pool."""
        req.status = status
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if self.kv is not None:
            self.kv.free(req)
        self.requests.pop(req.request_id, None)
