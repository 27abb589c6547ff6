"""The model runner: executes a `StepPlan` on the model and the paged KV cache, returns logits.

The plan's rows become one flat batch of tokens (no padding in the weight matmuls: every linear layer and
expert runs on exactly the step's tokens), with one attention group for the decode rows and one for the
prompt chunks. Logits are computed only where someone reads them: the last position of a row that samples,
and every position of a row whose prompt is being scored.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch

from .blocks import TRASH_BLOCK
from .kv_cache import AttnGroup, PagedKV, StepContext
from .model import Transformer
from .scheduler import Row, StepPlan


@dataclass
class RowLogits:
    last: torch.Tensor | None  # [V] fp32 on the CPU, for a row that samples
    every: torch.Tensor | None  # [t, V] fp32 on the CPU, for a row whose prompt is scored


class Runner:
    def __init__(self, model: Transformer, kv: PagedKV) -> None:
        self.model = model
        self.kv = kv
        self.device = kv.k.device

    @torch.no_grad()
    def execute(self, plan: StepPlan, score: Collection[int] = ()) -> list[RowLogits]:
        """Run one step; `score` names the sequences whose every position needs logits."""
        h, offsets = self.forward(plan)
        return self.outputs(plan.rows, h, offsets, score) if plan.rows else []

    @torch.no_grad()
    def forward(self, plan: StepPlan) -> tuple[torch.Tensor | None, list[int]]:
        """The block copies, then the model over the plan's tokens: hidden states [N, D] and each row's first
        flat index (None when the plan has no rows)."""
        for src, dst in plan.copies:
            self.kv.copy_block(src, dst)
        if not plan.rows:
            return None, []
        tokens, step, offsets = self.inputs(plan.rows)
        return self.model.hidden(tokens, step), offsets

    def inputs(self, rows: list[Row]) -> tuple[torch.Tensor, StepContext, list[int]]:
        """Flat tokens [N], the step context, and each row's first flat index."""
        bs = self.kv.block_size
        tokens, positions, slots, offsets = [], [], [], []
        for row in rows:
            offsets.append(len(tokens))
            tokens += row.tokens
            for p in range(row.start, row.start + len(row.tokens)):
                positions.append(p)
                slots.append(row.table[p // bs] * bs + p % bs)
        decode = [i for i, r in enumerate(rows) if len(r.tokens) == 1]
        chunks = [i for i, r in enumerate(rows) if len(r.tokens) > 1]
        groups = [self.group([rows[i] for i in part], [offsets[i] for i in part]) for part in (decode, chunks) if part]
        if len(groups) == 1 and len({len(r.tokens) for r in rows}) == 1:
            groups[0].whole = True  # rows are laid out back to back in order: the flat tokens are [R, T]
        dev = self.device
        step = StepContext(torch.tensor(positions, device=dev), torch.tensor(slots, device=dev), groups, self.kv)
        return torch.tensor(tokens, device=dev), step, offsets

    def group(self, rows: list[Row], offsets: list[int]) -> AttnGroup:
        T = max(len(r.tokens) for r in rows)
        end = max(r.start + len(r.tokens) for r in rows)
        nb = -(-end // self.kv.block_size)
        index = torch.zeros(len(rows), T, dtype=torch.long)
        present = torch.zeros(len(rows), T, dtype=torch.bool)
        q_pos = torch.zeros(len(rows), T, dtype=torch.long)
        tables = torch.full((len(rows), nb), TRASH_BLOCK, dtype=torch.long)
        for r, (row, first) in enumerate(zip(rows, offsets, strict=True)):
            t = len(row.tokens)
            index[r, :t] = torch.arange(first, first + t)
            present[r, :t] = True
            q_pos[r, :t] = torch.arange(row.start, row.start + t)
            used = -(-(row.start + t) // self.kv.block_size)
            tables[r, :used] = torch.tensor(row.table[:used])
        dev = self.device
        return AttnGroup(index.to(dev), present.to(dev), q_pos.to(dev), tables.to(dev), end)

    def outputs(self, rows: list[Row], h: torch.Tensor, offsets: list[int], score: Collection[int]) -> list[RowLogits]:
        last_rows = [i for i, r in enumerate(rows) if r.sample]
        last = {}
        if last_rows:
            idx = torch.tensor([offsets[i] + len(rows[i].tokens) - 1 for i in last_rows], device=h.device)
            logits = self.model.logits(h[idx]).float().cpu()  # [K, V]
            last = dict(zip(last_rows, logits, strict=True))
        out = []
        for i, row in enumerate(rows):
            every = None
            if row.seq in score:
                every = self.model.logits(h[offsets[i] : offsets[i] + len(row.tokens)]).float().cpu()  # [t, V]
            out.append(RowLogits(last.get(i), every))
        return out


class Stepper:
    """A few sequences stepped by hand through the paged cache, each with fixed blocks: for parity checks and
    kernel benchmarks that feed tokens directly, without a scheduler."""

    def __init__(self, model: Transformer, rows: int, max_len: int, block_size: int = 16) -> None:
        per_row = -(-max_len // block_size)
        kv = PagedKV(model.cfg, rows * per_row + 1, block_size, model.dtype, model.embed_tokens.weight.device)
        self.runner = Runner(model, kv)
        self.tables = [list(range(1 + r * per_row, 1 + (r + 1) * per_row)) for r in range(rows)]
        self.lengths = [0] * rows

    def feed(self, tokens: list[list[int]], logits: str = "last") -> list[torch.Tensor]:
        """Append tokens[r] to row r (rows with no tokens sit out); per fed row its logits: the last
        position's [V] ("last") or every position's [t, V] ("every")."""
        rows = [Row(r, self.lengths[r], list(t), self.tables[r], True, False) for r, t in enumerate(tokens) if t]
        plan = StepPlan(rows)
        outs = self.runner.execute(plan, score={r.seq for r in rows} if logits == "every" else ())
        for row in rows:
            self.lengths[row.seq] += len(row.tokens)
        return [o.every if logits == "every" else o.last for o in outs]
