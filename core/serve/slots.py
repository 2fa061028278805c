"""The KV cache of the server: a preallocated pool of slots, each holding one sequence's full context.

Layout (shared with the native batched step, `NativeDecoder.decode_rows`): for every layer, keys and values
are contiguous tensors (n_slots, n_kv_heads, context, head_dim), and `lengths` (n_slots,) int64 counts the
positions each slot holds. Nothing grows while serving: the memory is taken once at start-up and the log
says how much, and how many tokens each slot holds (every slot gets the whole `context`; it is never
split among slots behind the user's back).

A slot remembers the tokens its cache holds after its request ends, so a new request whose prompt starts
the same way (the same system prompt, the next turn of a chat) takes the free slot with the longest
common prefix and prefills only the rest.
"""

from __future__ import annotations

import torch

from glm_cli.core.model.transformer import KVCache


class SlotPool:
    def __init__(self, config, n_slots: int, context: int, dtype: torch.dtype, device="cpu"):
        shape = (n_slots, config.n_kv_heads, context, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.lengths = torch.zeros(n_slots, dtype=torch.int64)
        self.n_slots, self.context = n_slots, context
        self.tokens: list[list[int]] = [[] for _ in range(n_slots)]
        """The token ids each slot's cache holds, position by position (len == lengths[slot])."""
        self.busy = [False] * n_slots
        self._last_used = [0] * n_slots
        self._clock = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def free_count(self) -> int:
        return self.busy.count(False)

    def in_use(self) -> int:
        return self.n_slots - self.free_count()

    def acquire(self, prompt: list[int]) -> tuple[int, int] | None:
        """Take the free slot whose cached tokens share the longest prefix with `prompt` (the least
        recently used among equals); returns (slot, reused positions) or None when every slot is busy.

        At least the prompt's last token is always recomputed: its logits are what sampling starts from."""
        free = [s for s in range(self.n_slots) if not self.busy[s]]
        if not free:
            return None
        best = max(free, key=lambda s: (common_prefix(self.tokens[s], prompt), -self._last_used[s]))
        reuse = min(common_prefix(self.tokens[best], prompt), len(prompt) - 1)
        self.busy[best] = True
        self.truncate(best, reuse)
        return best, reuse

    def acquire_any(self) -> int | None:
        """A free slot for a copy (n > 1): the least recently used, whose cache matters least."""
        free = [s for s in range(self.n_slots) if not self.busy[s]]
        if not free:
            return None
        slot = min(free, key=lambda s: self._last_used[s])
        self.busy[slot] = True
        self.truncate(slot, 0)
        return slot

    def release(self, slot: int) -> None:
        self._clock += 1
        self._last_used[slot] = self._clock
        self.busy[slot] = False

    def truncate(self, slot: int, length: int) -> None:
        self.lengths[slot] = length
        del self.tokens[slot][length:]

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Give slot `dst` the first `length` positions of slot `src` (n > 1: one prefill, n caches)."""
        for k, v in zip(self.keys, self.values, strict=True):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]
        self.lengths[dst] = length
        self.tokens[dst] = self.tokens[src][:length]

    def view(self, slot: int) -> SlotCache:
        """One slot as a batch-of-one `KVCache`, for a prefill through the model's own forward."""
        return SlotCache(self, slot)


class SlotCache(KVCache):
    """A `KVCache` whose tensors are views of one slot of the pool: the model's forward writes into the
    pool directly. Its `length` starts at the slot's length; `SlotPool.lengths` is updated by the caller."""

    def __init__(self, pool: SlotPool, slot: int):  # no super().__init__(): it would allocate a cache
        self.keys = [k[slot:slot + 1] for k in pool.keys]
        self.values = [v[slot:slot + 1] for v in pool.values]
        self.length = int(pool.lengths[slot])
        self.max_len = pool.context


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
