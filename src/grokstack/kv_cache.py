"""Static KV storage for one batch of sequences, indexed by absolute position.

Each row writes its keys at its own positions, so prompts of different lengths share one
cache: a query at position p only reads keys 0..p, and anything a padded row wrote beyond its
length is overwritten before a query can reach it.

Continuous batching (`engine.py`) treats rows as slots: `window()` picks the rows the next forward
steps touch and how many keys they read, so a step costs what its live sequences need.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .errors import ContextLengthError


class KVCache:
    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (cfg.num_layers, batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, S_max, Hkv, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.key_valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)  # [B, S_max]
        self.batch_size = batch_size
        self.max_len = max_len
        self.length = 0  # keys 0..length-1 may be read
        self._rows = slice(0, batch_size)
        self._read_len: int | None = None
        self._row_ids = torch.arange(batch_size, device=device)[:, None]  # [B, 1]
        self._positions: torch.Tensor | None = None

    def window(self, rows: slice | torch.Tensor | None = None, read_len: int | None = None) -> None:
        """Make the next steps touch only `rows` (all by default) and read only keys 0..read_len-1
        (by default up to the step's last position). Rows of the window that only idle write at
        positions nobody reads before they are overwritten; their outputs are thrown away. A slice
        reads the cache in place; a tensor of row ids gathers (a copy, for scattered prefill rows)."""
        self._rows = rows if rows is not None else slice(0, self.batch_size)
        self._read_len = read_len

    def begin(self, positions: torch.Tensor, key_valid: torch.Tensor | None) -> None:
        """Start a forward step that writes `positions` [B, T]; key_valid [B, T] only for pad-masking models."""
        top = int(positions.max()) + 1
        if top > self.max_len:
            raise ContextLengthError(f"position {top - 1} is past the KV cache of {self.max_len} tokens")
        self._positions = positions
        if key_valid is not None:
            self.key_valid[self._row_ids[self._rows], positions] = key_valid
        self.length = top if self._read_len is None else self._read_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v [B, T, Hkv, D]; return all readable keys and values [B, S, Hkv, D]."""
        rows = self._row_ids[self._rows]
        self.k[layer][rows, self._positions] = k
        self.v[layer][rows, self._positions] = v
        return self.k[layer, self._rows, : self.length], self.v[layer, self._rows, : self.length]

    def valid_keys(self) -> torch.Tensor:
        return self.key_valid[self._rows, : self.length]  # [B, S]

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Give row `dst` the first `length` keys and values of row `src` (n > 1 choices share a prefill)."""
        self.k[:, dst, :length] = self.k[:, src, :length]
        self.v[:, dst, :length] = self.v[:, src, :length]
        self.key_valid[dst, :length] = self.key_valid[src, :length]
