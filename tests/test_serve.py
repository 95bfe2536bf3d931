"""Integration tests: the whole application in one in-process Ray instance (started once for
the module), driven over HTTP with the real `openai` client and httpx, and through Python
handles. Engine limits are small so it starts and runs quickly; no test asserts a duration."""
import asyncio
import base64
import struct
import time

import httpx
import openai
import pytest
import ray
from ray import serve

from deployments.builder import AppArgs, ModelArgs, build_app, deployment_name
from deployments.ingress import ROUTES
from deployments.protocol import (ChatCompletionRequest, ChatCompletionStreamResponse, EmbeddingRequest,
                                  EmbeddingResponse)
from cluster.local_cluster import free_port

API_KEY = "test-key"
EMBED = "sentence-transformers/all-MiniLM-L6-v2"
GEN = "HuggingFaceTB/SmolLM2-135M-Instruct"
RERANK = "smollm2-reranker"
CLASSIFY = "tiny-classifier"
TIGHT = "smollm2-tight"  # one request at a time, one queued: for the overload test
ORIGIN = "http://allowed.example"
BODY_LIMIT = 1 << 20
MAX_LEN = 512
EMBED_LEN = 256  # all-MiniLM-L6-v2's sentence_bert_config.json max_seq_length

# vLLM's response fields (vllm/entrypoints/openai/protocol.py).
EMBEDDING_KEYS = {"id", "object", "created", "model", "data", "usage"}
USAGE_KEYS = {"prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details"}
COMPLETION_KEYS = {"id", "object", "created", "model", "choices", "service_tier", "system_fingerprint", "usage",
                   "kv_transfer_params"}
CHAT_KEYS = COMPLETION_KEYS | {"prompt_logprobs"}
MODEL_CARD_KEYS = {"id", "object", "created", "owned_by", "root", "parent", "max_model_len", "permission"}


def small(model: str, task: str, served: str | None = None, cpus: float = 0.3, max_len: int = MAX_LEN,
          engine_kwargs: dict | None = None, **deployment) -> ModelArgs:
    return ModelArgs(model=model, task=task, served_model_name=served, max_model_len=max_len,
                     kv_cache_memory_bytes=64 << 20, num_threads=1, engine_kwargs=engine_kwargs or {},
                     deployment_config={"ray_actor_options": {"num_cpus": cpus},
                                        "autoscaling_config": {"min_replicas": 1, "max_replicas": 1}, **deployment})


def tiny_classifier(path) -> str:
    """A random-weight BERT classifier with MiniLM's tokenizer: /classify needs a classify model."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from engine.loader import resolve_model
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512, num_labels=3,
                        id2label={0: "negative", 1: "neutral", 2: "positive"},
                        label2id={"negative": 0, "neutral": 1, "positive": 2},
                        architectures=["BertForSequenceClassification"])
    BertForSequenceClassification(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_model(EMBED)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = AppArgs(
        # The generator's engine runs in a process of its own (as on a GPU by default): every generation route
        # below goes through it, a Ray replica's child process.
        models=[small(EMBED, "embed", max_len=EMBED_LEN), small(GEN, "generate", engine_kwargs={"engine_process": True}),
                small(GEN, "score", RERANK),
                small(tiny_classifier(tmp_path_factory.mktemp("classifier")), "classify", CLASSIFY, cpus=0.1),
                small(GEN, "generate", TIGHT, cpus=0.2, max_ongoing_requests=1, max_queued_requests=1)],
        api_key=API_KEY, allowed_origins=[ORIGIN], max_request_body_bytes=BODY_LIMIT,
        ingress_deployment_config={"ray_actor_options": {"num_cpus": 0.05}},
        rag={"embed_model": EMBED, "rerank_model": RERANK, "generate_model": GEN,
             "data_dir": str(tmp_path_factory.mktemp("rag")),
             "deployment_config": {"ray_actor_options": {"num_cpus": 0.05}}})
    serve.run(build_app(args), name="default", route_prefix="/", blocking=False)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=300)


def error_of(r: httpx.Response, status: int) -> dict:
    """The one error shape, with the expected status."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == status
    return body["error"]


