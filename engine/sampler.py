"""Turns the last-position logits of a batch into one token per request, vLLM style.

Per request: repetition/frequency/presence penalties, logit_bias and min_tokens masking, then greedy argmax or
temperature -> top_k -> top_p -> min_p -> a draw. Logprobs are taken from the raw logits."""
from dataclasses import dataclass

import torch

from engine.outputs import Logprob
from engine.params import SamplingParams
from engine.request import Request

# top_p first looks among this many most likely tokens: a full sort costs ~2 ms per row of a 50k
# vocabulary on CPU, and rows whose top_p mass lies beyond the candidates fall back to it.
TOP_P_CANDIDATES = 256


@dataclass(slots=True)
class SampledToken:
    token_id: int
    logprob: float | None  # of the sampled token, when logprobs were asked for
    logprobs: dict[int, Logprob] | None  # sampled token first, then the top `params.logprobs`


def _penalised(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


class Sampler:
    def __init__(self, eos_token_ids: set[int]):
        self.eos_token_ids = set(eos_token_ids)
        # Unseeded requests share this one; seeded requests only ever touch their own generator.
        self.generator = torch.Generator()
        self.generator.seed()

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> list[SampledToken]:
        params = [r.sampling_params for r in requests]
        penalised = [i for i, p in enumerate(params) if _penalised(p)]
        blocked = {i: ids for i, r in enumerate(requests) if (ids := self._blocked_ids(r, logits.shape[1]))}
        biased = [i for i, p in enumerate(params) if p.logit_bias]
        if not penalised and not blocked and not biased and all(p.greedy for p in params):
            token_ids = logits.argmax(-1)
        else:
            # Copy only when editing in place: the caller's logits stay raw for logprobs.
            x = logits.to(torch.float32, copy=bool(penalised or blocked or biased))
            for i in penalised:
                _apply_penalties(x[i], requests[i])
            for i in biased:
                bias = params[i].logit_bias
                x[i, list(bias)] += torch.tensor(list(bias.values()))
            for i, ids in blocked.items():
                x[i, ids] = float("-inf")
            token_ids = self._sample(x, requests)
        return _outputs(logits, token_ids, params)

    def _blocked_ids(self, r: Request, vocab: int) -> list[int]:
        """Stop and eos ids while the request is short of min_tokens."""
        p = r.sampling_params
        if r.num_output_tokens >= p.min_tokens:
            return []
        ids = set(p.stop_token_ids) if p.ignore_eos else self.eos_token_ids | set(p.stop_token_ids)
        return sorted(t for t in ids if 0 <= t < vocab)

    def _sample(self, x: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        rows = [i for i, r in enumerate(requests) if not r.sampling_params.greedy]
        every = len(rows) == len(requests)
        token_ids = torch.empty(len(requests), dtype=torch.long) if every else x.argmax(-1)  # greedy rows
        if not rows:
            return token_ids
        w = _weights(x if every else x[rows], [requests[i].sampling_params for i in rows])
        # One uniform per request and step, from its own generator when seeded, so a seeded
        # request draws the same numbers whatever else shares the batch.
        u = torch.empty(len(rows))
        shared = [j for j, i in enumerate(rows) if requests[i].generator is None]
        for j, i in enumerate(rows):
            if requests[i].generator is not None:
                u[j] = torch.rand(1, generator=requests[i].generator)
        if shared:
            u[shared] = torch.rand(len(shared), generator=self.generator)
        # Inverse CDF (multinomial is ~10x slower on CPU). 1 - u lies in (0, 1], so the first
        # index whose cdf reaches it exists and has a nonzero weight.
        cdf = w.cumsum_(-1)
        token_ids[rows] = torch.searchsorted(cdf, (1 - u).unsqueeze(1) * cdf[:, -1:]).squeeze(1)
        return token_ids


def _apply_penalties(row: torch.Tensor, r: Request) -> None:
    """In place on one row of logits, touching only the ids the request has seen."""
    p = r.sampling_params
    if p.repetition_penalty != 1.0:
        # vLLM/HF: over prompt and output; shrinks positive logits, grows negative ones.
        seen = torch.tensor(r.token_ids, dtype=torch.long).unique()
        v = row[seen]
        row[seen] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
    if p.frequency_penalty or p.presence_penalty:
        # OpenAI: over output tokens only.
        ids, counts = torch.tensor(r.output_token_ids, dtype=torch.long).unique(return_counts=True)
        row[ids] -= p.frequency_penalty * counts + p.presence_penalty


def _weights(x: torch.Tensor, ps: list[SamplingParams]) -> torch.Tensor:
    """Unnormalised probabilities after temperature, top_k, top_p and min_p (excluded tokens: 0).

    Working in place on exp((x - max) / T), where the most likely token weighs exactly 1, saves
    passes over [B, V]: no step needs a normalised softmax."""
    temperature = torch.tensor([p.temperature for p in ps]).unsqueeze(1)
    w = (x - x.amax(-1, keepdim=True)).div_(temperature).exp_()
    k = torch.tensor([min(p.top_k, w.shape[1]) for p in ps])
    if k.any():
        kth = w.topk(int(k.max()), -1).values.gather(1, (k.clamp(min=1) - 1).unsqueeze(1))
        w.masked_fill_((k > 0).unsqueeze(1) & (w < kth), 0.0)
    rows = [j for j, p in enumerate(ps) if p.top_p < 1.0]
    if rows:
        top_p = torch.tensor([ps[j].top_p for j in rows]).unsqueeze(1)
        k = min(TOP_P_CANDIDATES, w.shape[1])
        if len(rows) == len(ps):
            w.masked_fill_(_top_p_drop(w, top_p, k), 0.0)
        else:
            w[rows] = w[rows].masked_fill(_top_p_drop(w[rows], top_p, k), 0.0)
    if any(p.min_p > 0 for p in ps):
        # The most likely token still weighs 1, so p < min_p * p_max reads w < min_p.
        w.masked_fill_(w < torch.tensor([p.min_p for p in ps]).unsqueeze(1), 0.0)
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


def _outputs(logits: torch.Tensor, token_ids: torch.Tensor,
             params: list[SamplingParams]) -> list[SampledToken]:
    ids = token_ids.tolist()
    out = [SampledToken(t, None, None) for t in ids]
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return out
    # vLLM v1's default "raw_logprobs": before penalties, temperature and truncation.
    # logprob = logit - logsumexp, without materialising a [B, V] log_softmax.
    x = logits if len(rows) == len(params) else logits[rows]
    lse = x.float().logsumexp(-1, keepdim=True)
    chosen = token_ids[rows].unsqueeze(1)
    chosen_logit = x.gather(1, chosen)
    ranks = ((x > chosen_logit).sum(-1) + 1).tolist()
    chosen_lp = chosen_logit.float() - lse
    top_logits, top_ids = x.topk(max(params[i].logprobs for i in rows), -1)
    top_lp = top_logits.float() - lse
    for i, value, rank, tl, ti in zip(rows, chosen_lp.squeeze(1).tolist(), ranks, top_lp.tolist(),
                                      top_ids.tolist()):
        d = {ids[i]: Logprob(value, rank)}
        for r, (t, v) in enumerate(zip(ti[:params[i].logprobs], tl), start=1):
            d.setdefault(t, Logprob(v, r))
        out[i].logprob, out[i].logprobs = value, d
    return out
