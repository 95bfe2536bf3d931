"""Turns what a caller asks for into engine requests (vLLM v1's input processor): prompts encoded and
truncated, limits checked, score pairs and yes/no prompts built. Every error here is the caller's and
names the field; nothing reaches the scheduler until the whole call is valid.

It needs only a tokenizer and the engine's InputSpec, so it runs where the caller is (AsyncLLM): a server
tokenizes while the engine steps, as vLLM's frontend does, instead of the step loop stopping for it."""
import dataclasses
from dataclasses import dataclass

from engine.kv_cache_manager import cdiv
from engine.params import PoolingParams, SamplingParams
from engine.request import Request
from engine.tokenizer import RerankTemplate, YesNoPrompt, encode, encode_pairs, pair_texts


@dataclass(slots=True)
class PoolingJob:
    """The engine requests behind one embed / classify / score call; `kind` says how their results
    combine: "embed", "classify", "score" (one score per request) or "pair_cosine" (requests in
    pairs, scored by the cosine of their embeddings)."""
    request_id: str
    kind: str
    params: PoolingParams
    requests: list[Request]


@dataclass(slots=True, frozen=True)
class InputSpec:
    """What turning calls into requests needs to know of the engine: plain values, sent to a caller in
    another process."""
    task: str
    served_name: str
    max_model_len: int
    vocab_size: int
    is_decoder: bool
    block_size: int
    num_blocks: int | None  # None: no KV cache
    hidden_size: int
    matryoshka: list[int] | None
    rerank_template: RerankTemplate | None  # decoder yes/no rerankers' prompt
    bi_encoder: bool  # an embedding model scores a pair as the cosine of its two embeddings, as vLLM does
    auto_truncate: bool  # pooling inputs over max_model_len are cut, not refused


class InputProcessor:
    def __init__(self, tokenizer, spec: InputSpec):
        self.tokenizer, self.spec = tokenizer, spec
        self.yes_no = YesNoPrompt(tokenizer, spec.rerank_template) if spec.rerank_template else None

    def encode(self, prompts: list[str | list[int]], truncate_prompt_tokens: int | None = None,
               add_special_tokens: bool = True) -> list[list[int]]:
        return encode(self.tokenizer, prompts, self.spec.max_model_len, truncate_prompt_tokens, self.spec.vocab_size,
                      add_special_tokens, keep_end=self.spec.is_decoder)

    # ---- generation ---------------------------------------------------------------------------
    def generation(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> list[Request]:
        """The n engine requests of one generation; they share the prompt."""
        if self.spec.task != "generate":
            raise ValueError(f"model {self.spec.served_name} serves task {self.spec.task!r}, not generation")
        bad = [t for t in params.logit_bias or {} if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise ValueError(f"logit_bias keys must be token ids in [0, {self.spec.vocab_size}), got {bad[:5]}")
        ids = self.encode([prompt], params.truncate_prompt_tokens, add_special_tokens=not self._has_bos(prompt))[0]
        room = self.spec.max_model_len - len(ids)
        if room < 1:
            raise ValueError(f"the prompt has {len(ids)} tokens, which leaves no room to generate within "
                             f"max_model_len {self.spec.max_model_len}")
        max_tokens = room if params.max_tokens is None else params.max_tokens
        if max_tokens > room:
            raise ValueError(f"max_tokens is too large: {max_tokens}; the prompt has {len(ids)} tokens and "
                             f"max_model_len is {self.spec.max_model_len}, so at most {room} tokens can be generated")
        need = params.n * cdiv(len(ids) + max_tokens, self.spec.block_size)
        if need > self.spec.num_blocks:
            raise ValueError(f"n={params.n} sequences of {len(ids) + max_tokens} tokens need {need} KV-cache "
                             f"blocks; the pool has {self.spec.num_blocks}")
        return [Request(f"{request_id}#{i}" if params.n > 1 else request_id, list(ids), sampling_params=params,
                        max_tokens=max_tokens, seed=None if params.seed is None else params.seed + i)
                for i in range(params.n)]

    def _has_bos(self, prompt: str | list[int]) -> bool:
        # Chat templates already write the BOS token; adding another changes the model's input.
        bos = self.tokenizer.bos_token
        return isinstance(prompt, list) or (bos is not None and prompt.startswith(bos))

    # ---- pooling ------------------------------------------------------------------------------
    def _pooling_params(self, params: PoolingParams | None) -> PoolingParams:
        params = params or PoolingParams()
        if params.truncate_prompt_tokens is None and self.spec.auto_truncate:
            return dataclasses.replace(params, truncate_prompt_tokens=-1)  # -1: to max_model_len
        return params

    def embed(self, request_id: str, prompts: list[str | list[int]], params: PoolingParams | None) -> PoolingJob:
        params = self._pooling_params(params)
        if not prompts:
            raise ValueError("input must not be empty")
        if self.spec.task != "embed" and not self.spec.bi_encoder:
            raise ValueError(f"model {self.spec.served_name} serves task {self.spec.task!r}, not embeddings")
        self._check_dimensions(params.dimensions)
        return self._job(request_id, "embed", params, self.encode(prompts, params.truncate_prompt_tokens))

    def classify(self, request_id: str, prompts: list[str | list[int]], params: PoolingParams | None) -> PoolingJob:
        params = self._pooling_params(params)
        if self.spec.task != "classify":
            raise ValueError(f"model {self.spec.served_name} serves task {self.spec.task!r}, not classification")
        if not prompts:
            raise ValueError("input must not be empty")
        return self._job(request_id, "classify", params, self.encode(prompts, params.truncate_prompt_tokens))

    def score(self, request_id: str, text_1: str | list[str], text_2: str | list[str],
              params: PoolingParams | None) -> PoolingJob:
        params = self._pooling_params(params)
        if self.spec.task not in ("score", "embed"):
            raise ValueError(f"model {self.spec.served_name} serves task {self.spec.task!r}, not scoring")
        pairs, t = pair_texts(text_1, text_2), params.truncate_prompt_tokens
        if self.spec.bi_encoder:
            return self._job(request_id, "pair_cosine", params,
                             self.encode([x for pair in pairs for x in pair], t))
        if self.yes_no is not None:
            return self._job(request_id, "score", params,
                             self.yes_no.encode(pairs, self.spec.max_model_len, t))
        ids, types = encode_pairs(self.tokenizer, pairs, self.spec.max_model_len, t)
        return self._job(request_id, "score", params, ids, types)

    def _job(self, request_id: str, kind: str, params: PoolingParams, prompts: list[list[int]],
             token_types: list[list[int] | None] | None = None) -> PoolingJob:
        types = token_types or [None] * len(prompts)
        for ids in prompts:
            if self.spec.num_blocks is not None and cdiv(len(ids), self.spec.block_size) > self.spec.num_blocks:
                raise ValueError(f"the input of {len(ids)} tokens does not fit the KV-cache pool")
        return PoolingJob(request_id, kind, params,
                          [Request(f"{request_id}#{i}", ids, pooling_params=params, token_type_ids=tt)
                           for i, (ids, tt) in enumerate(zip(prompts, types))])

    def _check_dimensions(self, dims: int | None) -> None:
        if dims is None:
            return
        matryoshka, hidden = self.spec.matryoshka, self.spec.hidden_size
        if matryoshka is None:
            raise ValueError(f"model {self.spec.served_name} does not support Matryoshka embeddings, "
                             f"so dimensions must not be set")
        if not 1 <= dims <= hidden or (matryoshka and dims not in matryoshka):
            allowed = matryoshka or f"1..{hidden}"
            raise ValueError(f"dimensions must be one of {allowed}, got {dims}")