def sse_events(lines) -> list[str]:
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def server_stats(name: str, task: str) -> dict:
    return serve.get_deployment_handle(deployment_name(task, name), "default").stats.remote().result()


# ---- models, health, version, metrics -----------------------------------------------------------
def test_models(client, http):
    ids = [m.id for m in client.models.list().data]
    assert ids == [EMBED, GEN, RERANK, CLASSIFY, TIGHT]
    body = http.get("/v1/models").json()
    assert body["object"] == "list"
    card = body["data"][0]
    assert set(card) == MODEL_CARD_KEYS
    assert card["object"] == "model" and card["root"] == EMBED and card["max_model_len"] == EMBED_LEN
    assert card["permission"][0]["object"] == "model_permission"


def test_health_version_metrics(base_url, http):
    assert httpx.get(f"{base_url}/health").status_code == 200  # no key needed
    assert http.get("/version").json()["version"]
    http.post("/v1/completions", json={"model": GEN, "prompt": "Hello", "max_tokens": 3})
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")

    def generated() -> float:  # /metrics reads the stats Serve pushes every ~2 s: poll until they arrive
        text = http.get("/metrics").text
        line = next(l for l in text.splitlines() if l.startswith("vllm:generation_tokens_total") and f'"{GEN}"' in l)
        return float(line.split()[-1])
    for _ in range(240):
        if generated() >= 3:
            break
        time.sleep(0.5)
    text = http.get("/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_count"):
        assert f"{name}{{model_name=" in text, name
    line = next(l for l in text.splitlines() if l.startswith("vllm:generation_tokens_total") and f'"{GEN}"' in l)
    assert float(line.split()[-1]) >= 3


# ---- embeddings ---------------------------------------------------------------------------------
def test_embeddings_openai_client(client):
    resp = client.embeddings.create(model=EMBED, input=["The cat sat on the mat.", "A dog barked."])
    assert [d.index for d in resp.data] == [0, 1] and len(resp.data[0].embedding) == 384
    assert abs(sum(x * x for x in resp.data[0].embedding) - 1) < 1e-4  # normalized, as sentence-transformers
    assert resp.usage.prompt_tokens == resp.usage.total_tokens > 0
    single = client.embeddings.create(model=EMBED, input="The cat sat on the mat.", encoding_format="float")
    assert max(abs(a - b) for a, b in zip(single.data[0].embedding, resp.data[0].embedding)) < 1e-4


def test_embeddings_shapes_and_formats(http):
    ids = http.post("/tokenize", json={"model": EMBED, "prompt": "hello world"}).json()["tokens"]
    for payload in ({"input": "hello world"}, {"input": ids}, {"input": [ids, ids]}):
        body = http.post("/v1/embeddings", json={"model": EMBED, **payload}).json()
        assert set(body) == EMBEDDING_KEYS and set(body["usage"]) == USAGE_KEYS
        assert body["object"] == "list" and body["id"].startswith("embd-") and body["model"] == EMBED
        assert set(body["data"][0]) == {"index", "object", "embedding"} and body["data"][0]["object"] == "embedding"
    floats = http.post("/v1/embeddings", json={"model": EMBED, "input": "hello world"}).json()["data"][0]["embedding"]
    b64 = http.post("/v1/embeddings", json={"model": EMBED, "input": "hello world", "encoding_format": "base64"})
    raw = base64.b64decode(b64.json()["data"][0]["embedding"])
    assert max(abs(a - b) for a, b in zip(struct.unpack(f"<{len(raw) // 4}f", raw), floats)) < 1e-6
    # No model given: the first served model that embeds.
    assert http.post("/v1/embeddings", json={"input": "x"}).json()["model"] == EMBED


def test_embedding_errors(http):
    err = error_of(http.post("/v1/embeddings", json={"model": EMBED, "input": "x", "dimensions": 8}), 400)
    assert "dimensions" in err["message"]
    long_text = "word " * 2000
    err = error_of(http.post("/v1/embeddings", json={"model": EMBED, "input": long_text}), 400)
    assert str(EMBED_LEN) in err["message"]
    ok = http.post("/v1/embeddings", json={"model": EMBED, "input": long_text, "truncate_prompt_tokens": -1})
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == EMBED_LEN
    err = error_of(http.post("/v1/embeddings", json={"model": EMBED}), 400)
    assert err["param"] == "input" and "input" in err["message"]
    err = error_of(http.post("/v1/embeddings", json={"model": "nope", "input": "x"}), 404)
    assert "nope" in err["message"] and EMBED in err["message"] and GEN in err["message"]
    err = error_of(http.post("/v1/embeddings", json={"model": GEN, "input": "x"}), 400)
    assert "Embeddings API" in err["message"]


