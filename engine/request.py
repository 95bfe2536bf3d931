"""A request as the scheduler sees it: token ids, progress and the KV blocks it holds."""
import enum
import time
from dataclasses import dataclass, field

import torch

from engine.params import PoolingParams, SamplingParams


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def finished(self) -> bool:
        # _value_, not value (a descriptor call): this is asked for every sampled token.
        return self._value_ >= RequestStatus.FINISHED_STOPPED._value_


FINISH_REASONS = {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
                  RequestStatus.FINISHED_ABORTED: "abort"}


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    token_ids: list[int]  # prompt then output, one list so a decode step appends in place
    sampling_params: SamplingParams | None = None
    pooling_params: PoolingParams | None = None
    token_type_ids: list[int] | None = None  # encoder text pairs
    max_tokens: int = 0  # output budget resolved against max_model_len
    num_prompt_tokens: int = 0
    num_computed_tokens: int = 0
    # Tokens sampled by a step still in flight (async scheduling): counted, not yet in token_ids.
    num_pending_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache
    block_ids: list[int] = field(default_factory=list)  # replaced when its blocks change, never edited (BlockTable)
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    seed: int | None = None  # sampling seed; n > 1 children of a seeded request get seed, seed + 1, ...
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    # Filled by the model runner for pooling requests.
    pooled: torch.Tensor | None = None
    # Its token is the argmax of the raw logits and it wants no logprobs (most requests): read by the sampler's
    # one-pass check every step, so decided once from parameters that do not change.
    argmax_only: bool = field(init=False, default=False)

    def __post_init__(self):
        if not self.num_prompt_tokens:
            self.num_prompt_tokens = len(self.token_ids)
        p = self.sampling_params
        self.argmax_only = p is not None and p.plain_greedy and p.logprobs is None

    @property
    def is_pooling(self) -> bool:
        return self.pooling_params is not None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_tokens_with_pending(self) -> int:
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def num_outputs_with_pending(self) -> int:
        return self.num_output_tokens + self.num_pending_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]
