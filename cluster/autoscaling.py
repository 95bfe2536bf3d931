"""An autoscaling policy that reads the engines' own pressure signals, both ways.

Ray Serve's default policy scales on ongoing requests per replica. For a continuous-batching
engine that count says little: a generation replica with 16 short requests is idle while one with
16 long ones has run out of KV cache and is queueing. Each model replica therefore reports
(`ModelServer.record_autoscaling_stats`) its KV-cache usage and its engine's waiting requests, and
`EnginePressurePolicy` decides:
- up: one replica more when the engines are saturated (mean KV usage above `kv_usage_high`, or more
  than `waiting_per_replica` requests waiting per replica), or more if the request count asks;
- hold: while the KV caches are busy (mean usage above `kv_usage_low`) it never scales down, since
  few but long generations still need their replicas;
- down: otherwise the request-count rule (ongoing requests / target_ongoing_requests), which falls
  to min_replicas when the replicas are idle.
Serve applies min/max replicas and the up/down delays around it (cluster.shapes.autoscaling has
the LLM defaults: quick up, slow down, since a new replica must first load its model).

Use it in a deployment's autoscaling_config:
    autoscaling_config: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 16,
                         upscale_delay_s: 5, downscale_delay_s: 120,
                         policy: {policy_function: cluster.autoscaling:EnginePressurePolicy,
                                  policy_kwargs: {kv_usage_high: 0.85, kv_usage_low: 0.5, waiting_per_replica: 4}}}
"""
import math
from typing import Any

from ray.serve.config import AutoscalingContext


class EnginePressurePolicy:
    def __init__(self, kv_usage_high: float = 0.85, kv_usage_low: float = 0.5, waiting_per_replica: float = 4):
        if not 0 <= kv_usage_low <= kv_usage_high <= 1:
            raise ValueError(f"need 0 <= kv_usage_low <= kv_usage_high <= 1, got {kv_usage_low}, {kv_usage_high}")
        self.kv_usage_high, self.kv_usage_low = kv_usage_high, kv_usage_low
        self.waiting_per_replica = waiting_per_replica

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        replicas = ctx.current_num_replicas
        if replicas == 0:
            return ctx.target_num_replicas, {}
        by_requests = math.ceil(ctx.total_num_requests / (ctx.config.get_target_ongoing_requests() or 1))
        metrics = ctx.aggregated_metrics or {}
        kv = list((metrics.get("kv_cache_usage") or {}).values())
        kv_mean = sum(kv) / len(kv) if kv else 0.0
        waiting = sum((metrics.get("num_waiting") or {}).values())
        if kv_mean > self.kv_usage_high or waiting > self.waiting_per_replica * replicas:
            return max(by_requests, replicas + 1), {}
        if kv_mean > self.kv_usage_low or waiting > 0:
            return max(by_requests, replicas), {}
        return by_requests, {}