# ---- score, rerank, classify --------------------------------------------------------------------
def test_score_pairings(http):
    q, docs = "What is the capital of France?", ["Paris is the capital of France.", "Bananas are yellow."]
    for path in ("/v1/score", "/score"):
        body = http.post(path, json={"model": RERANK, "text_1": q, "text_2": docs[0]}).json()
        assert set(body) == {"id", "object", "created", "model", "data", "usage"} and body["object"] == "list"
        assert set(body["data"][0]) == {"index", "object", "score"} and body["data"][0]["object"] == "score"
        assert 0 <= body["data"][0]["score"] <= 1
    one_to_n = http.post("/v1/score", json={"model": RERANK, "text_1": q, "text_2": docs}).json()["data"]
    n_to_n = http.post("/v1/score", json={"model": RERANK, "text_1": [q, q], "text_2": docs}).json()["data"]
    assert [d["index"] for d in one_to_n] == [0, 1]
    assert [d["score"] for d in one_to_n] == pytest.approx([d["score"] for d in n_to_n], abs=1e-5)
    err = error_of(http.post("/v1/score", json={"model": RERANK, "text_1": [q, q], "text_2": docs + ["x"]}), 400)
    assert "text_1" in err["message"] or "text_2" in err["message"]
    # Embedding models score too, as vLLM's do: the cosine of the two embeddings.
    cosine = http.post("/score", json={"model": EMBED, "text_1": q, "text_2": docs}).json()["data"]
    assert cosine[0]["score"] > cosine[1]["score"]


def test_rerank(http):
    q = "What is the capital of France?"
    docs = ["Bananas are yellow.", "Paris is the capital of France.", "The stock market fell today."]
    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        body = http.post(path, json={"model": RERANK, "query": q, "documents": docs, "top_n": 2,
                                     "return_documents": True}).json()
        assert set(body) == {"id", "model", "usage", "results"} and set(body["usage"]) == {"total_tokens"}
        results = body["results"]
        assert len(results) == 2 and set(results[0]) == {"index", "document", "relevance_score"}
        scores = [r["relevance_score"] for r in results]
        assert scores == sorted(scores, reverse=True)
        assert all(r["document"]["text"] == docs[r["index"]] for r in results)
    everything = http.post("/rerank", json={"query": q, "documents": docs}).json()  # model: the first reranker
    assert everything["model"] == RERANK and sorted(r["index"] for r in everything["results"]) == [0, 1, 2]


def test_classify(http):
    body = http.post("/classify", json={"model": CLASSIFY, "input": ["good", "bad"]}).json()
    assert set(body) == {"id", "object", "created", "model", "data", "usage"} and body["id"].startswith("classify-")
    item = body["data"][0]
    assert set(item) == {"index", "label", "probs", "num_classes"} and item["num_classes"] == 3
    assert item["label"] in {"negative", "neutral", "positive"} and sum(item["probs"]) == pytest.approx(1, abs=1e-5)
    error_of(http.post("/classify", json={"model": EMBED, "input": "x"}), 400)


# ---- generation ---------------------------------------------------------------------------------
def test_completions(client, http):
    resp = client.completions.create(model=GEN, prompt="The capital of France is", max_tokens=5, n=2,
                                     temperature=0, logprobs=2, seed=1)
    assert len(resp.choices) == 2 and {c.index for c in resp.choices} == {0, 1}
    assert resp.choices[0].text == resp.choices[1].text  # greedy
    assert resp.choices[0].finish_reason in ("length", "stop")
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) > 0
    assert resp.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in resp.choices)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    body = http.post("/v1/completions", json={"model": GEN, "prompt": ["One", "Two"], "max_tokens": 2}).json()
    assert set(body) == COMPLETION_KEYS and body["object"] == "text_completion"
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert set(body["choices"][0]) == {"index", "text", "logprobs", "finish_reason", "stop_reason", "prompt_logprobs"}
    echo = client.completions.create(model=GEN, prompt="Hello", max_tokens=2, echo=True, temperature=0)
    assert echo.choices[0].text.startswith("Hello")


