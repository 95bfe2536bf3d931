"""The offline API, mirroring vLLM's `LLM`: swap the import and the code runs."""
import dataclasses
from typing import Callable

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import PoolingJobOutput, PoolingRequestOutput, RequestOutput
from engine.params import PoolingParams, RequestOutputKind, SamplingParams
from engine.tokenizer import apply_chat_template, pair_texts

Prompt = str | list[int] | dict
# A pooling call's inputs are encoded a slice at a time, each while the device runs the step launched before it
# (async scheduling), not all before the first step: tokenizing a corpus takes as long as embedding it on a GPU.
# The slices grow from the first, so the device waits for a few inputs' tokens, not for a whole slice's.
POOLING_FIRST_SLICE, POOLING_SLICE = 32, 256


def slices(n: int) -> list[tuple[int, int]]:
    """[start, end) of each slice of n inputs: POOLING_FIRST_SLICE, twice that, ... up to POOLING_SLICE each."""
    bounds, start, size = [], 0, min(POOLING_FIRST_SLICE, POOLING_SLICE)
    while start < n:
        bounds.append((start, min(n, start + size)))
        start, size = start + size, min(2 * size, POOLING_SLICE)
    return bounds


def prompt_of(p: Prompt) -> str | list[int]:
    """vLLM's prompt forms: a string, token ids, {"prompt": ...} or {"prompt_token_ids": [...]}."""
    if isinstance(p, dict):
        if "prompt_token_ids" in p:
            return list(p["prompt_token_ids"])
        return p["prompt"]
    return p


class LLM:
    def __init__(self, model: str, task: str = "auto", dtype: str = "auto", max_model_len: int | None = None,
                 **kwargs):
        self.engine = LLMEngine(EngineConfig(model=model, task=task, dtype=dtype, max_model_len=max_model_len,
                                             **kwargs))

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        ids, done = [], {}
        try:
            for p, sp in zip(prompts, params):
                ids.append(self.engine.new_id())
                # As vLLM's LLM: one output per prompt at its end, nothing built per step.
                sp = dataclasses.replace(sp, output_kind=RequestOutputKind.FINAL_ONLY)
                self.engine.add_generation(ids[-1], prompt_of(p), sp)
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
        except BaseException:  # a bad prompt or an interrupt: nothing stays in the engine
            for rid in ids:
                self.engine.abort(rid)
            raise
        return [done[rid] for rid in ids]

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template_kwargs: dict | None = None, use_tqdm: bool = False) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [apply_chat_template(self.engine.tokenizer, c, add_generation_prompt, continue_final_message,
                                       chat_template_kwargs) for c in conversations]
        return self.generate(prompts, sampling_params)

    def embed(self, prompts: Prompt | list[Prompt], truncate_prompt_tokens: int | None = None,
              pooling_params: PoolingParams | None = None, use_tqdm: bool = False) -> list[PoolingRequestOutput]:
        params = self._pooling_params(pooling_params, truncate_prompt_tokens)
        return self._run(lambda rid, part: self.engine.add_embed(rid, part, params),
                         [prompt_of(p) for p in self._as_list(prompts)])

    def classify(self, prompts: Prompt | list[Prompt], truncate_prompt_tokens: int | None = None,
                 pooling_params: PoolingParams | None = None, use_tqdm: bool = False) -> list[PoolingRequestOutput]:
        params = self._pooling_params(pooling_params, truncate_prompt_tokens)
        return self._run(lambda rid, part: self.engine.add_classify(rid, part, params),
                         [prompt_of(p) for p in self._as_list(prompts)])

    def score(self, data_1: str | list[str], data_2: str | list[str], truncate_prompt_tokens: int | None = None,
              pooling_params: PoolingParams | None = None, use_tqdm: bool = False) -> list[PoolingRequestOutput]:
        params = self._pooling_params(pooling_params, truncate_prompt_tokens)
        return self._run(lambda rid, part: self.engine.add_score(rid, [q for q, _ in part], [d for _, d in part], params),
                         pair_texts(data_1, data_2))

    @staticmethod
    def _as_list(prompts: Prompt | list[Prompt]) -> list[Prompt]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            return [prompts]
        return list(prompts)

    @staticmethod
    def _pooling_params(params: PoolingParams | None, truncate: int | None) -> PoolingParams:
        params = params or PoolingParams()
        if truncate is not None:
            params.truncate_prompt_tokens = truncate
        return params

    def _run(self, add: Callable[[str, list], None], inputs: list) -> list[PoolingRequestOutput]:
        """add(request id, slice of inputs) encodes a slice into a pooling call; one call per slice (slices), a
        step launched after each, their outputs in input order."""
        parts = [inputs[start:end] for start, end in slices(len(inputs))] or [inputs]
        rids, done = [], {}
        try:
            for part in parts:
                rids.append(self.engine.new_id())
                add(rids[-1], part)
                self._collect(self.engine.step(), rids, done)
            while len(done) < len(rids):
                if not self.engine.has_unfinished():
                    raise RuntimeError(f"the engine ran out of work before pooling calls {rids} finished")
                self._collect(self.engine.step(), rids, done)
        except BaseException:
            for rid in rids:
                self.engine.abort(rid)
            raise
        return [out for rid in rids for out in done[rid]]

    @staticmethod
    def _collect(outputs: list, rids: list[str], done: dict[str, list[PoolingRequestOutput]]) -> None:
        for out in outputs:
            if isinstance(out, PoolingJobOutput) and out.request_id in rids:
                done[out.request_id] = out.outputs
