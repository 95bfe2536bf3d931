"""The scheduler with a real KV-cache manager and no model: steps are simulated by applying the
scheduler's output (K/V written to the slots, computed tokens advanced, a token sampled for each
request whose last token ran). Unit tests of its rules, then a hypothesis state machine."""
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from conftest import check_kv_invariants
from engine.kv_cache_manager import KVCacheManager, cdiv
from engine.params import SamplingParams
from engine.request import Request, RequestStatus
from engine.scheduler import Scheduler


class Sim:
    """A scheduler, its KV-cache manager, and what a model would have written into each cache slot."""

    def __init__(self, num_blocks=32, block_size=4, budget=64, max_seqs=8, threshold=None, caching=True):
        self.kv = KVCacheManager(num_blocks, block_size, caching)
        self.sched = Scheduler(self.kv, budget, max_seqs, threshold)
        self.bs, self.budget, self.max_seqs = block_size, budget, max_seqs
        self.chunk_cap = threshold or budget
        self.slots: dict[int, int] = {}  # cache slot -> token whose K/V is there

    def add(self, rid: str, prompt, max_tokens: int = 4) -> Request:
        r = Request(rid, list(prompt), sampling_params=SamplingParams(max_tokens=max_tokens), max_tokens=max_tokens)
        self.sched.add(r)
        return r

    def slot(self, r: Request, pos: int) -> int:
        return r.block_ids[pos // self.bs] * self.bs + pos % self.bs

    def step(self, next_token=lambda r: 0, stop=lambda r: False):
        had_work = self.sched.has_work()
        out = self.sched.schedule()
        assert out.requests or not had_work, "work waits but nothing was scheduled"
        assert out.total_tokens <= self.budget
        assert all(1 <= n <= self.chunk_cap for n in out.num_tokens)
        assert len({r.request_id for r in out.requests}) == len(out.requests)
        assert len(self.sched.running) <= self.max_seqs
        # The model writes K/V of the scheduled tokens (all layers before any attention reads) ...
        for r, n in zip(out.requests, out.num_tokens):
            assert r.status == RequestStatus.RUNNING
            assert len(r.block_ids) == cdiv(r.num_computed_tokens + n, self.bs)
            for p in range(r.num_computed_tokens, r.num_computed_tokens + n):
                self.slots[self.slot(r, p)] = r.token_ids[p]
        # ... then attends over its whole context, which must be its own tokens, cached or not.
        for r, n in zip(out.requests, out.num_tokens):
            for p in range(r.num_computed_tokens + n):
                assert self.slots.get(self.slot(r, p)) == r.token_ids[p], f"{r.request_id} reads wrong K/V at {p}"
        for r, n in zip(out.requests, out.num_tokens):
            r.num_computed_tokens += n
            if r.num_computed_tokens == r.num_tokens:
                r.token_ids.append(next_token(r))
                if r.num_output_tokens >= r.max_tokens or stop(r):
                    self.sched.finish(r, RequestStatus.FINISHED_LENGTH)
        return out

    def check(self) -> None:
        check_kv_invariants(self.kv)
        s, blocks = self.sched, self.kv.req_blocks
        assert set(s.requests) == {r.request_id for r in s.running} | {r.request_id for r in s.waiting}
        assert len(s.requests) == len(s.running) + len(s.waiting)
        for r in s.running:  # exactly the blocks its computed tokens need
            assert r.status == RequestStatus.RUNNING
            assert len(blocks[r.request_id]) == cdiv(r.num_computed_tokens, self.bs)
            assert r.block_ids == [b.block_id for b in blocks[r.request_id]]
        for r in s.waiting:
            assert r.status == RequestStatus.WAITING
            assert not blocks.get(r.request_id) and r.num_computed_tokens == 0
        held = {rid for rid, b in blocks.items() if b}
        assert held <= {r.request_id for r in s.running}

    def drain(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_work():
                return
            self.step()
            self.check()
        raise AssertionError("the scheduler did not finish its work")

    def all_free(self) -> bool:
        pool = self.kv.pool
        return pool.num_free == pool.num_blocks and all(b.ref_count == 0 for b in pool.blocks)


# ---------------------------------------------------------------- rules


def scheduled(out) -> dict[str, int]:
    return {r.request_id: n for r, n in zip(out.requests, out.num_tokens)}


def test_token_budget_and_chunk_cap():
    sim = Sim(budget=10, threshold=6)
    for i in range(3):
        sim.add(f"r{i}", range(i * 100, i * 100 + 9))
    assert scheduled(sim.step()) == {"r0": 6, "r1": 4}
    sim.check()
    # Running chunks first (r0 3 left, r1 5 left), then r2 with what remains.
    assert scheduled(sim.step()) == {"r0": 3, "r1": 5, "r2": 2}
    sim.drain()
    assert sim.all_free()


def test_decodes_are_scheduled_before_new_prefills():
    sim = Sim(budget=8)
    sim.add("a", range(5), max_tokens=3)
    sim.step()
    sim.add("b", range(10, 30))
    assert scheduled(sim.step()) == {"a": 1, "b": 7}


def test_max_num_seqs():
    sim = Sim(max_seqs=2)
    for i in range(5):
        sim.add(f"r{i}", [i] * 3)
    assert list(scheduled(sim.step())) == ["r0", "r1"]
    assert [r.request_id for r in sim.sched.waiting] == ["r2", "r3", "r4"]
    sim.drain()
    assert sim.all_free()


def test_fifo_a_waiting_head_that_does_not_fit_blocks_the_rest():
    sim = Sim(num_blocks=5, block_size=4, max_seqs=8)
    sim.add("big", range(12), max_tokens=4)  # 3 blocks, 4 once it decodes
    sim.step()
    sim.add("next", range(100, 108))  # 2 blocks: do not fit beside big
    sim.add("small", [7])  # 1 block would fit, but must not overtake
    out = sim.step()
    assert scheduled(out) == {"big": 1}
    sim.drain()
    assert sim.all_free()


def test_admission_is_in_arrival_order():
    sim = Sim(budget=4)
    for rid in ("x", "y", "z"):
        sim.add(rid, [ord(rid)] * 4, max_tokens=1)
    order = []
    while sim.sched.has_work():
        order += [rid for rid, n in scheduled(sim.step()).items() if rid not in order]
    assert order == ["x", "y", "z"]


def test_preemption_takes_the_most_recently_started():
    sim = Sim(num_blocks=4, block_size=4, budget=64)
    a = sim.add("a", range(7), max_tokens=8)  # 2 blocks, a third at token 9
    b = sim.add("b", range(100, 107), max_tokens=8)
    sim.step()
    sim.check()
    assert sim.kv.pool.num_free == 0
    out = sim.step()  # both decode at position 7, inside their second block
    assert scheduled(out) == {"a": 1, "b": 1}
    out = sim.step()  # position 8 needs a new block for each: b, started last, gives its blocks back
    assert scheduled(out) == {"a": 1}
    assert b.status == RequestStatus.WAITING and b.num_computed_tokens == 0 and not b.block_ids
    assert list(sim.sched.waiting) == [b] and sim.sched.running == [a]
    sim.check()
    sim.add("c", [1, 2, 3])
    sim.drain()  # b is recomputed (prompt and its outputs so far) before the newer c
    assert sim.all_free()


def test_preempted_request_goes_back_ahead_of_newer_ones():
    sim = Sim(num_blocks=4, block_size=4, budget=64)
    sim.add("a", range(7), max_tokens=8)
    b = sim.add("b", range(100, 107), max_tokens=8)
    for _ in range(3):
        sim.step()
    c = sim.add("c", [5])
    assert list(sim.sched.waiting) == [b, c]
    outputs_so_far = list(b.output_token_ids)
    assert outputs_so_far
    while b.status == RequestStatus.WAITING:
        assert c.status == RequestStatus.WAITING
        sim.step()
    assert b.num_tokens >= 7 + len(outputs_so_far)  # recomputed with its outputs, none lost
    assert b.token_ids[7:7 + len(outputs_so_far)] == outputs_so_far


def test_blocks_given_back_by_preemption_are_not_handed_out_in_the_same_step():
    sim = Sim(num_blocks=4, block_size=4, budget=64)
    sim.add("a", range(7), max_tokens=8)
    sim.add("b", range(100, 107), max_tokens=8)
    sim.step(), sim.step()
    sim.add("c", [9])
    out = sim.step()  # b is preempted; neither it nor c takes the block it gave back
    assert scheduled(out) == {"a": 1}


def test_prefix_hit_starts_after_the_cached_blocks():
    sim = Sim(block_size=4)
    sim.add("a", range(8), max_tokens=1)
    sim.drain()
    b = sim.add("b", range(8), max_tokens=1)  # same prompt: the last token is still computed
    assert scheduled(sim.step()) == {"b": 4}
    assert b.num_cached_tokens == 4
    c = sim.add("c", list(range(8)) + [50, 51], max_tokens=1)
    assert scheduled(sim.step()) == {"c": 2}
    assert c.num_cached_tokens == 8
    sim.drain()
    assert sim.all_free()


def test_no_prefix_hits_when_caching_is_off():
    sim = Sim(block_size=4, caching=False)
    sim.add("a", range(8), max_tokens=1)
    sim.drain()
    b = sim.add("b", range(8), max_tokens=1)
    assert scheduled(sim.step()) == {"b": 8} and b.num_cached_tokens == 0


def test_finish_and_abort_free_at_once():
    sim = Sim(num_blocks=8, block_size=4)
    a, b = sim.add("a", range(10)), sim.add("b", range(20, 30))
    sim.step()
    sim.sched.finish(a, RequestStatus.FINISHED_ABORTED)
    sim.check()
    assert not a.block_ids and "a" not in sim.sched.requests
    sim.sched.finish(b, RequestStatus.FINISHED_STOPPED)
    waiting = sim.add("w", [1])
    sim.sched.finish(waiting, RequestStatus.FINISHED_ABORTED)  # aborted before it ever ran
    sim.check()
    assert sim.all_free() and not sim.sched.has_work()


# ---------------------------------------------------------------- state machine


class SchedulerMachine(RuleBasedStateMachine):
    """Random adds, steps (with random sampled tokens and early stops) and aborts."""

    @initialize(block_size=st.sampled_from([1, 2, 4]), num_blocks=st.integers(2, 16), budget=st.integers(1, 16),
                max_seqs=st.integers(1, 4), threshold=st.none() | st.integers(1, 8), caching=st.booleans())
    def setup(self, block_size, num_blocks, budget, max_seqs, threshold, caching):
        self.sim = Sim(num_blocks, block_size, budget, max_seqs, threshold, caching)
        self.count = 0

    @rule(prompt=st.lists(st.integers(0, 2), min_size=1, max_size=20), max_tokens=st.integers(1, 8))
    def add(self, prompt, max_tokens):
        # The engine turns away a request that could never fit the pool alone.
        if cdiv(len(prompt) + max_tokens, self.sim.bs) > self.sim.kv.pool.num_blocks:
            return
        self.sim.add(f"r{self.count}", prompt, max_tokens)
        self.count += 1

    @rule(data=st.data())
    def step(self, data):
        self.sim.step(next_token=lambda r: data.draw(st.integers(0, 2)),
                      stop=lambda r: data.draw(st.integers(0, 9)) == 0)

    @precondition(lambda self: self.sim.sched.requests)
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(sorted(self.sim.sched.requests)))
        self.sim.sched.finish(self.sim.sched.requests[rid], RequestStatus.FINISHED_ABORTED)

    @invariant()
    def consistent(self):
        self.sim.check()

    def teardown(self):
        self.sim.drain()
        assert self.sim.all_free()
        assert not any(self.sim.kv.req_blocks.values())


SchedulerMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=50, deadline=None,
                                              suppress_health_check=[HealthCheck.too_slow])
test_scheduler_state_machine = SchedulerMachine.TestCase


@pytest.mark.parametrize("caching", [True, False])
def test_abort_everything_frees_everything(caching):
    sim = Sim(num_blocks=6, block_size=2, budget=5, max_seqs=3, caching=caching)
    for i in range(6):
        sim.add(f"r{i}", [i % 2] * (3 + i), max_tokens=3)
    for _ in range(5):
        sim.step()
        sim.check()
    for rid in list(sim.sched.requests):
        sim.sched.finish(sim.sched.requests[rid], RequestStatus.FINISHED_ABORTED)
    sim.check()
    assert sim.all_free()