def test_completions_stop_and_seed(client):
    kwargs = dict(model=GEN, prompt="Count: 1, 2, 3,", max_tokens=20, temperature=1.0, seed=42)
    a, b = (client.completions.create(**kwargs).choices[0].text for _ in range(2))
    assert a == b  # same seed, same sample
    stopped = client.completions.create(model=GEN, prompt="Count: 1, 2, 3,", max_tokens=20, temperature=0,
                                        stop=[","])
    assert "," not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"


def test_completions_stream(client):
    stream = client.completions.create(model=GEN, prompt="Once upon a time", max_tokens=8, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 8 and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    full = client.completions.create(model=GEN, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert text == full.choices[0].text
    # Several prompts stream together, each choice index once finished.
    chunks = list(client.completions.create(model=GEN, prompt=["One", "Two"], max_tokens=4, n=2, stream=True))
    finished = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finished == [0, 1, 2, 3]


def test_chat(client, http):
    messages = [{"role": "user", "content": "Say hello."}]
    resp = client.chat.completions.create(model=GEN, messages=messages, max_completion_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=2)
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert len(choice.logprobs.content) == resp.usage.completion_tokens <= 6
    assert len(choice.logprobs.content[0].top_logprobs) == 2
    body = http.post("/v1/chat/completions", json={"model": GEN, "messages": messages, "max_tokens": 3}).json()
    assert set(body) == CHAT_KEYS and body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    n2 = client.chat.completions.create(model=GEN, messages=messages, max_tokens=3, n=2)
    assert sorted(c.index for c in n2.choices) == [0, 1]


def test_chat_stream(client, http):
    messages = [{"role": "user", "content": "Tell me a story."}]
    chunks = list(client.chat.completions.create(model=GEN, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].usage.prompt_tokens > 0
    full = client.chat.completions.create(model=GEN, messages=messages, max_tokens=10, temperature=0)
    assert text == full.choices[0].message.content
    with http.stream("POST", "/v1/chat/completions",
                     json={"model": GEN, "messages": messages, "max_tokens": 3, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]" and len(events) >= 3


def test_generation_errors(base_url, http):
    messages = [{"role": "user", "content": "hi"}]
    err = error_of(http.post("/v1/chat/completions", json={"model": GEN, "messages": messages,
                                                          "max_tokens": 10_000}), 400)
    assert "max_tokens" in err["message"] and str(MAX_LEN) in err["message"]
    # Over-long in a stream is still a plain 400, not a broken stream.
    err = error_of(http.post("/v1/chat/completions", json={"model": GEN, "messages": messages,
                                                          "max_tokens": 10_000, "stream": True}), 400)
    err = error_of(http.post("/v1/completions", json={"model": GEN, "prompt": "x", "temperature": -1}), 400)
    assert "temperature" in err["message"]
    err = error_of(http.post("/v1/chat/completions", json={"model": GEN, "messages": messages,
                                                          "stream_options": {"include_usage": True}}), 400)
    assert "stream_options" in err["message"]
    err = error_of(http.post("/v1/chat/completions", json={"model": GEN, "messages": "hi"}), 400)
    assert err["param"] == "messages"
    err = error_of(http.post("/v1/completions", json={"model": EMBED, "prompt": "x"}), 400)
    assert "Completions API" in err["message"]
    error_of(http.post("/v1/completions", content=b"{", headers={"content-type": "application/json"}), 400)
    error_of(http.get("/v1/no-such-route"), 404)
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY).chat.completions.create(
            model="missing", messages=messages)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
@pytest.mark.parametrize("message, field", [
    ({"role": "user"}, "content"), ({"content": None, "role": ""}, "role"), ({"role": "wizard", "content": "hi"}, "role"),
])
def test_bad_chat_messages_are_400_naming_the_field(http, path, message, field):
    err = error_of(http.post(path, json={"model": GEN, "messages": [message], "max_tokens": 2}), 400)
    assert err["param"].startswith("messages.0") and field in err["message"]


def test_logit_bias(http):
    messages = [{"role": "user", "content": "hi"}]
    err = error_of(http.post("/v1/chat/completions", json={"model": GEN, "messages": messages,
                                                          "logit_bias": {"abc": 5}}), 400)
    assert err["param"] == "logit_bias" and "abc" in err["message"]
    err = error_of(http.post("/v1/completions", json={"model": GEN, "prompt": "x", "logit_bias": {"99999999": 1}}), 400)
    assert "logit_bias" in err["message"] and "99999999" in err["message"]
    word = http.post("/tokenize", json={"model": GEN, "prompt": " Paris", "add_special_tokens": False}).json()["tokens"][0]
    body = http.post("/v1/completions", json={"model": GEN, "prompt": "Hello", "max_tokens": 3, "temperature": 0,
                                              "ignore_eos": True, "logit_bias": {str(word): 100}}).json()
    assert body["choices"][0]["text"] == " Paris" * 3


def test_rerank_top_n_and_empty_query_as_vllm(http):
    """vLLM returns every document for top_n <= 0 and scores an empty query like any other text."""
    docs = ["Bananas are yellow.", "Paris is the capital of France.", "The stock market fell today."]
    for top_n in (0, -1, -5):
        body = http.post("/v1/rerank", json={"model": RERANK, "query": "capital", "documents": docs, "top_n": top_n})
        assert sorted(r["index"] for r in body.json()["results"]) == [0, 1, 2]
    body = http.post("/v1/rerank", json={"model": RERANK, "query": "", "documents": docs, "top_n": 2})
    assert body.status_code == 200 and len(body.json()["results"]) == 2


def test_tokenize_detokenize(http):
    body = http.post("/tokenize", json={"model": GEN, "prompt": "Hello world", "return_token_strs": True}).json()
    assert set(body) == {"count", "max_model_len", "tokens", "token_strs"}
    assert body["count"] == len(body["tokens"]) == len(body["token_strs"]) and body["max_model_len"] == MAX_LEN
    assert http.post("/detokenize", json={"model": GEN, "tokens": body["tokens"]}).json() == {"prompt": "Hello world"}
    chat = http.post("/tokenize", json={"model": GEN, "messages": [{"role": "user", "content": "Hello"}]}).json()
    assert chat["count"] > body["count"]
    error_of(http.post("/detokenize", json={"model": GEN, "tokens": [10 ** 9]}), 400)


def test_tokenize_continue_final_message(http):
    """/tokenize and chat build prompts with the same function: continue_final_message leaves the last
    assistant message open."""
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "The answer is"}]
    body = {"model": GEN, "messages": messages, "add_generation_prompt": False}
    open_end = http.post("/tokenize", json={**body, "continue_final_message": True}).json()["tokens"]
    closed = http.post("/tokenize", json=body).json()["tokens"]
    assert len(open_end) < len(closed) and closed[:len(open_end)] == open_end
    assert http.post("/detokenize", json={"model": GEN, "tokens": open_end}).json()["prompt"].endswith("The answer is")
    err = error_of(http.post("/tokenize", json={**body, "continue_final_message": True,
                                               "add_generation_prompt": True}), 400)
    assert "continue_final_message" in err["message"]


def test_tokenizer_under_concurrent_tokenize_and_chat(base_url):
    """The replica's event loop tokenizes while its engine thread encodes prompts: many at once, no errors."""
    messages = [{"role": "user", "content": "Say something."}]

    async def scenario():
        async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"},
                                     timeout=300) as c:
            calls = []
            for i in range(24):
                calls.append(c.post("/tokenize", json={"model": GEN, "messages": messages}))
                calls.append(c.post("/tokenize", json={"model": GEN, "prompt": f"Hello number {i}",
                                                       "return_token_strs": True}))
            calls += [c.post("/v1/chat/completions", json={"model": GEN, "messages": messages, "max_tokens": 2})
                      for _ in range(6)]
            calls += [c.post("/v1/embeddings", json={"model": EMBED, "input": f"text {i}"}) for i in range(6)]
            return await asyncio.gather(*calls)

    responses = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200] * len(responses), [r.text for r in responses
                                                                          if r.status_code != 200][:3]
    assert len({tuple(r.json()["tokens"]) for r in responses[0:48:2]}) == 1  # the same chat prompt every time


