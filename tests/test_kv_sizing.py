"""The KV pool's size on a GPU, as vLLM reads gpu_memory_utilization, on a card faked through torch.cuda's
memory calls; the largest step the sizing measures runs on CPU too."""
import pytest
import torch

from conftest import assert_pool_free, sentence
from engine import LLM, EngineConfig, SamplingParams
from engine.context import get_context
from engine.kv_sizing import num_kv_blocks

GIB, MIB = 1 << 30, 1 << 20


class Card:
    """One card's memory as torch.cuda reports it to this process: what other processes hold, and what this
    process's allocator holds in tensors, keeps cached (freed, not given back) and held at most."""

    def __init__(self, monkeypatch, total: int, others: int = 0, held: int = 0, cached: int = 0):
        self.total, self.others, self.held, self.cached, self.peak = total, others, held, cached, held
        for name in ("empty_cache", "mem_get_info", "reset_peak_memory_stats", "max_memory_allocated",
                     "memory_allocated"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))

    def empty_cache(self) -> None:
        self.cached = 0

    def mem_get_info(self, device=None) -> tuple[int, int]:
        return self.total - self.others - self.held - self.cached, self.total

    def reset_peak_memory_stats(self, device=None) -> None:
        self.peak = self.held

    def max_memory_allocated(self, device=None) -> int:
        return self.peak

    def memory_allocated(self, device=None) -> int:
        return self.held

    def step(self, activations: int):
        """A largest step whose activations come and go through the allocator's cache."""
        def run() -> None:
            self.peak = max(self.peak, self.held + activations)
            self.cached += activations
        return run


def blocks(utilization: float, card: Card, activations: int, max_model_len: int = 4096,
           prefill_graphs: bool = False) -> int:
    """enforce_eager unless prefill_graphs: no piecewise prefill graphs to leave room for."""
    config = EngineConfig(model="m", gpu_memory_utilization=utilization, max_num_seqs=10_000,
                          enforce_eager=not prefill_graphs)
    return num_kv_blocks(config, MIB, max_model_len, torch.device("cuda"), card.step(activations))


def test_the_pool_is_the_engines_share_less_weights_and_its_largest_step(monkeypatch):
    """0.9 of a 20 GiB card, 2 GiB of weights, 1 GiB of activations at the largest step: 15 GiB of blocks. A
    quantized layer's float weights, freed after loading, sat in the allocator's cache (4 GiB): given back."""
    card = Card(monkeypatch, total=20 * GIB, held=2 * GIB, cached=4 * GIB)
    assert blocks(0.9, card, activations=GIB) == 15 * 1024


def test_two_engines_at_045_share_one_card(monkeypatch):
    """As the README packs two models on one GPU: the second engine's pool is the first's, not what the first
    left free less 55% of the card, and both engines' shares fit the card."""
    first = Card(monkeypatch, total=80 * GIB, held=2 * GIB)
    pool = blocks(0.45, first, activations=2 * GIB)
    assert pool == 32 * 1024
    in_use = first.held + pool * MIB + 2 * GIB  # serving: weights, pool, a largest step's activations
    second = Card(monkeypatch, total=80 * GIB, others=in_use, held=2 * GIB)
    assert blocks(0.45, second, activations=2 * GIB) == pool
    assert 2 * in_use <= 80 * GIB


def test_the_pool_leaves_room_for_the_largest_step_where_others_hold_the_card(monkeypatch):
    """Other processes hold 9 of 20 GiB: the share allows 14 GiB, but only 10 are free and the step needs 3."""
    card = Card(monkeypatch, total=20 * GIB, others=9 * GIB, held=GIB)
    assert blocks(0.9, card, activations=3 * GIB) == 7 * 1024


def test_captured_prefill_graphs_get_a_largest_steps_room_too(monkeypatch):
    """The piecewise prefill graphs' memory pool keeps a largest step's activations for good, beside the
    allocator's room for eager steps: 20 GiB x 0.9 less 2 GiB of weights and twice 1 GiB."""
    card = Card(monkeypatch, total=20 * GIB, held=2 * GIB)
    assert blocks(0.9, card, activations=GIB, prefill_graphs=True) == 14 * 1024


def test_a_card_without_room_for_one_sequence_is_refused(monkeypatch):
    card = Card(monkeypatch, total=20 * GIB, others=17 * GIB, held=GIB)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        blocks(0.9, card, activations=2 * GIB, max_model_len=8192)


def test_the_largest_step_runs_before_the_pool(tiny_model, monkeypatch):
    """The measured step: max_num_batched_tokens tokens in spans the model's positions hold, every row through
    the last layer, no pool to write; the engine built after it serves as before."""
    llm = LLM(tiny_model("llama"), dtype="float32", block_size=8, max_model_len=64, max_num_batched_tokens=160,
              max_num_seqs=5)
    runner, seen = llm.engine.runner, []
    forward = runner.model.forward

    def spy(input_ids, positions, token_type_ids=None):
        ctx = get_context()
        seen.append((len(input_ids), int(positions.max()), [s.end - s.start for s in ctx.prefills],
                     ctx.output_rows, ctx.slot_mapping))
        return forward(input_ids, positions, token_type_ids)
    monkeypatch.setattr(runner.model, "forward", spy)
    runner.num_blocks, num_blocks = 0, runner.num_blocks  # as before the pool exists
    runner.run_largest_step(160, 5)
    runner.num_blocks = num_blocks
    assert seen == [(160, 63, [64, 64, 32], None, None)]
    assert get_context().prefills == []
    out = llm.generate([sentence(730, 9)], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3
    assert_pool_free(llm)
