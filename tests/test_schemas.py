"""Unit tests of the serving layer that need no Ray cluster: schemas, error mapping, metrics
text, middlewares, the builder's options and the CLI's parsing."""
import base64
import struct

import numpy as np

import pytest
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError
from starlette.testclient import TestClient

from deployments import cli
from deployments.builder import AppArgs, ModelArgs, build_app, deployment_name
from deployments.errors import APIError, to_error
from deployments.ingress import ROUTES, handle_error, handle_validation_error
from deployments.metrics import render_prometheus
from deployments.protocol import (
    ChatCompletionRequest, ChatMessageParam, ClassificationRequest, CompletionRequest, DetokenizeRequest,
    EmbeddingRequest, RerankRequest, ScoreRequest, TokenizeRequest)
from deployments.security import ApiKeyMiddleware, BodyLimitMiddleware
from deployments.serving_pooling import encode_embedding
from engine import SamplingParams

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


# ---- protocol -----------------------------------------------------------------------------------
def test_embedding_input_forms():
    assert EmbeddingRequest(input="a").prompts() == ["a"]
    assert EmbeddingRequest(input=["a", "b"]).prompts() == ["a", "b"]
    assert EmbeddingRequest(input=[1, 2, 3]).prompts() == [[1, 2, 3]]
    assert EmbeddingRequest(input=[[1, 2], [3]]).prompts() == [[1, 2], [3]]
    assert EmbeddingRequest(input="a").encoding_format == "float"
    with pytest.raises(ValidationError, match="input must not be empty"):
        EmbeddingRequest(input=[])
    with pytest.raises(ValidationError, match="encoding_format"):
        EmbeddingRequest(input="a", encoding_format="int8")


@pytest.mark.parametrize("message, field", [
    ({"role": "user"}, "content is required for a user message"),
    ({"role": "", "content": None}, "role"),
    ({"role": "wizard", "content": "hi"}, "role"),
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, "content"),
])
def test_bad_chat_messages_are_refused_naming_the_field(message, field):
    for request in (lambda: ChatCompletionRequest(messages=[message]), lambda: TokenizeRequest(messages=[message])):
        with pytest.raises(ValidationError, match=field):
            request()


def test_chat_messages_openai_allows():
    tool_call = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    req = ChatCompletionRequest(messages=[
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                    {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "tool_calls": tool_call},
        {"role": "tool", "content": "42", "tool_call_id": "c1"}])
    assert [m.template_dict().get("content") for m in req.messages] == ["Be brief.", "ab", None, "42"]


def test_logit_bias_keys_are_token_ids():
    assert ChatCompletionRequest(messages=[{"role": "user", "content": "x"}],
                                 logit_bias={"5": 200, "7": -3}).sampling_kwargs()["logit_bias"] == {5: 100.0, 7: -3.0}
    for bad in ({"abc": 5}, {"-1": 5}, {"1.5": 1}):
        with pytest.raises(ValidationError, match="logit_bias"):
            CompletionRequest(prompt="x", logit_bias=bad)


def test_openapi_publishes_the_limits_the_server_enforces():
    """What the server refuses is in the schema, so generated clients and fuzzers see the truth."""
    app = FastAPI()
    for path, model in (("/c", ChatCompletionRequest), ("/e", EmbeddingRequest), ("/p", CompletionRequest),
                        ("/k", ClassificationRequest), ("/s", ScoreRequest), ("/d", DetokenizeRequest)):
        app.add_api_route(path, _route(model), methods=["POST"])
    defs = app.openapi()["components"]["schemas"]
    chat, message = defs["ChatCompletionRequest"]["properties"], defs["ChatMessageParam"]["properties"]
    assert chat["messages"]["minItems"] == 1
    assert message["role"]["enum"] == ["system", "developer", "user", "assistant", "tool"]
    assert _limits(chat["temperature"]) == {"minimum": 0}
    assert _limits(chat["top_p"]) == {"exclusiveMinimum": 0, "maximum": 1}
    assert _limits(chat["n"]) == {"minimum": 1} and _limits(chat["max_tokens"]) == {"minimum": 1}
    embed_input = defs["EmbeddingRequest"]["properties"]["input"]["anyOf"]
    assert all(branch.get("minItems") == 1 for branch in embed_input if branch.get("type") == "array")
    assert _limits(defs["ClassificationRequest"]["properties"]["truncate_prompt_tokens"]) == {"minimum": -1}
    assert _limits(defs["CompletionRequest"]["properties"]["logprobs"]) == {"minimum": 0, "maximum": 20}


