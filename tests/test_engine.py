"""The continuous-batching engine: same tokens as one-at-a-time generation, joins and leaves, limits."""

import queue
import threading
import time

import pytest
import torch

import grokstack
from grokstack.engine import Engine, PromptLogprobs
from grokstack.errors import ContextLengthError, InvalidArgumentError, OverloadedError
from grokstack.sampling import SamplingParams
from grokstack.tiny import make_tiny

GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return grokstack.load(make_tiny("grok-2", tmp_path_factory.mktemp("eng"), seed=2))


@pytest.fixture(scope="module")
def default_lm():
    return grokstack.load("default")


@pytest.fixture(scope="module")
def prompts(lm):
    texts = ["Human: hello there", "a", "the sea and the stars " * 6, "Grok " * 30, "x y z"]
    return [lm.encode(t) for t in texts]


def run_all(engine, prompts, params):
    out = {}

    def one(i):
        evs = list(engine.generate(prompts[i], params))
        out[i] = ([e.token_id for e in evs if not e.stop_token], evs[-1].finish_reason)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [out[i] for i in range(len(prompts))]


def test_concurrent_requests_match_one_at_a_time(lm, prompts):
    engine = Engine(lm, max_batch=3, max_model_len=256, prefill_chunk=16).start()  # fewer slots than requests
    try:
        got = run_all(engine, prompts, GREEDY)
        for p, (ids, finish) in zip(prompts, got, strict=True):
            ref = lm.generate(p, max_tokens=12, temperature=0)
            assert ids == ref.token_ids and finish == ref.finish_reason
        assert engine.stats().kv_blocks_used == 0
    finally:
        engine.shutdown(1)


def test_grok1_pad_masking_model_in_the_engine(tmp_path):
    lm1 = grokstack.load(make_tiny("grok-1", tmp_path / "g1"))
    engine = Engine(lm1, max_batch=4, max_model_len=128, prefill_chunk=32).start()  # prompts prefill together
    try:
        prompts = [[5, 0, 9, 33, 47, 12, 7], [100, 7, 7, 0, 0, 8, 9, 10, 11, 12, 13, 14], [3]]
        for p, (ids, _) in zip(prompts, run_all(engine, prompts, GREEDY), strict=True):
            assert ids == lm1.generate(p, max_tokens=12, temperature=0).token_ids
    finally:
        engine.shutdown(1)


def test_n_choices_share_the_prefill(lm, prompts):
    engine = Engine(lm, max_batch=4, max_model_len=256).start()
    try:
        evs = list(engine.generate(prompts[2], [GREEDY, GREEDY, GREEDY]))
        per = [[e.token_id for e in evs if e.index == i and not e.stop_token] for i in range(3)]
        assert per[0] == per[1] == per[2] == lm.generate(prompts[2], max_tokens=12, temperature=0).token_ids
        sampled = SamplingParams(max_tokens=12, temperature=1.0, seed=11)
        evs = list(engine.generate(prompts[2], [sampled, sampled]))
        a = [e.token_id for e in evs if e.index == 0]
        b = [e.token_id for e in evs if e.index == 1]
        assert a != b  # each choice gets its own seed (seed + index)
    finally:
        engine.shutdown(1)


def test_prompt_logprobs_match_a_full_forward(lm, prompts):
    engine = Engine(lm, max_batch=2, max_model_len=256, prefill_chunk=7).start()
    try:
        got: queue.Queue = queue.Queue()
        engine.submit(prompts[3], GREEDY, got.put, prompt_logprobs=2, generate=False)
        first = got.get(timeout=30)
        assert isinstance(first, PromptLogprobs) and first.entries[0] is None
        end = got.get(timeout=30)
        assert end.finish_reason == "length" and end.token_id == -1
        logp = torch.log_softmax(lm(torch.tensor([prompts[3]]))[0].float(), -1)
        for i, e in enumerate(first.entries[1:]):
            assert e.token_id == prompts[3][i + 1]
            assert e.logprob == pytest.approx(float(logp[i, e.token_id]), abs=1e-4)
            assert len(e.top) == 2 and e.top[0][1] == pytest.approx(float(logp[i].max()), abs=1e-4)
    finally:
        engine.shutdown(1)


