"""The engine's tokenizer, prompt encoding with vLLM's truncation rules, chat templating and
score-pair building."""
import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass

from jinja2.exceptions import TemplateError
from tokenizers.decoders import DecodeStream
from transformers import AutoTokenizer, PreTrainedTokenizerBase


class Tokenizer:
    """The one door to a Hugging Face tokenizer: every call holds one lock.

    A server's worker threads encode calls into requests while its event loop tokenizes, detokenizes
    and applies chat templates (engine.async_engine). Fast (Rust) tokenizers are not safe for that: encoding
    with truncation reconfigures the shared backend, and two threads meeting there fail with
    "Already borrowed". Attributes read through to the wrapped tokenizer; methods run locked."""
    __slots__ = ("hf", "_lock", "_rust_decode", "_direct_encode")

    def __init__(self, hf: PreTrainedTokenizerBase):
        self.hf = hf
        self._lock = threading.RLock()  # re-entrant: apply_chat_template may call back into encoding
        # Where Hugging Face's decode adds nothing to the Rust one (no space clean-up), call Rust directly.
        plain = getattr(hf, "is_fast", False) and not getattr(hf, "clean_up_tokenization_spaces", True)
        self._rust_decode = hf.backend_tokenizer.decode if plain else None
        self._direct_encode = _plain_batch_call(hf) and self._encodes_as_hugging_face()

    def __call__(self, *args, **kwargs):
        with self._lock:
            return self.hf(*args, **kwargs)

    def encode_batch(self, texts: list[str] | list[tuple[str, str]], add_special_tokens: bool = True,
                     max_length: int | None = None) -> tuple[list[list[int]], list[list[int]] | None]:
        """Token ids of many texts or (text, text) pairs, cut to max_length (pairs longest first), and their
        token type ids where the model takes them: what hf(texts, ...) returns. Where Hugging Face's batch call
        is its backend class's own, the same Rust call after the same configuration, minus what only costs
        here: offsets (encode_batch_fast) and a dict of lists per text (SciFact's 5,183 documents: 1.5-1.9 s
        -> 1.1-1.2 s on 2 cores)."""
        with self._lock:
            encode = self._encode_direct if self._direct_encode else self._encode_hf
            return encode(texts, add_special_tokens, max_length)

    def _encode_hf(self, texts, add_special_tokens: bool, max_length: int | None):
        pairs = bool(texts) and isinstance(texts[0], tuple)
        enc = self.hf([a for a, _ in texts] if pairs else texts, [b for _, b in texts] if pairs else None,
                      add_special_tokens=add_special_tokens, truncation=max_length is not None, max_length=max_length)
        return enc["input_ids"], enc.get("token_type_ids")

    def _encode_direct(self, texts, add_special_tokens: bool, max_length: int | None):
        hf, rust = self.hf, self.hf.backend_tokenizer
        padding, truncation, max_length, _ = hf._get_padding_truncation_strategies(
            padding=False, truncation=max_length is not None, max_length=max_length, verbose=False)
        hf.set_truncation_and_padding(padding_strategy=padding, truncation_strategy=truncation,
                                      max_length=max_length, stride=0, pad_to_multiple_of=None, padding_side=None)
        if rust.encode_special_tokens != hf.split_special_tokens:
            rust.encode_special_tokens = hf.split_special_tokens
        encodings = rust.encode_batch_fast(texts, add_special_tokens=add_special_tokens)
        types = [e.type_ids for e in encodings] if "token_type_ids" in hf.model_input_names else None
        return [e.ids for e in encodings], types

    def _encodes_as_hugging_face(self) -> bool:
        """One check at load: the direct call gives Hugging Face's ids and types on texts, special tokens and
        pairs, cut and whole (Hugging Face's private helpers it calls change between releases)."""
        texts = ["Hello world, x = 1.", f"{self.hf.eos_token or ''} ünïcödé  spaces\n", "a " * 40]
        pairs = [(texts[0], texts[2]), (texts[1], texts[0])]
        try:
            return all(self._encode_direct(batch, special, limit) == self._encode_hf(batch, special, limit)
                       for batch, special, limit in ((texts, True, None), (texts, False, None), (texts, True, 12),
                                                     (pairs, True, None), (pairs, True, 16)))
        except Exception:  # noqa: BLE001 (any failure: Hugging Face's own call stays)
            return False

    def __len__(self) -> int:
        return len(self.hf)

    def decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        # Spelled out: the engine decodes every output token, and the generic path builds a wrapper per call.
        with self._lock:
            if self._rust_decode is not None and not kwargs and isinstance(token_ids, list):
                return self._rust_decode(token_ids, skip_special_tokens=skip_special_tokens)
            return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode_stream(self, context: list[int], skip_special_tokens: bool) -> Callable[[int], str | None] | None:
        """step(token_id) -> the text it completes, or None while a character or a token's text is
        unfinished: tokenizers' DecodeStream, the incremental detokenizer's window method in one Rust
        call. `context` ids are decoded as the prefix the first token's text follows. None where the
        Rust decode is not what decode() returns, where this tokenizers has no DecodeStream(ids=), or
        where the context ends inside a character (the stream would then emit the context's text)."""
        if self._rust_decode is None or (context and self.decode(context, skip_special_tokens).endswith("\ufffd")):
            return None
        try:
            stream = DecodeStream(ids=list(context), skip_special_tokens=skip_special_tokens)
        except TypeError:
            return None
        rust, lock = self.hf.backend_tokenizer, self._lock

        def step(token_id: int) -> str | None:
            with lock:
                return stream.step(rust, token_id)
        return step

    def __getattr__(self, name: str):
        value = getattr(self.hf, name)
        if not callable(value):
            return value

        @functools.wraps(value)
        def locked(*args, **kwargs):
            with self._lock:
                return value(*args, **kwargs)
        return locked