def _route(model):
    async def route(body: model):  # as the ingress declares its routes
        return None
    return route


def _limits(prop: dict) -> dict:
    """The numeric limits of a field, looking inside `X | None`."""
    branches = prop.get("anyOf", [prop])
    keys = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
    return {k: v for b in branches for k, v in b.items() if k in keys}


def test_unknown_fields_are_accepted_and_dropped():
    req = RerankRequest(query="q", documents=["d"], return_documents=True)
    assert req.top_n == 0 and "return_documents" not in req.model_dump()


def test_score_accepts_strings_and_lists():
    assert ScoreRequest(text_1="a", text_2=["b", "c"]).text_2 == ["b", "c"]


def test_sampling_defaults_follow_vllm():
    req = CompletionRequest(prompt="hi")
    assert req.max_tokens == 16 and req.n == 1 and not req.stream
    kwargs = req.sampling_kwargs()
    assert kwargs["temperature"] == 1.0 and kwargs["top_p"] == 1.0 and kwargs["stop"] == []
    params = SamplingParams(**kwargs, max_tokens=req.max_tokens, logprobs=None)
    assert params.max_tokens == 16
    assert CompletionRequest(prompt="hi", stop="x").sampling_kwargs()["stop"] == ["x"]


def test_stream_options_need_stream():
    with pytest.raises(ValidationError, match="stream_options"):
        ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], stream_options={"include_usage": True})
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], stream=True,
                                stream_options={"include_usage": True})
    assert req.include_usage


def test_chat_output_limit_prefers_max_completion_tokens():
    msgs = [{"role": "user", "content": "x"}]
    assert ChatCompletionRequest(messages=msgs, max_tokens=5, max_completion_tokens=7).output_limit() == 7
    assert ChatCompletionRequest(messages=msgs, max_tokens=5).output_limit() == 5
    assert ChatCompletionRequest(messages=msgs).output_limit() is None


def test_chat_message_text_parts_are_joined():
    m = ChatMessageParam(role="user", content=[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])
    assert m.template_dict() == {"role": "user", "content": "ab"}


def test_tokenize_needs_prompt_or_messages():
    with pytest.raises(ValidationError, match="exactly one"):
        TokenizeRequest()
    assert TokenizeRequest(prompt="x").messages is None


def test_base64_embedding_is_little_endian_float32():
    vector = np.array([0.5, -1.25, 3.0], dtype=np.float32)  # EmbeddingOutput.data
    raw = base64.b64decode(encode_embedding(vector, "base64"))
    assert list(struct.unpack("<3f", raw)) == [0.5, -1.25, 3.0]
    assert encode_embedding(vector, "float") == [0.5, -1.25, 3.0]
    assert base64.b64decode(encode_embedding(vector.astype(">f4"), "base64")) == raw  # big-endian in, still little


# ---- errors -------------------------------------------------------------------------------------
def test_error_mapping():
    body, headers = to_error(APIError("nope", 404, "model"))
    assert body.model_dump() == {"error": {"message": "nope", "type": "not_found_error", "param": "model",
                                           "code": 404}} and headers == {}
    body, _ = to_error(ValueError("max_model_len is 512"))
    assert body.error.code == 400 and "512" in body.error.message
    body, headers = to_error(BackPressureError(num_queued_requests=3, max_queued_requests=3, status_code=429))
    assert body.error.code == 429 and headers == {"Retry-After": "1"}
    body, headers = to_error(BackPressureError(num_queued_requests=3, max_queued_requests=3, retry_after_s=2.5))
    assert body.error.code == 503 and headers == {"Retry-After": "3"}
    assert to_error(RuntimeError("boom"))[0].error.code == 500