def test_cancel_frees_kv_at_once(lm, prompts):
    engine = Engine(lm, max_batch=2, max_model_len=256).start()
    try:
        got: queue.Queue = queue.Queue()
        req = engine.submit(prompts[0], SamplingParams(max_tokens=200, temperature=1.0, ignore_eos=True), got.put)
        got.get(timeout=30)
        assert engine.stats().kv_tokens_used > 0
        engine.cancel(req)
        deadline = time.monotonic() + 5
        while engine.stats().running and time.monotonic() < deadline:
            time.sleep(0.01)
        s = engine.stats()
        assert s.running == 0 and s.kv_blocks_used == 0
    finally:
        engine.shutdown(1)


def test_long_prefill_does_not_freeze_running_streams(lm, prompts):
    engine = Engine(lm, max_batch=2, max_model_len=256, prefill_chunk=8).start()
    try:
        events: queue.Queue = queue.Queue()
        engine.submit(prompts[1], SamplingParams(max_tokens=150, temperature=1.0, ignore_eos=True, seed=1),
                      lambda ev: events.put(("a", ev)))
        while events.get(timeout=30)[0] != "a":
            pass
        long_prompt = (prompts[3] * 4)[:200]  # 25 chunks of 8
        engine.submit(long_prompt, SamplingParams(max_tokens=2, temperature=0), lambda ev: events.put(("b", ev)))
        a_before_b = 0
        while True:
            who, _ = events.get(timeout=60)
            if who == "b":
                break
            a_before_b += 1
        assert a_before_b >= 10  # the running stream kept getting tokens during the 25-chunk prefill
    finally:
        engine.shutdown(1)


def test_limits(lm, prompts):
    engine = Engine(lm, max_batch=2, max_model_len=64, max_queue=1)  # not started: requests only queue
    with pytest.raises(ContextLengthError, match="maximum context length is 64"):
        engine.submit(prompts[0], SamplingParams(max_tokens=100), lambda ev: None)
    with pytest.raises(InvalidArgumentError, match="n=3"):
        engine.submit(prompts[0], [GREEDY] * 3, lambda ev: None)
    engine.submit(prompts[0], GREEDY, lambda ev: None)
    with pytest.raises(OverloadedError, match="queue is full"):
        engine.submit(prompts[0], GREEDY, lambda ev: None)
    engine.shutdown(0)
    with pytest.raises(OverloadedError, match="shutting down"):
        engine.submit(prompts[0], GREEDY, lambda ev: None)


def test_short_prompts_prefill_together(lm, prompts):
    engine = Engine(lm, max_batch=4, max_model_len=256, prefill_chunk=64)
    first_step, events = {}, {0: [], 1: [], 4: []}

    def emitter(i):
        def emit(ev):
            first_step.setdefault(i, engine._steps)
            events[i].append(ev)
        return emit

    for i in events:  # short prompts, queued before the engine starts
        engine.submit(prompts[i], GREEDY, emitter(i))
    engine.start()
    try:
        deadline = time.monotonic() + 30
        while not all(evs and evs[-1].finish_reason for evs in events.values()):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert len(set(first_step.values())) == 1  # one prefill step gave all three their first token
        for i, evs in events.items():  # padded together, each still decodes exactly as it does alone
            ids = [e.token_id for e in evs if not e.stop_token]
            assert ids == lm.generate(prompts[i], max_tokens=12, temperature=0).token_ids
    finally:
        engine.shutdown(1)


# ----------------------------------------------------------------------------- paged KV and the prefix cache
def greedy_runs(engine: Engine, prompts: list[list[int]], n: int = 1, max_tokens: int = 10) -> list:
    """Each prompt run alone, one after the other on one engine (so later ones meet the earlier ones'
    cached blocks): per prompt, each choice's tokens, and the cached prompt tokens reported."""
    out = []
    for p in prompts:
        got: queue.Queue = queue.Queue()
        params = [SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)] * n
        req = engine.submit(p, params, got.put)
        engine.run()
        evs = [got.get_nowait() for _ in range(got.qsize())]
        out.append(([[e.token_id for e in evs if e.index == j] for j in range(n)], req.cached_tokens))
    return out


@pytest.mark.parametrize("arch", ["grok-1", "grok-2"])
def test_prefix_cache_on_equals_off(arch, tmp_path):
    lm_ = grokstack.load(make_tiny(arch, tmp_path / arch, seed=3))
    base = [int(t) for t in torch.randint(3, 500, (45,), generator=torch.Generator().manual_seed(1))]
    base[5] = base[20] = 0  # Grok-1 masks pad keys, inside shared blocks too
    prompts = [base, base[:37] + [11, 12, 13], base + [7], base[:16], base]  # mid-block, whole blocks, same
    on = greedy_runs(Engine(lm_, max_batch=4, max_model_len=128, block_size=8), prompts, n=2)
    off = greedy_runs(Engine(lm_, max_batch=4, max_model_len=128, block_size=8, prefix_cache=False), prompts, n=2)
    assert [toks for toks, _ in on] == [toks for toks, _ in off]
    assert all(toks[0] == toks[1] for toks, _ in on)  # greedy choices agree
    assert [cached for _, cached in on] == [0, 32, 40, 8, 40]  # whole shared blocks, never the last token
    assert all(cached == 0 for _, cached in off)


