from types import SimpleNamespace

import pytest

from cluster.autoscaling import EnginePressurePolicy
from cluster.shapes import DOWNSCALE_DELAY_S, UPSCALE_DELAY_S
from deployments.builder import ModelArgs

policy = EnginePressurePolicy()


def ctx(replicas: int, requests: float, kv: list[float] = (), waiting: list[int] = (), target: int = 16):
    metrics = {"kv_cache_usage": {f"r{i}": v for i, v in enumerate(kv)},
               "num_waiting": {f"r{i}": v for i, v in enumerate(waiting)}}
    return SimpleNamespace(current_num_replicas=replicas, target_num_replicas=replicas, total_num_requests=requests,
                           aggregated_metrics=metrics,
                           config=SimpleNamespace(get_target_ongoing_requests=lambda: target))


def test_request_count_rule_when_engines_are_relaxed():
    assert policy(ctx(2, 64, kv=[0.2, 0.3], waiting=[0, 0]))[0] == 4
    assert policy(ctx(2, 8, kv=[0.2, 0.3], waiting=[0, 0]))[0] == 1


def test_full_kv_cache_scales_up_even_with_few_requests():
    assert policy(ctx(2, 8, kv=[0.95, 0.9], waiting=[0, 0]))[0] == 3


def test_engine_queue_scales_up():
    assert policy(ctx(1, 4, kv=[0.1], waiting=[9]))[0] == 2


def test_idle_replicas_scale_down_to_what_requests_need():
    assert policy(ctx(4, 0, kv=[0.0] * 4, waiting=[0] * 4))[0] == 0  # Serve clamps to min_replicas
    assert policy(ctx(4, 20, kv=[0.1] * 4, waiting=[0] * 4))[0] == 2


def test_busy_kv_caches_hold_replicas_with_few_requests():
    """Few long generations: the request count says 1, the caches say keep both."""
    assert policy(ctx(2, 4, kv=[0.7, 0.6], waiting=[0, 0]))[0] == 2
    assert policy(ctx(2, 4, kv=[0.2, 0.1], waiting=[1, 0]))[0] == 2


def test_thresholds_are_configurable_and_checked():
    eager = EnginePressurePolicy(kv_usage_high=0.5, kv_usage_low=0.1, waiting_per_replica=1)
    assert eager(ctx(2, 4, kv=[0.6, 0.6], waiting=[0, 0]))[0] == 3
    assert eager(ctx(1, 1, kv=[0.0], waiting=[2]))[0] == 2
    with pytest.raises(ValueError, match="kv_usage_low"):
        EnginePressurePolicy(kv_usage_high=0.3, kv_usage_low=0.6)


def test_no_replicas_keeps_target():
    assert policy(ctx(0, 0))[0] == 0


def test_missing_custom_metrics_fall_back_to_requests():
    c = ctx(1, 40)
    c.aggregated_metrics = None
    assert policy(c)[0] == 3


def test_config_overrides_keep_llm_delays_and_policy():
    """A model config that only sets replica bounds keeps the LLM-suited delays and the engine policy."""
    m = ModelArgs(model="m", task="generate",
                  deployment_config={"autoscaling_config": {"min_replicas": 2, "max_replicas": 6}})
    auto = m.deployment_options(64)["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"]) == (2, 6)
    assert (auto["upscale_delay_s"], auto["downscale_delay_s"]) == (UPSCALE_DELAY_S, DOWNSCALE_DELAY_S)
    assert auto["policy"]["policy_function"] == "cluster.autoscaling:EnginePressurePolicy"
    assert UPSCALE_DELAY_S < DOWNSCALE_DELAY_S
    fixed = ModelArgs(model="m", task="embed", deployment_config={"num_replicas": 2}).deployment_options(64)
    assert "autoscaling_config" not in fixed and fixed["num_replicas"] == 2
