"""Shared tiny models for the parity tests.

Each tiny model is a `transformers` config with random weights and a small tokenizer of its
family (WordPiece for BERT, byte-level BPE for RoBERTa and Qwen2, Unigram for XLM-R, word-level
for the other decoders), saved once per session to a temp dir. Tests load the same dir into the engine and
into Hugging Face, so both run the same weights on the same token ids."""
import json
import os
import random
import shutil
import sys

import pytest
import torch
import transformers as T
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from tokenizers.implementations import ByteLevelBPETokenizer

# Without a GPU, Triton kernels run in Triton's interpreter; it is chosen when Triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

WORDS = ("the a an of to in on at for with from by and or but not is are was were be been has have had "
         "cat dog bird fish tree house river city road car book paper light water fire stone cloud rain "
         "sun moon star night day morning evening winter summer red blue green black white small large "
         "old new fast slow warm cold happy quiet loud bright dark runs sat sleeps reads writes sings "
         "walks jumps falls grows opens closes finds keeps makes takes gives sees hears knows thinks "
         "question query document answer model engine cache block token paris france capital").split()

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def sentence(seed: int, num_words: int) -> str:
    """A deterministic sentence of num_words known words."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


# ---------------------------------------------------------------- tokenizers


def bert_tokenizer():
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?:;'-")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + chars + ["##" + c for c in chars]
    return T.BertTokenizer(vocab={t: i for i, t in enumerate(dict.fromkeys(vocab))})


def roberta_tokenizer():
    # Byte-level BPE as RoBERTa's, special tokens where RoBERTa has them: <s>=0, <pad>=1, </s>=2.
    bpe = ByteLevelBPETokenizer()
    corpus = [sentence(i, 12) for i in range(200)]
    bpe.train_from_iterator(corpus, vocab_size=400, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    model = json.loads(bpe._tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return T.RobertaTokenizer(vocab=model["vocab"], merges=merges)


def xlmr_tokenizer():
    # A Unigram (SentencePiece-style) vocabulary laid out like XLM-R's: <s>=0, <pad>=1, </s>=2, <unk>=3.
    pieces = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -2.0) for w in WORDS] + [("\u2581", -3.0)]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?:;'-"] + [("<mask>", 0.0)]
    return T.XLMRobertaTokenizer(vocab=pieces)


DECODER_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
DECODER_VOCAB = 256
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def decoder_tokenizer():
    """Word-level, exactly DECODER_VOCAB tokens, BOS added, pad 0, bos 1, eos 2; a small chat template."""
    tokens = DECODER_SPECIALS + list(":.,?!") + WORDS
    tokens += [f"w{i}" for i in range(DECODER_VOCAB - len(tokens))]
    assert len(tokens) == len(set(tokens)) == DECODER_VOCAB
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    t = T.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=DECODER_SPECIALS[4:])
    t.chat_template = CHAT_TEMPLATE
    return t


def qwen2_tokenizer():
    """Byte-level BPE as a Qwen2Tokenizer: transformers picks that class for qwen2 configs whatever
    tokenizer_config.json says, and it would mangle a word-level vocabulary. No BOS, as Qwen2's."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([sentence(i, 12) for i in range(300)], vocab_size=400, min_frequency=1,
                            special_tokens=DECODER_SPECIALS)
    model = json.loads(bpe._tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    t = T.Qwen2Tokenizer(vocab=model["vocab"], merges=merges, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                         unk_token="<unk>", additional_special_tokens=DECODER_SPECIALS[4:])
    t.chat_template = CHAT_TEMPLATE
    return t


# ---------------------------------------------------------------- models

ENC_FAMILIES = {
    "bert": (T.BertConfig, bert_tokenizer, dict(type_vocab_size=2, max_position_embeddings=128, pad_token_id=0),
             {"": T.BertModel, "cls": T.BertForSequenceClassification}),
    "roberta": (T.RobertaConfig, roberta_tokenizer,
                dict(type_vocab_size=1, max_position_embeddings=130, pad_token_id=1, bos_token_id=0, eos_token_id=2),
                {"": T.RobertaModel, "cls": T.RobertaForSequenceClassification}),
    "xlmr": (T.XLMRobertaConfig, xlmr_tokenizer,
             dict(type_vocab_size=1, max_position_embeddings=130, pad_token_id=1, bos_token_id=0, eos_token_id=2),
             {"": T.XLMRobertaModel, "cls": T.XLMRobertaForSequenceClassification}),
}

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
DEC_COMMON = dict(vocab_size=DECODER_VOCAB, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, initializer_range=0.2, rms_norm_eps=1e-6)
DECODERS = {
    # name: (config class, model class, config overrides)
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "llama3-gqa": (T.LlamaConfig, T.LlamaForCausalLM,
                   dict(num_key_value_heads=2, tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE)),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)),
    "qwen3-hd32": (T.Qwen3Config, T.Qwen3ForCausalLM,
                   dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)),
    "gemma": (T.GemmaConfig, T.GemmaForCausalLM, dict(num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)),
    "mistral": (T.MistralConfig, T.MistralForCausalLM,
                dict(num_key_value_heads=2, tie_word_embeddings=False, sliding_window=4096)),
    "qwen2-cls1": (T.Qwen2Config, T.Qwen2ForSequenceClassification, dict(num_key_value_heads=2, num_labels=1)),
    "llama-cls3": (T.LlamaConfig, T.LlamaForSequenceClassification,
                   dict(num_key_value_heads=2, num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"},
                        label2id={"neg": 0, "neu": 1, "pos": 2})),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Matrices keep the config's (large) init; norms and biases get noise too, so a weight the engine
    failed to load, or loaded as its default, shows up as a difference."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def build_encoder(name: str, path: str, seed: int) -> str:
    """name: '<family>' (base model), '<family>-cls1' or '<family>-cls3'."""
    family, _, head = name.partition("-")
    config_cls, make_tokenizer, extra, classes = ENC_FAMILIES[family]
    tok = make_tokenizer()
    kwargs = dict(TINY, vocab_size=len(tok), initializer_range=0.2, hidden_act="gelu", **extra)
    if head == "cls1":
        kwargs.update(num_labels=1)
    elif head == "cls3":
        kwargs.update(num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"}, label2id={"neg": 0, "neu": 1, "pos": 2})
    torch.manual_seed(seed)
    model = classes["cls" if head else ""](config_cls(**kwargs)).eval()
    randomize(model, seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_decoder(name: str, path: str, seed: int) -> str:
    config_cls, model_cls, extra = DECODERS[name]
    tok = qwen2_tokenizer() if config_cls is T.Qwen2Config else decoder_tokenizer()
    torch.manual_seed(seed)
    model = model_cls(config_cls(**TINY, **dict(DEC_COMMON, vocab_size=len(tok)), **extra)).eval()
    randomize(model, seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def deberta_tokenizer():
    # SentencePiece-style Unigram as DeBERTa-v3's: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3.
    pieces = [("[PAD]", 0.0), ("[UNK]", 0.0), ("[CLS]", 0.0), ("[SEP]", 0.0)]
    pieces += [("\u2581" + w, -2.0) for w in WORDS] + [("\u2581", -3.0)]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?:;'-"] + [("[MASK]", 0.0)]
    return T.DebertaV2Tokenizer(vocab=pieces)


# DeBERTa-v3's layout (shared q/k position projections, log buckets, normalised relative embeddings,
# no absolute positions, no token types) and DeBERTa-v2's (separate position projections, clamped
# distances, absolute positions, token types, a factorised embedding). Buckets and distances are
# small so that the test sentences reach the log buckets and the clamp.
DEBERTA_V3 = dict(relative_attention=True, position_buckets=8, max_relative_positions=-1, norm_rel_ebd="layer_norm",
                  share_att_key=True, pos_att_type=["p2c", "c2p"], position_biased_input=False, type_vocab_size=0,
                  max_position_embeddings=128, layer_norm_eps=1e-7)
DEBERTA_V2 = dict(relative_attention=True, position_buckets=-1, max_relative_positions=12, share_att_key=False,
                  pos_att_type=["c2p", "p2c"], position_biased_input=True, type_vocab_size=2, embedding_size=48,
                  max_position_embeddings=128, layer_norm_eps=1e-7)


def build_deberta(name: str, path: str, seed: int) -> str:
    """name: 'deberta-v3' (base model), 'deberta-v3-cls1' or 'deberta-v2-cls3'."""
    _, layout, *head = name.split("-")
    tok = deberta_tokenizer()
    kwargs = dict(TINY, vocab_size=len(tok), initializer_range=0.2, hidden_act="gelu", pad_token_id=0,
                  **(DEBERTA_V3 if layout == "v3" else DEBERTA_V2))
    if head == ["cls1"]:
        kwargs.update(num_labels=1)
    elif head == ["cls3"]:
        kwargs.update(num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"}, label2id={"neg": 0, "neu": 1, "pos": 2})
    torch.manual_seed(seed)
    cls = T.DebertaV2ForSequenceClassification if head else T.DebertaV2Model
    model = cls(T.DebertaV2Config(**kwargs)).eval()
    randomize(model, seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def bge_tokenizer():
    """Byte-level BPE with BOS, where "Yes" is one token and token boundaries depend on how the prompt
    is cut into pieces (as with Gemma's and MiniCPM's tokenizers)."""
    from engine.tokenizer import BGE_RERANKER_INSTRUCTION
    bpe = ByteLevelBPETokenizer()
    corpus = [sentence(i, 12) for i in range(300)] + [BGE_RERANKER_INSTRUCTION, "A: B: Yes No"] * 20
    bpe.train_from_iterator(corpus, vocab_size=500, min_frequency=1, special_tokens=DECODER_SPECIALS)
    tok = Tokenizer.from_str(bpe._tokenizer.to_str())
    t = T.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    assert len(t("Yes", add_special_tokens=False)["input_ids"]) == 1
    return t


def build_bge_gemma(name: str, path: str, seed: int) -> str:
    """A random Gemma recognised as BAAI/bge-reranker-v2-gemma by its directory name."""
    tok = bge_tokenizer()
    torch.manual_seed(seed)
    config = T.GemmaConfig(**TINY, **dict(DEC_COMMON, vocab_size=len(tok)), num_key_value_heads=1, head_dim=16,
                           tie_word_embeddings=True)
    model = T.GemmaForCausalLM(config).eval()
    randomize(model, seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# bge-reranker-v2-minicpm-layerwise's config.json: a config class that only its repo's code defines.
MINICPM_LAYERWISE = dict(architectures=["LayerWiseMiniCPMForCausalLM"], model_type="minicpm",
                         auto_map={"AutoConfig": "configuration_minicpm_reranker.LayerWiseMiniCPMConfig",
                                   "AutoModelForCausalLM": "modeling_minicpm_reranker.LayerWiseMiniCPMForCausalLM"},
                         hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
                         attention_bias=False, tie_word_embeddings=True, scale_emb=12, dim_model_base=256,
                         scale_depth=1.4, start_layer=2, head_multi=True, head_type="simple")


def build_minicpm_layerwise(name: str, path: str, seed: int) -> str:
    """Random MiniCPM decoder weights (drawn through a Llama of the same shape: the layer names are MiniCPM's)
    plus one score head per layer from start_layer to the last, named as the published checkpoint's."""
    from safetensors.torch import save_file
    tok = bge_tokenizer()
    shape = dict(TINY, num_hidden_layers=6, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(seed)
    llama = T.LlamaForCausalLM(T.LlamaConfig(**shape, vocab_size=len(tok), initializer_range=0.2,
                                             rms_norm_eps=1e-5, tie_word_embeddings=True)).eval()
    randomize(llama, seed)
    weights = {k: v.contiguous() for k, v in llama.state_dict().items() if k != "lm_head.weight"}
    g = torch.Generator().manual_seed(seed)
    for i in range(shape["num_hidden_layers"] - MINICPM_LAYERWISE["start_layer"] + 1):
        weights[f"lm_head.{i}.linear_head.weight"] = 0.2 * torch.randn(1, shape["hidden_size"], generator=g)
    save_file(weights, os.path.join(path, "model.safetensors"))
    config = dict(MINICPM_LAYERWISE, **shape, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    tok.save_pretrained(path)
    return path


# jina-reranker-v2-base-multilingual's config.json: no model_type, its own config class, 1,026 positions.
JINA_RERANKER_V2 = dict(architectures=["XLMRobertaForSequenceClassification"],
                        auto_map={"AutoConfig": "configuration_xlm_roberta.XLMRobertaFlashConfig",
                                  "AutoModel": "modeling_xlm_roberta.XLMRobertaModel",
                                  "AutoModelForSequenceClassification":
                                      "modeling_xlm_roberta.XLMRobertaForSequenceClassification"},
                        hidden_act="gelu", layer_norm_eps=1e-5, max_position_embeddings=1026, num_labels=1,
                        id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, pad_token_id=1, bos_token_id=0,
                        eos_token_id=2, position_embedding_type="absolute", type_vocab_size=1, use_flash_attn=True,
                        emb_pooler=None, classifier_dropout=None)


def jina_layout(hf_state: dict) -> dict:
    """Hugging Face XLM-RoBERTa weights renamed and fused as jina's flash checkpoint stores them
    (its convert_roberta_weights_to_flash.py)."""
    out = {}
    for k, v in hf_state.items():
        k = k.replace("roberta.embeddings.LayerNorm.", "roberta.emb_ln.").replace("roberta.encoder.layer.",
                                                                                 "roberta.encoder.layers.")
        for old, new in ((".attention.output.dense.", ".mixer.out_proj."), (".attention.output.LayerNorm.", ".norm1."),
                         (".intermediate.dense.", ".mlp.fc1."), (".output.dense.", ".mlp.fc2."),
                         (".output.LayerNorm.", ".norm2.")):
            k = k.replace(old, new)
        out[k] = v
    layers = {k.split(".")[3] for k in out if k.startswith("roberta.encoder.layers.")}
    for i in layers:
        p = f"roberta.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            parts = [out.pop(f"{p}attention.self.{n}.{kind}") for n in ("query", "key", "value")]
            out[f"{p}mixer.Wqkv.{kind}"] = torch.cat(parts)
    return out


def build_jina(name: str, path: str, seed: int) -> str:
    """Random weights of an XLM-RoBERTa cross-encoder, stored in jina-reranker-v2's layout and config."""
    from safetensors.torch import save_file
    tok = xlmr_tokenizer()
    torch.manual_seed(seed)
    fields = {k: v for k, v in JINA_RERANKER_V2.items() if k not in ("architectures", "auto_map")}
    model = T.XLMRobertaForSequenceClassification(
        T.XLMRobertaConfig(**TINY, **fields, vocab_size=len(tok), initializer_range=0.2)).eval()
    randomize(model, seed)
    state = {k: v.contiguous() for k, v in jina_layout(model.state_dict()).items()}
    save_file(state, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(JINA_RERANKER_V2, **TINY, vocab_size=len(tok), initializer_range=0.2), f)
    tok.save_pretrained(path)
    return path


def builder(name: str):
    if name in DECODERS:
        return build_decoder
    if name.startswith("deberta"):
        return build_deberta
    if name == "bge-reranker-v2-gemma":
        return build_bge_gemma
    if name == "bge-reranker-v2-minicpm-layerwise":
        return build_minicpm_layerwise
    if name == "jina-reranker-v2":
        return build_jina
    return build_encoder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(name) -> a saved model dir; built once per session."""
    cache: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in cache:
            path = str(tmp_path_factory.mktemp(name.replace("/", "_")))
            seed = sum(map(ord, name))
            cache[name] = builder(name)(name, path, seed)
        return cache[name]
    return get


def update_config(model_dir: str, **fields) -> None:
    """Add fields to a saved config.json (e.g. matryoshka_dimensions)."""
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(fields)
    with open(path, "w") as f:
        json.dump(cfg, f)


def assert_pool_free(llm) -> None:
    """Nothing leaked: every KV block free, no request left in the scheduler or the engine."""
    eng = llm.engine
    assert not eng.scheduler.waiting and not eng.scheduler.running and not eng.scheduler.requests
    out = eng.output_processor
    assert not out.generations and not out.pooling and not out.parent_of and not out.sequence_of
    if eng.kv is not None:
        pool = eng.kv.pool
        assert pool.num_free == pool.num_blocks
        assert all(b.ref_count == 0 for b in pool.blocks)
        assert not any(eng.kv.req_blocks.values())


def require_c_kernels(library) -> None:
    """Skip where the CPU's C kernels (engine.c_kernels) did not build; on Linux with gcc (CI) they must have."""
    if library is None:
        assert not (sys.platform == "linux" and shutil.which("gcc")), "gcc is there but the C kernels did not build"
        pytest.skip("no C compiler with OpenMP on this machine")


def require_amx_kernel(library) -> None:
    """Skip where a C kernel for AMX-BF16 (engine.cpu_span_attention) did not build because the CPU lacks AMX; on
    Linux with gcc and an AMX CPU it must have."""
    if library is None:
        amx = False
        if sys.platform == "linux":
            with open("/proc/cpuinfo") as f:
                amx = "amx_bf16" in f.read()
        assert not (amx and shutil.which("gcc")), "gcc and AMX are there but the AMX kernel did not build"
        pytest.skip("no AMX-BF16 on this CPU (or no C compiler)")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are all per-op overhead: a second intra-op thread buys nothing and, on a busy
    2-core machine, its spin-waits make every op many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def free_queue_ids(pool) -> list[int]:
    """Walk the free queue front to back, checking its links."""
    ids, node = [], pool.free.head
    while node.next is not pool.free.tail:
        assert node.next.prev is node
        node = node.next
        ids.append(node.block_id)
    assert pool.free.tail.prev is node
    return ids


def check_kv_invariants(kv) -> None:
    """Every block is either free (ref_count 0, in the free queue once) or owned (ref_count == the
    number of requests holding it); only full, cached blocks are shared; the cache index is exact."""
    pool = kv.pool
    holders: dict[int, int] = {}
    for blocks in kv.req_blocks.values():
        assert len({b.block_id for b in blocks}) == len(blocks), "a request holds a block twice"
        for b in blocks:
            holders[b.block_id] = holders.get(b.block_id, 0) + 1
    free = free_queue_ids(pool)
    assert len(free) == len(set(free)) == pool.free.size == pool.num_free
    free = set(free)
    for b in pool.blocks:
        assert b.ref_count == holders.get(b.block_id, 0), f"block {b.block_id}: ref_count {b.ref_count}"
        assert (b.ref_count == 0) == (b.block_id in free)
        if b.ref_count > 1:
            assert b.block_hash is not None, "a partial block is shared"
        if b.block_hash is not None:
            assert len(b.tokens) == 8 * kv.block_size  # block_size packed 8-byte ids
    for h, b in pool.cached.items():
        assert b.block_hash == h

