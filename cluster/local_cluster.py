"""A multi-node Ray cluster on one machine (`ray.cluster_utils.Cluster`: a head and worker nodes
with logical CPUs and custom resources) running the app that deployments.builder builds, for the
multi-node tests (tests/test_cluster.py) and the scale benchmark (bench/scale.py)."""
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import ray
from ray import serve
from ray.cluster_utils import Cluster

from deployments.builder import AppArgs, ModelArgs, build_app

# Serve reports a replica it cannot place after this long (default 30 s), in status and logs.
SLOW_STARTUP_ENV = {"RAY_SERVE_SLOW_STARTUP_WARNING_S": "2", "RAY_SERVE_SLOW_STARTUP_WARNING_PERIOD_S": "2"}


@dataclass(slots=True)
class LocalCluster:
    cluster: Cluster
    workers: list = field(default_factory=list)  # the worker nodes, for remove_node
    url: str = ""  # the HTTP proxy


def free_port() -> int:
    """A free TCP port on localhost, for Serve's HTTP proxy."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_cluster(head: dict[str, Any], workers: list[dict[str, Any]]) -> Iterator[LocalCluster]:
    """head, workers: add_node arguments (num_cpus, resources). Serve listens on the head only."""
    os.environ.update(SLOW_STARTUP_ENV)
    c = Cluster(initialize_head=True, head_node_args={**head, "include_dashboard": False})
    try:
        nodes = [c.add_node(**w) for w in workers]
        ray.init(address=c.address)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly"})
        yield LocalCluster(c, nodes, f"http://127.0.0.1:{port}")
    finally:
        serve.shutdown()
        ray.shutdown()
        c.shutdown()
        for key in SLOW_STARTUP_ENV:
            os.environ.pop(key, None)


def model(name: str, task: str, actor_options: dict, replicas: int | None = None, max_model_len: int = 512,
          engine_kwargs: dict | None = None, **deployment) -> ModelArgs:
    """A small model deployment: one torch thread, short health checks; fixed `replicas`, or the
    autoscaling_config given in `deployment`."""
    fixed = {} if replicas is None else {"num_replicas": replicas}
    return ModelArgs(model=name, task=task, max_model_len=max_model_len, kv_cache_memory_bytes=64 << 20, num_threads=1,
                     dtype="float32", engine_kwargs=engine_kwargs or {},
                     deployment_config={**fixed, "ray_actor_options": actor_options, "health_check_period_s": 1,
                                        "health_check_timeout_s": 30, **deployment})


def deploy(args: AppArgs) -> None:
    serve.run(build_app(args), name="default", route_prefix="/", blocking=False)


def replica_nodes(deployment: str) -> dict[str, str]:
    """Alive replica actors of a deployment -> their node id (from the GCS actor table)."""
    actors = ray._private.state.actors()  # noqa: SLF001 (no dashboard here, so no state API)
    return {a["Name"]: a["Address"]["NodeID"] for a in actors.values()
            if a["State"] == "ALIVE" and f"#{deployment}#" in (a["Name"] or "")}


def metric_values(http: httpx.Client, name: str, model_name: str) -> dict[str, float]:
    """replica label -> value of a /metrics series for one model."""
    out = {}
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + "{") and f'model_name="{model_name}"' in line:
            replica = line.split('replica="')[1].split('"')[0]
            out[replica] = float(line.rsplit(" ", 1)[1])
    return out


def wait_for(condition, timeout_s: float = 120, what: str = "condition"):
    """Poll until condition() is truthy and return it; a generous bound against hangs, not a timing."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")
