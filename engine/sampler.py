"""Turns the last-position logits of a batch into one token per request, vLLM style.

The whole batch at once, on the logits' device: penalties, logit_bias and min_tokens masking, then greedy
argmax or temperature -> top_k -> top_p -> min_p -> a draw. Python touches requests only to read their
parameters into [B] tensors. Logprobs are taken from the raw logits."""
from dataclasses import dataclass

import torch

from engine.outputs import Logprob
from engine.params import SamplingParams
from engine.request import Request
from engine.transfer import to_device, to_host

# top_p first looks among this many most likely tokens: a full sort costs ~2 ms per row of a 50k
# vocabulary on CPU, and rows whose top_p mass lies beyond the candidates fall back to it.
TOP_P_CANDIDATES = 256
# The draw races this many most likely tokens with their own noise; the rest of the vocabulary
# enters the race as one entrant weighing its total mass (see Sampler._draw).
RACE_CANDIDATES = 256
# splitmix64's constants, as signed int64 (torch wraps int64 arithmetic).
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


@dataclass(slots=True)
class TokenLogprobs:
    """A sampled token's logprobs, for a request that asked for them."""
    logprob: float  # of the sampled token
    top: dict[int, Logprob]  # sampled token first, then the top `params.logprobs`


@dataclass(slots=True)
class SamplerOutput:
    """A step's draws: on the device for the next step's inputs, and on their way to the host, where
    read() takes them once the step is done."""
    token_ids: torch.Tensor  # [B] on the device
    host_token_ids: torch.Tensor
    params: list[SamplingParams]
    logprob_rows: list[int]  # rows that asked for logprobs, and theirs: sampled logprob, rank, top values, top ids
    host_logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def read(self) -> tuple[list[int], list[TokenLogprobs | None] | None]:
        """Each row's token id, and each row's logprobs where any row asked (None in the rows that did not):
        plain lists, no object per token, as the output processor reads them for every running request."""
        ids = self.host_token_ids.tolist()
        if self.host_logprobs is None:
            return ids, None
        logprobs: list[TokenLogprobs | None] = [None] * len(ids)
        for i, value, rank, tl, ti in zip(self.logprob_rows, *(t.tolist() for t in self.host_logprobs)):
            top = {ids[i]: Logprob(value, rank)}
            for r, (t, v) in enumerate(zip(ti[:self.params[i].logprobs], tl), start=1):
                top.setdefault(t, Logprob(v, r))
            logprobs[i] = TokenLogprobs(value, top)
        return ids, logprobs


