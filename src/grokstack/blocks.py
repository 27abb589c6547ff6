"""KV block bookkeeping: which cache blocks are free, who holds each, and the prefix cache over full blocks.

Pure Python, no tensors: the scheduler owns a `BlockPool` and the runner only sees block ids. Block 0 is
never handed out; pad tokens write there. A full block is keyed by a hash chain over every token up to its
end (and a namespace, e.g. an adapter), so two sequences whose first k blocks hold the same tokens share those
blocks. Shared blocks are never written again (a sequence only writes past its own length, into a block it
alone holds), so sharing needs no copy; the last, partial block is copied when `n` choices fork.
Unreferenced full blocks stay cached and are evicted least recently used first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

TRASH_BLOCK = 0  # pad tokens' keys and values go here; nothing reads it


def extend_keys(keys: list[int], tokens: Sequence[int], block_size: int, namespace: object = None) -> list[int]:
    """Add the prefix key of every full block of `tokens` not keyed yet: block i's key covers tokens
    [0, (i+1)*block_size) of the namespace (e.g. an adapter), chained from block i-1's key."""
    prev = keys[-1] if keys else hash(("grokstack-prefix", namespace))
    for i in range(len(keys), len(tokens) // block_size):
        prev = hash((prev, tuple(tokens[i * block_size : (i + 1) * block_size])))
        keys.append(prev)
    return keys


class BlockPool:
    """`num_blocks` blocks of `block_size` tokens; block 0 is reserved (see TRASH_BLOCK)."""

    def __init__(self, num_blocks: int, block_size: int, prefix_cache: bool = True) -> None:
        if num_blocks < 2 or block_size < 1:
            raise ValueError("a block pool needs at least 2 blocks of at least 1 token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_cache = prefix_cache
        self.refs = [0] * num_blocks
        self._free: list[int] = list(range(num_blocks - 1, 0, -1))  # never cached, or evicted; pop() = lowest
        self._cached: dict[int, int] = {}  # prefix key -> block
        self._key_of: dict[int, int] = {}  # block -> prefix key
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, oldest first

    # ------------------------------------------------------------------ counts
    @property
    def capacity(self) -> int:
        """Blocks a sequence can ever hold (all but the trash block)."""
        return self.num_blocks - 1

    @property
    def available(self) -> int:
        """Blocks that can be handed out now: free ones and idle cached ones (evicted on demand)."""
        return len(self._free) + len(self._idle)

    @property
    def in_use(self) -> int:
        return self.capacity - self.available

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # ------------------------------------------------------------------ prefix cache
    def match(self, keys: Sequence[int]) -> list[int]:
        """The cached blocks holding the longest prefix of `keys`, each now held once more by the caller."""
        if not self.prefix_cache:
            return []
        found = []
        for key in keys:
            block = self._cached.get(key)
            if block is None:
                break
            found.append(block)
        for block in found:
            self._hold(block)
        return found

    def publish(self, block: int, key: int) -> None:
        """Offer a block the caller just filled, under its prefix key. A prefix already cached keeps its block
        (the caller's copy stays private and is freed when released)."""
        if self.prefix_cache and key not in self._cached and block not in self._key_of:
            self._cached[key] = block
            self._key_of[block] = key

    # ------------------------------------------------------------------ holding
    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks (held once), evicting idle cached blocks least recently used first; None if fewer
        than n are available (nothing is taken then)."""
        if n > self.available:
            return None
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._idle.popitem(last=False)
                del self._cached[self._key_of.pop(block)]
            self.refs[block] = 1
            out.append(block)
        return out

    def share(self, blocks: Sequence[int]) -> None:
        """Hold each block once more (another choice reads the same prefix)."""
        for block in blocks:
            self._hold(block)

    def release(self, blocks: Sequence[int]) -> None:
        """Let go of blocks once each; one nobody holds is free again, or idle in the prefix cache."""
        for block in blocks:
            if block == TRASH_BLOCK or self.refs[block] <= 0:
                raise ValueError(f"block {block} released more often than it was held")
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self._key_of:
                    self._idle[block] = None
                else:
                    self._free.append(block)

    def _hold(self, block: int) -> None:
        if self.refs[block] == 0:
            self._idle.pop(block, None)
        self.refs[block] += 1

    def check(self) -> None:
        """Every block is exactly one of held, idle-cached or free (for tests)."""
        held = {b for b in range(1, self.num_blocks) if self.refs[b] > 0}
        idle, free = set(self._idle), set(self._free)
        assert not (held & idle) and not (held & free) and not (idle & free), "a block is in two states"
        assert held | idle | free == set(range(1, self.num_blocks)), "a block was lost"
        assert len(free) == len(self._free), "a block is free twice"
        assert all(b in self._key_of for b in idle), "an idle block without a prefix key"
