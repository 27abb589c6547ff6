"""`generate --tp N` and `serve --tp N` under torchrun: rank 0 answers, the other ranks follow its steps, and the
answers equal a single process's (greedy, fp32)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from grokstack.tiny import make_tiny

from .test_server import free_port

PROMPT = "Human: Tell me about Grok.<|separator|>\n\nAssistant:"


def torchrun(world: int, *args: str, **kw) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
            "-m", "grokstack.cli", *args]


def env() -> dict:
    out = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out.pop("GROKSTACK_MODEL", None)
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny("grok-2", tmp_path_factory.mktemp("tp-cli"))


def generate(cmd: list[str]) -> str:
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.parametrize("mode", [[], ["--ep"]])
def test_generate_tp2_equals_one_process(model, mode):
    args = ["generate", "--model", str(model), "--max-tokens", "12", "--temperature", "0", PROMPT]
    single = generate([sys.executable, "-m", "grokstack.cli", *args])
    assert single.strip()
    assert generate(torchrun(2, *args, "--tp", "2", *mode)) == single


def test_serve_tp2_answers_like_one_process(model, tmp_path):
    single = generate([sys.executable, "-m", "grokstack.cli", "generate", "--model", str(model), "--chat",
                       "--max-tokens", "10", "--temperature", "0", "hello"]).removesuffix("\n")  # the CLI's newline
    port = free_port()
    proc = subprocess.Popen(
        torchrun(2, "serve", "--model", str(model), "--tp", "2", "--port", str(port), "--state-dir",
                 str(tmp_path / "state"), "--max-batch", "2", "--max-model-len", "256"),
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the TP server did not come up"
            time.sleep(0.5)
        body = {"model": "grok-2", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 10,
                "temperature": 0}
        answers = [httpx.post(base + "/v1/chat/completions", json=body, timeout=120).json() for _ in range(2)]
        assert [a["choices"][0]["message"]["content"] for a in answers] == [single, single]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
