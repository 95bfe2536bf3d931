"""Block pool and KV-cache manager: free queue, LRU eviction, chained prefix hashes verified
against stored tokens, all-or-nothing allocation; and a property test of the reference counts."""
import hashlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine.kv_cache_manager as kvm
from conftest import check_kv_invariants, free_queue_ids
from engine.block_pool import BlockPool, FreeBlockQueue, Block, hash_block, pack_tokens
from engine.kv_cache_manager import KVCacheManager
from engine.request import Request


def req(rid: str, tokens) -> Request:
    return Request(rid, list(tokens))


def prefill(kv: KVCacheManager, r: Request) -> int:
    """Schedule a whole prompt the way the scheduler admits it; returns the number of hit tokens."""
    computed, hit = kv.get_computed_blocks(r)
    assert kv.allocate_slots(r, r.num_tokens - hit, computed)
    r.num_computed_tokens = r.num_tokens
    return hit


# ---------------------------------------------------------------- hashing


def test_hash_is_a_stable_chain():
    assert pack_tokens([1, 2, 3, 4]) == struct.pack("<4q", 1, 2, 3, 4) == pack_tokens((1, 2, 3, 4))
    h0 = hash_block(None, pack_tokens([1, 2, 3, 4]))
    assert h0 == hashlib.sha256(struct.pack("<4q", 1, 2, 3, 4)).digest()  # same in every process
    h1 = hash_block(h0, pack_tokens([5, 6, 7, 8]))
    assert h1 != hash_block(None, pack_tokens([5, 6, 7, 8]))  # the same tokens after another prefix
    assert h1 != hash_block(hash_block(None, pack_tokens([1, 2, 3, 9])), pack_tokens([5, 6, 7, 8]))
    assert hash_block(None, pack_tokens([1, 2])) != hash_block(None, pack_tokens([2, 1]))


# ---------------------------------------------------------------- free queue and pool


