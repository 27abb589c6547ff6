"""Decode throughput of a ~50M-parameter Grok-2-shaped model on this machine, against the
memory-bandwidth roofline (bytes of weights a decode step must read / measured copy bandwidth).

Run: .venv/bin/python benchmarks/decode.py [--tokens 64]. Prints a table, writes benchmarks/results/decode.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from grokstack.config import from_hf_config
from grokstack.generate import stream_batch
from grokstack.sampling import SamplingParams
from grokstack.tiny import random_model, tiny_grok2_hf_config


def bench_config():
    cfg = tiny_grok2_hf_config()
    cfg.update(
        vocab_size=16384, hidden_size=512, num_hidden_layers=3, head_dim=64, num_attention_heads=8,
        num_key_value_heads=2, intermediate_size=1536, moe_intermediate_size=768, max_position_embeddings=4096,
        attn_temperature_len=64,
    )
    return from_hf_config(cfg)


def copy_bandwidth() -> float:
    """Bytes/s of a large read+write (STREAM-style copy), best of 5."""
    src = torch.empty(256 << 20, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = max(best, 2 * src.numel() / (time.perf_counter() - t))
    return best


def step_bytes(cfg, batch: int, elem: int) -> int:
    """Weight bytes one decode step reads: everything but the unused experts."""
    counts = cfg.parameter_counts()
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    experts_used = min(cfg.num_experts, batch * cfg.num_experts_per_tok)
    unused = cfg.num_layers * (cfg.num_experts - experts_used) * per_expert
    return (counts["total"] - unused) * elem


def run(model, batch: int, new_tokens: int) -> float:
    prompts = [[(7 * b + i) % 1000 + 10 for i in range(16)] for b in range(batch)]
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    start, steps = None, 0
    for ev in stream_batch(model, None, prompts, params):
        if ev.index == 0:
            if start is None:
                start = time.perf_counter()  # prefill done: time the decode loop only
            steps += 1
    elapsed = time.perf_counter() - start
    return batch * (steps - 1) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    cfg = bench_config()
    counts = cfg.parameter_counts()
    bw = copy_bandwidth()
    print(f"model: Grok-2-shaped, {counts['total'] / 1e6:.1f}M params ({counts['active'] / 1e6:.1f}M active/token)")
    print(f"threads: {torch.get_num_threads()}, copy bandwidth: {bw / 1e9:.1f} GB/s")
    print(f"{'dtype':8s} {'batch':>5s} {'tok/s':>9s} {'roofline tok/s':>15s} {'fraction':>9s}")
    rows = []
    for dtype, elem in ((torch.float32, 4), (torch.bfloat16, 2)):
        model = random_model(cfg, seed=0, dtype=dtype).eval()
        run(model, 1, 8)  # warm-up
        for batch in (1, 8):
            tps = run(model, batch, args.tokens)
            roof = batch * bw / step_bytes(cfg, batch, elem)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "batch": batch, "tok_s": tps,
                         "roofline_tok_s": roof, "fraction": tps / roof})
            r = rows[-1]
            print(f"{r['dtype']:8s} {batch:5d} {tps:9.1f} {roof:15.1f} {r['fraction']:9.2%}")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "decode.json").write_text(json.dumps({"params": counts, "copy_bandwidth": bw, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
