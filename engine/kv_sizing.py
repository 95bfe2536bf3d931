"""How many KV-cache blocks the pool gets: the memory budget, capped by what max_num_seqs can use."""
from collections.abc import Callable

import torch

from engine.config import EngineConfig
from engine.kv_cache_manager import cdiv


def num_kv_blocks(config: EngineConfig, bytes_per_block: int, max_model_len: int, device: torch.device,
                  run_largest_step: Callable[[], None]) -> int:
    """run_largest_step: the engine's largest step, run before the pool exists (measured on CUDA)."""
    if config.num_blocks:
        return config.num_blocks
    if device.type == "cuda":
        total, free, held, peak = cuda_memory_use(device, run_largest_step)
        if config.captures_prefill_graphs(device):  # the graphs' pool keeps a step's activations beside the allocator's
            peak += peak - held
        budget = gpu_kv_budget(config.gpu_memory_utilization, total, free, held, peak)
    else:
        budget = config.kv_cache_memory_bytes
    # No use in a pool larger than every sequence at full length.
    most = cdiv(max_model_len, config.block_size) * config.max_num_seqs
    num_blocks = min(int(budget // bytes_per_block), most)
    if num_blocks < cdiv(max_model_len, config.block_size):
        raise ValueError(f"the KV-cache budget holds {max(num_blocks, 0)} blocks of {config.block_size} tokens, "
                         f"less than one sequence of max_model_len {max_model_len}; raise "
                         f"kv_cache_memory_bytes / gpu_memory_utilization or lower max_model_len")
    return num_blocks


def cuda_memory_use(device: torch.device, run_largest_step: Callable[[], None]) -> tuple[int, int, int, int]:
    """(total, free, held, peak): the card's memory, how much of it is free, what this engine's tensors hold
    (its weights) and the most they held while its largest step ran."""
    # Memory freed since loading (a quantized layer's float weights) and the step's activations stay in the
    # allocator's cache, which the driver counts as used: given back first, the pool gets it.
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    run_largest_step()
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return total, free, torch.cuda.memory_allocated(device), peak


def gpu_kv_budget(utilization: float, total: int, free: int, held: int, peak: int) -> float:
    """Bytes for the pool, as vLLM reads gpu_memory_utilization: this engine's share of the card (utilization x
    total) holds its weights, its largest step's activations (peak) and the pool, whatever other processes
    hold (two engines at 0.45 share a card); and the pool takes no more than is free, less the activations'
    room. The CUDA context and libraries' workspaces fall in the rest of the card."""
    return min(utilization * total - peak, free - (peak - held))
