"""Serving throughput and latency of `grokstack serve` on this machine (the bundled default model, CPU).

1. Throughput: a real server subprocess (--guard permissive, so the guard's hold-back is not counted), then
   for 1, 8 and 32 concurrent streaming chat clients (greedy, max_tokens 64, stopping at EOS as usual) the
   aggregate generated tokens/s and time to first token (p50/p95, from each request's send to its first
   content chunk), and the same requests one at a time. With `--llama-server PATH` (llama.cpp's server binary)
   the same clients also run against `llama-server -np 8 -t 2` on the same weights, taking turns with
   grokstack, for two weight files: F32 (grokstack fp32 vs an F32 GGUF made from the bundled file with
   `--llama-quantize PATH`, the same values) and the shipped Q4_1 (grokstack `--quantize int4`).
2. Prefix cache (`--sections prefix`): a request with a ~1,000-token prefix, then one sharing the prefix and
   differing in its last ~40 tokens (TTFT, cached_tokens, output against a --no-prefix-cache server), and a
   20-turn chat (TTFT of each turn).
3. Capacity (`--sections capacity`): with the KV memory the old engine reserved for 4 slots at
   --max-model-len 4096 (so it held 4 streams), how many 256-token streams run at once (the peak of
   grokstack_batch_size, and the KV blocks in use at their peak counted in full 256-token streams).

Run: .venv/bin/python benchmarks/serve.py [--levels 1,8,32] [--min-requests 32] [--max-tokens 64]
     [--sections throughput,prefix,capacity] [--llama-server PATH --llama-quantize PATH].
Prints tables, writes benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
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
LLAMA_SLOTS = 8
OLD_SLOTS, OLD_MODEL_LEN = 4, 4096  # capacity: the engine before paging reserved this many full-length rows


@dataclass
class Timing:
    sent: float
    first_token: float | None
    done: float
    tokens: int
    cached: int = 0
    text: str = ""


@dataclass
class Row:
    engine: str
    mode: str  # "concurrent" or "sequential"
    clients: int
    requests: int
    tokens: int
    seconds: float
    tok_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float


# ----------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, log: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("GROKSTACK_MODEL", None)
    with log.open("w") as out:  # a file, not a pipe: nobody reads the log while the benchmark runs
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
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
    raise SystemExit("server did not come up within 300 s")


def grokstack_server(tmp: Path, *extra: str, max_batch: int = MAX_BATCH, max_model_len: int = MAX_MODEL_LEN):
    port = free_port()
    cmd = [sys.executable, "-m", "grokstack.cli", "serve", "--port", str(port), "--max-batch", str(max_batch),
           "--max-model-len", str(max_model_len), "--max-queue", "1024", "--state-dir", str(tmp / f"state-{port}"),
           "--guard", "permissive", *extra]
    return start(cmd, port, tmp / f"grokstack-{port}.log")


def llama_server(tmp: Path, binary: str, gguf: Path):
    port = free_port()
    cmd = [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", str(LLAMA_SLOTS),
           "-c", str(LLAMA_SLOTS * MAX_MODEL_LEN), "-t", "2", "-tb", "2"]
    return start(cmd, port, tmp / f"llama-{port}.log")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ----------------------------------------------------------------------------- clients
def chat_body(messages: list[dict], max_tokens: int, **extra) -> dict:
    return {"model": "default", "messages": messages, "temperature": 0, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, **extra}


async def stream_chat(client: httpx.AsyncClient, messages: list[dict], max_tokens: int, **extra) -> Timing:
    """One streaming request: when it was sent, when the first content arrived, when it ended, tokens made."""
    sent = time.perf_counter()
    first, tokens, deltas, cached, text = None, 0, 0, 0, ""
    async with client.stream("POST", "/v1/chat/completions", json=chat_body(messages, max_tokens, **extra)) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            for c in chunk.get("choices") or []:
                piece = c["delta"].get("content")
                if piece:
                    if first is None:  # the role-only first chunk leaves before any token exists
                        first = time.perf_counter()
                    deltas += 1
                    text += piece
            usage = chunk.get("usage")
            if usage:
                tokens = usage["completion_tokens"]
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return Timing(sent, first, time.perf_counter(), tokens or deltas, cached, text)


def user(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


async def run_clients(base: str, clients: int, prompts: list[str], max_tokens: int) -> tuple[list[Timing], float]:
    """`clients` workers take the prompts in order until none are left; returns timings and wall seconds."""
    todo: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts:
        todo.put_nowait(p)
    timings: list[Timing] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while not todo.empty():
            timings.append(await stream_chat(client, user(todo.get_nowait()), max_tokens))

    # a fresh connection per request: llama-server closes idle keep-alive connections under the client's feet
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(900), limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        return timings, time.perf_counter() - started


def one(base: str, messages: list[dict], max_tokens: int) -> Timing:
    async def go() -> Timing:
        async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(900)) as client:
            return await stream_chat(client, messages, max_tokens)

    return asyncio.run(go())


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


def summarize(engine: str, mode: str, clients: int, timings: list[Timing], seconds: float) -> Row:
    ttfts = [t.first_token - t.sent for t in timings if t.first_token is not None]
    tokens = sum(t.tokens for t in timings)
    return Row(engine, mode, clients, len(timings), tokens, seconds, tokens / seconds,
               1000 * percentile(ttfts, 0.5), 1000 * percentile(ttfts, 0.95))


def measure(engine: str, base: str, clients: int, requests: int, max_tokens: int, sequential: bool) -> list[Row]:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
    timings, seconds = asyncio.run(run_clients(base, clients, prompts, max_tokens))
    rows = [summarize(engine, "concurrent", clients, timings, seconds)]
    if sequential and clients > 1:
        timings, seconds = asyncio.run(run_clients(base, 1, prompts, max_tokens))
        rows.append(summarize(engine, "sequential", clients, timings, seconds))
    return rows


HEADER = (f"{'engine':22s} {'clients':>7s} {'mode':10s} {'requests':>8s} {'tokens':>7s} {'wall s':>7s} "
          f"{'tok/s':>7s} {'TTFT p50':>9s} {'TTFT p95':>9s}")


def print_row(r: Row) -> None:
    print(f"{r.engine:22s} {r.clients:7d} {r.mode:10s} {r.requests:8d} {r.tokens:7d} {r.seconds:7.1f} "
          f"{r.tok_s:7.1f} {r.ttft_p50_ms:9.0f} {r.ttft_p95_ms:9.0f}", flush=True)


# ----------------------------------------------------------------------------- 1. throughput
def throughput(tmp: Path, args) -> list[dict]:
    from grokstack.loading.hub import bundled_default

    q4 = bundled_default()
    weights = [("fp32", [], None), ("int4", ["--quantize", "int4"], q4)]
    if args.llama_server:
        f32 = tmp / "default-f32.gguf"
        subprocess.run([args.llama_quantize, "--allow-requantize", str(q4), str(f32), "F32"], check=True,
                       capture_output=True)
        weights[0] = ("fp32", [], f32)
    levels = [int(x) for x in args.levels.split(",")]
    print(f"\n1. throughput: default model, grokstack --max-batch {MAX_BATCH} --max-model-len {MAX_MODEL_LEN} "
          f"--guard permissive; llama-server -np {LLAMA_SLOTS} -t 2; {os.cpu_count()} CPUs; greedy, "
          f"max_tokens {args.max_tokens}; TTFT from each request's send to its first content chunk")
    print(HEADER)
    out = []
    for name, flags, gguf in weights:
        engines = [(f"grokstack {name}", lambda f=flags: grokstack_server(tmp, *f))]
        if args.llama_server:
            engines.append((f"llama-server {gguf.name.split('.')[-2]}",
                            lambda g=gguf: llama_server(tmp, args.llama_server, g)))
        servers = [(label, *make()) for label, make in engines]
        try:
            for _label, _, base in servers:  # warm-up: first-call allocations
                asyncio.run(run_clients(base, 1, PROMPTS[:1], 4))
            by_level: dict[int, dict[str, Row]] = {}
            for clients in levels:  # engines take turns at each level, so drift hits them alike
                for label, _, base in servers:
                    if label.startswith("llama") and clients > LLAMA_SLOTS:
                        continue
                    rows = measure(label, base, clients, max(clients, args.min_requests), args.max_tokens,
                                   sequential=label.startswith("grokstack") and clients == 1)
                    for r in rows:
                        print_row(r)
                        out.append(asdict(r) | {"weights": name})
                    by_level.setdefault(clients, {})[label] = rows[0]
            if args.llama_server and LLAMA_SLOTS in by_level and len(by_level[LLAMA_SLOTS]) == 2:
                ours, theirs = by_level[LLAMA_SLOTS].values()
                print(f"   at {LLAMA_SLOTS} streams, {name}: grokstack/llama-server aggregate "
                      f"{ours.tok_s / theirs.tok_s:.2f}x, TTFT p50 {ours.ttft_p50_ms / theirs.ttft_p50_ms:.2f}x",
                      flush=True)
        finally:
            for _, proc, _ in servers:
                stop(proc)
    return out


# ----------------------------------------------------------------------------- 2. prefix cache
def long_text(words: int, seed: int) -> str:
    rng = random.Random(seed)
    vocab = ["river", "stone", "light", "market", "winter", "garden", "signal", "harbor", "paper", "orbit",
             "silver", "engine", "forest", "letter", "window", "bridge", "copper", "valley", "thunder", "candle"]
    return " ".join(rng.choice(vocab) for _ in range(words))


def prefix_cache(tmp: Path, args) -> dict:
    print("\n2. prefix cache: grokstack fp32, --max-model-len 2048")
    system = long_text(1000, 1)  # about 1,100 tokens with the template
    first = [{"role": "system", "content": system}, {"role": "user", "content": long_text(30, 2)}]
    second = [{"role": "system", "content": system}, {"role": "user", "content": long_text(30, 3)}]
    report = {}
    on_proc, on = grokstack_server(tmp, max_model_len=2048, max_batch=8)
    off_proc, off = grokstack_server(tmp, "--no-prefix-cache", max_model_len=2048, max_batch=8)
    try:
        one(on, user("warm up"), 2), one(off, user("warm up"), 2)
        a = one(on, first, 16)
        b = one(on, second, 16)
        b_off = one(off, second, 16)
        report["shared_prefix"] = {
            "ttft_first_ms": 1000 * (a.first_token - a.sent), "ttft_second_ms": 1000 * (b.first_token - b.sent),
            "cached_tokens": b.cached, "same_output_as_cache_off": b.text == b_off.text,
            "ttft_cache_off_ms": 1000 * (b_off.first_token - b_off.sent)}
        r = report["shared_prefix"]
        print(f"   shared ~1,000-token prefix: TTFT first {r['ttft_first_ms']:.0f} ms, second "
              f"{r['ttft_second_ms']:.0f} ms ({r['ttft_first_ms'] / r['ttft_second_ms']:.1f}x lower), "
              f"cached_tokens {b.cached}, output equal to --no-prefix-cache: {r['same_output_as_cache_off']}")
        for label, base in (("on", on), ("off", off)):
            history: list[dict] = []
            ttfts = []
            for turn in range(20):
                history.append({"role": "user", "content": long_text(25, 100 + turn)})
                t = one(base, history, 24)
                ttfts.append(1000 * (t.first_token - t.sent))
                history.append({"role": "assistant", "content": t.text})
            report[f"chat_20_turns_cache_{label}"] = ttfts
            print(f"   20-turn chat, prefix cache {label}: TTFT turn 2 {ttfts[1]:.0f} ms, turn 10 {ttfts[9]:.0f} ms, "
                  f"turn 20 {ttfts[19]:.0f} ms (turn 20 / turn 2: {ttfts[19] / ttfts[1]:.2f}x)", flush=True)
    finally:
        stop(on_proc)
        stop(off_proc)
    return report


# ----------------------------------------------------------------------------- 3. capacity
def capacity(tmp: Path, args) -> dict:
    import grokstack

    per_token = grokstack.load("default").config.kv_bytes_per_token(4)
    kv_bytes = OLD_SLOTS * OLD_MODEL_LEN * per_token
    streams, stream_len = 96, 256
    print(f"\n3. capacity: --kv-memory {kv_bytes / 2**30:.3f} GiB = what the old engine reserved for "
          f"--max-batch {OLD_SLOTS} --max-model-len {OLD_MODEL_LEN} ({OLD_SLOTS} streams at most); {streams} "
          f"requests of {stream_len} tokens (a short prompt, then max_tokens up to {stream_len}) sent at once")
    proc, base = grokstack_server(tmp, "--kv-memory", f"{kv_bytes / 2**30:.6f}", max_batch=512,
                                  max_model_len=OLD_MODEL_LEN)
    samples: list[tuple[int, int, int]] = []  # (running sequences, KV blocks used, preemptions)
    try:
        async def go() -> list[Timing]:
            limits = httpx.Limits(max_connections=streams + 1, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(1800), limits=limits) as client:
                prompts = [user(f"Count from {i} upwards, one number a line.") for i in range(streams)]
                jobs = [asyncio.create_task(stream_chat(client, p, stream_len - 24, ignore_eos=True)) for p in prompts]
                while not all(j.done() for j in jobs):
                    text = (await client.get("/metrics")).text

                    def gauge(name: str, text: str = text) -> int:
                        m = re.search(rf"^{re.escape(name)} (\S+)", text, re.M)
                        return int(float(m.group(1))) if m else 0

                    samples.append((gauge("grokstack_batch_size"), gauge('grokstack_kv_blocks{state="used"}'),
                                    gauge("grokstack_preemptions")))
                    await asyncio.sleep(0.5)
                return [j.result() for j in jobs]

        timings = asyncio.run(go())
    finally:
        stop(proc)
    peak = max(s[0] for s in samples)
    held = max(s[1] for s in samples) * 16 // stream_len  # full 256-token streams the blocks in use amount to
    tokens = sum(t.tokens for t in timings)
    print(f"   streams running at once: peak {peak}; KV in use at its peak = {held} full {stream_len}-token streams "
          f"(old engine: {OLD_SLOTS}; {held / OLD_SLOTS:.1f}x); preemptions {samples[-1][2]}; {tokens} tokens")
    return {"kv_bytes": kv_bytes, "peak_streams": peak, "full_streams_held": held, "old_streams": OLD_SLOTS,
            "requests": streams, "preemptions": samples[-1][2], "samples": samples}


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default="1,8,32", help="concurrent clients per level, comma-separated")
    ap.add_argument("--min-requests", type=int, default=32,
                    help="requests per level: at least this many, and at least one per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--sections", default="throughput,prefix,capacity")
    ap.add_argument("--llama-server", help="llama.cpp's llama-server binary, for the comparison columns")
    ap.add_argument("--llama-quantize", help="llama.cpp's llama-quantize binary (makes the F32 GGUF)")
    args = ap.parse_args()
    if args.llama_server and not args.llama_quantize:
        ap.error("--llama-server needs --llama-quantize (to write the F32 GGUF of the bundled weights)")
    sections = args.sections.split(",")
    report: dict = {"cpus": os.cpu_count(), "max_tokens": args.max_tokens, "prompts": PROMPTS}
    with tempfile.TemporaryDirectory() as tmp:
        if "throughput" in sections:
            report["throughput"] = throughput(Path(tmp), args)
        if "prefix" in sections:
            report["prefix"] = prefix_cache(Path(tmp), args)
        if "capacity" in sections:
            report["capacity"] = capacity(Path(tmp), args)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "serve.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
