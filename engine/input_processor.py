"""Turns what a caller asks for into engine requests (vLLM v1's input processor): prompts encoded and
truncated, limits checked, score pairs and yes/no prompts built. Every error here is the caller's and
names the field; nothing reaches the scheduler until the whole call is valid."""
from dataclasses import dataclass

from engine.kv_cache_manager import cdiv
from engine.params import PoolingParams, SamplingParams
from engine.request import Request
from engine.tokenizer import YesNoPrompt, encode, encode_pair, pair_texts


@dataclass(slots=True)
class PoolingJob:
    """The engine requests behind one embed / classify / score call; `kind` says how their results
    combine: "embed", "classify", "score" (one score per request) or "pair_cosine" (requests in
    pairs, scored by the cosine of their embeddings)."""
    request_id: str
    kind: str
    params: PoolingParams
    requests: list[Request]


class InputProcessor:
    def __init__(self, tokenizer, task: str, served_name: str, max_model_len: int, vocab_size: int,
                 is_decoder: bool, block_size: int, num_blocks: int | None, hidden_size: int,
                 matryoshka: list[int] | None, yes_no: YesNoPrompt | None, bi_encoder: bool):
        self.tokenizer = tokenizer
        self.task, self.served_name = task, served_name
        self.max_model_len, self.vocab_size, self.is_decoder = max_model_len, vocab_size, is_decoder
        self.block_size, self.num_blocks = block_size, num_blocks  # num_blocks None: no KV cache
        self.hidden_size, self.matryoshka = hidden_size, matryoshka
        self.yes_no = yes_no
        # Embedding models score a pair as the cosine of its two embeddings, as vLLM does.
        self.bi_encoder = bi_encoder

    def encode(self, prompts: list[str | list[int]], truncate_prompt_tokens: int | None = None,
               add_special_tokens: bool = True) -> list[list[int]]:
        return encode(self.tokenizer, prompts, self.max_model_len, truncate_prompt_tokens, self.vocab_size,
                      add_special_tokens, keep_end=self.is_decoder)

    # ---- generation ---------------------------------------------------------------------------
    def generation(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> list[Request]:
        """The n engine requests of one generation; they share the prompt."""
        if self.task != "generate":
            raise ValueError(f"model {self.served_name} serves task {self.task!r}, not generation")
        bad = [t for t in params.logit_bias or {} if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"logit_bias keys must be token ids in [0, {self.vocab_size}), got {bad[:5]}")
        ids = self.encode([prompt], params.truncate_prompt_tokens, add_special_tokens=not self._has_bos(prompt))[0]
        room = self.max_model_len - len(ids)
        if room < 1:
            raise ValueError(f"the prompt has {len(ids)} tokens, which leaves no room to generate within "
                             f"max_model_len {self.max_model_len}")
        max_tokens = room if params.max_tokens is None else params.max_tokens
        if max_tokens > room:
            raise ValueError(f"max_tokens is too large: {max_tokens}; the prompt has {len(ids)} tokens and "
                             f"max_model_len is {self.max_model_len}, so at most {room} tokens can be generated")
        need = params.n * cdiv(len(ids) + max_tokens, self.block_size)
        if need > self.num_blocks:
            raise ValueError(f"n={params.n} sequences of {len(ids) + max_tokens} tokens need {need} KV-cache "
                             f"blocks; the pool has {self.num_blocks}")
        return [Request(f"{request_id}#{i}" if params.n > 1 else request_id, list(ids), sampling_params=params,
                        max_tokens=max_tokens, seed=None if params.seed is None else params.seed + i)
                for i in range(params.n)]

    def _has_bos(self, prompt: str | list[int]) -> bool:
        # Chat templates already write the BOS token; adding another changes the model's input.
        bos = self.tokenizer.bos_token
        return isinstance(prompt, list) or (bos is not None and prompt.startswith(bos))

    # ---- pooling ------------------------------------------------------------------------------
    def embed(self, request_id: str, prompts: list[str | list[int]], params: PoolingParams) -> PoolingJob:
        if not prompts:
            raise ValueError("input must not be empty")
        if self.task != "embed" and not self.bi_encoder:
            raise ValueError(f"model {self.served_name} serves task {self.task!r}, not embeddings")
        self._check_dimensions(params.dimensions)
        return self._job(request_id, "embed", params, self.encode(prompts, params.truncate_prompt_tokens))

    def classify(self, request_id: str, prompts: list[str | list[int]], params: PoolingParams) -> PoolingJob:
        if self.task != "classify":
            raise ValueError(f"model {self.served_name} serves task {self.task!r}, not classification")
        if not prompts:
            raise ValueError("input must not be empty")
        return self._job(request_id, "classify", params, self.encode(prompts, params.truncate_prompt_tokens))

    def score(self, request_id: str, text_1: str | list[str], text_2: str | list[str],
              params: PoolingParams) -> PoolingJob:
        if self.task not in ("score", "embed"):
            raise ValueError(f"model {self.served_name} serves task {self.task!r}, not scoring")
        pairs, t = pair_texts(text_1, text_2), params.truncate_prompt_tokens
        if self.bi_encoder:
            return self._job(request_id, "pair_cosine", params,
                             self.encode([x for pair in pairs for x in pair], t))
        if self.yes_no is not None:
            return self._job(request_id, "score", params,
                             self.yes_no.encode(pairs, self.max_model_len, t))
        encoded = [encode_pair(self.tokenizer, q, d, self.max_model_len, t) for q, d in pairs]
        return self._job(request_id, "score", params, [ids for ids, _ in encoded], [types for _, types in encoded])

    def _job(self, request_id: str, kind: str, params: PoolingParams, prompts: list[list[int]],
             token_types: list[list[int] | None] | None = None) -> PoolingJob:
        types = token_types or [None] * len(prompts)
        for ids in prompts:
            if self.num_blocks is not None and cdiv(len(ids), self.block_size) > self.num_blocks:
                raise ValueError(f"the input of {len(ids)} tokens does not fit the KV-cache pool")
        return PoolingJob(request_id, kind, params,
                          [Request(f"{request_id}#{i}", ids, pooling_params=params, token_type_ids=tt)
                           for i, (ids, tt) in enumerate(zip(prompts, types))])

    def _check_dimensions(self, dims: int | None) -> None:
        if dims is None:
            return
        if self.matryoshka is None:
            raise ValueError(f"model {self.served_name} does not support Matryoshka embeddings, "
                             f"so dimensions must not be set")
        if not 1 <= dims <= self.hidden_size or (self.matryoshka and dims not in self.matryoshka):
            allowed = self.matryoshka or f"1..{self.hidden_size}"
            raise ValueError(f"dimensions must be one of {allowed}, got {dims}")
