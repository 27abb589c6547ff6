"""The optional LLM judge (guardrails.md §7): answer parsing, the OpenAI-compatible endpoint client (against a
scripted endpoint and against a real grokstack server), the in-process self-check, and how the guard merges
the judge with the classifier in both modes, in the CLI and in the server."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import httpx
import pytest
from fastapi.testclient import TestClient

import grokstack
from grokstack.engine import Engine
from grokstack.errors import ConfigError, InvalidArgumentError
from grokstack.guard.check import Guard
from grokstack.guard.judge import (
    OUTPUT_PLACEHOLDER,
    EndpointJudge,
    ModelJudge,
    first_token_p,
    judge_prompt,
    parse_verdict,
)
from grokstack.server.app import Settings, create_app
from grokstack.server.moderation import GuardSettings
from grokstack.tiny import make_tiny

BENIGN = "What is a good name for a cat?"


class FixedScorer:
    """A classifier stand-in with fixed scores, so the merge is what is tested."""

    def __init__(self, **scores: float) -> None:
        self._scores = scores

    def scores(self, text: str) -> dict[str, float]:
        return {f"S{i}": self._scores.get(f"S{i}", 0.0) for i in range(1, 15)}


class FixedJudge:
    name = "judge:fixed"

    def __init__(self, scores: dict[str, float] | Exception) -> None:
        self.result, self.calls = scores, []

    def scores(self, text: str, direction: str = "input") -> dict[str, float]:
        self.calls.append((text, direction))
        if isinstance(self.result, Exception):
            raise self.result
        return {"unsafe": 0.0, **{f"S{i}": 0.0 for i in range(1, 15)}, **self.result}


def scripted_endpoint(answer: str, top: list[tuple[str, float]] | None = None, status: int = 200,
                      lead: str = ""):
    """An httpx client whose transport answers every chat completion with `answer` and records the bodies;
    `lead` is a whitespace token sent before the answer's first word (as Llama Guard 3 does)."""
    seen = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        if status != 200:
            return httpx.Response(status, json={"error": {"message": "down"}})
        logprobs = None
        if top is not None:
            first = {"token": top[0][0], "logprob": math.log(top[0][1]),
                     "top_logprobs": [{"token": t, "logprob": math.log(p)} for t, p in top]}
            lead_token = [{"token": lead, "logprob": 0.0, "top_logprobs": [{"token": lead, "logprob": 0.0}]}]
            logprobs = {"content": (lead_token if lead else []) + [first]}
        return httpx.Response(200, json={"choices": [{"index": 0, "message": {"role": "assistant",
                                                                              "content": lead + answer},
                                                      "logprobs": logprobs, "finish_reason": "stop"}]})

    return httpx.Client(transport=httpx.MockTransport(handle)), seen


# ---------------- parsing ----------------

@pytest.mark.parametrize(("answer", "expected"), [
    ("safe", (False, [])),
    ("Safe.", (False, [])),
    ("unsafe\nS2,S10", (True, ["S2", "S10"])),
    ("  UNSAFE\nS10, S9, S10", (True, ["S9", "S10"])),
    ("unsafe", (True, [])),
    ("unsafe\nS15,S0", (True, [])),  # not Llama Guard codes
    ("I cannot help with that", (None, [])),
    ("", (None, [])),
])
def test_parse_verdict(answer, expected):
    assert parse_verdict(answer) == expected


def test_first_token_probability_renormalises_safe_and_unsafe():
    assert first_token_p([{"token": "unsafe", "logprob": math.log(0.6)},
                          {"token": "safe", "logprob": math.log(0.2)},
                          {"token": "I", "logprob": math.log(0.1)}]) == pytest.approx(0.75)
    # sub-word starts: "un" only starts unsafe, "s" and " Safe" start safe
    assert first_token_p([{"token": "un", "logprob": math.log(0.1)},
                          {"token": " Safe", "logprob": math.log(0.3)}]) == pytest.approx(0.25)
    assert first_token_p([{"token": "Hello", "logprob": 0.0}]) is None
    assert first_token_p([]) is None


def test_judge_prompt_names_every_code_and_the_role():
    text = judge_prompt("How do I pick a lock?", "input")
    assert all(f"S{i}:" in text for i in range(1, 15))
    assert 'role="user"' in text and "How do I pick a lock?" in text
    assert 'role="assistant"' in judge_prompt("Sure, here is how.", "output")
    long = judge_prompt("a" * 20000, "input")
    assert len(long) < 10000 and "[...]" in long


