"""The scheduler: which sequences run in the next step, which tokens each feeds, and which KV blocks hold them.

Pure Python over a `BlockPool`; no model, no tensors, so it is unit-tested on its own. `schedule()` returns a
`StepPlan` value (rows with their tokens, positions and block tables, plus block copies to do first) that a
runner executes; the engine then reports each sampled token back with `append` (or `finish`).

Policy:
- a step feeds one token to every running sequence past its prompt (decode), then prompt chunks, oldest
  first, up to `chunk_tokens` prompt tokens per step, so running streams never wait longer than one chunk;
- a sequence is admitted (first come, first served) when `max_seqs` allows its `n` choices and the blocks for
  its whole prompt are free (after reusing cached prefix blocks); decode blocks are taken as sequences grow;
- when a growing sequence finds no free block, the most recently admitted sequence is preempted: its blocks
  are released and it waits at the front of the queue to be recomputed from its tokens (prompt + output);
- a request that could never fit the pool is refused up front by `fits`, so preemption cannot loop.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from .blocks import BlockPool, extend_keys


@dataclass
class Seq:
    """One sequence: its tokens (prompt, then output) and the blocks holding their keys and values."""

    id: int
    group: int  # the request it belongs to (all n choices share one)
    tokens: list[int]
    prompt_len: int
    n: int = 1  # choices to fork into when the prompt is done (1 after forking)
    use_cache: bool = True  # may start from cached prefix blocks (not when every prompt position must be scored)
    blocks: list[int] = field(default_factory=list)
    spare: list[int] = field(default_factory=list)  # blocks kept for the forks' copies of the last prompt block
    started: bool = False  # the row ending its prompt was scheduled (it forks, and samples its first token)
    computed: int = 0  # tokens whose keys and values are in the cache
    cached: int = 0  # of those, tokens found in the prefix cache at (first) admission
    keys: list[int] = field(default_factory=list)  # prefix keys of the full blocks of `tokens`
    published: int = 0  # full blocks offered to the prefix cache
    order: int = 0  # admission order (preemption takes the highest)
    preemptions: int = 0


@dataclass
class Row:
    """One sequence's part of a step: `tokens` at positions start.., written through `table`."""

    seq: int
    start: int
    tokens: list[int]
    table: list[int]
    sample: bool  # the row reaches the end of the sequence's tokens: its last logits pick the next token
    prompt_end: bool  # the row completes the prompt (first time): fork, prompt logprobs, first token


@dataclass
class StepPlan:
    rows: list[Row]
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) blocks, copied before the step
    preempted: list[int] = field(default_factory=list)  # sequence ids sent back to the queue

    @property
    def tokens(self) -> int:
        return sum(len(r.tokens) for r in self.rows)


