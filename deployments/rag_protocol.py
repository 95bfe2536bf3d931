"""Request schemas of OpenAI's Files, Vector Stores and Responses (`file_search`) APIs.

Unknown fields are ignored (RequestModel), so newer clients pass. Fields whose rules live in
the rag/ library (attributes, filters, chunking_strategy, metadata) are taken as JSON here and
validated there, with errors that name the field. Responses are OpenAI's JSON objects, built
as dicts by rag/ and deployments/rag.py (shapes: openai-python's types/vector_store*.py,
types/vector_stores/, types/file_object.py, types/responses/).
"""
from typing import Any, Literal

from pydantic import Field, model_validator

from deployments.protocol import RequestModel

POLL_AFTER_MS = 200  # in_progress objects ask the openai SDK's poll helpers to come back this soon
Ranker = str  # "none", "auto", "default-2024-11-15" or a served reranker's name


class RankingOptions(RequestModel):
    ranker: Ranker = "auto"
    score_threshold: float = Field(default=0.0, ge=0.0, le=1.0)


class VectorStoreCreateRequest(RequestModel):
    name: str | None = None
    file_ids: list[str] = []
    chunking_strategy: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    expires_after: dict[str, Any] | None = None
    index_type: Literal["flat", "ivf", "hnsw"] = "flat"  # our extension: FAISS index kind for large stores


class VectorStoreUpdateRequest(RequestModel):
    name: str | None = None
    metadata: dict[str, Any] | None = None
    expires_after: dict[str, Any] | None = None


class VectorStoreFileCreateRequest(RequestModel):
    file_id: str
    attributes: dict[str, Any] | None = None
    chunking_strategy: dict[str, Any] | None = None


class VectorStoreFileUpdateRequest(RequestModel):
    attributes: dict[str, Any] | None


class FileBatchCreateRequest(RequestModel):
    file_ids: list[str] | None = None
    files: list[dict[str, Any]] | None = None
    attributes: dict[str, Any] | None = None
    chunking_strategy: dict[str, Any] | None = None


class VectorStoreSearchRequest(RequestModel):
    query: str | list[str]
    max_num_results: int = Field(default=10, ge=1, le=50)
    filters: dict[str, Any] | None = None
    ranking_options: RankingOptions | None = None
    rewrite_query: bool = False  # accepted; queries are searched as given

    @model_validator(mode="after")
    def _query(self):
        queries = [self.query] if isinstance(self.query, str) else self.query
        if not queries or not all(q.strip() for q in queries):
            raise ValueError("query must be a non-empty string or list of non-empty strings")
        return self

    def queries(self) -> list[str]:
        return [self.query] if isinstance(self.query, str) else list(self.query)


class FileSearchTool(RequestModel):
    type: Literal["file_search"]
    vector_store_ids: list[str] = Field(min_length=1)
    max_num_results: int = Field(default=10, ge=1, le=50)
    filters: dict[str, Any] | None = None
    ranking_options: RankingOptions | None = None


class ResponsesRequest(RequestModel):
    """POST /v1/responses: `input` is a string or a list of messages ({role, content}, content a
    string or input_text parts). Only the `file_search` tool is served; it runs on every request
    (retrieval does not depend on the model choosing to call it). `store` keeps the response for
    GET/DELETE /v1/responses/{id}; `previous_response_id` continues a stored one's conversation."""
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] = []
    include: list[str] = []
    stream: bool = False
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    metadata: dict[str, str] | None = None
    tool_choice: Any = "auto"
    parallel_tool_calls: bool = True
    store: bool = True
    previous_response_id: str | None = None

    @model_validator(mode="after")
    def _check(self):
        for i, tool in enumerate(self.tools):
            if tool.get("type") != "file_search":
                raise ValueError(f"tools[{i}].type: only 'file_search' is served, got {tool.get('type')!r}")
            FileSearchTool.model_validate(tool)
        if len(self.tools) > 1:
            raise ValueError("tools: at most one file_search tool (list several vector_store_ids in it)")
        if not self.user_text().strip():
            raise ValueError("input: needs a user message with text")
        return self

    def file_search(self) -> FileSearchTool | None:
        return FileSearchTool.model_validate(self.tools[0]) if self.tools else None

    def messages(self) -> list[dict[str, str]]:
        """The conversation as chat messages with text content."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        out = []
        for i, item in enumerate(self.input):
            if item.get("type", "message") != "message" or "role" not in item:
                raise ValueError(f"input[{i}]: only messages ({{role, content}}) are supported")
            content = item.get("content", "")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content
                                  if p.get("type") in ("input_text", "output_text", "text"))
            out.append({"role": "system" if item["role"] == "developer" else item["role"], "content": content})
        return out

    def user_text(self) -> str:
        """What the file search looks for: the last user message."""
        users = [m["content"] for m in self.messages() if m["role"] == "user"]
        return users[-1] if users else ""