def test_free_queue_order_and_removal():
    blocks = [Block(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    q.remove(blocks[2])
    assert q.size == 4
    assert q.popleft(1) == [blocks[0]] and blocks[0].prev is blocks[0].next is None
    q.append(blocks[2])
    q.append(blocks[0])
    with pytest.raises(RuntimeError, match="no free"):
        q.popleft(6)
    assert q.size == 5  # a refused pop takes nothing
    assert [b.block_id for b in q.popleft(4)] == [1, 3, 4, 2]
    assert q.popleft(1) == [blocks[0]] and q.size == 0 and q.head.next is q.tail and q.tail.prev is q.head
    assert q.popleft(0) == []
    with pytest.raises(RuntimeError, match="no free"):
        q.popleft(1)


def test_pool_release_is_lru_and_double_free_is_caught():
    pool = BlockPool(4)
    a, b, c = pool.allocate(3)
    assert [a.block_id, b.block_id, c.block_id] == [0, 1, 2] and a.ref_count == 1
    pool.release([b, a])
    # Never-used block 3 first, then in the order they were freed.
    assert [block.block_id for block in pool.allocate(3)] == [3, 1, 0]
    pool.release([c])
    with pytest.raises(AssertionError, match="freed twice"):
        pool.release([c])


def test_eviction_drops_the_cache_entry_and_touch_revives():
    pool = BlockPool(2)
    [a] = pool.allocate()
    tokens = pack_tokens((1, 2))
    h = hash_block(None, tokens)
    pool.cache(a, h, tokens)
    pool.release([a])
    assert pool.lookup(h, tokens) is a and pool.num_free == 2
    pool.touch(a)  # a cached free block comes back without being rewritten
    assert a.ref_count == 1 and pool.num_free == 1 and a.block_hash == h
    pool.release([a])
    pool.allocate()  # block 1: never used
    assert pool.lookup(h, tokens) is a
    [b] = pool.allocate()  # block 0 again: evicted, its content is about to be overwritten
    assert b is a and a.block_hash is None and pool.lookup(h, tokens) is None and not pool.cached


def test_lookup_verifies_the_stored_tokens():
    pool = BlockPool(2)
    [a] = pool.allocate()
    pool.cache(a, b"h", pack_tokens((1, 2)))
    assert pool.lookup(b"h", pack_tokens((1, 2))) is a
    assert pool.lookup(b"h", pack_tokens((1, 3))) is None  # a hash collision must not serve the wrong K/V
    [b] = pool.allocate()
    pool.cache(b, b"h", pack_tokens((1, 2)))  # a second copy of the same content keeps the first as the hit
    assert pool.cached[b"h"] is a


def test_no_caching_when_disabled():
    pool = BlockPool(2, enable_prefix_caching=False)
    [a] = pool.allocate()
    pool.cache(a, b"h", pack_tokens((1, 2)))
    assert a.block_hash is None and not pool.cached


# ---------------------------------------------------------------- KV-cache manager


def test_prefix_hits_follow_the_hash_chain():
    kv = KVCacheManager(16, 4)
    a = req("a", range(14))  # three full blocks and a partial one
    assert prefill(kv, a) == 0
    assert len(kv.pool.cached) == 3
    b = req("b", list(range(8)) + [99] * 6)  # shares two blocks
    assert prefill(kv, b) == 8
    assert b.block_ids[:2] == a.block_ids[:2] and b.block_ids[2] != a.block_ids[2]
    c = req("c", [99, 99, 99, 99] + list(range(4, 14)))  # same second block after a different first
    assert kv.get_computed_blocks(c) == ([], 0)
    assert kv.pool.blocks[a.block_ids[0]].ref_count == 2
    check_kv_invariants(kv)


def test_last_prompt_token_is_always_computed():
    kv = KVCacheManager(16, 4)
    prefill(kv, req("a", range(8)))
    again = req("b", range(8))  # the same two full blocks
    computed, hit = kv.get_computed_blocks(again)
    assert hit == 4 and len(computed) == 1  # the block with the last token runs again
    longer = req("c", range(9))
    assert kv.get_computed_blocks(longer)[1] == 8


def test_hits_are_verified_against_stored_tokens(monkeypatch):
    # Every block hashes alike: only the stored tokens can tell the prompts apart.
    monkeypatch.setattr(kvm, "hash_block", lambda parent, tokens: b"same")
    kv = KVCacheManager(8, 4)
    prefill(kv, req("a", [1, 2, 3, 4, 5]))
    assert kv.get_computed_blocks(req("b", [9, 9, 9, 9, 5])) == ([], 0)
    assert kv.get_computed_blocks(req("c", [1, 2, 3, 4, 6]))[1] == 4


def test_eviction_takes_the_least_recently_freed_and_tails_first():
    kv = KVCacheManager(6, 4)
    a = req("a", range(12))  # three full blocks
    prefill(kv, a)
    kv.free(a)
    b = req("b", range(100, 112))
    prefill(kv, b)  # blocks 3, 4, 5: never used before
    assert b.block_ids == [3, 4, 5]
    kv.free(b)
    # Free order: a's blocks tail first, then b's. One more block evicts a's tail only.
    assert free_queue_ids(kv.pool) == [2, 1, 0, 5, 4, 3]
    c = req("c", [7, 7, 7])
    prefill(kv, c)
    assert c.block_ids == [2]
    assert kv.get_computed_blocks(req("a2", range(13)))[1] == 8  # a's head survives
    assert kv.get_computed_blocks(req("b2", range(100, 113)))[1] == 12
    check_kv_invariants(kv)


def test_allocate_slots_is_all_or_nothing():
    kv = KVCacheManager(4, 4)
    a = req("a", range(12))
    prefill(kv, a)
    kv.free(a)
    b = req("b", range(100, 104))
    prefill(kv, b)  # takes block 3; a's three blocks are cached and free
    c = req("c", list(range(8)) + [5] * 12)  # hits a's two head blocks (revived), needs 3 more
    computed, hit = kv.get_computed_blocks(c)
    assert hit == 8
    before = [(blk.ref_count, blk.block_hash) for blk in kv.pool.blocks]
    assert not kv.allocate_slots(c, c.num_tokens - hit, computed)
    assert [(blk.ref_count, blk.block_hash) for blk in kv.pool.blocks] == before
    assert not kv.req_blocks.get("c") and kv.pool.num_free == 3
    assert kv.allocate_slots(c, 4, computed)  # a smaller chunk fits: 2 revived + 1 new block
    assert kv.pool.num_free == 0
    check_kv_invariants(kv)


def test_decode_blocks_are_cached_once_full():
    kv = KVCacheManager(8, 4)
    a = req("a", range(6))
    prefill(kv, a)
    for t in (6, 7):  # decode two tokens: the second block fills up
        a.token_ids.append(t)
        assert kv.allocate_slots(a, 1)
        a.num_computed_tokens += 1
    assert len(kv.pool.cached) == 2
    assert kv.get_computed_blocks(req("b", range(9)))[1] == 8


def test_forget_uncomputed_unregisters_only_unwritten_blocks():
    kv = KVCacheManager(8, 4)
    prefill(kv, req("a", range(10)))  # two full blocks registered and written
    b = req("b", list(range(8)) + list(range(50, 62)))
    computed, hit = kv.get_computed_blocks(b)
    assert hit == 8
    assert kv.allocate_slots(b, b.num_tokens - hit, computed)  # registers b's three new blocks
    b.num_computed_tokens = hit
    assert len(kv.pool.cached) == 5
    kv.forget_uncomputed(b)  # the step failed: none of b's new blocks was written
    assert len(kv.pool.cached) == 2
    assert kv.get_computed_blocks(req("c", b.token_ids + [1]))[1] == 8
    check_kv_invariants(kv)
    assert kv.allocate_slots(b, 12)  # the retry registers them again
    assert len(kv.pool.cached) == 5


# ---------------------------------------------------------------- property test

operations = st.lists(st.tuples(st.sampled_from(["add", "grow", "free"]), st.integers(0, 7),
                                st.lists(st.integers(0, 2), min_size=1, max_size=14)), max_size=40)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations, block_size=st.sampled_from([1, 2, 4]), num_blocks=st.integers(1, 12),
       caching=st.booleans())
def test_reference_counts_hold_under_random_use(ops, block_size, num_blocks, caching):
    """Random prompts over a 3-token alphabet (so prefixes are shared a lot), grown and freed at random:
    the pool's counts stay exact, a failed allocation changes nothing, and everything comes back."""
    kv = KVCacheManager(num_blocks, block_size, caching)
    live: dict[str, Request] = {}
    for i, (op, pick, tokens) in enumerate(ops):
        names = sorted(live)
        if op == "add":
            r = req(f"r{i}", tokens)
            computed, hit = kv.get_computed_blocks(r)
            assert hit % block_size == 0 and hit < r.num_tokens
            assert all(kv.pool.blocks[b.block_id] is b for b in computed)
            if kv.allocate_slots(r, r.num_tokens - hit, computed):
                r.num_computed_tokens = r.num_tokens
                live[r.request_id] = r
            else:
                assert not kv.req_blocks.get(r.request_id)
        elif op == "grow" and names:
            r = live[names[pick % len(names)]]
            r.token_ids.extend(tokens)
            if kv.allocate_slots(r, len(tokens)):
                r.num_computed_tokens = r.num_tokens
            else:
                del r.token_ids[r.num_computed_tokens:]
        elif op == "free" and names:
            kv.free(live.pop(names[pick % len(names)]))
        check_kv_invariants(kv)
        for r in live.values():  # exactly the blocks its tokens need, the shared ones with its tokens
            blocks = kv.req_blocks[r.request_id]
            assert len(blocks) == -(-r.num_tokens // block_size)
            for j, b in enumerate(blocks):
                if b.block_hash is not None:
                    assert b.tokens == pack_tokens(r.token_ids[j * block_size:(j + 1) * block_size])
    for r in list(live.values()):
        kv.free(r)
    check_kv_invariants(kv)
    assert kv.pool.num_free == num_blocks and all(b.ref_count == 0 for b in kv.pool.blocks)


# Each step: the batch (request indices, in order) and the requests whose block lists are replaced (new lists of
# any length: grown by a block, freed and reallocated, the same length with other ids).
block_table_steps = st.lists(st.tuples(st.lists(st.integers(0, 5), min_size=1, max_size=6, unique=True),
                                       st.lists(st.tuples(st.integers(0, 5), st.lists(st.integers(0, 99), min_size=1,
                                                                                       max_size=5)), max_size=3)),
                             min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(steps=block_table_steps)
def test_block_table_kept_between_steps_equals_a_fresh_one(steps):
    """BlockTable reuses rows whose request holds the same block list as in the previous step; whatever the batches
    and replacements, every step's table equals one built from scratch, and is the caller's own copy."""
    from engine.block_table import BlockTable
    reqs = [Request(f"r{i}", [1], block_ids=[i]) for i in range(6)]
    kept = BlockTable()
    for batch, replaced in steps:
        for i, ids in replaced:
            reqs[i].block_ids = list(ids)
        rows = [reqs[i] for i in batch]
        want = BlockTable().build(rows)
        got = kept.build(rows)
        assert got.shape == want.shape and (got == want).all()
        assert want.shape[1] == max(len(r.block_ids) for r in rows)
        assert all(list(row[:len(r.block_ids)]) == r.block_ids and not row[len(r.block_ids):].any()
                   for row, r in zip(want, rows))
        got[:] = -1  # the caller's copy: the next step's table is unaffected
