"""Per-request parameters, mirroring vLLM's SamplingParams and PoolingParams."""
import enum
from dataclasses import dataclass, field

MAX_STOP_STRINGS = 64


class RequestOutputKind(enum.Enum):
    """What each output of a generation carries (vLLM's): everything so far, only what is new since the
    previous output (streams), or one output at the end (non-streaming callers)."""
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    logprobs: int | None = None  # number of top logprobs per output token
    skip_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        checks = [
            (self.n >= 1, "n", "must be at least 1"),
            (self.temperature >= 0, "temperature", "must be non-negative"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "must be -1 (off) or a positive integer"),
            (0 <= self.min_p <= 1, "min_p", "must be in [0, 1]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]"),
            (self.repetition_penalty > 0, "repetition_penalty", "must be positive"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be at least 1"),
            (self.min_tokens >= 0, "min_tokens", "must be non-negative"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
             "must not exceed max_tokens"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "must be in [0, 20]"),
            (len(self.stop) <= MAX_STOP_STRINGS, "stop", f"has more than {MAX_STOP_STRINGS} strings"),
            (all(self.stop), "stop", "must not contain empty strings"),
            (all(isinstance(t, int) and t >= 0 for t in self.logit_bias or {}), "logit_bias",
             "keys must be token ids"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")

    @property
    def has_penalties(self) -> bool:
        """Repetition, presence or frequency penalties: the draw reads the tokens generated so far."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits: nothing edits them first (most requests; see Request.argmax_only)."""
        return self.greedy and not self.min_tokens and not self.logit_bias and not self.has_penalties


@dataclass(slots=True)
class PoolingParams:
    """What a pooling request returns: an embedding, a score or class probabilities."""
    dimensions: int | None = None  # Matryoshka truncation
    normalize: bool | None = None  # None: the model's default
    activation: bool = True  # sigmoid/softmax on classifier logits
    truncate_prompt_tokens: int | None = None
