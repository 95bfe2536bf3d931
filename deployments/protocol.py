"""Request and response schemas of the HTTP API, with vLLM's field names, defaults and shapes.

The same pydantic objects travel through Ray Serve handles, so a Python caller of a model
deployment gets exactly what the HTTP route would have serialized.

Errors everywhere use OpenAI's shape (see `ErrorResponse`):
    {"error": {"message": str, "type": str, "param": str | null, "code": int}}
`type` is OpenAI's error type ("invalid_request_error", "authentication_error",
"not_found_error", "rate_limit_error", "server_error", ...); `code` is the HTTP status, as
vLLM sends it. Unknown request fields are ignored, as vLLM does (e.g. rerank's
`return_documents`).
"""
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# Which engine tasks serve which API. A bi-encoder scores by cosine when served with task "score".
API_TASKS = {
    "embeddings": ("embed",),
    "score": ("score", "embed"),
    "rerank": ("score", "embed"),
    "classify": ("classify",),
    "completions": ("generate",),
    "chat": ("generate",),
    "tokenize": ("generate", "embed", "score", "classify"),
    "detokenize": ("generate", "embed", "score", "classify"),
}
API_NAMES = {"embeddings": "Embeddings API", "score": "Score API", "rerank": "Rerank API",
             "classify": "Classification API", "completions": "Completions API",
             "chat": "Chat Completions API", "tokenize": "Tokenize API", "detokenize": "Detokenize API"}


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class RequestModel(BaseModel):
    """Base of every request body: unknown fields are accepted and dropped."""
    model_config = ConfigDict(extra="ignore")


def not_empty(value: Any, info: ValidationInfo) -> Any:
    """One clear error for an empty list, before pydantic reports it once per member of a union."""
    if isinstance(value, list) and not value:
        raise ValueError(f"{info.field_name} must not be empty")
    return value


# The limits the server enforces, in the schema so /openapi.json tells clients the truth.
TokenId = Annotated[int, Field(ge=0)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Texts = Annotated[list[str], Field(min_length=1)]
PromptInput = TokenIds | Annotated[list[TokenIds], Field(min_length=1)] | str | Texts
TruncatePromptTokens = Annotated[int, Field(ge=-1)] | None  # -1: to max_model_len, k: the last/first k
Seed = Annotated[int, Field(ge=-(1 << 63), le=(1 << 63) - 1)]  # what torch.Generator.manual_seed takes
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 64  # engine.params' limit (this module imports no engine code: the ingress stays light)
StopString = Annotated[str, Field(min_length=1)]


# ---------------------------------------------------------------- errors

class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ---------------------------------------------------------------- models

class ModelPermission(BaseModel):
    id: str = Field(default_factory=lambda: random_id("modelperm"))
    object: str = "model_permission"
    created: int = Field(default_factory=now)
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "servecluster"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    permission: list[ModelPermission] = Field(default_factory=list)


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard] = Field(default_factory=list)


class ModelInfo(BaseModel):
    """What the ingress learns from a model deployment at start: its card and resolved task."""
    card: ModelCard
    task: str


class PromptTokenUsageInfo(BaseModel):
    cached_tokens: int | None = None


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int | None = 0
    prompt_tokens_details: PromptTokenUsageInfo | None = None


# ---------------------------------------------------------------- embeddings

def prompt_list(value: PromptInput) -> list[str | list[int]]:
    """One prompt per item: a string, or a list of token ids."""
    if isinstance(value, str) or isinstance(value[0], int):
        return [value]
    return list(value)


class EmbeddingRequest(RequestModel):
    model: str | None = None
    input: PromptInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None
    truncate_prompt_tokens: TruncatePromptTokens = None
    add_special_tokens: bool = True
    normalize: bool | None = None

    _input_not_empty = field_validator("input", mode="before")(not_empty)

    def prompts(self) -> list[str | list[int]]:
        return prompt_list(self.input)


class EmbeddingResponseData(BaseModel):
    index: int
    object: str = "embedding"
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("embd"))
    object: str = "list"
    created: int = Field(default_factory=now)
    model: str
    data: list[EmbeddingResponseData]
    usage: UsageInfo


# ---------------------------------------------------------------- score and rerank

class ScoreRequest(RequestModel):
    model: str | None = None
    text_1: Texts | str
    text_2: Texts | str
    truncate_prompt_tokens: TruncatePromptTokens = None
    activation: bool | None = None

    _texts_not_empty = field_validator("text_1", "text_2", mode="before")(not_empty)


class ScoreResponseData(BaseModel):
    index: int
    object: str = "score"
    score: float


class ScoreResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("score"))
    object: str = "list"
    created: int = Field(default_factory=now)
    model: str
    data: list[ScoreResponseData]
    usage: UsageInfo


class RerankRequest(RequestModel):
    model: str | None = None
    query: str  # may be empty: scored like any other text, as vLLM does
    documents: list[str]
    top_n: int = 0  # 0 or less: all documents, as vLLM
    truncate_prompt_tokens: TruncatePromptTokens = None
    activation: bool | None = None


class RerankDocument(BaseModel):
    text: str | None = None


class RerankResult(BaseModel):
    index: int
    document: RerankDocument
    relevance_score: float