def _column(values: list, like: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return to_device(values, like.device, dtype).unsqueeze(1)


def greedy_ids(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (the first of equal maxima, NaN counted largest, as torch.argmax): torch.max's indices, 3x
    faster than argmax on the CPU (32 x 49,152 float32 logits: 327 against 988 us on a 2-core Xeon)."""
    return logits.max(-1).indices


class Sampler:
    def __init__(self, eos_token_ids: set[int], decide_on_host: bool = True):
        self.eos_token_ids = set(eos_token_ids)
        # Whether a rare branch is taken after asking the host if any row needs it (the CPU). On an
        # accelerator that question waits for the step to finish, so async scheduling could not overlap
        # the next step with it: the branch runs for every row and is kept where it applies.
        self.decide_on_host = decide_on_host
        # Keys for unseeded requests, fresh each step; seeded requests never touch it.
        self.generator = torch.Generator()
        self.generator.seed()

    def __call__(self, logits: torch.Tensor, requests: list[Request],
                 last_inputs: torch.Tensor | None = None) -> SamplerOutput:
        """last_inputs [B]: each row's input token this step, on the device; penalties need the ones still
        in flight (async scheduling), which the host does not have yet."""
        if all(r.argmax_only for r in requests):
            token_ids = greedy_ids(logits)
            return SamplerOutput(token_ids, to_host(token_ids), [], [])
        params = [r.sampling_params for r in requests]
        penalised = [i for i, p in enumerate(params) if p.has_penalties]
        blocked = self._blocked(requests, logits.shape[1], logits.device)
        biased = [i for i, p in enumerate(params) if p.logit_bias]
        if not penalised and blocked is None and not biased and all(p.greedy for p in params):
            token_ids = greedy_ids(logits)
        else:
            # Copy only when editing in place: the caller's logits stay raw for logprobs.
            x = logits.to(torch.float32, copy=bool(penalised or blocked is not None or biased))
            if penalised:
                apply_penalties(x, penalised, requests, last_inputs)
            for i in biased:  # rare: per request
                bias = params[i].logit_bias
                x[i, to_device(list(bias), x.device)] += to_device(list(bias.values()), x.device, torch.float32)
            if blocked is not None:
                x.index_put_(blocked, torch.full(blocked[0].shape, float("-inf"), device=x.device))
            token_ids = self._sample(x, requests)
        return _output(logits, token_ids, params)

    def _blocked(self, requests: list[Request], vocab: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, ids) of stop and eos ids for requests still short of min_tokens."""
        rows, ids = [], []
        for i, r in enumerate(requests):
            p = r.sampling_params
            if not p.min_tokens or r.num_outputs_with_pending >= p.min_tokens:
                continue
            stop = set(p.stop_token_ids) if p.ignore_eos else self.eos_token_ids | set(p.stop_token_ids)
            stop = [t for t in stop if 0 <= t < vocab]
            rows += [i] * len(stop)
            ids += stop
        return (to_device(rows, device), to_device(ids, device)) if rows else None

    def _sample(self, x: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        rows = [i for i, r in enumerate(requests) if not r.sampling_params.greedy]
        every = len(rows) == len(requests)
        token_ids = torch.empty(len(requests), dtype=torch.long, device=x.device) if every else greedy_ids(x)
        if not rows:
            return token_ids
        sampled = [requests[i] for i in rows]
        rows_t = to_device(rows, x.device)
        # On an accelerator top_p sorts the whole vocabulary: no host check of whether the candidates suffice.
        candidates = TOP_P_CANDIDATES if self.decide_on_host else x.shape[1]
        w = _weights(x if every else x[rows_t], [r.sampling_params for r in sampled], candidates)
        picked = self._draw(w, to_device(self._keys(sampled), x.device))
        if every:
            return picked
        token_ids[rows_t] = picked
        return token_ids

    def _keys(self, requests: list[Request]) -> torch.Tensor:
        """One int64 key per row. A seeded request's key is a function of (seed, number of tokens it has
        generated) only, so its draw is the same alone or batched, after a prefix-cache hit, a chunked
        prefill or a preemption; unseeded requests get fresh random keys."""
        seeded = [r.seed is not None for r in requests]
        keys = torch.randint(-(1 << 63), (1 << 63) - 1, (len(requests),), generator=self.generator)
        if any(seeded):
            seeds = torch.tensor([(r.seed if s else 0) % (1 << 63) for r, s in zip(requests, seeded)])
            positions = torch.tensor([r.num_outputs_with_pending for r in requests])
            keys = torch.where(torch.tensor(seeded), _mix(_mix(seeds) + positions * _GOLDEN), keys)
        return keys

    def _draw(self, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """One token per row with probability proportional to w, as an exponential race: token i
        finishes at E_i / w_i with E_i ~ Exp(1), the first one wins (vLLM's probs / q). E_i is a hash
        of (key, i), so a token's odds move only with its own weight: a rounding difference in the
        logits changes the winner only in a near tie (an inverse-CDF draw moves every token after a
        changed one). Noise for the whole vocabulary costs ~1 ms a row on CPU, so only the
        RACE_CANDIDATES most likely tokens race at first, the rest as one entrant weighing their total
        mass with its own Exp(1); where that entrant wins (rarely), the rest race among themselves.
        Both stages are exact: a race's first finisher is independent of its finishing time."""
        vocab = w.shape[1]
        head_w, head_ids = w.topk(min(RACE_CANDIDATES, vocab), -1)
        head_time, j = (_exponential(keys.unsqueeze(1), head_ids) / head_w).min(-1)
        token_ids = head_ids.gather(1, j.unsqueeze(1)).squeeze(1)
        tail = w.scatter_(1, head_ids, 0.0)  # w is ours: the tail's weights, the head's zeroed
        tail_entrant = _exponential(keys, torch.full_like(keys, vocab))
        in_tail = tail_entrant / tail.sum(-1) < head_time
        if self.decide_on_host and not in_tail.any():
            return token_ids
        ids = torch.arange(vocab, device=w.device)
        if not self.decide_on_host:  # every row races the rest, kept where the entrant won
            return torch.where(in_tail, (_exponential(keys.unsqueeze(1), ids) / tail).argmin(-1), token_ids)
        token_ids[in_tail] = (_exponential(keys[in_tail].unsqueeze(1), ids) / tail[in_tail]).argmin(-1)
        return token_ids


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64: a bijection that spreads every input bit over the output.
    Shifts are masked to be logical (torch shifts int64 arithmetically)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _MIX1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _MIX2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def _exponential(keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Exp(1) numbers, each a function of its (key, counter) pair alone: a counter-based stream.
    keys and counters broadcast against each other."""
    return uniform(_mix(keys + _mix(counters + 1))).log_().neg_()


def uniform(bits: torch.Tensor) -> torch.Tensor:
    """int64 random bits to float32 in (0, 1), never 0 or 1. Their top 23 bits, so n + 0.5 is exact in float32:
    with 24 the largest value rounded to 1.0, its Exp(1) to 0, and a zero-weight token's 0 / 0 (NaN) won a race."""
    return (((bits >> 41) & ((1 << 23) - 1)).float() + 0.5) * (1.0 / (1 << 23))


def apply_penalties(x: torch.Tensor, rows: list[int], requests: list[Request],
                    last_inputs: torch.Tensor | None = None) -> None:
    """In place on the given rows of logits, all rows at once.

    Repetition (vLLM/HF) counts prompt and output and shrinks positive logits, grows negative ones;
    frequency and presence (OpenAI) count output tokens only. A request's latest output token still in
    flight (async scheduling) is this step's input, last_inputs[i], counted on the device."""
    ps = [requests[i].sampling_params for i in rows]
    dev = x.device
    rows_t = to_device(rows, dev)
    z = x[rows_t]
    seen = torch.zeros_like(z, dtype=torch.bool)
    counts = torch.zeros_like(z)
    seen_rows = [j for j, r in enumerate(rows) for _ in requests[r].token_ids]
    output_rows = [j for j, r in enumerate(rows) for _ in range(requests[r].num_output_tokens)]
    # index_put_ with values made on the device: `seen[i, j] = True` copies the scalar from the host and
    # waits for the device (an H200 under torch.cuda.set_sync_debug_mode); so does min_tokens' -inf.
    seen.index_put_((to_device(seen_rows, dev), to_device([t for r in rows for t in requests[r].token_ids], dev)),
                    torch.ones(len(seen_rows), dtype=torch.bool, device=dev))
    if output_rows:
        counts.index_put_((to_device(output_rows, dev),
                           to_device([t for r in rows for t in requests[r].output_token_ids], dev)),
                          torch.ones(len(output_rows), device=dev), accumulate=True)
    in_flight = [j for j, r in enumerate(rows) if requests[r].num_pending_tokens]
    if in_flight:
        j_t = to_device(in_flight, dev)
        tokens = last_inputs[rows_t[j_t]]
        seen.index_put_((j_t, tokens), torch.ones(len(in_flight), dtype=torch.bool, device=dev))
        counts.index_put_((j_t, tokens), torch.ones(len(in_flight), device=dev), accumulate=True)
    repetition = _column([p.repetition_penalty for p in ps], z)
    z = torch.where(seen, torch.where(z > 0, z / repetition, z * repetition), z)
    z -= _column([p.frequency_penalty for p in ps], z) * counts
    z -= _column([p.presence_penalty for p in ps], z) * (counts > 0)
    x[rows_t] = z


def _weights(x: torch.Tensor, ps: list[SamplingParams], top_p_candidates: int = TOP_P_CANDIDATES) -> torch.Tensor:
    """Unnormalised probabilities after temperature, top_k, top_p and min_p (excluded tokens: 0).

    Working in place on exp((x - max) / T), where the most likely token weighs exactly 1, saves
    passes over [B, V]: no step needs a normalised softmax."""
    temperature = _column([p.temperature for p in ps], x)
    w = (x - x.amax(-1, keepdim=True)).div_(temperature).exp_()
    top_k = [min(p.top_k, w.shape[1]) for p in ps]
    if any(top_k):
        k = _column(top_k, x, torch.long).squeeze(1)
        kth = w.topk(max(top_k), -1).values.gather(1, (k.clamp(min=1) - 1).unsqueeze(1))
        w.masked_fill_((k > 0).unsqueeze(1) & (w < kth), 0.0)
    rows = [j for j, p in enumerate(ps) if p.top_p < 1.0]
    if rows:
        top_p = _column([ps[j].top_p for j in rows], x)
        k = min(top_p_candidates, w.shape[1])
        if len(rows) == len(ps):
            w.masked_fill_(_top_p_drop(w, top_p, k), 0.0)
        else:
            rows_t = to_device(rows, x.device)
            w[rows_t] = w[rows_t].masked_fill(_top_p_drop(w[rows_t], top_p, k), 0.0)
    if any(p.min_p > 0 for p in ps):
        # The most likely token still weighs 1, so p < min_p * p_max reads w < min_p.
        w.masked_fill_(w < _column([p.min_p for p in ps], x), 0.0)
    return w


def _top_p_drop(w: torch.Tensor, top_p: torch.Tensor, k: int) -> torch.Tensor:
    """True outside the smallest set of most likely tokens whose probability reaches top_p."""
    values, ids = w.topk(k, -1)
    probs = values / w.sum(-1, keepdim=True)
    cum = probs.cumsum(-1)
    drop = torch.ones_like(w, dtype=torch.bool).scatter_(1, ids, cum - probs >= top_p)
    short = cum[:, -1] < top_p.squeeze(1)  # the k candidates hold less than top_p
    if k < w.shape[1] and short.any():
        drop[short] = _top_p_drop(w[short], top_p[short], w.shape[1])
    return drop


def _output(logits: torch.Tensor, token_ids: torch.Tensor, params: list[SamplingParams]) -> SamplerOutput:
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    out = SamplerOutput(token_ids, to_host(token_ids), params, rows)
    if not rows:
        return out
    # vLLM v1's default "raw_logprobs": before penalties, temperature and truncation.
    # logprob = logit - logsumexp, without materialising a [B, V] log_softmax.
    rows_t = to_device(rows, logits.device)
    x = logits if len(rows) == len(params) else logits[rows_t]
    lse = x.float().logsumexp(-1, keepdim=True)
    chosen_logit = x.gather(1, token_ids[rows_t].unsqueeze(1))
    ranks = (x > chosen_logit).sum(-1) + 1
    top_logits, top_ids = x.topk(max(params[i].logprobs for i in rows), -1)
    out.host_logprobs = tuple(to_host(t) for t in ((chosen_logit.float() - lse).squeeze(1), ranks,
                                                   top_logits.float() - lse, top_ids))
    return out
