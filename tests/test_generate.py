"""Generation: greedy equals argmax of full forwards, batching, seeds, stops, penalties, logprobs."""

import pytest
import torch

import grokstack
from grokstack.errors import ContextLengthError, InvalidArgumentError
from grokstack.sampling import SamplingParams, penalize, sample
from grokstack.tiny import make_tiny


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return grokstack.load(make_tiny("grok-2", tmp_path_factory.mktemp("g2")))


def greedy_by_full_forward(lm, ids, n):
    ids = list(ids)
    out = []
    for _ in range(n):
        nxt = int(lm(torch.tensor([ids]))[0, -1].argmax())
        out.append(nxt)
        ids.append(nxt)
    return out


def test_greedy_equals_repeated_full_forward(lm):
    prompt = lm.encode("The universe is")
    c = lm.generate(prompt, max_tokens=12, temperature=0, ignore_eos=True)
    assert c.token_ids == greedy_by_full_forward(lm, prompt, 12)
    assert c.finish_reason == "length" and c.prompt_tokens == len(prompt)


def test_batch_of_different_lengths_equals_one_by_one(lm):
    prompts = ["Hi", "The quick brown fox jumps over the lazy dog and", "Grok is"]
    batch = lm.generate(prompts, max_tokens=8, temperature=0, ignore_eos=True)
    for p, c in zip(prompts, batch, strict=True):
        assert c.token_ids == lm.generate(p, max_tokens=8, temperature=0, ignore_eos=True).token_ids


def test_same_seed_same_output_and_different_seed_differs(lm):
    kw = dict(max_tokens=16, temperature=1.0, top_p=0.95, ignore_eos=True)
    a = lm.generate("Hello", seed=7, **kw).token_ids
    assert a == lm.generate("Hello", seed=7, **kw).token_ids
    assert a != lm.generate("Hello", seed=8, **kw).token_ids


def test_stream_matches_generate_and_text_decodes(lm):
    kw = dict(max_tokens=10, temperature=0, ignore_eos=True)
    events = list(lm.stream("Grok", **kw))
    full = lm.generate("Grok", **kw)
    assert [e.token_id for e in events] == full.token_ids
    assert "".join(e.text for e in events) == full.text == lm.tokenizer.decode(full.token_ids)
    assert events[-1].finish_reason == "length" and all(e.finish_reason is None for e in events[:-1])


def test_stop_string_never_leaks(lm):
    kw = dict(max_tokens=20, temperature=0, ignore_eos=True)
    full = lm.generate("Tell me", **kw).text
    stop = full[5:8]
    assert len(stop) == 3
    events = list(lm.stream("Tell me", stop=[stop], **kw))
    streamed = "".join(e.text for e in events)
    assert streamed == full[: full.find(stop)]
    assert events[-1].finish_reason == "stop"
    for i in range(len(events)):  # no prefix of the stream ever showed stop text
        assert stop not in "".join(e.text for e in events[: i + 1])


def test_stop_token_ends_generation(lm):
    prompt = lm.encode("Hello")
    first = lm.generate(prompt, max_tokens=1, temperature=0).token_ids[0]
    c = lm.generate(prompt, max_tokens=5, temperature=0, stop_token_ids=[first])
    assert c.finish_reason == "stop" and c.token_ids == []


def test_context_is_enforced(lm):
    ctx = lm.config.context_length
    with pytest.raises(ContextLengthError):
        lm.generate([5] * ctx, max_tokens=1)
    c = lm.generate([5] * (ctx - 3), max_tokens=50, temperature=0, ignore_eos=True)
    assert len(c.token_ids) == 3 and c.finish_reason == "length"
    # a row clamped by the context finishes early while a short row goes on
    long, short = lm.generate([[5] * (ctx - 3), [6, 7]], max_tokens=20, temperature=0, ignore_eos=True)
    assert len(long.token_ids) == 3 and len(short.token_ids) == 20


def test_logprobs(lm):
    c = lm.generate("Hi", max_tokens=4, temperature=0, logprobs=3, ignore_eos=True)
    for tok, lp in zip(c.token_ids, c.logprobs, strict=True):
        assert lp.token_id == tok and len(lp.top) == 3
        assert lp.top[0][0] == tok  # greedy picks the most likely token
        assert lp.logprob <= 0 and abs(lp.logprob - lp.top[0][1]) < 1e-6


def test_sampling_filters():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    g = torch.Generator().manual_seed(0)
    assert {sample(logits, SamplingParams(top_k=1), g) for _ in range(20)} == {0}
    assert {sample(logits, SamplingParams(top_p=0.5), g) for _ in range(20)} == {0}
    assert {sample(logits, SamplingParams(min_p=0.3), g) for _ in range(50)} <= {0, 1}
    assert sample(logits, SamplingParams(temperature=0), g) == 0
    seen = torch.tensor([True, False, False, False])
    counts = torch.tensor([2.0, 0, 0, 0])
    out = penalize(logits, SamplingParams(repetition_penalty=2.0), seen, counts)
    assert out[0] == 1.5 and out[1] == 2.0
    out = penalize(logits, SamplingParams(presence_penalty=1.0, frequency_penalty=0.5), seen, counts)
    assert out[0] == 3.0 - 1.0 - 1.0


@pytest.mark.parametrize(
    "bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(logprobs=99),
            dict(presence_penalty=3), dict(stop=[""])]
)
def test_bad_sampling_values(bad):
    with pytest.raises(InvalidArgumentError):
        SamplingParams(**bad)


def test_grok1_base_model_without_tokenizer_takes_ids(tmp_path):
    from grokstack.tiny import make_tiny

    path = make_tiny("grok-1", tmp_path / "g1")
    (path / "tokenizer.model").unlink()
    lm1 = grokstack.load(path)
    assert lm1.tokenizer is None
    c = lm1.generate([5, 6, 7], max_tokens=4, temperature=0, ignore_eos=True)
    assert len(c.token_ids) == 4 and c.text == ""
    with pytest.raises(grokstack.GrokstackError, match="no tokenizer"):
        lm1.generate("text")


def test_chunked_prefill_equals_one_shot(lm):
    from grokstack.engine import Engine
    from grokstack.sampling import SamplingParams

    prompts = ["The quick brown fox jumps over the lazy dog", "Grok"]
    want = lm.generate(prompts, max_tokens=6, temperature=0, ignore_eos=True)
    engine = Engine(lm, max_batch=2, max_model_len=64, prefill_chunk=4)  # 4 prompt tokens a step
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    got = [[e.token_id for e in engine.generate(lm.encode(p), sp)] for p in prompts]
    assert got == [c.token_ids for c in want]


def test_earliest_stop_string_wins(lm):
    kw = dict(max_tokens=20, temperature=0, ignore_eos=True)
    full = lm.generate("Tell me", **kw).text
    early, late = full[4:6], full[9:12]
    assert full.find(early) < full.find(late)
    assert lm.generate("Tell me", stop=[late, early], **kw).text == full[: full.find(early)]
