"""Static KV storage for one batch of sequences, indexed by absolute position.

Each row writes its keys at its own positions, so prompts of different lengths share one
cache: a query at position p only reads keys 0..p, and anything a padded row wrote beyond its
length is overwritten before a query can reach it.
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
        self.max_len = max_len
        self.length = 0  # keys 0..length-1 may be read
        self._rows = torch.arange(batch_size, device=device)[:, None]  # [B, 1]
        self._positions: torch.Tensor | None = None

    def begin(self, positions: torch.Tensor, key_valid: torch.Tensor | None) -> None:
        """Start a forward step that writes `positions` [B, T]; key_valid [B, T] only for pad-masking models."""
        top = int(positions.max()) + 1
        if top > self.max_len:
            raise ContextLengthError(f"position {top - 1} is past the KV cache of {self.max_len} tokens")
        self._positions = positions
        if key_valid is not None:
            self.key_valid[self._rows, positions] = key_valid
        self.length = max(self.length, top)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v [B, T, Hkv, D]; return all readable keys and values [B, S, Hkv, D]."""
        self.k[layer][self._rows, self._positions] = k
        self.v[layer][self._rows, self._positions] = v
        return self.k[layer, :, : self.length], self.v[layer, :, : self.length]

    def valid_keys(self) -> torch.Tensor:
        return self.key_valid[:, : self.length]  # [B, S]