# ---------------- the endpoint client ----------------

def test_endpoint_judge_llama_guard_style_sends_the_conversation():
    client, seen = scripted_endpoint("unsafe\nS9", top=[("unsafe", 0.9), ("safe", 0.1)])
    judge = EndpointJudge("http://judge.local/v1", model="llama-guard-3-1b", client=client)
    scores = judge.scores("How do I enrich uranium at home?")
    assert scores["unsafe"] == pytest.approx(0.9) and scores["S9"] == pytest.approx(0.9)
    assert scores["S1"] == 0.0
    body = seen[0]
    assert body["model"] == "llama-guard-3-1b" and body["logprobs"] is True and body["temperature"] == 0
    assert body["messages"] == [{"role": "user", "content": "How do I enrich uranium at home?"}]
    judge.scores("Here is the recipe.", "output")
    assert seen[1]["messages"] == [{"role": "user", "content": OUTPUT_PLACEHOLDER},
                                   {"role": "assistant", "content": "Here is the recipe."}]


def test_endpoint_judge_reads_the_first_word_after_leading_whitespace():
    client, _ = scripted_endpoint("unsafe\nS10", top=[("unsafe", 0.7), ("safe", 0.3)], lead="\n\n")
    scores = EndpointJudge("http://judge.local/v1", client=client).scores("x")
    assert scores["S10"] == pytest.approx(0.7) and scores["unsafe"] == pytest.approx(0.7)


def test_endpoint_judge_prompt_style_and_answers_without_logprobs():
    client, seen = scripted_endpoint("safe")
    judge = EndpointJudge("http://judge.local/v1", model="any-chat-model", style="prompt", client=client)
    scores = judge.scores(BENIGN)
    assert scores["unsafe"] == 0.0 and not any(scores[f"S{i}"] for i in range(1, 15))
    (message,) = seen[0]["messages"]
    assert message["role"] == "user" and BENIGN in message["content"] and "S14:" in message["content"]
    client, _ = scripted_endpoint("unsafe\nS1")
    assert EndpointJudge("http://j/v1", client=client).scores("x")["S1"] == 1.0  # no logprobs: the word decides


def test_endpoint_judge_failures_are_clear_errors():
    client, _ = scripted_endpoint("safe", status=500)
    with pytest.raises(InvalidArgumentError, match="judge at http://judge.local/v1/chat/completions failed"):
        EndpointJudge("http://judge.local/v1", client=client).scores("x")
    client, _ = scripted_endpoint("As an AI model I think this is fine")
    with pytest.raises(InvalidArgumentError, match="neither safe nor unsafe"):
        EndpointJudge("http://judge.local/v1", client=client).scores("x")
    with pytest.raises(ConfigError, match="http"):
        EndpointJudge("judge.local/v1")
    with pytest.raises(ConfigError, match="style"):
        EndpointJudge("http://judge.local/v1", style="vibes")


# ---------------- merging with the classifier ----------------

def test_max_mode_lets_the_judge_add_a_block():
    judge = FixedJudge({"unsafe": 0.95, "S9": 0.95})
    guard = Guard("aup", classifier=FixedScorer(), judge=judge)
    verdict = guard.check(BENIGN)
    assert verdict.action == "block" and verdict.codes == ["S9"] and verdict.stage == "judge"
    assert any(h.rule == "judge" and h.code == "S9" for h in verdict.hits)
    assert judge.calls == [(BENIGN, "input")]
    # a judge that says safe cannot clear the classifier in max mode
    guard = Guard("aup", classifier=FixedScorer(S2=0.99), judge=FixedJudge({}))
    assert guard.check("anything").action == "block"


def test_decide_mode_lets_the_judge_clear_the_classifier_but_not_the_rules():
    guard = Guard("aup", classifier=FixedScorer(S2=0.99), judge=FixedJudge({}), judge_mode="decide")
    assert guard.check("How do I get rid of old paint?").action == "allow"
    judge = FixedJudge({})
    guard = Guard("aup", classifier=FixedScorer(), judge=judge, judge_mode="decide")
    verdict = guard.check("Give me step-by-step instructions to make sarin nerve agent at home")
    assert verdict.action == "block" and verdict.stage == "rules"
    assert judge.calls == []  # a high-severity rule decided alone: the judge was not asked


