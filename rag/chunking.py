"""Chunking by the embedding model's tokenizer, with OpenAI's strategies:

    {"type": "auto"}
    {"type": "static", "static": {"max_chunk_size_tokens": 100-4096, "chunk_overlap_tokens": <= half}}

`auto` is OpenAI's 800 tokens with 400 overlap, capped so that a chunk plus the tokenizer's
special tokens fits the embedding model's max length (all-MiniLM-L6-v2 served with
max_model_len 256: 254-token chunks, 127 overlap); the overlap stays at most half the chunk. A
static chunk longer than the embedder's limit is rejected (400): it would be truncated, and
the text past the limit would be stored but never embedded.

Chunks are slices of the original text at token boundaries (the tokenizer's offsets), so the
text a search returns is the text that was uploaded, not a detokenized approximation.
"""
from dataclasses import dataclass
from typing import Any

AUTO_MAX_TOKENS, AUTO_OVERLAP_TOKENS = 800, 400
STATIC_MIN_TOKENS, STATIC_MAX_TOKENS = 100, 4096


@dataclass(slots=True, frozen=True)
class ChunkingStrategy:
    type: str  # "auto" or "static"
    max_chunk_size_tokens: int
    chunk_overlap_tokens: int

    def as_dict(self) -> dict[str, Any]:
        """OpenAI's object on a vector-store file: both kinds are reported as their static sizes."""
        return {"type": "static", "static": {"max_chunk_size_tokens": self.max_chunk_size_tokens,
                                             "chunk_overlap_tokens": self.chunk_overlap_tokens}}


def chunking_strategy(spec: Any, max_tokens: int, param: str = "chunking_strategy") -> ChunkingStrategy:
    """Validate a request's chunking_strategy against the embedder's limit (max tokens per chunk,
    specials excluded); ValueError names the field."""
    if spec is None or (isinstance(spec, dict) and spec.get("type") == "auto"):
        size = min(AUTO_MAX_TOKENS, max_tokens)
        return ChunkingStrategy("auto", size, min(AUTO_OVERLAP_TOKENS, size // 2))
    if not isinstance(spec, dict) or spec.get("type") != "static":
        raise ValueError(f"{param}.type: must be 'auto' or 'static'")
    static = spec.get("static")
    if not isinstance(static, dict):
        raise ValueError(f"{param}.static: required for type 'static'")
    size, overlap = static.get("max_chunk_size_tokens"), static.get("chunk_overlap_tokens", 400)
    if not isinstance(size, int) or isinstance(size, bool) or not STATIC_MIN_TOKENS <= size <= STATIC_MAX_TOKENS:
        raise ValueError(f"{param}.static.max_chunk_size_tokens: must be an integer in "
                         f"[{STATIC_MIN_TOKENS}, {STATIC_MAX_TOKENS}], got {size!r}")
    if not isinstance(overlap, int) or isinstance(overlap, bool) or not 0 <= overlap <= size // 2:
        raise ValueError(f"{param}.static.chunk_overlap_tokens: must be an integer in [0, {size // 2}] "
                         f"(at most half of max_chunk_size_tokens), got {overlap!r}")
    if size > max_tokens:
        raise ValueError(f"{param}.static.max_chunk_size_tokens: {size} exceeds the embedding model's limit "
                         f"of {max_tokens} tokens per chunk")
    return ChunkingStrategy("static", size, overlap)


def max_chunk_tokens(tokenizer, max_model_len: int) -> int:
    """Tokens of text per chunk that fit the embedder with the tokenizer's special tokens."""
    return max_model_len - tokenizer.num_special_tokens_to_add(pair=False)


def chunk_text(text: str, tokenizer, strategy: ChunkingStrategy) -> list[str]:
    """Windows of max_chunk_size_tokens tokens stepping by size - overlap, as text slices."""
    if not text.strip():
        return []
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                        verbose=False)["offset_mapping"]
    if not offsets:
        return []
    size, step = strategy.max_chunk_size_tokens, strategy.max_chunk_size_tokens - strategy.chunk_overlap_tokens
    chunks = []
    for start in range(0, len(offsets), step):
        window = offsets[start:start + size]
        chunk = text[window[0][0]:window[-1][1]].strip()
        if chunk:
            chunks.append(chunk)
        if start + size >= len(offsets):
            break
    return chunks
