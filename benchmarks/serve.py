"""Serving throughput and latency of `grokstack serve` on this machine (the bundled default model, CPU).

Starts a real server subprocess (--max-batch 32), then for 1, 8 and 32 concurrent streaming chat clients
(greedy, max_tokens 64, stopping at EOS as usual) measures aggregate generated tokens/s and time to first
token (p50/p95, from each request's own send to its first content chunk). The same requests are then sent
one at a time, for comparison with continuous batching. At 1 client the concurrent run is already one at a
time, so its sequential row reuses it.

Run: .venv/bin/python benchmarks/serve.py [--levels 1,8,32] [--min-requests 16] [--max-tokens 64].
Prints a table, writes benchmarks/results/serve.json. About 5 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle works, part by part.",
    "Describe the water cycle in detail.",
    "List ten fruits and describe each one in a sentence.",
]
MAX_BATCH = 32
MAX_MODEL_LEN = 512  # the prompts and 64 new tokens fit; a smaller cache than the 4096 default


@dataclass
class Timing:
    sent: float
    first_token: float | None
    done: float
    tokens: int


@dataclass
class Row:
    mode: str  # "concurrent" or "sequential"
    clients: int
    requests: int
    tokens: int
    seconds: float
    tok_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float


# ----------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(state_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("GROKSTACK_MODEL", None)
    with log.open("w") as out:  # a file, not a pipe: nobody reads the log while the benchmark runs
        proc = subprocess.Popen(
            [sys.executable, "-m", "grokstack.cli", "serve", "--port", str(port), "--max-batch", str(MAX_BATCH),
             "--max-model-len", str(MAX_MODEL_LEN), "--max-queue", "256", "--state-dir", str(state_dir)],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not come up within 180 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ----------------------------------------------------------------------------- clients
def chat_body(prompt: str, max_tokens: int) -> dict:
    return {"model": "default", "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}


async def stream_chat(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> Timing:
    """One streaming request: when it was sent, when the first content arrived, when it ended, tokens made."""
    sent = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", "/v1/chat/completions", json=chat_body(prompt, max_tokens)) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first = time.perf_counter()  # the role-only first chunk leaves before any token exists
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return Timing(sent, first, time.perf_counter(), tokens)


async def run_clients(base: str, clients: int, prompts: list[str], max_tokens: int) -> tuple[list[Timing], float]:
    """`clients` workers take the prompts in order until none are left; returns timings and wall seconds."""
    todo: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts:
        todo.put_nowait(p)
    timings: list[Timing] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while not todo.empty():
            timings.append(await stream_chat(client, todo.get_nowait(), max_tokens))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(600), limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        return timings, time.perf_counter() - start


# ----------------------------------------------------------------------------- numbers
def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(mode: str, clients: int, timings: list[Timing], seconds: float) -> Row:
    ttfts = [t.first_token - t.sent for t in timings if t.first_token is not None]
    tokens = sum(t.tokens for t in timings)
    return Row(mode, clients, len(timings), tokens, seconds, tokens / seconds,
               1000 * percentile(ttfts, 0.5), 1000 * percentile(ttfts, 0.95))


def measure(base: str, clients: int, requests: int, max_tokens: int) -> list[Row]:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
    timings, seconds = asyncio.run(run_clients(base, clients, prompts, max_tokens))
    concurrent = summarize("concurrent", clients, timings, seconds)
    if clients == 1:  # one client already sends one request at a time
        return [concurrent, Row(**{**asdict(concurrent), "mode": "sequential"})]
    timings, seconds = asyncio.run(run_clients(base, 1, prompts, max_tokens))
    return [concurrent, summarize("sequential", clients, timings, seconds)]


def print_row(r: Row, speedup: float | None) -> None:
    ratio = f"{speedup:7.2f}x" if speedup is not None else f"{'':8s}"
    print(f"{r.clients:7d} {r.mode:10s} {r.requests:8d} {r.tokens:7d} {r.seconds:8.1f} {r.tok_s:8.1f} "
          f"{r.ttft_p50_ms:9.0f} {r.ttft_p95_ms:9.0f} {ratio}", flush=True)


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default="1,8,32", help="concurrent clients per level, comma-separated")
    ap.add_argument("--min-requests", type=int, default=16,
                    help="requests per level: at least this many, and at least one per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    plan = {c: max(c, args.min_requests) for c in levels}

    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        proc, base = start_server(Path(tmp) / "state", log)
        try:
            print(f"server: default model, --max-batch {MAX_BATCH} --max-model-len {MAX_MODEL_LEN}, "
                  f"{os.cpu_count()} CPUs; {len(PROMPTS)} prompts, greedy, max_tokens {args.max_tokens}")
            print("requests per level: " + ", ".join(f"{c} clients -> {n}" for c, n in plan.items()))
            print("TTFT: from each request's send to its first content chunk; speedup: vs the same requests "
                  "one at a time")
            asyncio.run(run_clients(base, 1, PROMPTS[:1], 4))  # warm-up: first-call allocations
            print(f"{'clients':>7s} {'mode':10s} {'requests':>8s} {'tokens':>7s} {'wall s':>8s} {'tok/s':>8s} "
                  f"{'TTFT p50':>9s} {'TTFT p95':>9s} {'speedup':>8s}")
            rows = []
            for clients, requests in plan.items():
                concurrent, sequential = measure(base, clients, requests, args.max_tokens)
                print_row(concurrent, concurrent.tok_s / sequential.tok_s)
                print_row(sequential, None)
                rows += [concurrent, sequential]
        finally:
            stop_server(proc)

    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    report = {"model": "default", "max_batch": MAX_BATCH, "max_model_len": MAX_MODEL_LEN,
              "max_tokens": args.max_tokens, "cpus": os.cpu_count(), "prompts": PROMPTS,
              "rows": [asdict(r) for r in rows]}
    (out / "serve.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
