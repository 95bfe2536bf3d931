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
    tokens: bytes = b""  # its token ids packed (pack_tokens), kept to verify a hash hit
    # Doubly linked free queue: O(1) removal when a cached free block is revived.
    prev: "Block | None" = None
    next: "Block | None" = None


def pack_tokens(token_ids: list[int] | tuple[int, ...]) -> bytes:
    """Token ids as 8-byte little-endian integers: a request's whole prompt packed in one call, then cut into
    blocks by slicing bytes."""
    return _packer(len(token_ids))(*token_ids)


def hash_block(parent: bytes | None, tokens: bytes) -> bytes:
    """A stable chained hash of a block's packed tokens: equal hashes mean equal prefixes, in every process."""
    return hashlib.sha256((parent or b"") + tokens).digest()


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

    def popleft(self, n: int) -> list[Block]:
        """The n least recently freed blocks, unlinked in one walk."""
        if n > self.size:
            raise RuntimeError("no free KV-cache block")
        blocks, block = [], self.head.next
        for _ in range(n):
            blocks.append(block)
            block.prev, block = None, block.next
            blocks[-1].next = None
        self.head.next, block.prev = block, self.head
        self.size -= n
        return blocks


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

    def lookup(self, block_hash: bytes, tokens: bytes) -> Block | None:
        block = self.cached.get(block_hash)
        if block is None or block.tokens != tokens:
            return None
        return block

    def touch(self, block: Block) -> None:
        """Take a reference on a cached block, reviving it from the free queue if needed."""
        if block.ref_count == 0:
            self.free.remove(block)
        block.ref_count += 1

    def allocate(self, n: int = 1) -> list[Block]:
        """n blocks off the free queue, each evicted from the cache: its content is about to be overwritten."""
        blocks = self.free.popleft(n)
        for block in blocks:
            if block.block_hash is not None:
                self.uncache(block)
            block.ref_count = 1
        return blocks

    def uncache(self, block: Block) -> None:
        if block.block_hash is not None and self.cached.get(block.block_hash) is block:
            del self.cached[block.block_hash]
        block.block_hash, block.tokens = None, b""

    def cache(self, block: Block, block_hash: bytes, tokens: bytes) -> None:
        if not self.enable_prefix_caching or block.block_hash is not None:
            return
        block.block_hash, block.tokens = block_hash, tokens
        self.cached.setdefault(block_hash, block)

    def release(self, blocks: list[Block]) -> None:
        """Blocks back to the free queue's end in this order, once no request holds them."""
        for block in blocks:
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block.block_id} freed twice"
            if block.ref_count == 0:
                self.free.append(block)
