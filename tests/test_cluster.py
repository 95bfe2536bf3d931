"""Multi-node tests on one machine: a head and two worker nodes of `ray.cluster_utils.Cluster`
(logical CPUs and custom resources), the application built by deployments.builder, and requests
through the HTTP proxy. One cluster for the module; the tests run in order and the last removes a
node. No test asserts a duration; waits poll with generous bounds."""
import concurrent.futures
import os
import socket
import time

import httpx
import pytest
import ray
from ray import serve

from cluster.local_cluster import deploy, local_cluster, metric_values, model, replica_nodes, wait_for
from deployments.builder import AppArgs, deployment_name

EMBED = "sentence-transformers/all-MiniLM-L6-v2"
GEN = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBED_DEPLOYMENT, GEN_DEPLOYMENT = deployment_name("embed", EMBED), deployment_name("generate", GEN)
MAX_INPUTS = 6000
# 64 characters make one block of the prefix router's table; this shares several.
SYSTEM = "You are a terse assistant for the servecluster tests. Answer in one short sentence, please. " * 3


@pytest.fixture(scope="module")
def cluster():
    # Each worker takes one Generator (pinned by `gen_slot`) and one Embedder.
    with local_cluster(head={"num_cpus": 1, "resources": {"embed_slot": 1}},
                       workers=[{"num_cpus": 2, "resources": {"gen_slot": 1, "embed_slot": 1}}] * 2) as lc:
        deploy(AppArgs(
            models=[model(EMBED, "embed", {"num_cpus": 0.3, "resources": {"embed_slot": 0.5}}, 2,
                          max_model_len=256, max_replicas_per_node=1),
                    model(GEN, "generate", {"num_cpus": 0.3, "resources": {"gen_slot": 1}}, 2)],
            limits={"max_inputs_per_request": MAX_INPUTS, "pooling_slice_inputs": 128},
            retry={"max_attempts": 3, "retry_budget_s": 60},
            ingress_deployment_config={"ray_actor_options": {"num_cpus": 0.05}}))
        yield lc.cluster, lc.workers, lc.url


@pytest.fixture(scope="module")
def http(cluster):
    with httpx.Client(base_url=cluster[2], timeout=300) as c:
        yield c


def chat(http: httpx.Client, content: str, system: str | None = None, max_tokens: int = 4) -> httpx.Response:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return http.post("/v1/chat/completions", json={"model": GEN, "messages": messages, "max_tokens": max_tokens})


def test_replicas_are_spread_and_pinned_by_resources(cluster, http):
    c, workers, _ = cluster
    wait_for(lambda: http.get("/v1/models").status_code == 200, what="the app")
    gen = replica_nodes(GEN_DEPLOYMENT)
    assert len(gen) == 2 and set(gen.values()) == {w.node_id for w in workers}  # one per gen_slot
    embed = replica_nodes(EMBED_DEPLOYMENT)
    assert len(embed) == 2 and len(set(embed.values())) == 2  # max_replicas_per_node: 1


def test_requests_answer_through_the_proxy(http):
    r = http.post("/v1/embeddings", json={"model": EMBED, "input": ["a cat", "a dog"]})
    assert r.status_code == 200 and len(r.json()["data"]) == 2
    r = chat(http, "Say hi.")
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None


def test_metrics_show_every_replica(http):
    """One scrape shows both replicas of each model, whichever replica served the requests."""
    for i in range(4):
        assert http.post("/v1/embeddings", json={"model": EMBED, "input": f"text {i}"}).status_code == 200
    series = wait_for(lambda: (s := metric_values(http, "vllm:num_requests_running", GEN)) and len(s) == 2 and s,
                      what="two Generator series")
    assert len(set(series)) == 2
    assert len(metric_values(http, "vllm:prompt_tokens_total", EMBED)) == 2


def test_prefix_routing_keeps_a_conversation_on_one_replica(http):
    # Earlier tests' chats reach /metrics up to one stats period (2 s) late: start from settled counters.
    before = wait_for(lambda: (a := metric_values(http, "vllm:prompt_tokens_total", GEN)) == (
        time.sleep(2.5) or metric_values(http, "vllm:prompt_tokens_total", GEN)) and a, what="settled counters")
    sent = 0
    for i in range(6):
        r = chat(http, f"Question number {i}?", system=SYSTEM, max_tokens=1)
        assert r.status_code == 200
        sent += r.json()["usage"]["prompt_tokens"]

    def grown():
        now = metric_values(http, "vllm:prompt_tokens_total", GEN)
        delta = {k: v - before.get(k, 0) for k, v in now.items()}
        return delta if sum(delta.values()) >= sent else None
    delta = wait_for(grown, what="the Generator's prompt tokens in /metrics")
    assert sorted(delta.values())[-1] == sent  # all on one replica: the one holding the prefix