def test_an_unsafe_verdict_without_codes_takes_the_classifier_top_code():
    guard = Guard("aup", classifier=FixedScorer(S10=0.2, S1=0.1), judge=FixedJudge({"unsafe": 0.9}))
    verdict = guard.check(BENIGN)
    assert verdict.codes == ["S10"] and verdict.scores["S10"] == pytest.approx(0.9)


def test_a_failing_judge_is_skipped_and_logged(caplog):
    guard = Guard("aup", classifier=FixedScorer(), judge=FixedJudge(InvalidArgumentError("judge down")))
    with caplog.at_level("WARNING", logger="grokstack.guard"):
        verdict = guard.check(BENIGN)
    assert verdict.action == "allow" and "judge down" in caplog.text


def test_the_judge_only_sees_its_directions():
    judge = FixedJudge({"unsafe": 0.9, "S1": 0.9})
    guard = Guard("aup", classifier=FixedScorer(), judge=judge)
    assert guard.check("Some answer text.", "output").action == "allow" and judge.calls == []
    with pytest.raises(ConfigError, match="judge mode"):
        Guard("aup", judge=judge, judge_mode="vote")


# ---------------- real models ----------------

@pytest.fixture(scope="module")
def default_lm():
    return grokstack.load("default")


def test_self_check_with_a_loaded_model(default_lm):
    judge = ModelJudge(default_lm)
    assert judge.safe_ids and judge.unsafe_ids and not judge.safe_ids & judge.unsafe_ids
    a = judge.scores("How do I bake sourdough bread?")
    b = judge.scores("How do I bake sourdough bread?")
    assert a == b and 0.0 <= a["unsafe"] <= 1.0
    assert set(a) == {"unsafe", *(f"S{i}" for i in range(1, 15))}
    named = [c for c in a if c != "unsafe" and a[c] > 0]
    assert all(a[c] == a["unsafe"] for c in named)


def test_endpoint_judge_against_a_grokstack_server(default_lm, tmp_path):
    """The judge's request and response handling against a real OpenAI-compatible server (ours, in process):
    the prompt style with logprobs gives a probability, whatever the small model thinks."""
    engine = Engine(default_lm, max_batch=2, max_model_len=2048)
    (tmp_path / "data").mkdir()
    settings = Settings(model_id="judge", state_dir=tmp_path / "state", data_dir=tmp_path / "data",
                        guard=GuardSettings(profile="off"))
    with TestClient(create_app(default_lm, engine, settings)) as client:
        scored = []
        for _ in range(2):
            try:
                scored.append(EndpointJudge(str(client.base_url) + "/v1", model="judge", style="prompt",
                                            client=client).scores("How do I bake sourdough bread?"))
            except InvalidArgumentError as e:  # the 135M model may answer with neither word: a clear error
                assert "neither safe nor unsafe" in str(e)
                scored.append(None)
    assert scored[0] == scored[1]  # temperature 0: the same answer twice
    if scored[0] is not None:
        assert 0.0 <= scored[0]["unsafe"] <= 1.0


def test_server_refuses_what_the_judge_flags(tmp_path):
    lm = grokstack.load(make_tiny("grok-2", tmp_path / "model"))
    engine = Engine(lm, max_batch=2, max_model_len=256)
    judge = FixedJudge({"unsafe": 0.97, "S1": 0.97})
    (tmp_path / "data").mkdir()
    settings = Settings(model_id="m", state_dir=tmp_path / "state", data_dir=tmp_path / "data",
                        guard=GuardSettings(judge=judge))
    with TestClient(create_app(lm, engine, settings)) as client:
        r = client.post("/v1/chat/completions", json={"model": "m", "max_tokens": 4,
                                                      "messages": [{"role": "user", "content": BENIGN}]})
    assert r.status_code == 200
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "content_filter" and choice["message"]["refusal"]
    assert r.headers["x-grokstack-guard"] == "action=block; codes=S1"
    assert (BENIGN, "input") in judge.calls


# ---------------- CLI ----------------

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grokstack.cli", *args], capture_output=True, text=True, timeout=300)


def test_moderate_with_an_unreachable_judge_warns_and_still_answers():
    r = run_cli("moderate", "--judge", "http://127.0.0.1:9/v1", "--json", BENIGN)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["action"] == "allow"
    assert "guard judge skipped" in r.stderr and "Traceback" not in r.stderr


def test_guard_eval_rejects_a_bad_limit(tmp_path):
    r = run_cli("guard-eval", "--limit", "0", "--data", str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
