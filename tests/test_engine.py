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
        assert engine.stats().kv_tokens_reserved == 0
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
        assert s.running == 0 and s.kv_tokens_used == 0 and s.kv_tokens_reserved == 0
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
