"""Schemathesis against the application's own /openapi.json: generated requests for every
operation, tiny random-weight models, generation capped to a few tokens. The server may refuse
(4xx) but must never fail (5xx), and its schema must describe the bodies it accepts."""
import shutil

import httpx
import pytest
import ray
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from ray import serve
from transformers import AutoTokenizer

from deployments.builder import AppArgs, ModelArgs, build_app
from cluster.local_cluster import free_port

EXAMPLES_PER_OPERATION = 8
OUTPUT_CAP = {"max_tokens": 3, "max_completion_tokens": 3, "n": 2, "min_tokens": 1, "top_k": 8, "top_n": 4}


def tiny(path: str, task: str, served: str) -> ModelArgs:
    return ModelArgs(model=path, task=task, served_model_name=served, max_model_len=64, num_threads=1,
                     kv_cache_memory_bytes=4 << 20,
                     deployment_config={"ray_actor_options": {"num_cpus": 0.1}, "num_replicas": 1})


# Real chat templates (ChatML, SmolLM2's, Qwen's) join strings with `+`, so a message without text
# breaks them: the tiny model gets one like them.
CONCATENATING_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' <|end|> ' }}"
                          "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def with_concatenating_template(model_dir: str, out_dir) -> str:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = CONCATENATING_TEMPLATE
    shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="module")
def base_url(tiny_model, tmp_path_factory):
    generator = with_concatenating_template(tiny_model("llama"), tmp_path_factory.mktemp("chatml-llama"))
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # never a `ray start` cluster on this host
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = AppArgs(models=[tiny(tiny_model("bert"), "embed", "embed"), tiny(generator, "generate", "gen"),
                           tiny(tiny_model("bert-cls1"), "score", "rerank"),
                           tiny(tiny_model("bert-cls3"), "classify", "classify")],
                   ingress_deployment_config={"ray_actor_options": {"num_cpus": 0.1}, "num_replicas": 1},
                   rag={"embed_model": "embed", "rerank_model": "rerank", "generate_model": "gen",
                        "deployment_config": {"ray_actor_options": {"num_cpus": 0.1}}})
    serve.run(build_app(args), name="default", route_prefix="/", blocking=False)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def steered(body):
    """Generated bodies go to the route's default model (a random `model` would only meet the 404
    that test_serve covers) and ask for a few output tokens at most: the same code paths, quickly."""
    if isinstance(body, dict):
        body.pop("model", None)
        for key, cap in OUTPUT_CAP.items():
            if isinstance(body.get(key), int) and not isinstance(body[key], bool) and body[key] > cap:
                body[key] = cap
    return body


def test_no_generated_request_gets_a_server_error(base_url):
    raw = httpx.get(f"{base_url}/openapi.json").json()
    schema = schemathesis.openapi.from_dict(raw)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 17
    failures, answered = [], set()
    for operation in operations:
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def run(case):
            case.body = steered(case.body)
            response = case.call(base_url=base_url, timeout=120)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.path} {case.body!r} -> {response.status_code} "
                                f"{response.text[:300]}")
            elif response.status_code < 300:
                answered.add(operation.label)
        run()
    assert not failures, "\n".join(failures[:10])
    # The schema leads the generator to bodies the server accepts, so the engines were reached. Routes on
    # stored objects ({id} in the path) rightly answer 404 to generated ids, so they are not counted.
    reachable = {o.label for o in operations if "{" not in o.path}
    assert len(answered & reachable) >= len(reachable) * 2 // 3, sorted(answered)
