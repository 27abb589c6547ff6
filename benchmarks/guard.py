"""Latency the guard adds per request: the input check on a user turn and the output checks on a streamed
answer (windowed moderation + link filter), p50/p95 in ms on this CPU.

    python benchmarks/guard.py [--profile aup] [--requests 300]

Prompts are the public safety sets when ../shared/data/safety exists (XSTest, JBB), else built-in samples;
answers are built from ordinary prose of 0.5-4 kB, streamed in 4-character deltas like a tokenizer would.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import time
from pathlib import Path

from grokstack.guard.check import Guard
from grokstack.server.moderation import Guards, GuardSettings

SAFETY = Path(__file__).resolve().parents[2] / "shared" / "data" / "safety"
SAMPLES = [
    "What is the capital of France?",
    "How do I kill a Python process that hangs?",
    "Write a short poem about autumn leaves.",
    "Summarise the causes of the First World War in three paragraphs.",
    "Explain how vaccines train the immune system.",
]
PROSE = (
    "The city council met on Tuesday to discuss the new bus routes. Residents asked for more frequent service "
    "in the evening, and the transport office said it would publish a timetable next month. More details are "
    "at https://example.org/transport and in the minutes. "
)


def prompts(n: int) -> list[str]:
    found = []
    xs = SAFETY / "xstest" / "xstest_prompts.csv"
    if xs.is_file():
        with xs.open(newline="", encoding="utf-8") as f:
            found += [row["prompt"] for row in csv.DictReader(f)]
    pool = found or SAMPLES
    rng = random.Random(0)
    return [rng.choice(pool) for _ in range(n)]


def answers(n: int) -> list[str]:
    rng = random.Random(1)
    return [PROSE * rng.randint(2, 16) for _ in range(n)]


def percentiles(ms: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(ms, n=20)
    return statistics.median(ms), q[18]


def bench_input(guard: Guard, texts: list[str]) -> list[float]:
    out = []
    for t in texts:
        t0 = time.perf_counter()
        guard.check_messages([{"role": "user", "content": t}])
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def bench_output(guards: Guards, texts: list[str]) -> list[float]:
    out = []
    for t in texts:
        rg = guards.request(None, "bench")
        rg.check_input([{"role": "user", "content": "Tell me about the council meeting."}])
        t0 = time.perf_counter()
        screen = rg.output()
        for i in range(0, len(t), 4):
            screen.feed(t[i : i + 4])
        screen.finish()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="aup")
    ap.add_argument("--requests", type=int, default=300)
    args = ap.parse_args()
    guards = Guards(GuardSettings(profile=args.profile))  # trains or loads the classifier once, outside the timings
    guard = guards.for_profile(args.profile)
    ins = bench_input(guard, prompts(args.requests))
    outs_texts = answers(max(20, args.requests // 5))
    outs = bench_output(guards, outs_texts)
    chars = statistics.mean(len(t) for t in outs_texts)
    rows = [("input check (user turn)", *percentiles(ins)), (f"output checks ({chars:.0f} chars streamed)",
                                                             *percentiles(outs))]
    print(f"guard latency, profile {args.profile}, {args.requests} requests")
    print("| check | p50 ms | p95 ms |\n|---|---|---|")
    for name, p50, p95 in rows:
        print(f"| {name} | {p50:.2f} | {p95:.2f} |")
    out = Path(__file__).parent / "results" / "guard.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps([{"check": n, "p50_ms": a, "p95_ms": b} for n, a, b in rows], indent=1))


if __name__ == "__main__":
    main()
