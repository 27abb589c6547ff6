"""One torchrun job of tests/test_parallel.py: sharded logits and TP engine runs, results written to files.

usage: python -m torch.distributed.run --standalone --nproc-per-node N tests/parallel_worker.py SPEC.json

SPEC: {"out": folder, "tokens": [[...]], "tail": t, "cases": [{"name", "path", "mode"}],
       "engines": [{"name", "path", "mode"}], "backend": "gloo" (default) | "nccl", "device": optional}
Rank 0 writes out/logits.pt ({case: {"full", "tail", "spread"}}) and out/engine.json; the other ranks
write out/follower-RANK.json (forward steps replayed).
"""

from __future__ import annotations

import dataclasses
import json
import queue
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from grokstack.engine import Engine, PromptLogprobs
from grokstack.lm import LM
from grokstack.runner import Stepper
from grokstack.sampling import SamplingParams

# prompts (token ids) and choices per request: different lengths, one with n=2 (a copied cache row)
ENGINE_PROMPTS = [
    ([5, 17, 99, 230, 41], 1),
    ([7, 300, 12, 8, 77, 64, 129, 33, 410, 56, 90, 22, 18], 2),
    ([260, 14, 3, 95, 501, 44, 71, 9, 150], 1),
]
GENERATE_PROMPTS = [[11, 42, 250, 6], [301, 7, 7, 19, 88, 140, 23]]
MAX_TOKENS = 6


def engine_tokens(lm: LM) -> list[list[list[int]]]:
    """Greedy tokens of ENGINE_PROMPTS, all submitted before the engine starts so they run batched."""
    engine = Engine(lm, max_batch=4, max_model_len=48, prefill_chunk=8, block_size=4)
    events: queue.Queue = queue.Queue()
    for i, (prompt, n) in enumerate(ENGINE_PROMPTS):
        params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True) for _ in range(n)]
        engine.submit(prompt, params, lambda ev, i=i: events.put((i, ev)))
    out = [[[] for _ in range(n)] for _, n in ENGINE_PROMPTS]
    left = sum(n for _, n in ENGINE_PROMPTS)
    engine.start()
    try:
        while left:
            i, ev = events.get(timeout=120)
            if isinstance(ev, BaseException):
                raise ev
            if isinstance(ev, PromptLogprobs):
                continue
            out[i][ev.index].append(ev.token_id)
            left -= ev.finish_reason is not None
    finally:
        engine.shutdown(grace=1)
    return out


def generate_tokens(lm: LM) -> list[list[int]]:
    """LM.generate's path (an engine of its own each call), twice: the followers must follow a new cache."""
    runs = [lm.generate(GENERATE_PROMPTS, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True) for _ in range(2)]
    return [c.token_ids for run in runs for c in run]


@torch.no_grad()
def logits_case(model, tokens: torch.Tensor, tail: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the whole batch without a cache, and of the last `tail` positions through a paged KV cache
    (every rank runs both: the collectives pair up)."""
    B, T = tokens.shape
    full = model(tokens.to(model.embed_tokens.weight.device))
    cache = Stepper(model, B, T, block_size=4)
    rows = tokens.tolist()
    cache.feed([r[: T - tail] for r in rows])
    tail_logits = cache.feed([r[T - tail :] for r in rows], "every")  # B x [tail, V]
    return full.cpu(), torch.stack(tail_logits).cpu()


def spread(x: torch.Tensor) -> float:
    """Largest difference between this tensor on any rank and on rank 0 (every rank must agree)."""
    if dist.get_backend() != "nccl":
        x = x.cpu()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return max(float((p - parts[0]).abs().max()) for p in parts)


def main(spec_path: str) -> None:
    from grokstack.parallel import follow, init_distributed, lead, load_lm, load_sharded, shutdown_distributed

    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    base = init_distributed(spec.get("backend", "gloo"), device=spec.get("device"))
    tokens = torch.tensor(spec["tokens"])
    results = {}
    for case in spec["cases"]:
        ctx = dataclasses.replace(base, mode=case["mode"])
        model = load_sharded(case["path"], ctx, torch.float32)
        full, tail = logits_case(model, tokens, spec["tail"])
        agree = max(spread(full.to(base.device)), spread(tail.to(base.device)))  # nccl gathers on the GPU
        results[case["name"]] = {"full": full, "tail": tail, "spread": agree}
    engines, steps = {}, {}
    for case in spec["engines"]:
        ctx = dataclasses.replace(base, mode=case["mode"])
        lm = load_lm(case["path"], ctx, "float32")
        if ctx.rank != 0:
            steps[case["name"]] = follow(lm.model, ctx)
            continue
        lm, leader = lead(lm, ctx)
        try:
            engines[case["name"]] = {"engine": engine_tokens(lm), "generate": generate_tokens(lm)}
        finally:
            leader.stop()
    if base.rank == 0:
        torch.save(results, out / "logits.pt")
        (out / "engine.json").write_text(json.dumps(engines))
    else:
        (out / f"follower-{base.rank}.json").write_text(json.dumps(steps))
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
