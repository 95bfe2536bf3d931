"""/metrics: each model replica's engine stats in Prometheus text format, with vLLM's metric
names where vLLM has one, labelled by model_name and replica.

The engine keeps the cumulative counters and histograms (engine.stats(), vLLM's bucket edges);
the model server adds its name and replica id (ModelServer.stats) and the ingress renders them for
every replica of every model from the stats Serve pushes to its routers (cluster.replica_stats),
plus one `replica="retired"` series per model holding the counters of replicas that are gone.
"""
GAUGES = {
    "vllm:num_requests_running": ("num_running", "Number of requests in model execution batches."),
    "vllm:num_requests_waiting": ("num_waiting", "Number of requests waiting to be processed."),
    "vllm:kv_cache_usage_perc": ("kv_cache_usage", "KV-cache usage. 1 means 100 percent usage."),
}
COUNTERS = {
    "vllm:prompt_tokens_total": ("prompt_tokens_total", "Number of prefill tokens processed."),
    "vllm:generation_tokens_total": ("generation_tokens_total", "Number of generation tokens processed."),
    # vLLM's vllm:prefix_cache_queries / vllm:prefix_cache_hits (prometheus_client adds _total).
    "vllm:prefix_cache_queries_total": ("prefix_cache_queries_total",
                                        "Prefix cache queries, in terms of number of queried tokens."),
    "vllm:prefix_cache_hits_total": ("prefix_cache_hits_total",
                                     "Prefix cache hits, in terms of number of cached tokens."),
}
HISTOGRAMS = {
    "vllm:time_to_first_token_seconds": ("ttft_seconds", "Histogram of time to first token in seconds."),
    "vllm:inter_token_latency_seconds": ("inter_token_seconds", "Histogram of inter-token latency in seconds."),
    "vllm:e2e_request_latency_seconds": ("e2e_seconds", "Histogram of end to end request latency in seconds."),
}


def render_prometheus(snapshots: list[dict]) -> str:
    """Text exposition format for a list of ModelServer.stats() dicts."""
    lines = []

    def labels(s: dict, **extra) -> str:
        pairs = {"model_name": s["model_name"], "replica": s["replica"], **extra}
        return "{" + ",".join(f'{k}="{escape(str(v))}"' for k, v in pairs.items()) + "}"

    for kind, table in (("gauge", GAUGES), ("counter", COUNTERS)):
        for name, (key, doc) in table.items():
            lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]
            lines += [f"{name}{labels(s)} {float(s.get(key, 0))}" for s in snapshots]
    name = "vllm:request_success_total"
    lines += [f"# HELP {name} Count of successfully processed requests.", f"# TYPE {name} counter"]
    for s in snapshots:
        for reason, n in sorted(s.get("request_success_total", {}).items()):
            lines.append(f"{name}{labels(s, finished_reason=reason)} {float(n)}")
    for name, (key, doc) in HISTOGRAMS.items():
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} histogram"]
        for s in snapshots:
            if key not in s:
                continue
            h, cumulative = s[key], 0
            for edge, count in zip([*h["buckets"], "+Inf"], h["counts"]):
                cumulative += count
                lines.append(f"{name}_bucket{labels(s, le=edge)} {float(cumulative)}")
            lines.append(f"{name}_sum{labels(s)} {float(h['sum'])}")
            lines.append(f"{name}_count{labels(s)} {float(cumulative)}")
    return "\n".join(lines) + "\n"


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
