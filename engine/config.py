"""Engine configuration: what the user sets, checked once."""
import ctypes
import os
from dataclasses import dataclass

import torch

from engine.c_kernels import cpu_flags
from engine.quantization import FP8, QUANTIZATION_METHODS

TASKS = ("auto", "generate", "embed", "score", "classify")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "half": torch.float16,
          "float": torch.float32}
# vLLM's names; None: the serving dtype.
KV_CACHE_DTYPES = {"auto": None, "fp8": FP8, "fp8_e4m3": FP8}


@dataclass(slots=True)
class EngineConfig:
    model: str
    task: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None  # None: the model's own limit
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 128
    # One long prompt may take at most this many tokens of a step, so decodes keep flowing.
    long_prefill_token_threshold: int | None = None
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory_bytes: int = 1 << 30  # CPU pool size when num_blocks is not given
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    # Decoders only (engine.quantization): "int8" weight-only int8; "int4" weight-only 4-bit with a scale and zero
    # point per 32 input channels (engine.int4_linear); "w8a8" int8 weights and per-token int8 activations; "fp8"
    # float8 weights and per-token float8 activations. None serves the weights as loaded.
    quantization: str | None = None
    # The paged KV cache's dtype: "auto" (the serving dtype) or "fp8" (float8 e4m3 with a float32 scale per
    # token and kv head: ~1.8x bf16's tokens in the same memory at head_dim 128; vLLM's kv_cache_dtype values).
    # Decoders only.
    kv_cache_dtype: str = "auto"
    # Steps run eagerly instead of from captured CUDA graphs: decode steps' whole-model graphs and the piecewise
    # ones of steps with prefills (vLLM's option; CPU never captures).
    enforce_eager: bool = False
    # Prefill steps and decode steps each run as one torch.compile graph of the whole model (engine.compiled_model),
    # every task; CUDA graphs capture the decode one where they are on, and w8a8 layers fuse their quantizing and
    # rescaling (engine.quantization). On CPU a small batch's step is dominated by the dispatch of its many small
    # ops, on a GPU a small-hidden model's prefill by its elementwise passes. Compiles when the engine starts
    # (README: how long, and what it gains).
    torch_compile: bool = False
    # Schedule and launch each step before the previous one's tokens reach the host, so host work overlaps the
    # device's (vLLM's async scheduling). None: on where the device runs kernels asynchronously (CUDA); a CPU
    # runs the model on the host's own cores, so nothing would overlap.
    async_scheduling: bool | None = None
    # AsyncLLM runs the engine in a process of its own (vLLM v1's engine core process), so the server's Python
    # (asyncio, Ray, HTTP) does not take the GIL from the steps, and streams are detokenized by the server's
    # process. None: where the device is a GPU; on CPU a real model's steps bound everything (README: measured).
    engine_process: bool | None = None
    num_threads: int | None = None  # torch intra-op threads; None leaves torch's default
    # Embed / score / classify inputs over max_model_len are cut to it instead of refused, as TEI's
    # --auto-truncate: for clients (LangChain, LlamaIndex) that cannot send truncate_prompt_tokens.
    auto_truncate: bool = False
    served_model_name: str | None = None
    seed: int = 0
    # Decoder-only yes/no rerankers (Qwen3-Reranker style).
    # None: the recognised model's own (engine.tokenizer.RERANK_TEMPLATES_BY_*), else Qwen3-Reranker's.
    score_tokens: tuple[str, ...] | None = None  # e.g. ("no", "yes") or ("Yes",)
    score_template: str | None = None
    score_instruction: str | None = None
    # Layerwise rerankers (bge-reranker-v2-minicpm-layerwise): the layer whose head scores; None: the model card's.
    cutoff_layers: int | list[int] | None = None
    # Pooling override for embedding models: "cls" | "mean" | "last"; None reads the model files.
    pooling: str | None = None
    normalize: bool | None = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)}, "
                             f"got {self.quantization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        for name in ("max_num_batched_tokens", "max_num_seqs", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.score_tokens is not None:
            self.score_tokens = tuple(self.score_tokens)
        if isinstance(self.cutoff_layers, (list, tuple)):  # FlagEmbedding's form, e.g. [28]
            if len(self.cutoff_layers) != 1:
                raise ValueError(f"cutoff_layers must name one layer, got {self.cutoff_layers}")
            self.cutoff_layers = self.cutoff_layers[0]

    @property
    def served_name(self) -> str:
        return self.served_model_name or self.model

    def torch_device(self) -> torch.device:
        if self.device != "auto":
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def uses_async_scheduling(self, device: torch.device) -> bool:
        return device.type == "cuda" if self.async_scheduling is None else self.async_scheduling

    def captures_prefill_graphs(self, device: torch.device) -> bool:
        """Decoders' steps with prefills from piecewise CUDA graphs (engine.prefill_graphs); a compiled model's
        prefill is one graph already."""
        return device.type == "cuda" and not self.enforce_eager and not self.torch_compile

    def uses_engine_process(self, device: torch.device) -> bool:
        return device.type == "cuda" if self.engine_process is None else self.engine_process

    def kv_torch_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The KV cache's dtype for a model serving in dtype."""
        return KV_CACHE_DTYPES[self.kv_cache_dtype] or dtype

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        return torch.bfloat16 if bf16_is_fast(device) else torch.float32


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 pays only with hardware support; on a CPU without it bf16 matmuls are ~500x slower."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def keep_freed_memory() -> None:
    """glibc returns every large freed block to the OS and page-faults it back on the next step;
    the activations of each step are such blocks. Keeping them in the heap makes large tensor
    allocations several times faster on CPU."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, (1 << 31) - 1)


def set_num_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)
        os.environ.setdefault("OMP_NUM_THREADS", str(n))
