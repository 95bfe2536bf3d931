"""What a model can serve, decided once from its config: the task and the context length."""
from engine.config import EngineConfig
from engine.models import model_class


def resolve_task(hf, config: EngineConfig) -> str:
    """config.task, or the model's natural task when "auto"; a task the architecture cannot serve is an error."""
    archs = hf.architectures or []
    classifier = any(a.endswith("SequenceClassification") for a in archs)
    causal = any(a.endswith("CausalLM") for a in archs)
    allowed = {"embed"}
    if classifier:
        allowed |= {"classify"} | ({"score"} if hf.num_labels == 1 else set())
    elif causal:
        allowed |= {"generate", "score"}  # score: yes/no reranking from the LM head
    else:
        allowed |= {"score"}  # bi-encoder: cosine of the two embeddings
    reranker_only = getattr(model_class(hf), "reranker_only", False)
    if reranker_only:
        allowed = {"score"}
    task = config.task
    if task == "auto":
        task = ("score" if reranker_only else "generate" if causal else "score" if classifier and hf.num_labels == 1
                else "classify" if classifier else "embed")
    if task not in allowed:
        raise ValueError(f"task {task!r} is not supported by {config.model} "
                         f"({', '.join(archs)}); it supports {', '.join(sorted(allowed))}")
    return task


def resolve_max_model_len(hf, config: EngineConfig, is_decoder: bool, st_max_seq_length: int | None) -> int:
    """st_max_seq_length: sentence-transformers' max_seq_length, what the model was trained and is
    evaluated at, which bounds the limit as vLLM reads it."""
    limit = getattr(hf, "max_position_embeddings", None) or 2048
    if not is_decoder and hf.model_type in ("roberta", "xlm-roberta", "camembert"):
        limit -= hf.pad_token_id + 1  # their positions start after the padding index
    if getattr(hf, "sliding_window", None) and getattr(hf, "use_sliding_window", True):
        limit = min(limit, hf.sliding_window)  # full attention is exact only inside the window
    if st_max_seq_length:
        limit = min(limit, st_max_seq_length)
    want = config.max_model_len
    if want is not None and want > limit:
        raise ValueError(f"max_model_len {want} is larger than the model's limit {limit}")
    return want or limit
