"""Prefix-aware request routing for generation and yes/no reranking (a Ray Serve RequestRouter).

Each engine keeps a prefix cache: KV blocks of prompts it has seen, found by hash. A conversation's
next turn, or a rerank query's next batch of documents, is cheap only on the replica that served the
earlier ones. This router keeps, per replica, the chained hashes of the first blocks of text it sent
there (`CHARS_PER_BLOCK` characters, about one 16-token KV block; no tokenizer in the ingress) and
sends a request to the replica holding the longest prefix of it, if:
- the replicas are balanced: the longest and the shortest queue differ by at most
  `imbalanced_threshold` requests (Serve's cached queue lengths), and the matching replica is not
  nearly out of KV cache (`kv_usage_limit`, from the replica's routing stats);
- at least `min_match_blocks` blocks match.
Otherwise it routes as Serve's default does (power of two choices, shortest queue). The tables are
per router, i.e. per ingress replica, bounded by `max_blocks_per_replica` (least recently used go).

Enable it per model deployment (cluster.shapes does for generation and reranking models):
    request_router_config: {request_router_class: cluster.prefix_router:PrefixAwareRouter,
                            request_router_kwargs: {imbalanced_threshold: 8}}
"""
import hashlib
from collections import OrderedDict

from ray.serve.request_router import PendingRequest, ReplicaID, RunningReplica

from cluster.replica_stats import StatsRouter

CHARS_PER_BLOCK = 64
MAX_PREFIX_BLOCKS = 64  # the first 4k characters decide; deeper prefixes rarely change the choice


def request_text(args: list) -> str:
    """The text whose prefix an engine caches: the chat messages in order, the prompt, or the rerank/score
    query. Only its start matters, and the same conversation always yields the same start."""
    for arg in args:
        if hasattr(arg, "messages") and arg.messages is not None:
            return "".join(f"{m.role}\x00{content_text(m.content)}\x00" for m in arg.messages)
        if hasattr(arg, "prompt") and arg.prompt is not None:
            prompt = arg.prompt
            return prompt if isinstance(prompt, str) else content_text(prompt)
        if hasattr(arg, "query"):
            return arg.query
        if hasattr(arg, "text_1"):
            return arg.text_1 if isinstance(arg.text_1, str) else content_text(arg.text_1[:1])
    return ""


def content_text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(content_text(part) for part in content)
    if isinstance(content, int):
        return f"{content},"
    return getattr(content, "text", None) or (content.get("text", "") if isinstance(content, dict) else "")


def prefix_hashes(text: str) -> list[bytes]:
    """Chained hashes of the text's full blocks: block i's hash covers blocks 0..i."""
    hashes, h = [], b""
    for start in range(0, min(len(text), CHARS_PER_BLOCK * MAX_PREFIX_BLOCKS) - CHARS_PER_BLOCK + 1,
                       CHARS_PER_BLOCK):
        h = hashlib.blake2b(h + text[start:start + CHARS_PER_BLOCK].encode(), digest_size=16).digest()
        hashes.append(h)
    return hashes


class PrefixTable:
    """One replica's block hashes, least recently used first."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.blocks: OrderedDict[bytes, None] = OrderedDict()

    def match(self, hashes: list[bytes]) -> int:
        n = 0
        while n < len(hashes) and hashes[n] in self.blocks:
            n += 1
        return n

    def insert(self, hashes: list[bytes]) -> None:
        for h in hashes:
            self.blocks[h] = None
            self.blocks.move_to_end(h)
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)


class PrefixAwareRouter(StatsRouter):
    def initialize_state(self, imbalanced_threshold: int = 8, min_match_blocks: int = 1,
                         kv_usage_limit: float = 0.95, max_blocks_per_replica: int = 100_000, **kwargs):
        super().initialize_state(**kwargs)
        self.imbalanced_threshold = imbalanced_threshold
        self.min_match_blocks = min_match_blocks
        self.kv_usage_limit = kv_usage_limit
        self.max_blocks_per_replica = max_blocks_per_replica
        self.tables: dict[ReplicaID, PrefixTable] = {}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        ranked = self.rank_by_prefix(candidate_replicas, pending_request)
        if ranked is None:
            return await super().choose_replicas(candidate_replicas, pending_request)
        return ranked

    def rank_by_prefix(self, candidates: list[RunningReplica],
                       pending_request: PendingRequest | None) -> list[list[RunningReplica]] | None:
        """[best matches, the rest], or None to route by queue length."""
        if pending_request is None or not candidates:
            return None
        hashes = prefix_hashes(request_text(pending_request.args))
        if len(hashes) < self.min_match_blocks:
            return None
        queues = [self.replica_queue_len_cache.get(r.replica_id) or 0 for r in candidates]
        if max(queues) - min(queues) > self.imbalanced_threshold:
            return None
        matches = {r.replica_id: self.tables[r.replica_id].match(hashes) if r.replica_id in self.tables else 0
                   for r in candidates if kv_usage(r) < self.kv_usage_limit}
        best = max(matches.values(), default=0)
        if best < self.min_match_blocks:
            return None
        first = [r for r in candidates if matches.get(r.replica_id) == best]
        return [first, [r for r in candidates if r not in first]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        hashes = prefix_hashes(request_text(pending_request.args))
        if hashes:
            self.tables.setdefault(replica_id, PrefixTable(self.max_blocks_per_replica)).insert(hashes)
        for gone in self.tables.keys() - self.curr_replicas.keys():  # replicas that died or scaled away
            del self.tables[gone]


def kv_usage(replica: RunningReplica) -> float:
    return float((replica.routing_stats or {}).get("kv_cache_usage", 0.0))
