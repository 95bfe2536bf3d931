"""The rerankers of every new architecture served end to end: DeBERTa-v3 cross-encoder, jina-reranker-v2,
bge-reranker-v2-gemma (its prompt by default) and bge-reranker-v2-minicpm-layerwise, tiny random models
in one Ray instance, through /v1/score (1:1, 1:N, N:N) and /v1/rerank; HTTP scores equal the offline
engine's on the same model. No test asserts a duration."""

import httpx
import pytest
import ray
from ray import serve

from conftest import sentence
from deployments.builder import AppArgs, ModelArgs, build_app
from engine import LLM
from cluster.local_cluster import free_port

MODELS = {  # served name: (tiny model, engine_kwargs)
    "deberta-v3": ("deberta-v3-cls1", {}),
    "jina-reranker-v2": ("jina-reranker-v2", {}),
    "bge-reranker-v2-gemma": ("bge-reranker-v2-gemma", {"block_size": 4}),
    "bge-reranker-v2-minicpm-layerwise": ("bge-reranker-v2-minicpm-layerwise", {"block_size": 4, "cutoff_layers": 4}),
}
QUERIES = ["where does the cat sleep", "is the dog on the road"]
DOCS = [sentence(1000 + i, 4 + 7 * i) for i in range(3)]


@pytest.fixture(scope="module")
def http(tiny_model):
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    models = [ModelArgs(model=tiny_model(name), task="score", served_model_name=served, dtype="float32",
                        num_threads=1, engine_kwargs=kwargs,
                        deployment_config={"ray_actor_options": {"num_cpus": 0.2},
                                           "autoscaling_config": {"min_replicas": 1, "max_replicas": 1}})
              for served, (name, kwargs) in MODELS.items()]
    app = build_app(AppArgs(models=models, ingress_deployment_config={"ray_actor_options": {"num_cpus": 0.05}}))
    serve.run(app, name="default", route_prefix="/", blocking=False)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
            yield client
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def offline(tiny_model, one_thread):
    """The same models in this process: what each route must return."""
    return {served: LLM(tiny_model(name), task="score", dtype="float32", **kwargs)
            for served, (name, kwargs) in MODELS.items()}


def scores(http, model: str, text_1, text_2) -> list[float]:
    r = http.post("/v1/score", json={"model": model, "text_1": text_1, "text_2": text_2})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["index"] for d in data] == list(range(len(data)))
    return [d["score"] for d in data]


@pytest.mark.parametrize("model", list(MODELS))
def test_score_pairings(model, http, offline):
    llm = offline[model]
    want_1n = [o.outputs.score for o in llm.score(QUERIES[0], DOCS)]
    want_nn = [o.outputs.score for o in llm.score(QUERIES + QUERIES[:1], DOCS)]
    assert scores(http, model, QUERIES[0], DOCS[1]) == pytest.approx(want_1n[1:2], abs=1e-5)  # 1:1
    assert scores(http, model, QUERIES[0], DOCS) == pytest.approx(want_1n, abs=1e-5)  # 1:N
    assert scores(http, model, QUERIES + QUERIES[:1], DOCS) == pytest.approx(want_nn, abs=1e-5)  # N:N
    assert want_nn[0] == pytest.approx(want_1n[0], abs=1e-5) and want_nn[1] != pytest.approx(want_1n[1], abs=1e-6)
    r = http.post("/v1/score", json={"model": model, "text_1": QUERIES, "text_2": DOCS})  # 2:3
    assert r.status_code == 400 and "text_1" in r.json()["error"]["message"]


@pytest.mark.parametrize("model", list(MODELS))
def test_rerank(model, http, offline):
    want = [o.outputs.score for o in offline[model].score(QUERIES[1], DOCS)]
    r = http.post("/v1/rerank", json={"model": model, "query": QUERIES[1], "documents": DOCS, "top_n": 2})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    order = sorted(range(len(DOCS)), key=lambda i: -want[i])[:2]
    assert [x["index"] for x in results] == order
    assert [x["relevance_score"] for x in results] == pytest.approx([want[i] for i in order], abs=1e-5)
    assert all(x["document"]["text"] == DOCS[x["index"]] for x in results)