class RerankUsage(BaseModel):
    total_tokens: int


class RerankResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("rerank"))
    model: str
    usage: RerankUsage
    results: list[RerankResult]


# ---------------------------------------------------------------- classification

class ClassificationRequest(RequestModel):
    model: str | None = None
    input: Texts | str
    truncate_prompt_tokens: TruncatePromptTokens = None
    user: str | None = None
    activation: bool | None = None

    _input_not_empty = field_validator("input", mode="before")(not_empty)


class ClassificationData(BaseModel):
    index: int
    label: str | None
    probs: list[float]
    num_classes: int


class ClassificationResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("classify"))
    object: str = "list"
    created: int = Field(default_factory=now)
    model: str
    data: list[ClassificationData]
    usage: UsageInfo


# ---------------------------------------------------------------- generation, shared

class StreamOptions(BaseModel):
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


class SamplingFields(RequestModel):
    """Sampling fields common to completions and chat (vLLM's extra sampling params included)."""
    model: str | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = 0.0
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = 0.0
    n: Annotated[int, Field(ge=1)] = 1
    seed: Seed | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = \
        Field(default_factory=list)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    user: str | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # -1 or 0: off
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    stop_token_ids: list[TokenId] | None = Field(default_factory=list)
    # OpenAI's: token id (as a string key) -> bias added to its logit, clamped to [-100, 100] as vLLM.
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0)] = 0
    skip_special_tokens: bool = True
    truncate_prompt_tokens: Annotated[int, Field(ge=1)] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias_keys_are_token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            try:
                token_id = int(key)
            except ValueError:
                token_id = -1
            if token_id < 0:
                raise ValueError(f"keys must be token ids (non-negative integers as strings), got {key!r}")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be defined when stream=True")
        return self

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for engine.SamplingParams, defaults filled as vLLM fills them."""
        return dict(
            n=self.n, seed=self.seed,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0, min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
            skip_special_tokens=self.skip_special_tokens,
            truncate_prompt_tokens=self.truncate_prompt_tokens,
            logit_bias={int(k): min(100.0, max(-100.0, v)) for k, v in self.logit_bias.items()}
            if self.logit_bias else None,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


# ---------------------------------------------------------------- completions

class CompletionRequest(SamplingFields):
    prompt: PromptInput
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    suffix: str | None = None
    add_special_tokens: bool = True

    _prompt_not_empty = field_validator("prompt", mode="before")(not_empty)

    def prompts(self) -> list[str | list[int]]:
        return prompt_list(self.prompt)


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionResponseChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[int, Any] | None] | None = None  # vLLM's field; not computed here


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionResponseChoice]
    service_tier: str | None = None
    system_fingerprint: str | None = None
    usage: UsageInfo
    kv_transfer_params: dict[str, Any] | None = None  # vLLM's field; always null here


class CompletionResponseStreamChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionStreamResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: str = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionResponseStreamChoice]
    usage: UsageInfo | None = None


# ---------------------------------------------------------------- chat

class ChatTextPart(BaseModel):
    """A content part; these models read text only, so other part types (images, audio) are a 400."""
    model_config = ConfigDict(extra="allow")
    type: Literal["text"] = "text"
    text: str


class ChatMessageParam(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]  # OpenAI's roles
    content: str | list[ChatTextPart] | None = None  # None only for an assistant message with tool_calls
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _content_unless_tool_calls(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"content is required for a {self.role} message (only an assistant message "
                             f"with tool_calls may leave it out)")
        return self

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates expect it: text parts joined into one string."""
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "".join(part.text for part in self.content)
        return message


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessageParam], Field(min_length=1)]
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = 0
    max_tokens: Annotated[int, Field(ge=1)] | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("Cannot set both continue_final_message and add_generation_prompt to true")
        return self

    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ChatMessage(BaseModel):
    role: str
    content: str | None = None
    refusal: str | None = None
    annotations: Any | None = None
    audio: Any | None = None
    function_call: Any | None = None
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)
    reasoning_content: str | None = None


class ChatCompletionLogProb(BaseModel):
    token: str
    logprob: float = -9999.0
    bytes: list[int] | None = None


class ChatCompletionLogProbsContent(ChatCompletionLogProb):
    top_logprobs: list[ChatCompletionLogProb] = Field(default_factory=list)


class ChatCompletionLogProbs(BaseModel):
    content: list[ChatCompletionLogProbsContent] | None = None


class ChatCompletionResponseChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = "stop"
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatCompletionResponseChoice]
    service_tier: str | None = None
    system_fingerprint: str | None = None
    usage: UsageInfo
    prompt_logprobs: list[dict[int, Any] | None] | None = None  # vLLM's field; not computed here
    kv_transfer_params: dict[str, Any] | None = None  # vLLM's field; always null here


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None


class ChatCompletionResponseStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatCompletionResponseStreamChoice]
    usage: UsageInfo | None = None


# ---------------------------------------------------------------- tokenizer

class TokenizeRequest(RequestModel):
    """vLLM's TokenizeCompletionRequest and TokenizeChatRequest in one: give prompt or messages."""
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessageParam], Field(min_length=1)] | None = None
    add_special_tokens: bool | None = None  # None: True for a prompt, False for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_of(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str
