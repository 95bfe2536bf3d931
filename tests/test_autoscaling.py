from types import SimpleNamespace

from cluster.autoscaling import engine_pressure_policy


def ctx(replicas: int, requests: float, kv: list[float] = (), waiting: list[int] = (), target: int = 16):
    metrics = {"kv_cache_usage": {f"r{i}": v for i, v in enumerate(kv)},
               "num_waiting": {f"r{i}": v for i, v in enumerate(waiting)}}
    return SimpleNamespace(current_num_replicas=replicas, target_num_replicas=replicas, total_num_requests=requests,
                           aggregated_metrics=metrics,
                           config=SimpleNamespace(get_target_ongoing_requests=lambda: target))


def test_request_count_rule_when_engines_are_relaxed():
    assert engine_pressure_policy(ctx(2, 64, kv=[0.2, 0.3], waiting=[0, 0]))[0] == 4
    assert engine_pressure_policy(ctx(2, 8, kv=[0.2, 0.3], waiting=[0, 0]))[0] == 1


def test_full_kv_cache_scales_up_even_with_few_requests():
    assert engine_pressure_policy(ctx(2, 8, kv=[0.95, 0.9], waiting=[0, 0]))[0] == 3


def test_engine_queue_scales_up():
    assert engine_pressure_policy(ctx(1, 4, kv=[0.1], waiting=[9]))[0] == 2


def test_no_replicas_keeps_target():
    assert engine_pressure_policy(ctx(0, 0))[0] == 0


def test_missing_custom_metrics_fall_back_to_requests():
    c = ctx(1, 40)
    c.aggregated_metrics = None
    assert engine_pressure_policy(c)[0] == 3