def _plain_batch_call(hf) -> bool:
    """hf's call on a batch is its Rust backend's encode_batch after TokenizersBackend's configuration, nothing
    else: no subclass overrides encoding or the call, no target-text mode, and the backend has encode_batch_fast."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # an older transformers: its own path stays
        return False
    cls = type(hf)
    return (isinstance(hf, TokenizersBackend) and cls._encode_plus is TokenizersBackend._encode_plus
            and cls.__call__ is PreTrainedTokenizerBase.__call__ and not hasattr(hf, "_switch_to_input_mode")
            and hasattr(hf.backend_tokenizer, "encode_batch_fast"))


def load_tokenizer(model_dir: str, config=None) -> Tokenizer:
    """config: the model's, already read (engine.loader.load_config), so that a config.json naming remote
    code is never handed to AutoConfig, which would ask on stdin whether to run it."""
    return Tokenizer(AutoTokenizer.from_pretrained(model_dir, config=config, trust_remote_code=False))


_NOT_TEMPLATE_VARIABLES = frozenset({"conversation", "messages", "tools", "documents", "chat_template", "tokenize",
                                     "padding", "truncation", "max_length", "return_tensors", "return_dict",
                                     "return_assistant_tokens_mask", "tokenizer_kwargs"})


def apply_chat_template(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                        continue_final_message: bool = False, chat_template_kwargs: dict | None = None) -> str:
    """The prompt text of a conversation, for every caller (offline LLM.chat, the chat route, /tokenize).
    continue_final_message leaves the last (assistant) message open for the model to go on with."""
    if tokenizer.chat_template is None:
        raise ValueError("this model has no chat template; send a plain prompt (e.g. /v1/completions)")
    if continue_final_message and add_generation_prompt:
        raise ValueError("Cannot set both continue_final_message and add_generation_prompt to true")
    if continue_final_message and (not messages or not isinstance(messages[-1].get("content"), str)):
        raise ValueError("continue_final_message needs a final message with text content")
    # As vLLM: chat_template_kwargs are template variables; names of the call's own arguments are dropped.
    kwargs = {k: v for k, v in (chat_template_kwargs or {}).items() if k not in _NOT_TEMPLATE_VARIABLES}
    kwargs.update(add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except (TemplateError, TypeError) as e:  # raise_exception("roles must alternate"), 'str' + None, ...
        raise ValueError(f"the chat template refused these messages: {e}") from e


def length_error(num_tokens: int, limit: int) -> ValueError:
    return ValueError(f"This model's maximum context length is {limit} tokens. However, your request has "
                      f"{num_tokens} input tokens. Please reduce the length of the input, or set "
                      f"truncate_prompt_tokens (or the model's auto_truncate option) to truncate it.")


def truncation_length(max_model_len: int, truncate_prompt_tokens: int | None) -> int | None:
    """vLLM's semantics: None means no truncation, -1 means max_model_len, k means k tokens."""
    if truncate_prompt_tokens is None:
        return None
    if truncate_prompt_tokens == -1:
        return max_model_len
    if not 1 <= truncate_prompt_tokens <= max_model_len:
        raise ValueError(f"truncate_prompt_tokens must be -1 or between 1 and max_model_len "
                         f"({max_model_len}), got {truncate_prompt_tokens}")
    return truncate_prompt_tokens


