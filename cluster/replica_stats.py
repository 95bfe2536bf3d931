"""Every replica's engine stats, as Serve delivers them to the routers in this process.

Each model replica answers Serve's `record_routing_stats` with its engine snapshot
(ModelServer.record_routing_stats). The controller polls every replica each
`request_routing_stats_period_s` and pushes the results to every handle's router. `StatsRouter`
(Serve's default power-of-two-choices routing) registers itself per deployment, so
the ingress renders one /metrics for all replicas of all models, reading the routers' replica
stats (`snapshots`) without calling any replica.

Counters survive replica restarts: when a replica leaves, its last snapshot is folded into one
`retired` record per deployment, so a per-model sum over replica series never goes down.
"""
import importlib
from dataclasses import dataclass, field

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter

# Snapshot keys that are cumulative: summed into the retired record when a replica leaves.
COUNTER_KEYS = ("prompt_tokens_total", "generation_tokens_total", "prefix_cache_queries_total",
                "prefix_cache_hits_total")
HISTOGRAM_KEYS = ("ttft_seconds", "inter_token_seconds", "e2e_seconds")
RETIRED = "retired"


@dataclass(slots=True)
class DeploymentStats:
    live: dict[str, dict] = field(default_factory=dict)  # replica id -> latest snapshot
    retired: dict | None = None  # the sum of the counters of replicas that are gone

    def update(self, snapshots: dict[str, dict]) -> None:
        for replica in self.live.keys() - snapshots.keys():
            self.retire(self.live[replica])
        self.live = snapshots

    def retire(self, snap: dict) -> None:
        if not snap:
            return
        if self.retired is None:
            self.retired = {"model_name": snap["model_name"], "replica": RETIRED,
                            **{k: 0 for k in COUNTER_KEYS}, "request_success_total": {}}
        r = self.retired
        for key in COUNTER_KEYS:
            r[key] += snap.get(key, 0)
        for reason, n in snap.get("request_success_total", {}).items():
            r["request_success_total"][reason] = r["request_success_total"].get(reason, 0) + n
        for key in HISTOGRAM_KEYS:
            if key not in snap:
                continue
            h = snap[key]
            if key not in r:
                r[key] = {"buckets": list(h["buckets"]), "counts": [0] * len(h["counts"]), "sum": 0.0, "count": 0}
            r[key]["counts"] = [a + b for a, b in zip(r[key]["counts"], h["counts"])]
            r[key]["sum"] += h["sum"]
            r[key]["count"] += h["count"]

    def snapshots(self) -> list[dict]:
        """Series to render: each live replica that has reported, then the retired totals."""
        live = [s for s in self.live.values() if s]
        return live + ([self.retired] if self.retired else [])


# deployment name -> the router whose replicas /metrics reads, and what it rendered before.
# Several handles (routers) of one deployment may live in a process; the first one reports.
_ROUTERS: dict[str, "StatsRouter"] = {}
_STATS: dict[str, DeploymentStats] = {}


def snapshots(deployment: str) -> list[dict] | None:
    """The latest stats of each replica of a deployment plus its retired totals; None if no router of
    this process routes to it. A replica that left since the last call is retired with the snapshot
    seen then (its last routing-stats period before it died is not counted)."""
    router = _ROUTERS.get(deployment)
    if router is None:
        return None
    stats = _STATS.setdefault(deployment, DeploymentStats())
    replicas = list(router.curr_replicas.items())  # the router updates it from its own event loop
    stats.update({rid.unique_id: dict(r.routing_stats or {}) for rid, r in replicas})
    return stats.snapshots()


def running_replicas(deployment: str) -> int | None:
    """How many replicas of a deployment a router of this process can send to now (None: no router of
    this process routes to it). A replica leaves the count when the controller drops it or a request
    to it meets its death."""
    router = _ROUTERS.get(deployment)
    return None if router is None else len(router.curr_replicas)


class StatsRouter(PowerOfTwoChoicesRequestRouter):
    """Serve's default routing; it also makes its replicas' stats readable for /metrics."""

    def initialize_state(self, **kwargs) -> None:
        super().initialize_state(**kwargs)
        # Serve ships the router class to each handle by value (cloudpickle), with its own copy of
        # this module's globals: register in the imported module, the one the ingress reads.
        importlib.import_module(__name__)._ROUTERS.setdefault(self._deployment_id.name, self)
