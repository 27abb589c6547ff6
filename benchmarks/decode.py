"""Decode throughput on this machine.

1. A ~50M-parameter Grok-2-shaped model against the memory-bandwidth roofline (bytes of weights a decode
   step must read / measured copy bandwidth), batch 1 and 8.
2. The bundled default model (SmolLM2-135M-Instruct GGUF) at batch 1, next to Hugging Face `transformers`
   running the same file in the same process, with the ratio.
3. With --quantize int8,int4: both models again, float and weight-only quantized (quant.py), batch 1 and 8,
   against the same roofline; the bytes a step reads are counted from the quantized model's own buffers.

Run: .venv/bin/python benchmarks/decode.py [--tokens 64] [--only grok|default] [--quantize int8,int4].
Prints tables, writes benchmarks/results/decode.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from functools import partial
from pathlib import Path

import torch

from grokstack.lm import LM
from grokstack.model import Experts
from grokstack.quant import QuantExperts, model_bytes, quantize_model
from grokstack.sampling import SamplingParams
from grokstack.tiny import random_model, tiny_config


def bench_config():
    return tiny_config(
        "grok-2",
        vocab_size=16384, hidden_size=512, num_hidden_layers=3, head_dim=64, num_attention_heads=8,
        num_key_value_heads=2, intermediate_size=1536, moe_intermediate_size=768, max_position_embeddings=4096,
        attn_temperature_len=64,
    )


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
    lm = LM(model, None)
    engine = lm._engine(prompts, [params] * batch)
    first: list[int] = []
    for p in prompts:
        engine.submit(p, params, lambda ev: first.append(ev.token_id))
    while not first:  # prefill (and the first tokens): time the decode steps only
        engine.step()
    start, steps = time.perf_counter(), 0
    while engine.step():
        steps += 1
    elapsed = time.perf_counter() - start
    return batch * steps / elapsed


def decode_rates(engines: list, new_tokens: int, rounds: int = 3) -> list[float]:
    """Decode tokens/s of each `generate(n)` (n new tokens after one prefill): (n - 1) / (t(n) - t(1)), so
    prefill cancels out alike for every engine. Engines take turns, best of `rounds` each, so a noisy
    machine slows them alike."""

    def timed(generate, n: int) -> float:
        t = time.perf_counter()
        generate(n)
        return time.perf_counter() - t

    for generate in engines:
        generate(2)  # warm-up
    best = [0.0] * len(engines)
    for _ in range(rounds):
        for i, generate in enumerate(engines):
            best[i] = max(best[i], (new_tokens - 1) / (timed(generate, new_tokens) - timed(generate, 1)))
    return best


def grokstack_generate(lm, ids: list[int], n: int) -> None:
    lm.generate(ids, max_tokens=n, temperature=0, ignore_eos=True)


def transformers_generate(model, ids: list[int], n: int) -> None:
    with torch.no_grad():
        model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=2)


def bench_default(new_tokens: int) -> list[dict]:
    """The bundled default model: grokstack vs transformers on the same GGUF, batch 1, greedy."""
    import transformers

    import grokstack
    from grokstack.loading.hub import bundled_default

    path = bundled_default()
    rows = []
    print(f"\nmodel: bundled default {path.name}, batch 1, {new_tokens} new tokens, greedy")
    print(f"{'dtype':8s} {'grokstack tok/s':>16s} {'transformers tok/s':>19s} {'ratio':>6s}")
    for dtype in (torch.float32, torch.bfloat16):
        lm = grokstack.load("default", dtype=dtype)
        ids = lm.chat_ids([{"role": "user", "content": "Write a short poem about the sea."}])
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
        engines = [partial(grokstack_generate, lm, ids), partial(transformers_generate, hf.eval(), ids)]
        ours, theirs = decode_rates(engines, new_tokens)
        name = str(dtype).removeprefix("torch.")
        rows.append({"model": "default", "dtype": name, "batch": 1, "tok_s": ours, "transformers_tok_s": theirs,
                     "ratio": ours / theirs})
        print(f"{name:8s} {ours:16.1f} {theirs:19.1f} {ours / theirs:6.2f}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--only", choices=["grok", "default"])
    ap.add_argument("--quantize", default="", help="comma-separated quant.py modes for extra rows, e.g. int8,int4")
    args = ap.parse_args()
    modes = [m for m in args.quantize.split(",") if m]
    report: dict = {}
    if args.only != "default":
        report.update(bench_grok(args.tokens))
    if args.only != "grok":
        report["default_rows"] = bench_default(args.tokens)
    if modes:
        report["quant_rows"] = bench_quantized(args.tokens, modes, args.only)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "decode.json").write_text(json.dumps(report, indent=1))


def bench_grok(new_tokens: int) -> dict:
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
            tps = run(model, batch, new_tokens)
            roof = batch * bw / step_bytes(cfg, batch, elem)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "batch": batch, "tok_s": tps,
                         "roofline_tok_s": roof, "fraction": tps / roof})
            r = rows[-1]
            print(f"{r['dtype']:8s} {batch:5d} {tps:9.1f} {roof:15.1f} {r['fraction']:9.2%}")
    return {"params": counts, "copy_bandwidth": bw, "rows": rows}


def read_bytes(model, batch: int) -> int:
    """Weight bytes a decode step reads, from the model's own tensors: everything but the unused experts."""
    total = model_bytes(model)
    for m in model.modules():
        if isinstance(m, Experts | QuantExperts):
            per_expert = model_bytes(m) // m.count
            total -= (m.count - min(m.count, batch * model.cfg.num_experts_per_tok)) * per_expert
    return total


def bench_quantized(new_tokens: int, modes: list[str], only: str | None) -> list[dict]:
    """Float vs weight-only quantized decode, batch 1 and 8, against the copy-bandwidth roofline."""
    import grokstack

    bw = copy_bandwidth()
    bases = []
    if only != "default":
        bases.append(("grok-synthetic", "bfloat16", random_model(bench_config(), seed=0, dtype=torch.bfloat16)))
    if only != "grok":
        bases.append(("default", "float32", grokstack.load("default").model))
    print(f"\nweight-only quantization, threads {torch.get_num_threads()}, copy bandwidth {bw / 1e9:.1f} GB/s")
    print(f"{'model':15s} {'weights':8s} {'batch':>5s} {'MiB/step':>9s} {'tok/s':>9s} {'roofline tok/s':>15s} "
          f"{'fraction':>9s}")
    rows = []
    for name, base_dtype, base in bases:
        for mode in ["float", *modes]:
            model = base if mode == "float" else quantize_model(copy.deepcopy(base), mode, 128)
            model.eval()
            run(model, 1, 8)  # warm-up
            for batch in (1, 8):
                tps = run(model, batch, new_tokens)
                nbytes = read_bytes(model, batch)
                roof = batch * bw / nbytes
                weights = base_dtype if mode == "float" else mode + (" g128" if mode == "int4" else "")
                rows.append({"model": name, "weights": weights, "batch": batch, "step_bytes": nbytes, "tok_s": tps,
                             "roofline_tok_s": roof, "fraction": tps / roof})
                print(f"{name:15s} {weights:8s} {batch:5d} {nbytes / 2**20:9.1f} {tps:9.1f} {roof:15.1f} "
                      f"{tps / roof:9.2%}", flush=True)
            del model
    return rows


if __name__ == "__main__":
    main()
