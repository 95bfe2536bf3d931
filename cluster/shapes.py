"""Resource shapes and autoscaling defaults for the replica kinds.

A replica's torch threads must match its CPU share: more threads than reserved cores only
fight the other replicas for them (see `torch_threads`). On a GPU the engine's threads do
little, so a GPU shape reserves one CPU for the Python side.
"""
import math
from typing import Any


def cpu_shape(num_cpus: float, memory_gib: float | None = None) -> dict[str, Any]:
    """ray_actor_options for a CPU replica."""
    options: dict[str, Any] = {"num_cpus": num_cpus}
    if memory_gib is not None:
        options["memory"] = int(memory_gib * (1 << 30))
    return options


def gpu_shape(num_gpus: float = 1, num_cpus: float = 1) -> dict[str, Any]:
    """ray_actor_options for a GPU replica; a fraction (e.g. 0.5) packs two small models on one GPU."""
    return {"num_cpus": num_cpus, "num_gpus": num_gpus}


def torch_threads(ray_actor_options: dict[str, Any]) -> int:
    """Intra-op threads for a replica: its reserved cores, rounded, at least one."""
    return max(1, math.floor(ray_actor_options.get("num_cpus", 1) + 0.5))


# Per engine task: how many requests one replica should hold before Serve adds a replica.
# Generation batches many sequences per step, so it tolerates far more in flight than pooling.
TARGET_ONGOING_REQUESTS = {"generate": 16, "embed": 8, "score": 8, "classify": 8, "auto": 8}


ENGINE_PRESSURE_POLICY = {"policy_function": "cluster.autoscaling:EnginePressurePolicy",
                          "policy_kwargs": {"kv_usage_high": 0.85, "kv_usage_low": 0.5, "waiting_per_replica": 4}}
# Quick up (a saturated engine queues and TTFT climbs within seconds), slow down (a new replica
# must load its model again), decisions on a few seconds of engine stats.
UPSCALE_DELAY_S, DOWNSCALE_DELAY_S, METRICS_INTERVAL_S, LOOK_BACK_PERIOD_S = 5, 120, 2, 10


def autoscaling(task: str, min_replicas: int = 1, max_replicas: int = 2) -> dict[str, Any]:
    """A model deployment's autoscaling_config: request counts, plus its engine's KV and queue pressure."""
    return {"min_replicas": min_replicas, "max_replicas": max_replicas,
            "target_ongoing_requests": TARGET_ONGOING_REQUESTS[task],
            "upscale_delay_s": UPSCALE_DELAY_S, "downscale_delay_s": DOWNSCALE_DELAY_S,
            "metrics_interval_s": METRICS_INTERVAL_S, "look_back_period_s": LOOK_BACK_PERIOD_S,
            "policy": ENGINE_PRESSURE_POLICY}


# Generation and yes/no reranking reuse prompt prefixes, so they route to the replica holding them;
# the others route as Serve does. Both record every replica's stats for the ingress's /metrics.
ROUTERS = {"generate": "cluster.prefix_router:PrefixAwareRouter", "score": "cluster.prefix_router:PrefixAwareRouter"}
STATS_ROUTER = "cluster.replica_stats:StatsRouter"
ROUTING_STATS_PERIOD_S = 2  # how fresh the routers' KV usage and /metrics are


def request_router(task: str) -> dict[str, Any]:
    return {"request_router_class": ROUTERS.get(task, STATS_ROUTER),
            "request_routing_stats_period_s": ROUTING_STATS_PERIOD_S}


def model_deployment_defaults(task: str) -> dict[str, Any]:
    """@serve.deployment options for a model replica when the config gives none."""
    return {"ray_actor_options": cpu_shape(1), "autoscaling_config": autoscaling(task),
            "max_ongoing_requests": 64, "request_router_config": request_router(task)}


def ingress_deployment_defaults() -> dict[str, Any]:
    # The ingress only parses JSON and awaits handles: a sliver of a CPU, many requests at once.
    return {"ray_actor_options": cpu_shape(0.1), "max_ongoing_requests": 512,
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 128}}
