"""An autoscaling policy that reads the engines' own pressure signals.

Ray Serve's default policy scales on ongoing requests per replica. For a continuous-batching
engine that count says little: a generation replica with 16 short requests is idle while one with
16 long ones has run out of KV cache and is queueing. Each model replica therefore reports
(`ModelServer.record_autoscaling_stats`) its KV-cache usage and its engine's waiting requests,
and this policy scales up when either says the replicas are saturated, and otherwise falls back to
the request-count rule. Serve applies min/max replicas and the up/down delays around it.

Use it in a deployment's autoscaling_config:
    autoscaling_config: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 16,
                         policy: {policy_function: cluster.autoscaling:engine_pressure_policy}}
"""
import math
from typing import Any

from ray.serve.config import AutoscalingContext

KV_USAGE_HIGH = 0.85  # above this, new sequences soon preempt running ones
WAITING_PER_REPLICA = 4  # engine-side queue a replica may hold before it is saturated


def engine_pressure_policy(ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
    replicas = max(ctx.current_num_replicas, 1)
    if ctx.current_num_replicas == 0:
        return ctx.target_num_replicas, {}
    by_requests = math.ceil(ctx.total_num_requests / (ctx.config.get_target_ongoing_requests() or 1))
    metrics = ctx.aggregated_metrics or {}
    kv = list((metrics.get("kv_cache_usage") or {}).values())
    waiting = sum((metrics.get("num_waiting") or {}).values())
    saturated = (kv and sum(kv) / len(kv) > KV_USAGE_HIGH) or waiting > WAITING_PER_REPLICA * replicas
    desired = max(by_requests, replicas + 1 if saturated else 0)
    return desired, {}
