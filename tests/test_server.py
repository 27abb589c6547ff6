"""`grokstack serve` driven as a real process on 127.0.0.1 by the official `openai` client and by raw HTTP."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(state_dir, *args, port: int | None = None) -> tuple[subprocess.Popen, str]:
    port = port or free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for name in ("GROKSTACK_MODEL", "GROKSTACK_API_KEY", "GROKSTACK_API_KEYS"):
        env.pop(name, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "grokstack.cli", "serve", "--port", str(port), "--state-dir", str(state_dir),
         "--max-batch", "8", "--max-model-len", "1024", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read()}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not come up")


def stop_server(proc: subprocess.Popen) -> bool:
    """SIGTERM; True if the server shut down by itself (uvicorn re-raises the signal after a clean shutdown)."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30) in (0, -signal.SIGTERM)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    keys = tmp / "keys.txt"
    keys.write_text("# test keys\nsk-main name=main\nsk-limited name=limited rpm=2\n")
    proc, base = start_server(tmp / "state", "--api-keys-file", str(keys))
    yield base
    assert stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="sk-main", max_retries=0, timeout=120)


def test_stream_deltas_concatenate_to_the_full_answer(client):
    full = client.chat.completions.create(model="default", messages=QUESTION, temperature=0, max_tokens=24)
    assert "Paris" in full.choices[0].message.content
    assert full.usage.prompt_tokens > 0 and full.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(
        model="default", messages=QUESTION, temperature=0, max_tokens=24, stream=True,
        stream_options={"include_usage": True},
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_n_choices_and_seed_reproducibility(client):
    kw = dict(model="default", messages=QUESTION, temperature=1.0, max_tokens=16, n=2, seed=7)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    c = client.chat.completions.create(**(kw | {"seed": 8}))
    assert [x.message.content for x in c.choices] != [x.message.content for x in a.choices]


def test_stop_string(client):
    r = client.chat.completions.create(model="default", messages=QUESTION, temperature=0, max_tokens=24,
                                       stop=["Paris"])
    assert "Paris" not in r.choices[0].message.content
    assert r.choices[0].message.content.startswith("The capital of France is")
    assert r.choices[0].finish_reason == "stop"


def test_logprobs(client):
    r = client.chat.completions.create(model="default", messages=QUESTION, temperature=0, max_tokens=8,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.top_logprobs[0].logprob == t.logprob  # greedy: the chosen token is the top one, same float
        assert bytes(t.bytes).decode() == t.token


def test_json_object_output_parses(client):
    r = client.chat.completions.create(
        model="default", temperature=0.7, seed=3, max_tokens=200, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Give me a JSON object describing a cat with name and age."}],
    )
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_errors_map_to_openai_exceptions(server, client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="grok-9", messages=QUESTION, max_tokens=4)
    bad = openai.OpenAI(base_url=server + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
        bad.chat.completions.create(model="default", messages=QUESTION, max_tokens=4)
    limited = openai.OpenAI(base_url=server + "/v1", api_key="sk-limited", max_retries=0)
    for _ in range(2):
        limited.chat.completions.create(model="default", messages=QUESTION, max_tokens=2)
    with pytest.raises(openai.RateLimitError, match="rate limit") as info:
        limited.chat.completions.create(model="default", messages=QUESTION, max_tokens=2)
    assert int(info.value.response.headers["retry-after"]) >= 1
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.chat.completions.create(model="default", messages=QUESTION, max_tokens=5000)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="default", messages=QUESTION, temperature=7)


def test_completions_echo_logprobs_like_lm_eval(server, client):
    ctx = client.completions.create(model="default", prompt="The capital of France is", max_tokens=1).usage
    tok = httpx.post(server + "/tokenize", json={"prompt": "The capital of France is Paris"},
                     headers={"authorization": "Bearer sk-main"}).json()["tokens"]
    r = client.completions.create(model="default", prompt=[tok, tok[:3]], max_tokens=1, temperature=0, logprobs=1,
                                  echo=True, seed=1234)
    assert [c.index for c in r.choices] == [0, 1] and ctx.prompt_tokens == len(tok) - 1
    for c, ids in zip(r.choices, [tok, tok[:3]], strict=True):
        lp = c.logprobs
        assert len(lp.token_logprobs) == len(ids) + 1  # the prompt, then the generated token
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
        assert lp.token_logprobs[-1] == max(lp.top_logprobs[-1].values())  # lm-eval's is_greedy check
        assert c.text.startswith("The capital of")
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # scoring only: max_tokens 0 with echo gives the prompt's logprobs and no new token
    r = client.completions.create(model="default", prompt=tok, max_tokens=0, echo=True, logprobs=2)
    assert len(r.choices[0].logprobs.token_logprobs) == len(tok) and r.usage.completion_tokens == 0


def test_sse_wire_format(server):
    body = {"model": "default", "messages": QUESTION, "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body,
                      headers={"authorization": "Bearer sk-main"}, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-request-id"]
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_listings_tokenizer_and_metrics(server):
    h = {"authorization": "Bearer sk-main"}
    models = httpx.get(server + "/v1/models", headers=h).json()
    model_id = models["data"][0]["id"]
    assert httpx.get(server + f"/v1/models/{model_id}", headers=h).json()["id"] == model_id
    assert httpx.get(server + "/v1/models/nope", headers=h).status_code == 404
    lm = httpx.get(server + "/v1/language-models", headers=h).json()["models"][0]
    assert lm["id"] == model_id and lm["fingerprint"].startswith("fp_") and "default" in lm["aliases"]
    toks = httpx.post(server + "/v1/tokenize-text", headers=h, json={"text": "Hello <|im_end|>"}).json()["token_ids"]
    assert "".join(t["string_token"] for t in toks) == "Hello <|im_end|>" and len(toks) > 3  # specials stay text
    info = httpx.get(server + "/tokenizer_info", headers=h).json()
    eos = httpx.post(server + "/tokenize", headers=h, json={"prompt": info["eos_token"]}).json()["tokens"]
    assert eos == [info["eos_token_id"]]  # lm-eval finds the EOS id by encoding its text
    ids = httpx.post(server + "/tokenize", headers=h, json={"prompt": "round trip"}).json()["tokens"]
    assert httpx.post(server + "/detokenize", headers=h, json={"tokens": ids}).json()["prompt"] == "round trip"
    assert httpx.get(server + "/v1/models").status_code == 401
    metrics = httpx.get(server + "/metrics").text
    for name in ("grokstack_requests_total", "grokstack_prompt_tokens_total", "grokstack_time_to_first_token_seconds",
                 "grokstack_inter_token_latency_seconds", "grokstack_queue_depth", "grokstack_batch_size",
                 "grokstack_kv_memory_bytes"):
        assert name in metrics


def test_xai_error_style(tmp_path):
    proc, base = start_server(tmp_path, "--error-style", "xai", "--api-key", "k1")
    try:
        r = httpx.post(base + "/v1/chat/completions", json={"model": "x", "messages": QUESTION},
                       headers={"authorization": "Bearer k1"})
        assert r.status_code == 404
        assert r.json() == {"code": "Some requested entity was not found", "error": r.json()["error"]}
        r = httpx.get(base + "/v1/models", headers={"authorization": "Bearer nope"})
        assert r.status_code == 401 and r.json()["code"] == "Client specified an invalid argument"
    finally:
        assert stop_server(proc)


def test_deferred_results_survive_a_restart(tmp_path):
    h = {"authorization": "Bearer k"}
    body = {"model": "default", "messages": QUESTION, "temperature": 0, "max_tokens": 12, "deferred": True}
    proc, base = start_server(tmp_path, "--api-key", "k")
    try:
        done_id = httpx.post(base + "/v1/chat/completions", json=body, headers=h).json()["request_id"]
        deadline = time.monotonic() + 60
        while 'grokstack_deferred_jobs{state="done"} 1.0' not in httpx.get(base + "/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert httpx.get(base + "/v1/chat/deferred-completion/nope", headers=h).status_code == 404
    finally:
        assert stop_server(proc)
    proc, base = start_server(tmp_path, "--api-key", "k")
    try:
        r = httpx.get(base + f"/v1/chat/deferred-completion/{done_id}", headers=h)
        assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]
        assert httpx.get(base + f"/v1/chat/deferred-completion/{done_id}", headers=h).status_code == 404  # once
        # a job accepted just before a shutdown is run again after the restart
        pending_id = httpx.post(base + "/v1/chat/completions", json=body | {"max_tokens": 400}, headers=h).json()
        pending_id = pending_id["request_id"]
        assert httpx.get(base + f"/v1/chat/deferred-completion/{pending_id}", headers=h).status_code == 202
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # a crash, not a clean stop
        proc.wait()
    proc, base = start_server(tmp_path, "--api-key", "k")
    try:
        deadline = time.monotonic() + 120
        while (r := httpx.get(base + f"/v1/chat/deferred-completion/{pending_id}", headers=h)).status_code == 202:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    finally:
        assert stop_server(proc)


def test_graceful_shutdown_finishes_running_streams(tmp_path):
    proc, base = start_server(tmp_path, "--grace", "20")
    body = {"model": "default", "messages": QUESTION, "max_tokens": 40, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)  # the stream is running
        proc.send_signal(signal.SIGTERM)
        rest = list(lines)
    assert "data: [DONE]" in rest  # the running stream was finished, not cut
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
