"""Gives each request KV-cache blocks from the pool; finds shared prompt prefixes by hash."""
from engine.block_pool import Block, BlockPool, hash_block, pack_tokens
from engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.req_blocks: dict[str, list[Block]] = {}
        # The request's full blocks so far: their chain hashes, and their tokens packed (to verify a hit).
        self.req_hashes: dict[str, list[bytes]] = {}
        self.req_tokens: dict[str, list[bytes]] = {}
        self.req_num_cached: dict[str, int] = {}  # how many of its blocks are registered
        # vLLM's prefix-cache counters, in tokens: looked up when a request is admitted, and found.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    def get_computed_blocks(self, req: Request) -> tuple[list[Block], int]:
        """Cached blocks matching the request's leading tokens; the last token is always computed,
        because its logits (or hidden state) are what the request needs."""
        if not self.pool.enable_prefix_caching:
            return [], 0
        n, blocks = (req.num_tokens - 1) // self.block_size, []
        hashes = self._hashes(req, n)
        for block_hash, tokens in zip(hashes[:n], self.req_tokens[req.request_id]):
            block = self.pool.lookup(block_hash, tokens)
            if block is None:
                break
            blocks.append(block)
        return blocks, len(blocks) * self.block_size

    def record_prefix_lookup(self, req: Request, num_hit: int) -> None:
        """Count an admitted request's lookup: once per admission (a preempted request's again), not per
        failed allocation."""
        if self.pool.enable_prefix_caching:
            self.prefix_cache_queries += req.num_tokens
            self.prefix_cache_hits += num_hit

    def allocate_slots(self, req: Request, num_new_tokens: int, computed: list[Block] = ()) -> bool:
        """Make room for num_new_tokens after the request's computed (and newly hit) tokens.
        All or nothing: on False the pool is untouched."""
        if num_new_tokens == 1 and not computed and 0 < req.num_computed_tokens % self.block_size < self.block_size - 1:
            return True  # most decode steps: the token's slot is in the last block, which it leaves unfilled
        blocks = self.req_blocks.setdefault(req.request_id, [])
        num_tokens = req.num_computed_tokens + len(computed) * self.block_size + num_new_tokens
        num_new_blocks = cdiv(num_tokens, self.block_size) - len(blocks) - len(computed)
        num_revived = sum(1 for b in computed if b.ref_count == 0) if computed else 0
        if num_new_blocks + num_revived > self.pool.num_free:
            return False
        if computed or num_new_blocks:  # most decode steps fit in the last block: nothing to change
            for b in computed:
                self.pool.touch(b)
            blocks.extend(computed)
            blocks.extend(self.pool.allocate(num_new_blocks))
            req.block_ids = [b.block_id for b in blocks]
        self._cache_full_blocks(req, blocks, num_tokens)
        return True

    def free(self, req: Request) -> None:
        # Tail blocks first, so they are evicted before the shared heads of prefixes.
        self.pool.release(self.req_blocks.pop(req.request_id, [])[::-1])
        self.req_hashes.pop(req.request_id, None)
        self.req_tokens.pop(req.request_id, None)
        self.req_num_cached.pop(req.request_id, None)
        req.block_ids = []

    def forget_uncomputed(self, req: Request) -> None:
        """Unregister the blocks past the request's computed tokens: a step that failed registered
        them but never wrote their K/V, and a later prefix hit on them would read garbage."""
        first = req.num_computed_tokens // self.block_size
        for block in self.req_blocks.get(req.request_id, [])[first:]:
            self.pool.uncache(block)
        if req.request_id in self.req_num_cached:
            self.req_num_cached[req.request_id] = min(self.req_num_cached[req.request_id], first)

    def _cache_full_blocks(self, req: Request, blocks: list[Block], num_tokens: int) -> None:
        # A block is registered once the step that fills it is scheduled and its tokens are known (a token
        # still being sampled by the step in flight is not): every layer writes K/V before any attention
        # reads it, even within the same step.
        if not self.pool.enable_prefix_caching:
            return
        done = self.req_num_cached.get(req.request_id, 0)
        num_full = min(num_tokens, req.num_tokens) // self.block_size
        if num_full <= done:
            return
        hashes, tokens, cache = self._hashes(req, num_full), self.req_tokens[req.request_id], self.pool.cache
        for i in range(done, num_full):
            cache(blocks[i], hashes[i], tokens[i])
        self.req_num_cached[req.request_id] = num_full

    def _hashes(self, req: Request, n: int) -> list[bytes]:
        """The request's chain hashes, at least its first n blocks' (each block packed and hashed once per
        request, the new blocks' tokens packed in one call)."""
        rid, bs = req.request_id, self.block_size
        hashes, tokens = self.req_hashes.setdefault(rid, []), self.req_tokens.setdefault(rid, [])
        start = len(hashes)
        if n > start:
            packed, width = pack_tokens(req.token_ids[start * bs:n * bs]), 8 * bs
            parent = hashes[-1] if hashes else None
            for j in range(0, (n - start) * width, width):
                tokens.append(packed[j:j + width])
                parent = hash_block(parent, tokens[-1])
                hashes.append(parent)
        return hashes