def test_input_cap_is_a_400_naming_the_limit(http):
    r = http.post("/v1/embeddings", json={"model": EMBED, "input": ["x"] * (MAX_INPUTS + 1)})
    assert r.status_code == 400
    err = r.json()["error"]
    assert "max_inputs_per_request" in err["message"] and err["param"] == "input"


def test_disconnected_embedding_request_leaves_the_engine(cluster, http):
    """A client that goes away from a 5,000-input request: its work leaves the engine."""
    texts = [f"document {i}: " + "the quick brown fox jumps over the lazy dog " * 6 for i in range(5000)]
    body = httpx.Request("POST", cluster[2] + "/v1/embeddings", json={"model": EMBED, "input": texts})
    host, port = cluster[2].removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = "".join(f"{k}: {v}\r\n" for k, v in body.headers.items())
    sock.sendall(f"POST /v1/embeddings HTTP/1.1\r\n{head}\r\n".encode() + body.read())

    def engine_work() -> float:
        return sum(metric_values(http, "vllm:num_requests_waiting", EMBED).values()) + \
            sum(metric_values(http, "vllm:num_requests_running", EMBED).values())
    wait_for(lambda: engine_work() > 0, what="the request to reach an engine")
    tokens_at_disconnect = sum(metric_values(http, "vllm:prompt_tokens_total", EMBED).values())
    sock.close()
    wait_for(lambda: engine_work() == 0, timeout_s=60, what="the engine queue to empty")
    done = sum(metric_values(http, "vllm:prompt_tokens_total", EMBED).values()) - tokens_at_disconnect
    assert done < 5000 * 50 / 2  # most of the request never ran: it was cancelled, not finished


def test_killed_replica_loses_no_request(http):
    """16 non-streaming chats in flight on two replicas; one replica is killed: all 16 answer 200."""
    victim = sorted(replica_nodes(GEN_DEPLOYMENT))[0]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(chat, http, f"Count to {i}.", None, 24) for i in range(16)]
        wait_for(lambda: sum(metric_values(http, "vllm:num_requests_running", GEN).values()) > 0,
                 what="chats to run")
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        statuses = [f.result().status_code for f in futures]
    assert statuses == [200] * 16


def test_removing_a_worker_replaces_its_replicas(cluster, http):
    c, workers, _ = cluster
    wait_for(lambda: len(replica_nodes(EMBED_DEPLOYMENT)) == 2 and len(replica_nodes(GEN_DEPLOYMENT)) == 2,
             what="replicas back after the kill")
    embed_nodes = set(replica_nodes(EMBED_DEPLOYMENT).values())
    worker = next(w for w in workers if w.node_id in embed_nodes)
    c.remove_node(worker)
    # The survivors answer meanwhile; the lost Embedder comes back on another node.
    assert chat(http, "Still there?").status_code == 200
    assert http.post("/v1/embeddings", json={"model": EMBED, "input": "x"}).status_code == 200
    wait_for(lambda: len(nodes := replica_nodes(EMBED_DEPLOYMENT)) == 2 and worker.node_id not in nodes.values(),
             what="the Embedder replica re-placed")
    # The Generator replica needs the gone node's gen_slot: serve status shows the deployment short of
    # a replica, and the controller log says which resources it waits for.
    logs = os.path.join(ray._private.worker._global_node.get_logs_dir_path(), "serve")  # noqa: SLF001

    def scheduling_warning() -> bool:
        text = "".join(open(os.path.join(logs, f)).read() for f in os.listdir(logs) if f.startswith("controller"))
        return any("to be scheduled" in line and GEN_DEPLOYMENT in line and "gen_slot" in line
                   for line in text.splitlines()[-200:])
    wait_for(scheduling_warning, what="the controller's report of the unplaceable replica")
    status = serve.status().applications["default"].deployments[GEN_DEPLOYMENT]
    assert status.status != "HEALTHY" or "gen_slot" in status.message, status
    assert chat(http, "And now?").status_code == 200
