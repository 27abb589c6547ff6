"""Weight-only quantization on one GPU at Grok-2's full width: correctness, parity and decode throughput.

Builds a Grok-2-shaped model with random bf16 weights (hidden 8192, 64 query / 8 KV heads of 128, dense MLP
32768, 8 experts of 16384 with top-2, vocab 131072) with --layers decoder layers (default 4, ~38 GB in bf16), then
for bf16, int8, int8k (int8 through torch._weight_int8pack_mm on CUDA too), int4 (group --group-size) and fp8:
1. correctness on small shapes first, failing fast: each kernel against the dequantized codes, int4 unpacking
   of the CUDA layout, a CPU -> GPU move (int4 repacks), a quantized checkpoint loaded onto the GPU;
2. parity of every full-width matrix kind and of one whole decoder layer against bf16 (relative error);
3. kernel bandwidth: CUDA-graph replays of all matrices of a kind (too many bytes for the 60 MB L2), batch 1, 8;
4. eager decode steps through model.py with a KV cache, batch 1 and 8: tok/s and the HBM-roofline fraction =
   bytes of weights the step reads (routed experts only, embedding rows only) / step time / --hbm.
--small runs all of it on CPU at a tiny width: a crash test, the numbers mean nothing.

Run: python benchmarks/gpu_quant.py [--layers 4] [--hbm 4.8e12] [--modes bf16,int8,int4,fp8] [--small]
Prints markdown tables; writes $OUT/gpu_quant.json when OUT is set. Meant to finish in ~3 minutes on an H200.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

from grokstack import quant
from grokstack.config import grok2_preset
from grokstack.loading.weights import empty_model
from grokstack.model import MoE, rope_cos_sin
from grokstack.quant import (
    QuantExperts,
    QuantLinear,
    QuantSpec,
    dequantize,
    load_quantized,
    quantize_matrix,
    quantize_model,
    save_quantized,
)
from grokstack.runner import Stepper
from grokstack.tiny import random_model, tiny_config

START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s] {msg}", file=sys.stderr, flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------ model
def config(args):
    over = {"num_layers": args.layers}
    if args.small:
        over.update(hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64, intermediate_size=1024,
                    moe_intermediate_size=512, vocab_size=1024)
    return grok2_preset().with_overrides(over)


@torch.no_grad()
def build(cfg, device: torch.device):
    """Random bf16 weights on the device (std 1/sqrt(fan_in)); norms and the fp32 router as the model makes them."""
    model = empty_model(cfg, torch.bfloat16, device)
    g = torch.Generator(device=device).manual_seed(0)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        elif name == "embed_tokens.weight":
            p.normal_(0, 1 / cfg.embedding_multiplier, generator=g)
        else:
            p.normal_(0, 1 / math.sqrt(p.shape[-1]), generator=g)
    return model.eval()


def matrix_kinds(model) -> dict[str, list]:
    """kind -> [(callable x -> y, weight bytes it reads, (N, K))] over every layer (and expert)."""
    kinds: dict[str, list] = {}

    def add(kind, fn, nbytes, shape):
        kinds.setdefault(kind, []).append((fn, nbytes, shape))

    def linear(kind, m):
        if isinstance(m, QuantLinear):
            add(kind, m, sum(b[0].nbytes for b in m.buffers()), (m.out_features, m.in_features))
        else:
            add(kind, m, m.weight.nbytes, tuple(m.weight.shape))

    for layer in model.layers:
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            linear(n, getattr(layer.self_attn, n))
        linear("dense up", layer.mlp.up_proj)
        linear("dense down", layer.mlp.down_proj)
        ex = layer.block_sparse_moe.experts
        for e in range(ex.count):
            for w, kind in (("w1", "expert w1"), ("w2", "expert w2")):
                stack = getattr(ex, w)
                if isinstance(ex, QuantExperts):
                    nbytes, shape = sum(b[e].nbytes for b in stack.buffers()), (stack.out_features, stack.in_features)
                else:
                    nbytes, shape = stack[e].nbytes, tuple(stack.shape[1:])
                add(kind, partial(ex.project, w, e), nbytes, shape)
    linear("lm_head", model.lm_head)
    return kinds


def weight_bytes(model) -> dict[str, int]:
    """Bytes of the experts (per expert, per layer) and of everything else but the embedding table."""
    def nbytes(m: nn.Module) -> int:
        return sum(t.nbytes for t in [*m.parameters(), *m.buffers()])

    experts = sum(nbytes(layer.block_sparse_moe.experts) for layer in model.layers)
    total = nbytes(model)
    return {"experts_per_expert_layer": experts // (len(model.layers) * model.cfg.num_experts),
            "fixed": total - experts - model.embed_tokens.weight.nbytes}


# ------------------------------------------------------------------------------ 1. correctness
@torch.no_grad()
def check_small(device: torch.device, modes: list[str], group: int) -> list[str]:
    """Small-shape checks; returns the failures (empty when all pass)."""
    failures = []
    g = torch.Generator().manual_seed(0)
    for mode in modes:
        if mode in ("bf16", "int8k"):
            continue
        before = len(failures)
        spec = QuantSpec(mode, group)
        for n, k in ((512, 1024), (200, 576), (130, 100)):
            w = torch.randn(n, k, generator=g) / k**0.5
            want = quantize_matrix(w, spec)
            deq = dequantize(want, spec, k).to(device)
            ql = QuantLinear.quantize(w.to(device), spec)  # quantized and packed on the device
            moved = QuantLinear.quantize(w, spec).to(device)  # packed on CPU, moved: int4 repacks
            for batch in (1, 8, 33):
                x = torch.randn(batch, k, generator=g).to(device, torch.bfloat16)
                ref = x.float() @ deq.T
                for label, m in (("on-device", ql), ("moved", moved)):
                    err = rel(m(x), ref)
                    # fp8 on CUDA quantizes activations too (W8A8): looser than the weight-only kernels
                    tol = 0.05 if mode == "fp8" and device.type == "cuda" and k % 16 == 0 else 0.01
                    if not err < tol:
                        failures.append(f"{mode} {label} [{n}, {k}] batch {batch}: rel err {err:.4f} vs dequantized")
            # codes quantized on the device may differ in rounding from CPU ones: compare each with its own
            for label, m, ref_st in (("on-device", ql, quantize_matrix(w.to(device), spec)), ("moved", moved, want)):
                got = m.storage(0)
                if not all(torch.equal(got[p].cpu(), ref_st[p].cpu()) for p in want):
                    failures.append(f"{mode} {label} [{n}, {k}]: storage form does not round-trip")
        # a quantized checkpoint written on CPU, loaded straight onto the device
        tiny = quantize_model(random_model(tiny_config("grok-2"), seed=1), mode, group).eval()
        ids = torch.arange(3, 27)[None]
        with tempfile.TemporaryDirectory() as tmp:
            save_quantized(tiny, tmp)
            loaded = load_quantized(tmp, tiny.cfg, torch.float32, device=device).eval()
            err = rel(loaded(ids.to(device)).cpu(), tiny(ids))
        if not err < 0.05:
            failures.append(f"{mode}: tiny checkpoint loaded on {device}: logits rel err {err:.4f} vs CPU")
        log(f"correctness {mode}: {len(failures) - before} failure(s)")
    return failures


# ------------------------------------------------------------------------------ 2. parity
@torch.no_grad()
def parity(base, q, device: torch.device) -> dict[str, float]:
    g = torch.Generator(device=device).manual_seed(1)
    out = {}
    bk, qk = matrix_kinds(base), matrix_kinds(q)
    for kind in bk:
        (bf, _, (_, k)), (qf, _, _) = bk[kind][0], qk[kind][0]
        x = torch.randn(8, k, generator=g, device=device).to(torch.bfloat16)
        out[kind] = rel(qf(x), x.float() @ _float_weight(bf).float().T)
    h = torch.randn(1, 16, base.cfg.hidden_size, generator=g, device=device).to(torch.bfloat16)
    pos = torch.arange(16, device=device)[None]
    cos, sin = rope_cos_sin(base.cfg, pos)
    want = base.layers[0](h, cos, sin, pos, None, None)
    out["decoder layer 0"] = rel(q.layers[0](h, cos, sin, pos, None, None), want)
    return out


def _float_weight(fn) -> torch.Tensor:
    if isinstance(fn, nn.Linear):
        return fn.weight
    ex, w, e = fn.func.__self__, fn.args[0], fn.args[1]
    return getattr(ex, w)[e]


# ------------------------------------------------------------------------------ 3. kernels
def time_kind(fns: list, k: int, batch: int, device: torch.device, reps: int) -> float:
    """Seconds for one pass over all matrices of a kind: CUDA-graph replays on a GPU, eager on CPU."""
    x = torch.randn(batch, k, device=device).to(torch.bfloat16)
    with torch.no_grad():
        for f in fns:  # warm-up outside any graph (fp8 decides row-wise vs tensor-wise scales here)
            f(x)
        if device.type != "cuda":
            t = time.perf_counter()
            for _ in range(reps):
                for f in fns:
                    f(x)
            return (time.perf_counter() - t) / reps
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for f in fns:
                f(x)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for f in fns:
                f(x)
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / reps


def kernels(model, device, reps: int, hbm: float) -> list[dict]:
    rows = []
    for kind, items in matrix_kinds(model).items():
        fns = [f for f, _, _ in items]
        nbytes = sum(b for _, b, _ in items)
        n, k = items[0][2]
        for batch in (1, 8):
            try:
                sec = time_kind(fns, k, batch, device, reps)
            except RuntimeError as exc:  # e.g. a path that cannot be captured in a CUDA graph
                rows.append({"kind": kind, "batch": batch, "error": str(exc)[:200]})
                continue
            rows.append({"kind": kind, "shape": [n, k], "count": len(fns), "batch": batch, "bytes": nbytes,
                         "us_per_matrix": sec / len(fns) * 1e6, "GBps": nbytes / sec / 1e9,
                         "fraction": nbytes / sec / hbm})
    return rows


# ------------------------------------------------------------------------------ 4. decode
@torch.no_grad()
def decode(model, device: torch.device, batch: int, steps: int, hbm: float, context: int = 64) -> dict:
    cfg = model.cfg
    cache = Stepper(model, batch, context + steps + 8)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, cfg.vocab_size, (batch, context), generator=g)
    cache.feed(prompt.tolist())
    used: list[int] = []
    routes = {}
    for m in model.modules():  # count the experts each step routes to (they are what a step reads)
        if isinstance(m, MoE):
            routes[m] = m.route

            def counting(x, _route=m.route):
                ids, w = _route(x)
                used.append(int(torch.unique(ids).numel()))
                return ids, w

            m.route = counting
    def step(p: int) -> None:  # one token per row; the rows' positions follow from what they were fed
        cache.feed([[5]] * batch)

    for i in range(3):
        step(context + i)
    used.clear()
    sync(device)
    t = time.perf_counter()
    for i in range(steps):
        step(context + 3 + i)
    sync(device)
    sec = (time.perf_counter() - t) / steps
    for m, route in routes.items():
        m.route = route
    wb = weight_bytes(model)
    experts_read = sum(used) / steps  # expert stacks read per step, all layers
    nbytes = wb["fixed"] + experts_read * wb["experts_per_expert_layer"] + batch * cfg.hidden_size * 2
    return {"batch": batch, "step_ms": sec * 1e3, "tok_s": batch / sec, "GB_per_step": nbytes / 1e9,
            "experts_per_layer": experts_read / cfg.num_layers, "fraction": nbytes / sec / hbm}


# ------------------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hbm", type=float, default=4.8e12, help="HBM bandwidth in B/s (H200 HBM3e: 4.8e12)")
    ap.add_argument("--modes", default="bf16,int8,int8k,int4,fp8", help="int8k: int8 via _weight_int8pack_mm on CUDA")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="timed decode steps per row")
    ap.add_argument("--reps", type=int, default=20, help="CUDA-graph replays per kernel row")
    ap.add_argument("--budget-s", type=float, default=200, help="skip the remaining modes past this many seconds")
    ap.add_argument("--small", action="store_true", help="CPU, tiny width: a crash test")
    args = ap.parse_args()
    modes = args.modes.split(",")
    if args.small:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU (use --small for a CPU crash test)", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
        log(f"{torch.cuda.get_device_name()} torch {torch.__version__}, "
            f"{torch.cuda.mem_get_info()[0] / 2**30:.0f} GiB free")
    report: dict = {"device": str(device) if args.small else torch.cuda.get_device_name(), "torch": torch.__version__,
                    "hbm": args.hbm, "layers": args.layers, "group_size": args.group_size, "modes": {}}

    failures = check_small(device, modes, args.group_size)
    report["correctness_failures"] = failures
    if failures:
        print("CORRECTNESS FAILURES (stopping before the big model):\n  " + "\n  ".join(failures))
        write(report)
        return 1

    cfg = config(args)
    base = build(cfg, device)
    log(f"built {args.layers} layers at hidden {cfg.hidden_size}: "
        f"{sum(p.nbytes for p in base.parameters()) / 1e9:.1f} GB bf16")
    for mode in modes:
        if time.perf_counter() - START > args.budget_s:
            log(f"time budget spent: skipping {mode}")
            report["modes"][mode] = {"skipped": "time budget"}
            continue
        quant.INT8_CUDA_KERNEL = mode == "int8k"  # int8k: int8 through torch._weight_int8pack_mm on CUDA too
        if mode == "bf16":
            model = base
        else:
            model = quantize_model(copy.deepcopy(base), mode.removesuffix("k"), args.group_size)
            sync(device)
            log(f"quantized {mode}")
        entry = {"parity": parity(base, model, device) if mode != "bf16" else {},
                 "kernels": kernels(model, device, args.reps, args.hbm),
                 "decode": [decode(model, device, b, args.steps, args.hbm) for b in (1, 8)]}
        report["modes"][mode] = entry
        log(f"measured {mode}")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_tables(report)
    write(report)
    return 0


def write(report: dict) -> None:
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu_quant.json").write_text(json.dumps(report, indent=1))


def print_tables(report: dict) -> None:
    modes = [m for m, e in report["modes"].items() if "decode" in e]
    print(f"\n## decode step, {report['layers']} Grok-2 layers + lm_head ({report['device']}, "
          f"roofline {report['hbm'] / 1e12:.1f} TB/s)\n")
    print("| weights | batch | experts/layer | GB read/step | step ms | tok/s | HBM roofline fraction |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for m in modes:
        for r in report["modes"][m]["decode"]:
            print(f"| {m} | {r['batch']} | {r['experts_per_layer']:.1f} | {r['GB_per_step']:.2f} | {r['step_ms']:.2f} "
                  f"| {r['tok_s']:.1f} | {r['fraction']:.1%} |")
    print("\n## kernels: one pass over all matrices of a kind (CUDA graph), fraction of the roofline\n")
    print("| kind | [N, K] | batch | " + " | ".join(modes) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in modes) + " |")
    first = report["modes"][modes[0]]["kernels"]
    for i, row in enumerate(first):
        cells = []
        for m in modes:
            r = report["modes"][m]["kernels"][i]
            cells.append("error" if "error" in r else f"{r['us_per_matrix']:.1f} us, {r['fraction']:.0%}")
        print(f"| {row['kind']} | {row.get('shape', '')} | {row['batch']} | " + " | ".join(cells) + " |")
    print("\n## parity vs bf16 (relative error of the output)\n")
    qmodes = [m for m in modes if report["modes"][m]["parity"]]
    if qmodes:
        print("| output | " + " | ".join(qmodes) + " |")
        print("| --- | " + " | ".join("---" for _ in qmodes) + " |")
        for kind in report["modes"][qmodes[0]]["parity"]:
            print(f"| {kind} | " + " | ".join(f"{report['modes'][m]['parity'][kind]:.4f}" for m in qmodes) + " |")


if __name__ == "__main__":
    sys.exit(main())