def check_token_ids(ids: list[int], vocab_size: int) -> list[int]:
    bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size}), got {bad[:5]}")
    return ids


def encode(tokenizer, prompts: list[str | list[int]], max_model_len: int, truncate_prompt_tokens: int | None,
           vocab_size: int, add_special_tokens: bool = True, keep_end: bool = False) -> list[list[int]]:
    """Every prompt's token ids; the texts in one batched tokenizer call (its Rust side runs them in
    parallel). keep_end: decoders keep a truncated prompt's end (what the model continues from);
    encoders keep its beginning, as Hugging Face tokenizers truncate, so the tokenizer cuts them."""
    limit = truncation_length(max_model_len, truncate_prompt_tokens)
    cut = limit is not None and not keep_end
    texts = [p for p in prompts if isinstance(p, str)]
    encoded = iter(tokenizer.encode_batch(texts, add_special_tokens, limit if cut else None)[0] if texts else ())
    out = []
    for prompt in prompts:
        ids = next(encoded) if isinstance(prompt, str) else check_token_ids(list(prompt), vocab_size)
        if not ids:
            raise ValueError("prompt must not be empty")
        if limit is None and len(ids) > max_model_len:
            raise length_error(len(ids), max_model_len)
        out.append(ids if limit is None or len(ids) <= limit else ids[-limit:])
    return out


def encode_pairs(tokenizer, pairs: list[tuple[str, str]], max_model_len: int,
                 truncate_prompt_tokens: int | None) -> tuple[list[list[int]], list[list[int]] | None]:
    """[CLS] q [SEP] d [SEP] with token types, as cross-encoders were trained; all pairs in one batched call."""
    limit = truncation_length(max_model_len, truncate_prompt_tokens)
    ids, types = tokenizer.encode_batch(pairs, True, limit)
    longest = max(map(len, ids))
    if longest > max_model_len:
        raise length_error(longest, max_model_len)
    return ids, types


def pair_texts(text_1: str | list[str], text_2: str | list[str]) -> list[tuple[str, str]]:
    """vLLM's score pairing: 1:1, 1:N, N:N (zipped); anything else is an error."""
    a = [text_1] if isinstance(text_1, str) else list(text_1)
    b = [text_2] if isinstance(text_2, str) else list(text_2)
    if not a:
        raise ValueError("text_1 must not be empty")
    if not b:
        raise ValueError("text_2 must not be empty")
    if len(a) == 1:
        return [(a[0], t) for t in b]
    if len(a) != len(b):
        raise ValueError(f"text_1 and text_2 must have the same length (N:N) or text_1 must be a single "
                         f"text (1:N); got {len(a)} and {len(b)}")
    return list(zip(a, b))


QWEN3_RERANKER_TEMPLATE = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
    "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n"
    "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n")
QWEN3_RERANKER_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
BGE_RERANKER_INSTRUCTION = ("Given a query A and a passage B, determine whether the passage contains an answer to "
                            "the query by providing a prediction of either 'Yes' or 'No'.")


@dataclass(slots=True, frozen=True)
class RerankTemplate:
    """A decoder reranker's prompt as the pieces its reference code tokenizes one at a time (where
    pieces are cut changes the token ids). Head pieces take {query} and {instruction}, the document
    piece takes {document}, tail pieces take {instruction}."""
    head: tuple[str, ...]
    document: str
    tail: tuple[str, ...]
    instruction: str
    score_tokens: tuple[str, ...]  # ("no", "yes"): softmax over the two; ("Yes",): that logit
    bos: bool = False  # start with the tokenizer's BOS token

    @classmethod
    def from_string(cls, template: str, instruction: str, score_tokens: tuple[str, ...]) -> "RerankTemplate":
        if template.count("{document}") != 1 or "{query}" not in template.split("{document}")[0]:
            raise ValueError("score_template must contain {query} before one {document}")
        head, tail = template.split("{document}")
        return cls((head,), "{document}", (tail,), instruction, score_tokens)


