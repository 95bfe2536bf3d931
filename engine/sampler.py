"""Turns the last-position logits of a batch into one token per request, vLLM style.

Order per request: repetition/frequency/presence penalties, min_tokens masking, then greedy argmax
or temperature -> top_k -> top_p -> min_p -> sampling. Logprobs are taken from the raw logits."""
from dataclasses import dataclass

import torch

from engine.outputs import Logprob
from engine.params import SamplingParams
from engine.request import Request


@dataclass(slots=True)
class SampledToken:
    token_id: int
    logprob: float | None  # of the sampled token, when logprobs were asked for
    logprobs: dict[int, Logprob] | None  # sampled token first, then the top `params.logprobs`


def _penalised(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _padded(rows: list[list[int]], pad: int) -> torch.Tensor:
    width = max(map(len, rows), default=0)
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)


class Sampler:
    def __init__(self, eos_token_ids: set[int]):
        self.eos_token_ids = set(eos_token_ids)
        # Unseeded requests share this one; seeded requests only ever touch their own generator.
        self.generator = torch.Generator()
        self.generator.seed()

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> list[SampledToken]:
        params = [r.sampling_params for r in requests]
        blocked = [self._blocked_ids(r, logits.shape[1]) for r in requests]
        if all(p.greedy and not _penalised(p) for p in params) and not any(blocked):
            token_ids = logits.argmax(-1)
        else:
            x = logits.to(torch.float32, copy=True)  # never write into the caller's logits
            self._apply_penalties(x, requests)
            for i, ids in enumerate(blocked):
                if ids:
                    x[i, ids] = float("-inf")
            token_ids = self._sample(x, requests)
        return self._outputs(logits, token_ids, params)

    def _blocked_ids(self, r: Request, vocab: int) -> list[int]:
        """Stop and eos ids while the request is short of min_tokens."""
        p = r.sampling_params
        if r.num_output_tokens >= p.min_tokens:
            return []
        ids = set(p.stop_token_ids) if p.ignore_eos else self.eos_token_ids | set(p.stop_token_ids)
        return sorted(t for t in ids if 0 <= t < vocab)

    @staticmethod
    def _apply_penalties(x: torch.Tensor, requests: list[Request]) -> None:
        rows = [i for i, r in enumerate(requests) if _penalised(r.sampling_params)]
        if not rows:
            return
        reqs = [requests[i] for i in rows]
        ps = [r.sampling_params for r in reqs]
        vocab = x.shape[1]
        sub = x[rows]
        # Column `vocab` swallows the padding (and any id the logits do not cover).
        out = _padded([r.output_token_ids for r in reqs], vocab).clamp_(max=vocab)
        counts = torch.zeros(len(rows), vocab + 1).scatter_add_(1, out, torch.ones(out.shape))[:, :vocab]
        if any(p.repetition_penalty != 1.0 for p in ps):
            # vLLM/HF: over prompt and output tokens; shrinks positive logits, grows negative ones.
            seen = torch.zeros(len(rows), vocab + 1, dtype=torch.bool)
            seen.scatter_(1, _padded([r.token_ids for r in reqs], vocab).clamp_(max=vocab), True)
            rep = torch.tensor([p.repetition_penalty for p in ps]).unsqueeze(1)
            sub = torch.where(seen[:, :vocab], torch.where(sub > 0, sub / rep, sub * rep), sub)
        # OpenAI: over output tokens only.
        freq = torch.tensor([p.frequency_penalty for p in ps]).unsqueeze(1)
        pres = torch.tensor([p.presence_penalty for p in ps]).unsqueeze(1)
        x[rows] = sub - freq * counts - pres * (counts > 0)

    def _sample(self, x: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        token_ids = x.argmax(-1)  # the answer for greedy rows
        rows = [i for i, r in enumerate(requests) if not r.sampling_params.greedy]
        if not rows:
            return token_ids
        ps = [requests[i].sampling_params for i in rows]
        probs = _warp(x[rows], ps).softmax(-1)
        seeded = [j for j, i in enumerate(rows) if requests[i].generator is not None]
        shared = [j for j, i in enumerate(rows) if requests[i].generator is None]
        for j in seeded:
            token_ids[rows[j]] = torch.multinomial(probs[j], 1, generator=requests[rows[j]].generator)[0]
        if shared:
            picked = torch.multinomial(probs[shared], 1, generator=self.generator).squeeze(1)
            token_ids[[rows[j] for j in shared]] = picked
        return token_ids

    @staticmethod
    def _outputs(logits: torch.Tensor, token_ids: torch.Tensor,
                 params: list[SamplingParams]) -> list[SampledToken]:
        ids = token_ids.tolist()
        out = [SampledToken(t, None, None) for t in ids]
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not rows:
            return out
        # vLLM v1's default "raw_logprobs": before penalties, temperature and truncation.
        lp = torch.log_softmax(logits[rows].float(), -1)
        chosen = token_ids[rows].unsqueeze(1)
        chosen_lp = lp.gather(1, chosen)
        ranks = ((lp > chosen_lp).sum(-1) + 1).tolist()
        k = max(params[i].logprobs for i in rows)
        top_lp, top_ids = lp.topk(k, -1)
        for i, value, rank, tl, ti in zip(rows, chosen_lp.squeeze(1).tolist(), ranks,
                                          top_lp.tolist(), top_ids.tolist()):
            d = {ids[i]: Logprob(value, rank)}
            for r, (t, v) in enumerate(zip(ti[:params[i].logprobs], tl), start=1):
                d.setdefault(t, Logprob(v, r))
            out[i].logprob, out[i].logprobs = value, d
        return out


def _warp(x: torch.Tensor, ps: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top_k, top_p and min_p: excluded tokens get -inf."""
    inf = float("-inf")
    x = x / torch.tensor([p.temperature for p in ps]).unsqueeze(1)
    vocab = x.shape[1]
    k = torch.tensor([min(p.top_k, vocab) for p in ps])
    if k.any():
        kth = x.topk(int(k.max()), -1).values.gather(1, (k.clamp(min=1) - 1).unsqueeze(1))
        x = x.masked_fill((k > 0).unsqueeze(1) & (x < kth), inf)
    top_p = [j for j, p in enumerate(ps) if p.top_p < 1.0]
    if top_p:
        # Keep the smallest set of most likely tokens whose mass reaches top_p.
        sorted_x, order = x[top_p].sort(-1, descending=True)
        probs = sorted_x.softmax(-1)
        p = torch.tensor([ps[j].top_p for j in top_p]).unsqueeze(1)
        drop_sorted = probs.cumsum(-1) - probs >= p
        x[top_p] = x[top_p].masked_fill(drop_sorted.scatter(1, order, drop_sorted), inf)
    min_p = torch.tensor([p.min_p for p in ps]).unsqueeze(1)
    if min_p.any():
        probs = x.softmax(-1)
        x = x.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), inf)
    return x
