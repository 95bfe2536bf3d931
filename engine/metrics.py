"""Cumulative histograms with vLLM's bucket edges, cheap to snapshot for Prometheus."""
import bisect
from dataclasses import dataclass, field

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                       20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


@dataclass(slots=True)
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; last is +Inf
    sum: float = 0.0
    count: int = 0

    def __post_init__(self):
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float, count: int = 1) -> None:
        """count observations of value."""
        self.counts[bisect.bisect_left(self.buckets, value)] += count  # the first edge >= value; past all: +Inf
        self.sum += value * count
        self.count += count

    def snapshot(self) -> dict:
        return {"buckets": list(self.buckets), "counts": list(self.counts), "sum": self.sum, "count": self.count}


@dataclass(slots=True)
class Stats:
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    request_success_total: dict = field(default_factory=lambda: {"stop": 0, "length": 0, "abort": 0})
    ttft_seconds: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    inter_token_seconds: Histogram = field(default_factory=lambda: Histogram(INTER_TOKEN_BUCKETS))
    e2e_seconds: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))