def test_errors_from_other_deployments_are_unwrapped():
    try:
        raise ValueError("prompt too long for max_model_len 512")
    except ValueError as e:
        wrapped = RayTaskError("fn", "traceback", e).as_instanceof_cause()
    body, _ = to_error(wrapped)
    assert body.error.code == 400 and body.error.message == "prompt too long for max_model_len 512"


def test_api_error_survives_pickling():
    import pickle
    e = pickle.loads(pickle.dumps(APIError("gone", 404, "model")))
    assert (e.message, e.status, e.param) == ("gone", 404, "model")


# ---- HTTP pieces on a plain FastAPI app ---------------------------------------------------------
def tiny_app(**middleware) -> TestClient:
    app = FastAPI()

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        return {"n": len(body.prompts())}

    @app.get("/health")
    async def health():
        return {}

    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(APIError, handle_error)
    if "max_bytes" in middleware:
        app.add_middleware(BodyLimitMiddleware, max_bytes=middleware["max_bytes"])
    if "api_key" in middleware:
        app.add_middleware(ApiKeyMiddleware, api_key=middleware["api_key"])
    return TestClient(app)


def test_validation_error_is_400_naming_the_field():
    client = tiny_app()
    r = client.post("/v1/embeddings", json={"model": "m"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "input" and "input" in err["message"] and err["type"] == "invalid_request_error"
    r = client.post("/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == 400


def test_api_key_middleware():
    client = tiny_app(api_key="sekrit")
    assert client.post("/v1/embeddings", json={"input": "a"}).status_code == 401
    r = client.post("/v1/embeddings", json={"input": "a"}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert client.post("/v1/embeddings", json={"input": "a"},
                       headers={"Authorization": "Bearer sekrit"}).status_code == 200
    assert client.get("/health").status_code == 200


def test_body_limit_middleware():
    client = tiny_app(max_bytes=100)
    assert client.post("/v1/embeddings", json={"input": "a"}).status_code == 200
    r = client.post("/v1/embeddings", json={"input": "a" * 200})
    assert r.status_code == 413 and r.json()["error"]["code"] == 413

    def chunks():  # no Content-Length: the limit is counted while reading
        yield b'{"input": "'
        yield b"a" * 200
        yield b'"}'
    r = client.post("/v1/embeddings", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


# ---- metrics text -------------------------------------------------------------------------------
def test_prometheus_rendering():
    hist = {"buckets": [0.1, 1.0], "counts": [1, 2, 0], "sum": 1.5, "count": 3}
    text = render_prometheus([{"model_name": "m", "replica": "r1", "num_running": 2, "num_waiting": 1,
                               "kv_cache_usage": 0.25, "prompt_tokens_total": 10, "generation_tokens_total": 4,
                               "request_success_total": {"stop": 3}, "ttft_seconds": hist,
                               "inter_token_seconds": hist, "e2e_seconds": hist}])
    assert 'vllm:num_requests_running{model_name="m",replica="r1"} 2.0' in text
    assert 'vllm:request_success_total{model_name="m",replica="r1",finished_reason="stop"} 3.0' in text
    assert 'vllm:time_to_first_token_seconds_bucket{model_name="m",replica="r1",le="1.0"} 3.0' in text
    assert 'vllm:time_to_first_token_seconds_bucket{model_name="m",replica="r1",le="+Inf"} 3.0' in text
    assert "# TYPE vllm:inter_token_latency_seconds histogram" in text


# ---- builder and CLI ----------------------------------------------------------------------------
def test_model_args_fill_engine_and_deployment_options():
    m = ModelArgs(model=MINILM, task="embed", max_model_len=256,
                  deployment_config={"ray_actor_options": {"num_cpus": 2}})
    options = m.deployment_options(max_queued_requests=8)
    assert options["max_queued_requests"] == 8 and "autoscaling_config" in options
    assert options["backpressure_config"]["retry_after_s"] == 1
    kwargs = m.engine_config(options["ray_actor_options"])
    assert kwargs["num_threads"] == 2 and kwargs["max_model_len"] == 256 and "dtype" in kwargs
    fixed = ModelArgs(model=MINILM, deployment_config={"num_replicas": 2}).deployment_options(8)
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert m.deployment_name == deployment_name("embed", MINILM) == f"Embedder:{MINILM}"


def test_bad_config_fails_at_build_time():
    with pytest.raises(ValidationError):
        AppArgs(models=[{"model": MINILM, "tsak": "embed"}])
    with pytest.raises(ValueError, match="dtype"):
        build_app(AppArgs(models=[{"model": MINILM, "dtype": "float7"}]))
    with pytest.raises(ValueError, match="quantization"):
        build_app(AppArgs(models=[{"model": MINILM, "quantization": "int3"}]))
    with pytest.raises(ValueError, match="served as"):
        build_app(AppArgs(models=[{"model": MINILM}, {"model": MINILM}]))
    with pytest.raises(ValueError, match="not served"):
        build_app(AppArgs(models=[{"model": MINILM}], rag={"embed_model": MINILM, "generate_model": "x"}))


def test_cli_takes_vllm_serve_commands():
    ns, unknown = cli.parser().parse_known_args(
        ["serve", "BAAI/bge-reranker-v2-m3", "--task", "score", "--port", "8123", "--max-model-len", "8192",
         "--dtype", "auto", "--api-key", "KEY", "--served-model-name", "bge", "--trust-remote-code"])
    assert unknown == ["--trust-remote-code"]
    args = cli.app_args(ns)
    (m,) = args.models
    assert (m.model, m.task, m.max_model_len, m.served_name, args.api_key) == (
        "BAAI/bge-reranker-v2-m3", "score", 8192, "bge", "KEY")
    assert ns.port == 8123
    assert m.deployment_options(args.max_queued_requests)["num_replicas"] == 1
    assert not m.auto_truncate
    build_app(args)  # the same application serve_config.yaml builds, for one model
    ns, _ = cli.parser().parse_known_args(["serve", MINILM, "--task", "embed", "--auto-truncate"])
    assert cli.app_args(ns).models[0].engine_config({})["auto_truncate"] is True
    ns, _ = cli.parser().parse_known_args(["serve", "HuggingFaceTB/SmolLM2-135M-Instruct", "-q", "fp8",
                                           "--torch-compile", "--enforce-eager", "--no-async-scheduling",
                                           "--kv-cache-dtype", "fp8"])
    config = cli.app_args(ns).models[0].engine_config({})
    assert (config["quantization"], config["torch_compile"], config["enforce_eager"], config["async_scheduling"],
            config["kv_cache_dtype"]) == ("fp8", True, True, False, "fp8")


def test_every_route_names_an_ingress_method():
    from deployments.ingress import OpenAIIngress
    for _, path, name in ROUTES:
        assert callable(getattr(OpenAIIngress.func_or_class, name)), path


def test_serve_config_is_valid():
    """serve_config.yaml passes Serve's schema and builds; its replicas fit 2 cores."""
    import pathlib

    import yaml
    from ray.serve.schema import ServeDeploySchema
    config = yaml.safe_load((pathlib.Path(__file__).parents[1] / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "deployments.builder:build_app"
    args = AppArgs.model_validate(app["args"])
    build_app(args)
    deployments = [m.deployment_config for m in args.models] + [args.ingress_deployment_config,
                                                                 args.rag.deployment_config]
    assert all("autoscaling_config" in d for d in deployments)
    assert sum(d["ray_actor_options"]["num_cpus"] for d in deployments) <= 2
    # The default embedder truncates over-long inputs as sentence-transformers does (SciFact documents).
    embedder = next(m for m in args.models if m.task == "embed")
    assert embedder.engine_config({})["auto_truncate"] is True