class Scheduler:
    def __init__(self, pool: BlockPool, max_seqs: int, chunk_tokens: int) -> None:
        if max_seqs < 1 or chunk_tokens < 1:
            raise ValueError("max_seqs and chunk_tokens must be >= 1")
        self.pool = pool
        self.max_seqs = max_seqs
        self.chunk_tokens = chunk_tokens
        self.seqs: dict[int, Seq] = {}
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self._ids = itertools.count(1)
        self._order = itertools.count(1)
        self._copies: list[tuple[int, int]] = []
        self.preemptions = 0
        self.cached_tokens = 0  # prompt tokens admitted from the prefix cache (a request that waits counts once)

    # ------------------------------------------------------------------ requests
    def fits(self, prompt_len: int, max_new: int, n: int) -> bool:
        """Whether a request can ever run: every choice's whole context in blocks, with nothing shared."""
        return n * self.pool.blocks_for(prompt_len + max_new) <= self.pool.capacity and n <= self.max_seqs

    def add(self, group: int, prompt: list[int], n: int = 1, use_cache: bool = True) -> Seq:
        seq = Seq(next(self._ids), group, list(prompt), len(prompt), n, use_cache)
        self.seqs[seq.id] = seq
        self.waiting.append(seq)
        return seq

    def append(self, seq_id: int, token: int) -> None:
        """The engine sampled `token` for this sequence; it is fed in the next step."""
        self.seqs[seq_id].tokens.append(token)

    def finish(self, seq_id: int) -> None:
        """The sequence is done (or cancelled): its blocks go back to the pool (full ones stay cached)."""
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.release(seq.blocks + seq.spare)
        seq.blocks, seq.spare = [], []

    def fork(self, seq_id: int) -> list[int]:
        """Split a sequence whose prompt is done into its n choices; returns the ids, the original first. The
        copies share the full blocks and get their own copy of the partly filled last block."""
        seq = self.seqs[seq_id]
        ids = [seq.id]
        for _ in range(seq.n - 1):
            twin = Seq(next(self._ids), seq.group, list(seq.tokens), seq.prompt_len, 1, seq.use_cache,
                       started=True, computed=seq.computed, cached=seq.cached, keys=list(seq.keys),
                       published=seq.published, order=seq.order)
            full = seq.computed // self.pool.block_size
            shared = seq.blocks[:full]
            self.pool.share(shared)
            twin.blocks = list(shared)
            if len(seq.blocks) > full:  # the partial block: each choice writes its own continuation
                copy = seq.spare.pop()
                self._copies.append((seq.blocks[full], copy))
                twin.blocks.append(copy)
            self.seqs[twin.id] = twin
            self.running.append(twin)
            ids.append(twin.id)
        self.pool.release(seq.spare)  # unused when the prompt ended on a block boundary
        seq.spare, seq.n = [], 1
        return ids

    # ------------------------------------------------------------------ the step
    def schedule(self) -> StepPlan:
        plan = StepPlan([], self._copies)
        self._copies = []
        self._grow_decoders(plan)
        budget = self.chunk_tokens
        for seq in list(self.running):  # prompts already admitted, oldest first
            if budget > 0 and self._feeding(seq) > 1:
                budget -= self._add_chunk(plan, seq, budget)
        self._admit(plan, budget)
        return plan

    def _feeding(self, seq: Seq) -> int:
        return len(seq.tokens) - seq.computed

    def _grow_decoders(self, plan: StepPlan) -> None:
        """One token for each decoding sequence; a block for those that need one, preempting if none is free."""
        for seq in sorted((s for s in self.running if self._feeding(s) == 1), key=lambda s: s.order):
            if seq not in self.running:  # preempted to make room for an older one
                continue
            while seq.computed >= len(seq.blocks) * self.pool.block_size:
                got = self.pool.allocate(1)
                if got is not None:
                    seq.blocks += got
                    break
                victim = max(self.running, key=lambda s: s.order)
                self._preempt(victim, plan)
                if victim is seq:
                    break
            if seq in self.running:
                self._add_row(plan, seq, 1)

    def _add_chunk(self, plan: StepPlan, seq: Seq, budget: int) -> int:
        take = min(self._feeding(seq), budget)
        self._add_row(plan, seq, take)
        return take

    def _add_row(self, plan: StepPlan, seq: Seq, count: int) -> None:
        start = seq.computed
        end = start + count
        done = end == len(seq.tokens)
        plan.rows.append(Row(seq.id, start, seq.tokens[start:end], list(seq.blocks), done, done and not seq.started))
        seq.started = seq.started or done
        seq.computed = end  # the runner writes these keys and values in this step

    def _admit(self, plan: StepPlan, budget: int) -> None:
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if sum(s.n for s in self.running) + seq.n > self.max_seqs:
                return
            matched = self._match(seq)
            need = self.pool.blocks_for(len(seq.tokens)) - len(matched) + (seq.n - 1)  # + the forks' copies
            if need > self.pool.available:
                self.pool.release(matched)
                return  # first come, first served: later requests wait behind it
            self.waiting.popleft()
            fresh = self.pool.allocate(need) or []
            seq.blocks = matched + fresh[: len(fresh) - (seq.n - 1)]
            seq.spare = fresh[len(fresh) - (seq.n - 1) :]
            seq.computed = len(matched) * self.pool.block_size
            if seq.preemptions == 0:
                seq.cached = seq.computed
                self.cached_tokens += seq.cached
            seq.published = len(matched)
            seq.order = next(self._order)
            self.running.append(seq)
            budget -= self._add_chunk(plan, seq, budget)

    def _match(self, seq: Seq) -> list[int]:
        """Cached blocks for the sequence's prefix, leaving at least its last token to compute."""
        self._extend_keys(seq)
        if not seq.use_cache:
            return []
        usable = (len(seq.tokens) - 1) // self.pool.block_size
        return self.pool.match(seq.keys[:usable])

    def _extend_keys(self, seq: Seq) -> None:
        extend_keys(seq.keys, seq.tokens, self.pool.block_size)

    def _preempt(self, seq: Seq, plan: StepPlan) -> None:
        self.running.remove(seq)
        self.pool.release(seq.blocks + seq.spare)
        seq.blocks, seq.spare, seq.computed, seq.published = [], [], 0, 0
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)
        plan.preempted.append(seq.id)

    def computed(self, plan: StepPlan) -> None:
        """After the runner ran `plan`: offer the blocks it filled to the prefix cache."""
        if not self.pool.prefix_cache:
            return
        for row in plan.rows:
            seq = self.seqs.get(row.seq)
            if seq is None:
                continue
            self._extend_keys(seq)
            full = min(seq.computed // self.pool.block_size, len(seq.keys))
            for i in range(seq.published, full):
                self.pool.publish(seq.blocks[i], seq.keys[i])
            seq.published = max(seq.published, full)