# ---- security and limits ------------------------------------------------------------------------
def test_api_key_on_every_route(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as anonymous:
        for method, path, _ in ROUTES:
            r = anonymous.request(method, path, json={})
            if path == "/health":
                assert r.status_code == 200
            else:
                assert error_of(r, 401)["type"] == "authentication_error", path
        r = anonymous.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        error_of(r, 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0).models.list()


def test_body_limit(http):
    err = error_of(http.post("/v1/embeddings", json={"model": EMBED, "input": "a" * (BODY_LIMIT + 1)}), 413)
    assert str(BODY_LIMIT) in err["message"]


def test_cors(http):
    r = http.options("/v1/embeddings", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = http.options("/v1/embeddings", headers={"Origin": "http://evil.example",
                                                "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers


def wait_for(predicate, what: str, timeout_s: float = 120):
    """Poll until true; the deadline only bounds a hang, it is not a timing assertion."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_disconnected_stream_frees_its_blocks(base_url):
    before = server_stats(GEN, "generate")
    assert before["num_running"] == 0
    payload = {"model": GEN, "messages": [{"role": "user", "content": "Write a long story."}],
               "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        with c.stream("POST", "/v1/chat/completions", json=payload) as r:
            for n, _ in enumerate(r.iter_lines()):
                if n > 6:
                    break  # leave mid-stream: the connection closes here
    aborts = before["request_success_total"]["abort"]
    wait_for(lambda: settled(base_url, GEN)["request_success_total"]["abort"] == aborts + 1, "the abort")
    after = settled(base_url, GEN)
    assert after["num_running"] == 0 and after["num_free_blocks"] == before["num_free_blocks"] == after["num_blocks"]


def settled(base_url: str, model: str) -> dict:
    """A model's stats after one more request: the engine snapshots its stats after a step."""
    httpx.post(f"{base_url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
               json={"model": model, "prompt": "Hi", "max_tokens": 1}, timeout=120)
    return server_stats(model, "generate")


def test_overload_answers_503_with_retry_after(base_url):
    """TIGHT runs one request and queues one; a third is refused instead of queued forever."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    # Long enough to still run when the two quick requests arrive; the queued one waits for all of it.
    hold = {"model": TIGHT, "prompt": "Go on forever:", "max_tokens": 120, "ignore_eos": True, "stream": True}
    quick = {"model": TIGHT, "prompt": "Hi", "max_tokens": 1}

    async def scenario():
        async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=120) as c:
            async with c.stream("POST", "/v1/completions", json=hold) as held:
                lines = held.aiter_lines()
                await anext(lines)  # the long request is running now
                return await asyncio.gather(c.post("/v1/completions", json=quick),
                                            c.post("/v1/completions", json=quick))

    statuses = asyncio.run(scenario())
    refused = [r for r in statuses if r.status_code != 200]
    assert refused, [r.status_code for r in statuses]
    for r in refused:
        error_of(r, r.status_code)
        assert r.status_code in (429, 503) and int(r.headers["retry-after"]) >= 1
    wait_for(lambda: settled(base_url, TIGHT)["num_running"] == 0, "the held request to leave")
    stats = settled(base_url, TIGHT)
    assert stats["num_free_blocks"] == stats["num_blocks"]


# ---- Python handles -----------------------------------------------------------------------------
def test_python_handles_return_protocol_objects():
    embedder = serve.get_deployment_handle(deployment_name("embed", EMBED), app_name="default")
    resp = embedder.embeddings.remote(EmbeddingRequest(input=["hello"])).result()
    assert isinstance(resp, EmbeddingResponse) and len(resp.data[0].embedding) == 384

    async def stream():
        generator = serve.get_deployment_handle(deployment_name("generate", GEN), app_name="default")
        req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True)
        return [chunk async for chunk in generator.options(stream=True).chat_stream.remote(req)]

    chunks = asyncio.run(stream())
    assert all(isinstance(c, ChatCompletionStreamResponse) for c in chunks) and len(chunks) >= 2