def test_prefix_cache_on_equals_off_on_the_default_model(default_lm):
    system = default_lm.chat_ids([{"role": "system", "content": "You are a terse assistant. " * 8},
                                  {"role": "user", "content": "Name a colour."}])
    other = default_lm.chat_ids([{"role": "system", "content": "You are a terse assistant. " * 8},
                                 {"role": "user", "content": "Name a fruit."}])
    on = greedy_runs(Engine(default_lm, max_batch=2, max_model_len=512), [system, other], n=2, max_tokens=8)
    off = greedy_runs(Engine(default_lm, max_batch=2, max_model_len=512, prefix_cache=False), [system, other], n=2,
                      max_tokens=8)
    assert [t for t, _ in on] == [t for t, _ in off]
    assert on[1][1] >= 64  # the system prompt's blocks were reused


def test_scored_prompts_get_every_position_when_their_prefix_is_cached(lm, prompts):
    engine = Engine(lm, max_batch=2, max_model_len=256, block_size=4)
    greedy_runs(engine, [prompts[3]])  # its blocks are now cached
    got: queue.Queue = queue.Queue()
    req = engine.submit(prompts[3], GREEDY, got.put, prompt_logprobs=1, generate=False)
    engine.run()
    first = got.get_nowait()
    assert isinstance(first, PromptLogprobs) and len(first.entries) == len(prompts[3])
    assert req.cached_tokens == 0  # scoring computes every position
    logp = torch.log_softmax(lm(torch.tensor([prompts[3]]))[0].float(), -1)
    for i, e in enumerate(first.entries[1:]):
        assert e.logprob == pytest.approx(float(logp[i, e.token_id]), abs=1e-4)


def test_a_preempted_seeded_request_resumes_with_the_same_tokens(lm, prompts):
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=5, ignore_eos=True)
    short = [prompts[0], prompts[1], prompts[4]]
    wanted = [lm.generate(p, max_tokens=40, temperature=1.0, seed=5, ignore_eos=True).token_ids for p in short]
    # 12 blocks of 8 tokens: three sequences of ~45 tokens (6 blocks each) cannot all hold their blocks at once
    engine = Engine(lm, max_batch=3, max_model_len=256, block_size=8, prefill_chunk=16,
                    kv_memory=12 * 8 * lm.config.kv_bytes_per_token(4))
    out = {i: [] for i in range(3)}
    for i, p in enumerate(short):
        engine.submit(p, params, lambda ev, i=i: out[i].append(ev.token_id))
    engine.run()
    assert engine.stats().preemptions > 0
    assert [out[i] for i in range(3)] == wanted
    assert engine.stats().kv_blocks_used == 0


def test_a_request_that_can_never_fit_the_kv_budget_is_refused(lm, prompts):
    kv = 10 * 8 * lm.config.kv_bytes_per_token(4)  # 10 blocks of 8 tokens
    engine = Engine(lm, max_batch=4, max_model_len=256, block_size=8, kv_memory=kv)
    p = prompts[0]
    with pytest.raises(ContextLengthError, match="KV tokens"):
        engine.submit(p, SamplingParams(max_tokens=81 - len(p)), lambda ev: None)  # 81 tokens > 10 blocks
    with pytest.raises(ContextLengthError, match="KV tokens"):
        engine.submit(p, [SamplingParams(max_tokens=41 - len(p))] * 2, lambda ev: None)  # 2 x 6 blocks
    engine.submit(p, SamplingParams(max_tokens=80 - len(p)), lambda ev: None)  # exactly 10 blocks: accepted


def test_cancelling_mid_prefill_frees_its_blocks(lm, prompts):
    engine = Engine(lm, max_batch=2, max_model_len=256, prefill_chunk=8, block_size=4)
    long_prompt = (prompts[3] * 4)[:120]
    req = engine.submit(long_prompt, GREEDY, lambda ev: None)
    engine.step()  # admitted: the whole prompt's blocks taken, one chunk computed
    assert engine.stats().kv_blocks_used == 30
    engine.cancel(req)
    engine.step()
    assert engine.stats().kv_blocks_used == 0 and engine.stats().running == 0
