"""How many KV-cache blocks the pool gets: the memory budget, capped by what max_num_seqs can use."""
import torch

from engine.config import EngineConfig
from engine.kv_cache_manager import cdiv


def num_kv_blocks(config: EngineConfig, bytes_per_block: int, max_model_len: int, device: torch.device) -> int:
    if config.num_blocks:
        return config.num_blocks
    if device.type == "cuda":
        # Memory freed since loading (a quantized layer's float weights) is still the allocator's cache, which
        # the driver counts as used: given back first, the pool gets it.
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        budget = free - (1 - config.gpu_memory_utilization) * total
    else:
        budget = config.kv_cache_memory_bytes
    # No use in a pool larger than every sequence at full length.
    most = cdiv(max_model_len, config.block_size) * config.max_num_seqs
    num_blocks = min(int(budget // bytes_per_block), most)
    if num_blocks < cdiv(max_model_len, config.block_size):
        raise ValueError(f"the KV-cache budget holds {num_blocks} blocks of {config.block_size} tokens, "
                         f"less than one sequence of max_model_len {max_model_len}; raise "
                         f"kv_cache_memory_bytes / gpu_memory_utilization or lower max_model_len")
    return num_blocks
