"""One preallocated pool of KV-cache blocks, with prefix caching by chained block hashes."""
import functools
import hashlib
import struct
from dataclasses import dataclass


@dataclass(slots=True, eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None  # set once the block is full and cached
    token_ids: tuple[int, ...] = ()  # kept to verify a hash hit
    # Doubly linked free queue: O(1) removal when a cached free block is revived.
    prev: "Block | None" = None
    next: "Block | None" = None


def hash_block(parent: bytes | None, token_ids: list[int] | tuple[int, ...]) -> bytes:
    """A stable chained hash: equal hashes mean equal prefixes, in every process."""
    return hashlib.sha256((parent or b"") + _packer(len(token_ids))(*token_ids)).digest()


@functools.cache
def _packer(n: int):
    return struct.Struct(f"<{n}q").pack


class FreeBlockQueue:
    """Free blocks, least recently freed first, so eviction keeps the hottest prefixes."""

    def __init__(self, blocks: list[Block]):
        self.head = Block(-1)
        self.tail = Block(-1)
        self.head.next, self.tail.prev = self.tail, self.head
        self.size = 0
        for b in blocks:
            self.append(b)

    def append(self, block: Block) -> None:
        last = self.tail.prev
        last.next, block.prev = block, last
        block.next, self.tail.prev = self.tail, block
        self.size += 1

    def remove(self, block: Block) -> None:
        block.prev.next, block.next.prev = block.next, block.prev
        block.prev = block.next = None
        self.size -= 1

    def popleft(self) -> Block:
        if not self.size:
            raise RuntimeError("no free KV-cache block")
        block = self.head.next
        self.remove(block)
        return block


class BlockPool:
    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True):
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free = FreeBlockQueue(self.blocks)
        self.cached: dict[bytes, Block] = {}
        self.enable_prefix_caching = enable_prefix_caching

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return self.free.size

    def usage(self) -> float:
        return 1.0 - self.num_free / max(1, self.num_blocks)

    def lookup(self, block_hash: bytes, token_ids: tuple[int, ...]) -> Block | None:
        block = self.cached.get(block_hash)
        if block is None or block.token_ids != token_ids:
            return None
        return block

    def touch(self, block: Block) -> None:
        """Take a reference on a cached block, reviving it from the free queue if needed."""
        if block.ref_count == 0:
            self.free.remove(block)
        block.ref_count += 1

    def allocate(self) -> Block:
        block = self.free.popleft()
        self.uncache(block)  # evict: its content is about to be overwritten
        block.ref_count = 1
        return block

    def uncache(self, block: Block) -> None:
        if block.block_hash is not None and self.cached.get(block.block_hash) is block:
            del self.cached[block.block_hash]
        block.block_hash, block.token_ids = None, ()

    def cache(self, block: Block, block_hash: bytes, token_ids: tuple[int, ...]) -> None:
        if not self.enable_prefix_caching or block.block_hash is not None:
            return
        block.block_hash, block.token_ids = block_hash, token_ids
        self.cached.setdefault(block_hash, block)

    def release(self, block: Block) -> None:
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block.block_id} freed twice"
        if block.ref_count == 0:
            self.free.append(block)