QWEN3_RERANKER = RerankTemplate.from_string(QWEN3_RERANKER_TEMPLATE, QWEN3_RERANKER_INSTRUCTION, ("no", "yes"))
# FlagEmbedding's LLM rerankers: [BOS] "A: {query}" "\n" "B: {document}" "\n" "{prompt}", score = logit of "Yes".
BGE_RERANKER = RerankTemplate(("A: {query}", "\n"), "B: {document}", ("\n", "{instruction}"),
                              BGE_RERANKER_INSTRUCTION, ("Yes",), bos=True)
# Decoder rerankers recognised by a name in their Hub id or directory, or by their architecture.
RERANK_TEMPLATES_BY_NAME = {"bge-reranker-v2-gemma": BGE_RERANKER, "bge-reranker-v2-minicpm-layerwise": BGE_RERANKER}
RERANK_TEMPLATES_BY_ARCHITECTURE = {"LayerWiseMiniCPMForCausalLM": BGE_RERANKER}


def rerank_template(names: tuple[str, ...], architectures: list[str], template: str | None,
                    instruction: str | None, score_tokens: tuple[str, ...] | None) -> RerankTemplate:
    """The recognised model's published prompt (Qwen3-Reranker's otherwise), with the user's overrides."""
    known = next((t for key, t in RERANK_TEMPLATES_BY_NAME.items() if any(key in n for n in names)), None)
    known = known or next((RERANK_TEMPLATES_BY_ARCHITECTURE[a] for a in architectures
                           if a in RERANK_TEMPLATES_BY_ARCHITECTURE), QWEN3_RERANKER)
    instruction = instruction or known.instruction
    score_tokens = score_tokens or known.score_tokens
    if template is not None:
        return RerankTemplate.from_string(template, instruction, score_tokens)
    return RerankTemplate(known.head, known.document, known.tail, instruction, score_tokens, known.bos)


class YesNoPrompt:
    """Builds a decoder reranker's prompt with instruction and query before the document, tokenized
    in pieces so every document of one query shares the same leading token blocks (prefix cache)."""

    def __init__(self, tokenizer, template: RerankTemplate):
        self.tokenizer, self.template = tokenizer, template
        if template.bos and tokenizer.bos_token_id is None:
            raise ValueError("this reranker's prompt starts with a BOS token, but the tokenizer has none")
        self.tail_ids = [t for piece in template.tail
                         for t in self._ids([piece.replace("{instruction}", template.instruction)])[0]]

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer.encode_batch(texts, add_special_tokens=False)[0]

    def encode(self, pairs: list[tuple[str, str]], max_model_len: int,
               truncate_prompt_tokens: int | None) -> list[list[int]]:
        """Every (query, document) pair's prompt ids; each template piece is tokenized for all pairs in one
        batched call, and a query's head once for all its documents."""
        t = self.template
        queries = list(dict.fromkeys(q for q, _ in pairs))
        heads = {q: [self.tokenizer.bos_token_id] if t.bos else [] for q in queries}
        for piece in t.head:
            for q, ids in zip(queries, self._ids([piece.format(query=q, instruction=t.instruction) for q in queries])):
                heads[q] += ids
        docs = self._ids([t.document.format(document=d) for _, d in pairs])
        limit = truncation_length(max_model_len, truncate_prompt_tokens)
        out = []
        for (q, _), doc in zip(pairs, docs):
            head = heads[q]
            total = len(head) + len(doc) + len(self.tail_ids)
            if limit is None and total > max_model_len:
                raise length_error(total, max_model_len)
            if limit is not None and total > limit:  # cut the document, keep the question and the answer cue
                doc = doc[:max(0, limit - len(head) - len(self.tail_ids))]
            out.append(head + doc + self.tail_ids)
        return out
