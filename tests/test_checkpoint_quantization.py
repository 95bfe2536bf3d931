"""FP8 checkpoints (compressed-tensors, fbgemm_fp8, fine-grained fp8) against Hugging Face running the same
dequantized weights; the methods that do not load are refused by name."""
import json
import os
import shutil

import pytest
import torch
import transformers as T
from conftest import assert_pool_free, sentence
from safetensors.torch import load_file, save_file
from test_quantization import beside_hf

from engine import LLM, SamplingParams
from engine import checkpoint_quantization as CQ
from engine import quantization as Q

pytestmark = pytest.mark.usefixtures("one_thread")

FORMATS = {  # name: (quantization_config, how weights are scaled)
    "compressed-tensors, per channel": ({"quant_method": "compressed-tensors", "format": "float-quantized",
                                         "config_groups": {"group_0": {
                                             "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                                             "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor",
                                                                   "dynamic": False},
                                             "targets": ["Linear"]}}, "ignore": ["lm_head"]}, "channel"),
    "compressed-tensors, per tensor": ({"quant_method": "compressed-tensors", "format": "float-quantized",
                                        "config_groups": {"group_0": {
                                            "weights": {"num_bits": 8, "type": "float", "strategy": "tensor"},
                                            "targets": ["Linear"]}}}, "tensor"),
    "fbgemm_fp8": ({"quant_method": "fbgemm_fp8"}, "channel"),
    "fine-grained fp8, blocks 16 x 24": ({"quant_method": "fp8", "weight_block_size": [16, 24]}, "block"),
}


