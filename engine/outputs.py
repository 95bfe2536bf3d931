"""Output objects shaped like vLLM's, so code moves between the two with an import change."""
from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None

    def add_delta(self, later: "CompletionOutput") -> None:
        """Append a later DELTA of the same choice: its text, token ids and logprobs; its finish and
        cumulative logprob replace these."""
        self.text += later.text
        self.token_ids.extend(later.token_ids)
        if self.logprobs is not None and later.logprobs is not None:
            self.logprobs.extend(later.logprobs)
        self.cumulative_logprob, self.finish_reason, self.stop_reason = (
            later.cumulative_logprob, later.finish_reason, later.stop_reason)


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: dict | None = None  # as vLLM's (which holds a RequestMetrics there, or None)

    def add_delta(self, later: "RequestOutput") -> None:
        """Merge the DELTA output of a later step into this one (which owns its lists): text, token ids
        and logprobs appended per choice, the later finish, cumulative logprob and counters."""
        for o in later.outputs:
            for into in self.outputs:  # a scan, not a dict: most requests have one choice, merged every step
                if into.index == o.index:
                    into.add_delta(o)
                    break
            else:
                self.outputs.append(o)
        self.finished, self.num_cached_tokens, self.metrics = later.finished, later.num_cached_tokens, later.metrics


@dataclass(slots=True)
class EmbeddingOutput:
    """data: the vector, float32 (vLLM's PoolingOutput.data); `embedding` is it as a list, made on access: a
    corpus' vectors as Python floats cost more host time than a GPU spends embedding them, and a server encodes
    base64 straight from the array."""
    data: np.ndarray

    @property
    def embedding(self) -> list[float]:
        return self.data.tolist()

    @property
    def hidden_size(self) -> int:
        return self.data.shape[0]


@dataclass(slots=True)
class ScoringOutput:
    score: float


@dataclass(slots=True)
class ClassificationOutput:
    probs: list[float]

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass(slots=True)
class PoolingRequestOutput:
    """vLLM's EmbeddingRequestOutput / ScoringRequestOutput / ClassificationRequestOutput."""
    request_id: str
    outputs: EmbeddingOutput | ScoringOutput | ClassificationOutput
    prompt_token_ids: list[int]
    finished: bool = True
    num_cached_tokens: int = 0


EmbeddingRequestOutput = ScoringRequestOutput = ClassificationRequestOutput = PoolingRequestOutput


@dataclass(slots=True)
class PoolingJobOutput:
    """Every output of one embed / score / classify call, in input order, once the last is done."""
    request_id: str
    outputs: list[PoolingRequestOutput]
    finished: bool = True
