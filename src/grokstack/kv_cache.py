"""Paged KV storage, and the context one forward step runs in.

Keys and values live in fixed-size blocks: k, v [L, num_blocks, block_size, Hkv, D]. A sequence owns a list
of blocks (its block table, from `blocks.BlockPool`); token position p of that sequence sits in block
table[p // block_size] at offset p % block_size, so key index j read through the table is absolute position
j and the causal mask stays `j <= q_pos`. Memory is taken block by block as sequences grow (torch.zeros does
not touch pages until they are written).

A step is flat: N tokens of many sequences, each with its position and the cache slot its k, v go to
(block * block_size + offset). Attention then runs per group of rows padded to one length (decode rows
together, prefill chunks together), each row reading its keys through its block table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig


class PagedKV:
    def __init__(
        self,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, NB, BS, Hkv, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.key_valid = torch.ones(num_blocks * block_size, dtype=torch.bool, device=device)  # [NB*BS]
        self.num_blocks = num_blocks
        self.block_size = block_size

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [N, Hkv, D] at flat slots [N]."""
        self.k[layer].view(-1, *k.shape[1:])[slots] = k
        self.v[layer].view(-1, *v.shape[1:])[slots] = v

    def read(self, layer: int, tables: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [R, length, Hkv, D] of rows with block tables [R, nb]."""
        R, nb = tables.shape
        k = self.k[layer][tables].view(R, nb * self.block_size, *self.k.shape[3:])[:, :length]
        v = self.v[layer][tables].view(R, nb * self.block_size, *self.v.shape[3:])[:, :length]
        return k, v

    def valid_keys(self, tables: torch.Tensor, length: int) -> torch.Tensor:
        """key_valid [R, length] through block tables [R, nb] (Grok-1's pad-key mask)."""
        slots = (tables[:, :, None] * self.block_size + torch.arange(self.block_size, device=tables.device))
        return self.key_valid[slots.flatten(1)[:, :length]]

    def copy_block(self, src: int, dst: int) -> None:
        """Give block `dst` the contents of `src` (a choice forking off a shared, partly filled block)."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]
        bs = self.block_size
        self.key_valid[dst * bs : (dst + 1) * bs] = self.key_valid[src * bs : (src + 1) * bs]

    @property
    def bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


@dataclass
class AttnGroup:
    """Rows attended together: row r's query t is flat token index[r, t] (pads: present False)."""

    index: torch.Tensor  # [R, T] long, flat token indices (pads point at token 0)
    present: torch.Tensor  # [R, T] bool
    q_pos: torch.Tensor  # [R, T] long, absolute positions (pads: 0)
    tables: torch.Tensor  # [R, nb] long, block tables (padded with the trash block)
    length: int  # keys to read per row: the group's highest position + 1
    whole: bool = False  # index is arange(N).view(R, T) with nothing padded: the step's tokens as they are


@dataclass
class StepContext:
    """What one forward step over a paged cache needs besides its tokens [N]."""

    positions: torch.Tensor  # [N] absolute position of each token
    slots: torch.Tensor  # [N] flat cache slot its k, v are written to
    groups: list[AttnGroup]
    kv: PagedKV
