"""Incremental detokenization with stop strings, vLLM style.

Each new token decodes a short window of ids twice, with and without it, and keeps the difference
(vLLM's prefix_offset/read_offset): context tokens give WordPiece/SentencePiece their leading
spaces, and byte-level tokens that end inside a UTF-8 character wait for the rest. Where the
tokenizer's decode is plain Rust, tokenizers' DecodeStream runs that same method in one call per
token (README: ~5 against ~9 us a token with SmolLM2's tokenizer); a token it cannot finish (inside a
character, past MAX_PENDING, an unexpected prefix) goes through the window method, and the stream
restarts after it. Stop strings are searched only in the new text and the len(stop) - 1 characters
before it."""
from engine.params import RequestOutputKind, SamplingParams

REPLACEMENT = "\ufffd"  # what a decoder shows for an incomplete UTF-8 sequence
INITIAL_OFFSET = 5  # prompt tokens used as context for the first output token, as in vLLM
# A model emitting invalid bytes must not grow the window forever: past this many pending tokens
# the replacement characters are taken as final (real text reaches a character boundary within
# a few tokens).
MAX_PENDING = 16


class IncrementalDetokenizer:
    per_token = True  # takes each token as it comes (the others take a finished request's tokens at once)
    __slots__ = ("tokenizer", "skip_special_tokens", "stop", "_max_hold", "_ids", "_prefix_offset",
                 "_read_offset", "_text", "_tail", "_sent", "_decode_stream", "_stream")

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.stop = list(params.stop)
        self._max_hold = max(map(len, self.stop), default=1) - 1
        self._ids = list(prompt_token_ids[-INITIAL_OFFSET:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._text = ""  # decoded ids[:read_offset], output part only
        self._tail = ""  # decoded ids[read_offset:]; ends with U+FFFD while a character is unfinished
        self._sent = 0  # chars of output_text already handed out by take_delta
        self._decode_stream = getattr(tokenizer, "decode_stream", None)  # looked up once: restarts are per token
        self._stream = self._new_stream()

    @property
    def output_text(self) -> str:
        return self._text + self._tail if self._tail else self._text

    def update(self, token_ids: list[int]) -> str | None:
        """Append new output tokens; returns the stop string found (output_text then ends before it)."""
        start = len(self._text)  # the old tail may be rewritten, so new text starts where it began
        for token_id in token_ids:  # one at a time, so every clean character boundary is seen
            self._ids.append(token_id)
            self._decode_next()
        return self._check_stop(start) if self.stop and token_ids else None

    def take_delta(self, finished: bool) -> str:
        """Text not handed out yet; until finished, holds back what may still change or be cut."""
        text = self.output_text
        end = len(text)
        if not finished:
            while end > self._sent and text[end - 1] == REPLACEMENT:
                end -= 1
            if self.stop:
                end -= self._stop_prefix_len(text, end)
        if end <= self._sent:
            return ""
        delta, self._sent = text[self._sent:end], end
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _new_stream(self):
        """The Rust stream over the window's context, or None (the tokenizer has none to offer)."""
        if self._decode_stream is None:
            return None
        return self._decode_stream(self._ids[self._prefix_offset:], self.skip_special_tokens)

    def _decode_next(self) -> None:
        if self._stream is not None:
            try:
                piece = self._stream(self._ids[-1])
            except Exception:  # tokenizers' "Invalid prefix encountered": the window method takes over
                piece, self._stream = None, None
            if piece is not None:
                self._accept(piece)
                return
        p, r = self._prefix_offset, self._read_offset
        prefix = self._decode(self._ids[p:r])
        self._tail = self._decode(self._ids[p:])[len(prefix):]
        unfinished = self._tail.endswith(REPLACEMENT) and len(self._ids) - r < MAX_PENDING
        # An empty difference (e.g. a skipped special token) keeps the context window as it is.
        if self._tail and not unfinished:
            self._accept(self._tail)
            self._stream = self._new_stream()  # the stream held what was just taken, or had none: start after it

    def _accept(self, piece: str) -> None:
        self._text += piece
        self._tail = ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)

    def _check_stop(self, start: int) -> str | None:
        text = self.output_text
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = text.find(s, max(0, start - len(s) + 1))
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        # vLLM: the stop string is not part of the output.
        self._text, self._tail = text[:best[0]], ""
        return best[1]

    def _stop_prefix_len(self, text: str, end: int) -> int:
        """Length of the longest text[:end] suffix that could still grow into a stop string."""
        for k in range(min(self._max_hold, end - self._sent), 0, -1):
            piece = text[end - k:end]
            if any(s.startswith(piece) for s in self.stop):
                return k
        return 0


class FinalDetokenizer:
    """For a request nobody reads until it ends and no stop string can cut: the text is decoded once,
    at the end, with the same prompt context as the incremental path. Per token it costs nothing,
    where the incremental path decodes twice (the host's largest per-token cost at high batch)."""
    per_token = False
    __slots__ = ("tokenizer", "skip_special_tokens", "_ids", "_context_len", "_text")

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self._ids = list(prompt_token_ids[-INITIAL_OFFSET:])
        self._context_len = len(self._ids)
        self._text = ""

    @property
    def output_text(self) -> str:
        return self._text

    def update(self, token_ids: list[int]) -> None:
        self._ids.extend(token_ids)

    def take_delta(self, finished: bool) -> str:
        if not finished:
            return ""
        context = self.tokenizer.decode(self._ids[:self._context_len], skip_special_tokens=self.skip_special_tokens)
        whole = self.tokenizer.decode(self._ids, skip_special_tokens=self.skip_special_tokens)
        self._text = whole[len(context):]
        return self._text


class CallerDetokenizer:
    """For a stream the caller's process detokenizes (text_by_caller): the engine emits token ids and no text.
    Only where no stop string can end it, so every stop decision is a token's."""
    __slots__ = ()
    per_token = False
    output_text = ""

    def update(self, token_ids: list[int]) -> None:
        return None

    def take_delta(self, finished: bool) -> str:
        return ""


def text_by_caller(params: SamplingParams) -> bool:
    """A DELTA stream without stop strings: the engine in a process of its own leaves its text to the caller
    (engine.stream_text), so the process that runs the steps does not detokenize it."""
    return params.output_kind is RequestOutputKind.DELTA and not params.stop


def make_detokenizer(tokenizer, prompt_token_ids: list[int], params: SamplingParams, caller_detokenizes: bool = False):
    if caller_detokenizes and text_by_caller(params):
        return CallerDetokenizer()
    if params.output_kind is RequestOutputKind.FINAL_ONLY and not params.stop:
        return FinalDetokenizer(tokenizer, prompt_token_ids, params)
    return IncrementalDetokenizer(tokenizer, prompt_token_ids, params)
