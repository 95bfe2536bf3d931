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
from cluster.replica_stats import RETIRED
from deployments.builder import AppArgs, deployment_name

EMBED = "sentence-transformers/all-MiniLM-L6-v2"
GEN = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBED_DEPLOYMENT, GEN_DEPLOYMENT = deployment_name("embed", EMBED), deployment_name("generate", GEN)
MAX_INPUTS = 6000
KILL_TOKENS = 32  # per chat in the kill test: several seconds of decoding, longer than the stats' lag
RETRY_BUDGET_S = 5  # how long a call waits for a replica when its deployment has none
# 64 characters make one block of the prefix router's table; this shares several.
SYSTEM = "You are a terse assistant for the servecluster tests. Answer in one short sentence, please. " * 3


@pytest.fixture(scope="module")
def cluster():
    # Each worker takes one Generator (pinned by `gen_slot`) and one Embedder; the ingress stays on the
    # head (`ingress_slot`), which the tests never remove.
    with local_cluster(head={"num_cpus": 1, "resources": {"embed_slot": 1, "ingress_slot": 1}},
                       workers=[{"num_cpus": 2, "resources": {"gen_slot": 1, "embed_slot": 1}}] * 2) as lc:
        deploy(AppArgs(
            models=[model(EMBED, "embed", {"num_cpus": 0.3, "resources": {"embed_slot": 0.5}}, 2,
                          max_model_len=256, max_replicas_per_node=1),
                    model(GEN, "generate", {"num_cpus": 0.3, "resources": {"gen_slot": 1}}, 2)],
            limits={"max_inputs_per_request": MAX_INPUTS, "pooling_slice_inputs": 128},
            retry={"max_attempts": 3, "retry_budget_s": RETRY_BUDGET_S},
            ingress_deployment_config={"ray_actor_options": {"num_cpus": 0.05, "resources": {"ingress_slot": 0.1}}}))
        yield lc.cluster, lc.workers, lc.url


@pytest.fixture(scope="module")
def http(cluster):
    with httpx.Client(base_url=cluster[2], timeout=300) as c:
        yield c


def chat(http: httpx.Client, content: str, system: str | None = None, max_tokens: int = 4,
         ignore_eos: bool = False) -> httpx.Response:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return http.post("/v1/chat/completions", json={"model": GEN, "messages": messages, "max_tokens": max_tokens,
                                                   "ignore_eos": ignore_eos})


def settled(http: httpx.Client, name: str) -> dict[str, float]:
    """A /metrics counter per replica once it has stopped moving: earlier requests reach /metrics up to
    one routing-stats period (2 s) late."""
    return wait_for(lambda: (a := metric_values(http, name, GEN)) == (time.sleep(2.5) or metric_values(http, name, GEN))
                    and a, what=f"settled {name}")


def scheduling_warning(pending: int) -> bool:
    """Serve's controller logged, in its last lines, `pending` Generator replicas waiting for gen_slot (it
    names the resources required and available; after RAY_SERVE_SLOW_STARTUP_WARNING_S, 2 s in these tests)."""
    logs = os.path.join(ray._private.worker._global_node.get_logs_dir_path(), "serve")  # noqa: SLF001
    text = "".join(open(os.path.join(logs, f)).read() for f in os.listdir(logs) if f.startswith("controller"))
    return any(f"has {pending} replicas that have taken more" in line and "to be scheduled" in line
               and GEN_DEPLOYMENT in line and "gen_slot" in line for line in text.splitlines()[-200:])


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
    before = settled(http, "vllm:prompt_tokens_total")
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
    """16 non-streaming chats on two replicas; the replica killed is one whose own stats show it
    generating them: all 16 answer 200, all generated again by the survivor. Without the ingress's
    retries (retry.max_attempts 1) the chats the victim held answer 503."""
    before = settled(http, "vllm:generation_tokens_total")

    def generating() -> str | None:
        """A replica whose stats were taken while it decoded these chats (its counter moved since `before`)."""
        running = metric_values(http, "vllm:num_requests_running", GEN)
        made = metric_values(http, "vllm:generation_tokens_total", GEN)
        return next((r for r, n in running.items()
                     if r != RETIRED and n > 0 and before.get(r, 0) < made.get(r, 0)), None)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(chat, http, f"Count to {i}.", None, KILL_TOKENS, True) for i in range(16)]
        victim = wait_for(generating, what="a replica generating the chats")
        ray.kill(ray.get_actor(next(n for n in replica_nodes(GEN_DEPLOYMENT) if n.endswith("#" + victim)),
                               namespace="serve"))
        answers = [f.result() for f in futures]
    assert [r.status_code for r in answers] == [200] * 16, [r.text for r in answers if r.status_code != 200]
    assert all(r.json()["usage"]["completion_tokens"] == KILL_TOKENS for r in answers)

    def generated_by_live_replicas() -> float:
        now = metric_values(http, "vllm:generation_tokens_total", GEN)
        return sum(v - before.get(r, 0) for r, v in now.items() if r not in (RETIRED, victim))
    # The victim answered none of them (its partial work was lost): the live replicas made every token.
    wait_for(lambda: generated_by_live_replicas() >= 16 * KILL_TOKENS, what="the survivors' counters")
    assert generated_by_live_replicas() == 16 * KILL_TOKENS
    retired = metric_values(http, "vllm:generation_tokens_total", GEN)[RETIRED] - before.get(RETIRED, 0)
    assert retired > before[victim]  # its last stats, taken mid-generation, joined the retired series


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
    wait_for(lambda: scheduling_warning(1), what="the controller's report of the unplaceable replica")
    status = serve.status().applications["default"].deployments[GEN_DEPLOYMENT]
    assert status.status != "HEALTHY" or "gen_slot" in status.message, status
    assert chat(http, "And now?").status_code == 200


def test_no_replica_left_is_a_503_with_retry_after(cluster, http):
    """The last gen_slot goes with the last worker: the Generator has no replica anywhere. A chat waits
    retry.retry_budget_s for one, then gets 503 with Retry-After, not a 500 and not an endless wait;
    /health names the model; serve status and the controller log say the replica waits for gen_slot."""
    c, workers, _ = cluster
    c.remove_node(next(w for w in workers if w.node_id in set(replica_nodes(GEN_DEPLOYMENT).values())))
    wait_for(lambda: not replica_nodes(GEN_DEPLOYMENT), what="the last Generator replica to die")
    r = chat(http, "Anyone?")
    assert r.status_code == 503, r.text
    assert int(r.headers["retry-after"]) >= 1 and "no replica is running" in r.json()["error"]["message"]
    assert http.post("/v1/embeddings", json={"model": EMBED, "input": "x"}).status_code == 200  # the rest serves
    health = wait_for(lambda: (h := httpx.get(cluster[2] + "/health")).status_code == 503 and h, what="/health 503")
    assert health.json()["error"]["message"] == f"no replica is running for: {GEN}"
    status = serve.status().applications["default"].deployments[GEN_DEPLOYMENT]
    assert status.status != "HEALTHY" and not status.replica_states.get("RUNNING"), status
    wait_for(lambda: scheduling_warning(2), what="the controller's report of both unplaceable replicas")