def quantize_stored(w: torch.Tensor, strategy: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float8 values, the scale tensor a checkpoint of that strategy stores for them, and the float weights
    they stand for (computed here, not by the code under test)."""
    if strategy == "channel":
        q, scale = Q.quantize_fp8(w)  # scale [out, 1]
        return q, scale, q.float() * scale
    if strategy == "tensor":
        scale = w.abs().amax().reshape(1) / Q.FP8_MAX
        q = (w / scale).clamp(-Q.FP8_MAX, Q.FP8_MAX).to(Q.FP8)
        return q, scale, q.float() * scale
    rows, cols = w.shape  # blocks of 16 x 24: the last column block is partial
    scale = torch.empty(-(-rows // 16), -(-cols // 24))
    q, dequantized = torch.empty_like(w, dtype=Q.FP8), torch.empty_like(w)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            block = (slice(16 * i, 16 * (i + 1)), slice(24 * j, 24 * (j + 1)))
            scale[i, j] = w[block].abs().amax() / Q.FP8_MAX
            q[block] = (w[block] / scale[i, j]).clamp(-Q.FP8_MAX, Q.FP8_MAX).to(Q.FP8)
            dequantized[block] = q[block].float() * scale[i, j]
    return q, scale, dequantized


def fp8_checkpoint(src: str, dst: str, fmt: str) -> dict[str, torch.Tensor]:
    """A copy of src whose layers' projections are stored as fp8 the format's way; returns the dequantized
    float32 weights by name (what Hugging Face runs as the reference)."""
    quant_config, strategy = FORMATS[fmt]
    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    stored, dequantized = {}, {}
    for name, w in load_file(path).items():
        if ".layers." in name and name.endswith("proj.weight"):
            q, scale, dequantized[name] = quantize_stored(w.float(), strategy)
            suffix = "_scale_inv" if strategy == "block" else "_scale"
            stored[name], stored[name + suffix] = q, scale
            if fmt.startswith("compressed-tensors, per channel"):
                stored[name.removesuffix("weight") + "input_scale"] = torch.ones(1)  # static: not used here
        else:
            stored[name] = w
    save_file(stored, path)
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(dict(config, quantization_config=quant_config), f)
    return dequantized


def hf_on(model_dir: str, weights: dict[str, torch.Tensor]):
    hf = T.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    state = hf.state_dict()
    with torch.no_grad():
        for name, w in weights.items():
            state[name].copy_(w)
    return hf


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_fp8_checkpoint_generates_as_hf_on_its_dequantized_weights(fmt, tiny_model, tmp_path):
    src = tiny_model("qwen3")
    dequantized = fp8_checkpoint(src, str(tmp_path / "fp8"), fmt)
    assert all(w.dtype == torch.float32 for w in dequantized.values())
    llm = LLM(str(tmp_path / "fp8"), dtype="float32", block_size=8)
    # On a CPU the checkpoint is served as float weights (fp8 would be emulated): no quantized layer.
    assert not any(isinstance(m, Q.QuantizedLinear) for m in llm.engine.runner.model.modules())
    hf = hf_on(src, dequantized)
    outs = llm.generate([sentence(810 + i, n) for i, n in enumerate((5, 30))],
                        SamplingParams(temperature=0.0, max_tokens=8, logprobs=1, ignore_eos=True))
    for out in outs:
        for tok, logprob, row in beside_hf(hf, out):
            assert row.argmax().item() == tok
            assert abs(logprob - row.log_softmax(-1)[tok].item()) < 1e-4
    assert_pool_free(llm)


def test_per_channel_checkpoint_served_fp8_keeps_its_float8_values(tiny_model, tmp_path):
    """Dequantized at load and quantized again per output channel, a per-channel checkpoint's float8 values
    and scales come back exactly (each channel's largest value is 448 in both)."""
    src = tiny_model("qwen3")
    fp8_checkpoint(src, str(tmp_path / "fp8"), "fbgemm_fp8")
    stored = load_file(str(tmp_path / "fp8" / "model.safetensors"))
    llm = LLM(str(tmp_path / "fp8"), dtype="float32", block_size=8, quantization="fp8")
    qkv = llm.engine.runner.model.layers[0].self_attn.qkv_proj
    parts = [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
    want_q = torch.cat([stored[p] for p in parts])
    want_scale = torch.cat([stored[p + "_scale"] for p in parts]).flatten()
    assert torch.equal(qkv.qweight.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(qkv.scale, want_scale)
    assert llm.generate(sentence(820, 6), SamplingParams(temperature=0.0, max_tokens=4))[0].outputs[0].token_ids


def test_served_quantization_of_an_fp8_checkpoint(monkeypatch):
    quant = CQ.CheckpointQuantization("fbgemm_fp8", None)
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(CQ, "scaled_mm_out_dtype", lambda device, dtype: torch.bfloat16)
    assert CQ.served_quantization(quant, True, gpu, torch.bfloat16) == "fp8"
    assert CQ.served_quantization(quant, False, gpu, torch.bfloat16) is None  # encoders are not quantized
    assert CQ.served_quantization(quant, True, cpu, torch.bfloat16) is None  # emulated there
    assert CQ.served_quantization(None, True, gpu, torch.bfloat16) is None
    monkeypatch.setattr(CQ, "scaled_mm_out_dtype", lambda device, dtype: None)  # e.g. an A100: no fp8
    assert CQ.served_quantization(quant, True, gpu, torch.bfloat16) is None


@pytest.mark.parametrize("quant_config, match", [
    ({"quant_method": "gptq", "bits": 4}, "quantized with 'gptq', which does not load here"),
    ({"quant_method": "awq"}, "'awq'"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int"}}}},
     "8-bit float weights"),
])
def test_checkpoints_quantized_otherwise_are_refused_by_name(quant_config, match, tiny_model, tmp_path):
    dst = str(tmp_path / "q")
    shutil.copytree(tiny_model("llama"), dst)
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(dict(config, quantization_config=quant_config), f)
    with pytest.raises(ValueError, match=match):
        LLM(dst, dtype="float32")


def test_float8_weights_need_their_scales():
    quant = CQ.CheckpointQuantization("fbgemm_fp8", None)
    weights = [("a.weight", torch.ones(2, 2).to(Q.FP8)), ("b.weight", torch.ones(2, 2))]
    with pytest.raises(ValueError, match=r"without a weight_scale.*\['a'\]"):
        list(CQ.dequantized_weights(weights, quant))
    with pytest.raises(ValueError, match="fits neither"):
        CQ.dequantize(torch.ones(4, 6).to(Q.FP8), torch.ones(3), None, "layer")
    # A scale may come before its weight.
    out = dict(CQ.dequantized_weights([("a.weight_scale", torch.tensor([[2.0], [3.0]])),
                                       ("a.weight", torch.ones(2, 2).to(Q.FP8))], quant))
    assert torch.equal(out["a.weight"], torch.tensor([[2.0, 2.0], [3.0, 3.0]]))
