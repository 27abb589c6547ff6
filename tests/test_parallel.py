"""Tensor / expert parallelism: sharded logits equal one process, ranks read only their slices, a missing
shard fails at every size, and the TP engine's followers replay rank 0's steps.

Two torchrun jobs (2 and 4 gloo ranks) run tests/parallel_worker.py once each; the TP=8 loading and the
missing-shard checks run in this process with one rank's context at a time (loading does no collective).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import grokstack.parallel as parallel
from grokstack.config import from_hf_config
from grokstack.errors import CheckpointError, ConfigError
from grokstack.lm import LM, load
from grokstack.loading.safetensors_folder import save_safetensors_folder
from grokstack.parallel import (
    ParallelContext,
    kv_heads,
    lead,
    load_sharded,
    local_config,
    shard_model,
)
from grokstack.tiny import make_tiny, random_model, tiny_config, tiny_grok2_hf_config
from tests.parallel_worker import engine_tokens, generate_tokens, logits_case

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("parallel_worker.py")
TAIL = 3  # positions the worker runs through a KV cache after prefilling the rest

# (case, checkpoint, mode) per torchrun job; the 4-rank job has more ranks than KV heads (replicated KV)
CASES = {
    2: [("g1", "tp"), ("g1", "ep"), ("g2", "tp"), ("g2", "ep"), ("g2flat", "tp")],
    4: [("g1", "tp"), ("g2", "tp"), ("g2", "ep"), ("g2flat", "ep")],
}
ENGINES = {2: [("g2", "tp"), ("g1", "ep")], 4: [("g2", "tp")]}
MIN_STEPS = 2 * 6  # forward steps a follower replays at least: the decodes of the two generate.py runs


def wide_config():
    """Tiny Grok-2 with 8 query heads (2 KV heads), so it splits over 8 ranks."""
    return from_hf_config({**tiny_grok2_hf_config(), "num_attention_heads": 8, "head_dim": 8})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: more intra-op threads only spin against the torchrun ranks."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parallel")
    out = {"g1": make_tiny("grok-1", root / "g1"), "g2": make_tiny("grok-2", root / "g2")}
    out["g2flat"] = root / "g2flat"  # one plain safetensors file: whole experts, sliced at load
    save_safetensors_folder(random_model(tiny_config("grok-2"), seed=1), out["g2flat"], torch.bfloat16)
    out["wide"] = root / "wide"  # presharded like the release (TP=8)
    save_safetensors_folder(random_model(wide_config(), seed=2), out["wide"], torch.bfloat16, preshard=8)
    return out


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    t = torch.randint(3, 512, (2, 12), generator=g)
    t[1, -2:] = 0  # a right-padded row: Grok-1 masks pad keys
    return t


@pytest.fixture(scope="module")
def reference(ckpts, tokens) -> dict:
    """One process, full model: logits, and the engine's and generate.py's greedy tokens."""
    out = {}
    for name in ("g1", "g2", "g2flat"):
        lm = load(ckpts[name], dtype="float32")
        full, tail = logits_case(lm.model, tokens, TAIL)
        out[name] = {"full": full, "tail": tail}
        if name != "g2flat":
            out[name]["engine"] = engine_tokens(lm)
            out[name]["generate"] = generate_tokens(lm)
    return out


def _torchrun(world: int, ckpts: dict[str, Path], tokens: torch.Tensor, out: Path, **spec) -> dict:
    spec = {
        "out": str(out),
        "tokens": tokens.tolist(),
        "tail": TAIL,
        "cases": [{"name": f"{c}-{m}", "path": str(ckpts[c]), "mode": m} for c, m in CASES[world]],
        "engines": [{"name": f"{c}-{m}", "path": str(ckpts[c]), "mode": m} for c, m in ENGINES[world]],
        **spec,
    }
    (out / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           str(WORKER), str(out / "spec.json")]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    followers = {r: json.loads((out / f"follower-{r}.json").read_text()) for r in range(1, world)}
    return {
        "logits": torch.load(out / "logits.pt"),
        "engine": json.loads((out / "engine.json").read_text()),
        "followers": followers,
    }


@pytest.fixture(scope="module")
def launched(ckpts, tokens, tmp_path_factory):
    runs: dict[int, dict] = {}

    def get(world: int) -> dict:
        if world not in runs:
            runs[world] = _torchrun(world, ckpts, tokens, tmp_path_factory.mktemp(f"tp{world}"))
        return runs[world]

    return get


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _check_logits(run: dict, reference: dict, world: int) -> None:
    assert set(run["logits"]) == {f"{c}-{m}" for c, m in CASES[world]}
    for case, res in run["logits"].items():
        ref = reference[case.split("-")[0]]
        assert rel_err(res["full"], ref["full"]) <= 1e-5, case
        assert rel_err(res["tail"], ref["tail"]) <= 1e-5, case  # through the rank-local KV cache
        assert res["spread"] == 0.0, case  # every rank computed the same logits


def _check_engines(run: dict, reference: dict, world: int) -> None:
    assert set(run["engine"]) == {f"{c}-{m}" for c, m in ENGINES[world]}
    for case, got in run["engine"].items():
        ref = reference[case.split("-")[0]]
        assert got["engine"] == ref["engine"], case
        assert got["generate"] == ref["generate"], case
    for rank, steps in run["followers"].items():  # every forward step ran on every rank
        assert set(steps) == set(run["engine"]), rank
        assert all(n > MIN_STEPS for n in steps.values()), (rank, steps)


# ------------------------------------------------------------------------------ multi-process
@pytest.mark.parametrize("world", [2, 4])
def test_sharded_logits_equal_one_process(world, launched, reference):
    _check_logits(launched(world), reference, world)


@pytest.mark.parametrize("world", [2, 4])
def test_engine_followers_replay_the_leader(world, launched, reference):
    _check_engines(launched(world), reference, world)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ranks_on_cuda(ckpts, tokens, reference, tmp_path):
    """Two ranks on CUDA: nccl over two GPUs, or gloo over CUDA tensors when one GPU holds both."""
    two = torch.cuda.device_count() >= 2
    run = _torchrun(2, ckpts, tokens, tmp_path, backend="nccl" if two else "gloo", device=None if two else "cuda:0")
    _check_logits(run, reference, 2)
    _check_engines(run, reference, 2)


# ------------------------------------------------------------------------------ one process
def test_kv_heads_are_the_ones_their_query_heads_read():
    for hq, hkv in [(8, 2), (8, 8), (8, 1), (16, 4), (4, 2)]:
        cfg = from_hf_config({**tiny_grok2_hf_config(), "num_attention_heads": hq, "num_key_value_heads": hkv})
        for world in (1, 2, 4, 8):
            if hq % world or (hkv % world if world <= hkv else world % hkv):
                continue
            for rank in range(world):
                first, n = kv_heads(cfg, ParallelContext(rank, world))
                q = range(rank * hq // world, (rank + 1) * hq // world)
                assert set(range(first, first + n)) == {h // (hq // hkv) for h in q}, (hq, hkv, world, rank)
                local = local_config(cfg, ParallelContext(rank, world))
                assert (local.num_heads, local.num_kv_heads) == (len(q), n)
                assert local.vocab_size == cfg.vocab_size and local.num_experts == cfg.num_experts


def test_splits_that_do_not_divide_are_refused():
    cfg = wide_config()
    with pytest.raises(ConfigError, match="8 attention heads"):
        local_config(cfg, ParallelContext(0, 3))
    with pytest.raises(ConfigError, match="6 experts"):
        local_config(from_hf_config({**tiny_grok2_hf_config(), "num_local_experts": 6}), ParallelContext(0, 4, "ep"))
    gqa3 = from_hf_config({**tiny_grok2_hf_config(), "num_attention_heads": 12, "num_key_value_heads": 4})
    with pytest.raises(ConfigError, match="4 KV heads"):  # 6 ranks: a rank's 2 query heads span 2 KV heads
        local_config(gqa3, ParallelContext(0, 6))
    model = shard_model(random_model(cfg), ParallelContext(0, 2))
    with pytest.raises(Exception, match="already sharded"):
        shard_model(model, ParallelContext(0, 2))


class _Spy:
    """Stands in for open_safetensors in parallel.py: which files were opened, which tensors read."""

    def __init__(self, real) -> None:
        self.real = real
        self.reads: dict[str, set[str]] = defaultdict(set)

    @contextmanager
    def __call__(self, path: Path):
        with self.real(path) as st:
            yield _Recorder(st, self.reads[path.name])


class _Recorder:
    def __init__(self, st, names: set[str]) -> None:
        self.st, self.names = st, names

    def get_slice(self, name: str):
        self.names.add(name)
        return self.st.get_slice(name)

    def get_tensor(self, name: str):
        self.names.add(name)
        return self.st.get_tensor(name)


def _check_tiles(full, ranks, mode: str) -> None:
    """The ranks' slices put back together are the full model; replicated weights are whole everywhere."""
    cfg, w = full.cfg, len(ranks)
    hq, hkv, hd, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size

    def joined(name: str, dim: int) -> bool:
        return torch.equal(torch.cat([m.get_parameter(name) for m in ranks], dim), full.get_parameter(name))

    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        assert joined(p + "self_attn.q_proj.weight", 0) and joined(p + "self_attn.o_proj.weight", 1)
        assert joined(p + "mlp.gate_proj.weight", 0) and joined(p + "mlp.up_proj.weight", 0)
        assert joined(p + "mlp.down_proj.weight", 1)
        for x in ("w1", "w2", "w3"):
            assert joined(p + f"block_sparse_moe.experts.{x}", 0 if mode == "ep" else (2 if x == "w2" else 1))
        for r, m in enumerate(ranks):
            read = sorted({h // (hq // hkv) for h in range(r * hq // w, (r + 1) * hq // w)})  # KV heads it reads
            for x in ("k_proj", "v_proj"):
                heads = full.get_parameter(p + f"self_attn.{x}.weight").view(hkv, hd, d)[read].reshape(-1, d)
                assert torch.equal(m.get_parameter(p + f"self_attn.{x}.weight"), heads)
            assert m.layers[i].self_attn.cfg.num_heads == hq // w
            first = m.layers[i].block_sparse_moe.experts.first
            assert first == (r * cfg.num_experts // w if mode == "ep" else 0)
            for name in ("block_sparse_moe.gate.weight", "post_moe_norm.weight", "pre_attn_norm.weight"):
                assert torch.equal(m.get_parameter(p + name), full.get_parameter(p + name))
    for m in ranks:
        assert torch.equal(m.embed_tokens.weight, full.embed_tokens.weight)
        assert torch.equal(m.lm_head.weight, full.lm_head.weight)


@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("mode", ["tp", "ep"])
def test_each_rank_reads_only_its_slices(world, mode, ckpts, monkeypatch):
    """Release presharded at TP=8: at TP=8 rank k reads tensor data from the common files and its own
    TP-00k files only; at TP 1/2/4 the release slices covering its range; under EP every TP file but
    only its own experts."""
    path = ckpts["wide"]
    full = load(path, dtype="float32").model
    common = {f.name for f in path.glob("*-TP-common.safetensors")}
    ranks = []
    for rank in range(world):
        spy = _Spy(parallel.open_safetensors)
        monkeypatch.setattr(parallel, "open_safetensors", spy)
        ctx = ParallelContext(rank, world, mode)
        model = load_sharded(path, ctx, torch.float32)
        ranks.append(model)
        opened = set(spy.reads)
        tp_files = {int(n[-15:-12]) for n in opened - common}
        assert common <= opened
        if mode == "tp":
            assert tp_files == set(range(rank * 8 // world, (rank + 1) * 8 // world)), (rank, sorted(opened))
        else:
            e = 8 // world
            mine = {f"experts.{x}." for x in range(rank * e, (rank + 1) * e)}
            assert tp_files == set(range(8))
            read = {n for f in opened - common for n in spy.reads[f]}
            assert read and all(any(s in n for s in mine) for n in read)
        expected = shard_model(copy.deepcopy(full), ctx)  # the same slices, cut from the full model
        for (name, got), (_, want) in zip(model.state_dict().items(), expected.state_dict().items(), strict=True):
            assert torch.equal(got, want), name
    _check_tiles(full, ranks, mode)


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_missing_shard_fails_at_every_size(world, ckpts, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(ckpts["wide"], broken)
    (broken / "pytorch_model-00007-TP-003.safetensors").unlink()
    for mode in ("tp", "ep"):
        for rank in {0, world - 1}:
            with pytest.raises(CheckpointError, match="TP-003"):
                load_sharded(broken, ParallelContext(rank, world, mode))
    for f in broken.glob("*-TP-007.safetensors"):  # all of the last shard: no gap in k to spot
        f.unlink()
    shutil.copy(ckpts["wide"] / "pytorch_model-00007-TP-003.safetensors", broken)
    with pytest.raises(CheckpointError, match="TP-007"):
        load_sharded(broken, ParallelContext(world - 1, world, "tp"))


def test_leader_on_one_rank_runs_the_engine_unchanged(ckpts, reference):
    """World 1 (no torchrun): the lead sends nothing and the engine's tokens are the plain model's."""
    lm = load(ckpts["g2"], dtype="float32")
    one = ParallelContext(0, 1)
    led, leader = lead(LM(load_sharded(ckpts["g2"], one), lm.tokenizer, lm.path), one)
    assert engine_tokens(led) == reference["g2"]["engine"]
    assert generate_tokens(led) == reference["g2"]["generate"]
    leader.stop()
