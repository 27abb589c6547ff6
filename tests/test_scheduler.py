"""The scheduler and the block pool without a model: admission, chunking, preemption, prefix sharing, leaks."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grokstack.blocks import TRASH_BLOCK, BlockPool, extend_keys
from grokstack.scheduler import Scheduler, StepPlan


def drive(sched: Scheduler, plan: StepPlan, lengths: dict[int, int], token: int = 7) -> list[int]:
    """What the engine does after a step: fork prompts that ended, then give every sampling row a token, or
    finish it once its sequence holds `lengths[group]` tokens. Returns the finished sequence ids."""
    sched.computed(plan)
    done = []
    for row in plan.rows:
        if not row.sample:
            continue
        ids = sched.fork(row.seq) if row.prompt_end else [row.seq]
        for sid in ids:
            seq = sched.seqs[sid]
            if len(seq.tokens) + 1 >= lengths[seq.group]:
                sched.finish(sid)
                done.append(sid)
            else:
                sched.append(sid, token)
    return done


def test_a_request_waits_until_its_prompt_blocks_are_free():
    pool = BlockPool(num_blocks=9, block_size=4, prefix_cache=False)  # 8 usable blocks = 32 tokens
    sched = Scheduler(pool, max_seqs=4, chunk_tokens=64)
    a = sched.add(1, list(range(20)))  # 5 blocks
    b = sched.add(2, list(range(100, 116)))  # 4 blocks: only 3 left
    plan = sched.schedule()
    assert [r.seq for r in plan.rows] == [a.id]
    assert b in sched.waiting and pool.in_use == 5
    sched.finish(a.id)
    plan = sched.schedule()
    assert [r.seq for r in plan.rows] == [b.id] and pool.in_use == 4


def test_max_seqs_counts_the_choices_a_prompt_will_fork_into():
    sched = Scheduler(BlockPool(64, 4), max_seqs=3, chunk_tokens=64)
    sched.add(1, [1, 2, 3], n=2)
    late = sched.add(2, [4, 5, 6], n=2)
    plan = sched.schedule()
    assert len(plan.rows) == 1 and late in sched.waiting


def test_prompt_chunks_interleave_with_decode_rows():
    sched = Scheduler(BlockPool(64, 4), max_seqs=4, chunk_tokens=8)
    short = sched.add(1, [1, 2, 3])
    lengths = {1: 50, 2: 50}
    drive(sched, sched.schedule(), lengths)  # short's prompt in one step, its first token sampled
    long = sched.add(2, list(range(10, 40)))  # 30 tokens: four chunks of at most 8
    seen = []
    for _ in range(4):
        plan = sched.schedule()
        rows = {r.seq: r for r in plan.rows}
        assert len(rows[short.id].tokens) == 1  # the stream advances every step
        assert plan.tokens - 1 <= 8
        seen.append(len(rows[long.id].tokens))
        drive(sched, plan, lengths)
    assert seen == [8, 8, 8, 6]
    assert sched.seqs[long.id].computed == 30 and len(sched.seqs[long.id].tokens) == 31


def test_the_newest_sequence_is_preempted_and_resumes_from_its_tokens():
    pool = BlockPool(num_blocks=5, block_size=4, prefix_cache=False)  # 4 usable blocks
    sched = Scheduler(pool, max_seqs=4, chunk_tokens=64)
    old = sched.add(1, [1, 2, 3, 4, 5, 6])  # 2 blocks
    new = sched.add(2, [9, 9, 9, 9, 9])  # 2 blocks
    lengths = {1: 12, 2: 12}
    drive(sched, sched.schedule(), lengths)
    preempted = []
    for _ in range(4):
        plan = sched.schedule()
        preempted += plan.preempted
        drive(sched, plan, lengths)
    assert preempted == [new.id]  # the pool ran dry as `old` crossed into its third block
    assert sched.seqs[new.id] in sched.waiting and sched.seqs[new.id].blocks == []
    while old.id in sched.seqs:
        drive(sched, sched.schedule(), lengths)
    plan = sched.schedule()  # `new` again: all its tokens (prompt + output so far) recomputed in one row
    (row,) = plan.rows
    assert row.seq == new.id and row.start == 0 and row.tokens == sched.seqs[new.id].tokens
    assert row.sample and not row.prompt_end  # resumes sampling; the prompt's end was handled before
    pool.check()


def test_a_request_that_can_never_fit_is_refused_up_front():
    sched = Scheduler(BlockPool(num_blocks=9, block_size=4), max_seqs=8, chunk_tokens=64)
    assert sched.fits(20, 12, 1)  # 8 blocks
    assert not sched.fits(20, 13, 1)
    assert not sched.fits(10, 6, 3)  # 3 choices x 4 blocks


def test_cancelling_mid_prefill_frees_its_blocks():
    pool = BlockPool(64, 4)
    sched = Scheduler(pool, max_seqs=4, chunk_tokens=8)
    seq = sched.add(1, list(range(40)))
    sched.computed(sched.schedule())  # the first chunk only
    assert sched.seqs[seq.id].computed == 8 and pool.in_use == 10
    sched.finish(seq.id)
    assert pool.in_use == 0
    pool.check()


def test_shared_prefix_blocks_are_reused_and_the_last_token_is_always_computed():
    pool = BlockPool(64, 4)
    sched = Scheduler(pool, max_seqs=4, chunk_tokens=64)
    prefix = list(range(50, 60))  # 2 full blocks and 2 tokens
    a = sched.add(1, prefix + [1, 2, 3])
    drive(sched, sched.schedule(), {1: 100, 2: 100, 3: 100})
    b = sched.add(2, prefix + [7, 8])  # shares 2 full blocks, then differs mid-block
    plan = sched.schedule()
    row = next(r for r in plan.rows if r.seq == b.id)
    assert row.start == 8 and row.tokens == prefix[8:] + [7, 8]
    assert sched.seqs[b.id].blocks[:2] == sched.seqs[a.id].blocks[:2] and sched.seqs[b.id].cached == 8
    c = sched.add(3, prefix[:8])  # the whole prompt cached: its last token is computed anyway
    plan = sched.schedule()
    row = next(r for r in plan.rows if r.seq == c.id)
    assert row.start == 4 and row.tokens == prefix[4:8]


def test_forked_choices_share_full_blocks_and_copy_the_partial_one():
    pool = BlockPool(64, 4)
    sched = Scheduler(pool, max_seqs=4, chunk_tokens=64)
    seq = sched.add(1, list(range(10)), n=3)
    plan = sched.schedule()
    sched.computed(plan)
    ids = sched.fork(plan.rows[0].seq)
    assert len(ids) == 3
    tables = [sched.seqs[i].blocks for i in ids]
    assert tables[0][:2] == tables[1][:2] == tables[2][:2]  # blocks 0-1 full: shared
    assert len({t[2] for t in tables}) == 3  # block 2 partial: one each
    copies = sched.schedule().copies
    assert sorted(copies) == sorted((tables[0][2], t[2]) for t in tables[1:])
    assert pool.refs[tables[0][0]] == 3
    for i in ids:
        sched.finish(i)
    assert pool.in_use == 0 and seq.id not in sched.seqs
    pool.check()


def test_idle_cached_blocks_are_evicted_least_recently_used_first():
    pool = BlockPool(num_blocks=5, block_size=2)
    keys = [extend_keys([], [i, i], 2)[0] for i in range(4)]
    blocks = pool.allocate(4)
    for b, k in zip(blocks, keys, strict=True):
        pool.publish(b, k)
    pool.release([blocks[2], blocks[0], blocks[3], blocks[1]])  # idle in this order
    assert pool.available == 4 and pool.in_use == 0
    assert pool.match([keys[0]]) == [blocks[0]]  # touched: now the most recent
    pool.release([blocks[0]])
    (fresh,) = pool.allocate(1)
    assert fresh == blocks[2]  # the oldest idle block went first
    assert pool.match([keys[2]]) == []  # and its prefix is forgotten
    assert pool.match([keys[3]]) == [blocks[3]]
    pool.check()


def test_prefix_keys_cover_the_whole_prefix_and_the_namespace():
    a = extend_keys([], [1, 2, 3, 4, 5, 6], 2)
    b = extend_keys([], [9, 2, 3, 4, 5, 6], 2)
    assert len(a) == 3 and a[0] != b[0] and a[1] != b[1]  # block 1 is equal but its prefix differs
    assert extend_keys([], [1, 2], 2, namespace="adapter") != a[:1]
    grown = extend_keys(a[:1], [1, 2, 3, 4, 5, 6, 7], 2)
    assert grown == a


def test_the_trash_block_is_never_handed_out_or_released():
    pool = BlockPool(4, 2, prefix_cache=False)
    assert TRASH_BLOCK not in pool.allocate(3)
    with pytest.raises(ValueError):
        pool.release([TRASH_BLOCK])


# ----------------------------------------------------------------------------- the property
@settings(max_examples=25, deadline=None, database=None)
@given(seed=st.integers(0, 2**32 - 1), prefix_cache=st.booleans(), block_size=st.sampled_from([1, 2, 4, 16]))
def test_no_block_leaks_over_random_requests_and_cancels(seed, prefix_cache, block_size):
    rng = random.Random(seed)
    pool = BlockPool(num_blocks=rng.randint(8, 40), block_size=block_size, prefix_cache=prefix_cache)
    sched = Scheduler(pool, max_seqs=rng.randint(1, 6), chunk_tokens=rng.randint(1, 24))
    lengths: dict[int, int] = {}
    groups: dict[int, list[int]] = {}
    shared = [rng.randrange(100) for _ in range(20)]
    for event in range(1000):
        roll = rng.random()
        if roll < 0.15:
            n = rng.randint(1, 3)
            prompt = shared[: rng.randint(0, 20)] + [rng.randrange(100) for _ in range(rng.randint(1, 12))]
            new = rng.randint(1, 10)
            if sched.fits(len(prompt), new, n):
                lengths[event] = len(prompt) + new
                groups[event] = [sched.add(event, prompt, n, use_cache=rng.random() < 0.8).id]
        elif roll < 0.22 and groups:
            gone = rng.choice(sorted(groups))
            for sid in [s for s, seq in sched.seqs.items() if seq.group == gone]:
                sched.finish(sid)
            del groups[gone]
        else:
            plan = sched.schedule()
            for row in plan.rows:  # every written slot is in a block the sequence holds, never the trash
                assert all(b != TRASH_BLOCK for b in row.table[: -(-(row.start + len(row.tokens)) // block_size)])
            drive(sched, plan, lengths)
        pool.check()
        held = sum(len(s.blocks) + len(s.spare) for s in sched.seqs.values())
        assert pool.in_use <= held  # shared blocks count once in the pool, once per holder here
    for sid in list(sched.seqs):
        sched.finish(sid)
    assert pool.in_use == 0
    pool.check()
