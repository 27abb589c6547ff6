"""plan.py: GPU specs, byte counts against real allocations, sanity of the per-GPU split, the H200 question."""

import argparse
import copy
import dataclasses
import json
import re
from itertools import chain

import pytest
import torch

from grokstack.config import grok1_preset, grok2_preset
from grokstack.errors import CheckpointError, InvalidArgumentError
from grokstack.kv_cache import PagedKV
from grokstack.model import Transformer
from grokstack.plan import (
    GB,
    GIB,
    NO_FIT_EXIT,
    WEIGHT_CLASSES,
    add_plan_args,
    cmd_plan,
    format_plan,
    grok2_on_one_h200,
    matrix_bytes,
    parse_gpus,
    plan,
    plan_for,
)
from grokstack.runner import Runner
from grokstack.scheduler import Row, StepPlan
from grokstack.tiny import random_model, tiny_config, tiny_grok2_hf_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def tensor_class(name: str) -> str:
    """The planner's tensor class of a parameter or buffer name (module paths, whatever the leaf is called)."""
    if "self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return "dense_mlp"
    if ".experts." in name:
        return "experts"
    if "block_sparse_moe.gate" in name:
        return "router"
    if "norm" in name:
        return "norms"
    if name.startswith("embed_tokens"):
        return "embeddings"
    if name.startswith("lm_head"):
        return "lm_head"
    raise AssertionError(f"unclassified tensor {name}")


def measured(model: torch.nn.Module) -> dict[str, int]:
    out = dict.fromkeys(WEIGHT_CLASSES, 0)
    for name, t in chain(model.named_parameters(), model.named_buffers()):
        out[tensor_class(name)] += t.numel() * t.element_size()
    return out


_MODELS: dict = {}


def tiny_model(arch: str, dtype: torch.dtype = torch.bfloat16) -> Transformer:
    """A fresh copy of one random tiny model per (arch, dtype): building it is the slow part."""
    if (arch, dtype) not in _MODELS:
        _MODELS[arch, dtype] = random_model(tiny_config(arch), seed=1, dtype=dtype)
    return copy.deepcopy(_MODELS[arch, dtype])


def meta_model(cfg, dtype):
    with torch.device("meta"):
        return Transformer(cfg, dtype)


def close(a: int, b: int, tol: float = 0.05) -> bool:
    return abs(a - b) <= tol * max(a, b)


# ------------------------------------------------------------------------------------ GPU specs
@pytest.mark.parametrize(
    "spec, count, nbytes",
    [
        ("8x80GB", 8, 80 * GB),
        ("141GB", 1, 141 * GB),
        ("1x141GB", 1, 141 * GB),
        ("2x24GiB", 2, 24 * GIB),
        ("4 x 40 gb", 4, 40 * GB),
        ("2X1.5TB", 2, 1500 * GB),
        ("cpu:64GB", 1, 64 * GB),
    ],
)
def test_parse_gpus(spec, count, nbytes):
    g = parse_gpus(spec)
    assert (g.count, g.bytes_each) == (count, nbytes)
    assert g.kind == ("cpu" if spec.startswith("cpu") else "cuda")


@pytest.mark.parametrize("spec", ["", "80", "8x", "x80GB", "8x80", "0x80GB", "8x0GB", "8x80GX", "eightx80GB", "-1x8GB"])
def test_parse_gpus_rejects_bad_specs(spec):
    with pytest.raises(InvalidArgumentError, match="GPUs"):
        parse_gpus(spec)


def test_cpu_device_has_no_cuda_reserve():
    cfg = tiny_config("grok-2")
    assert plan(cfg, "cpu:64GB", context=64, batch=1).reserve < plan(cfg, "64GB", context=64, batch=1).reserve


# ------------------------------------------------------------------------------------ real allocations
@pytest.mark.parametrize("arch", ["grok-1", "grok-2"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_weights_match_a_real_tiny_model(arch, dtype):
    cfg = tiny_config(arch)
    got = measured(tiny_model(arch, DTYPES[dtype]))
    p = plan(cfg, "1x80GB", dtype=dtype, context=cfg.context_length, batch=2)
    assert close(p.weights_total, sum(got.values()))
    for cls in WEIGHT_CLASSES:  # each class on its own, so two errors cannot cancel out
        assert close(p.weights[cls], got[cls]), (cls, p.weights[cls], got[cls])
    assert got["norms"] and got["router"]  # fp32 tensors the planner must not count at bf16


@pytest.mark.parametrize("arch", ["grok-1", "grok-2"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_kv_cache_matches_a_real_allocation(arch, dtype):
    cfg = tiny_config(arch)
    batch, context = 3, 200
    cache = PagedKV(cfg, batch * context // 8, 8, DTYPES[dtype])  # the engine's pool for batch x context tokens
    real = sum(t.numel() * t.element_size() for t in (cache.k, cache.v, cache.key_valid))
    p = plan(cfg, "1x80GB", dtype=dtype, context=context, batch=batch)
    assert close(p.kv_total, real)
    assert p.kv["key_valid"] == cache.key_valid.numel()


@pytest.mark.parametrize("preset", [grok1_preset, grok2_preset])
def test_release_sizes_match_a_meta_model(preset):
    # The real shapes on the meta device: no memory, exact byte counts.
    cfg = preset()
    got = measured(meta_model(cfg, torch.bfloat16))
    p = plan(cfg, "1x2000GB", dtype="bf16", context=8192, batch=16)
    assert close(p.weights_total, sum(got.values()), 0.001)
    assert close(p.weights_total, 2 * cfg.parameter_counts()["total"], 0.001)
    cache = PagedKV(cfg, 16 * 8192 // 16, 16, torch.bfloat16, device="meta")
    assert close(p.kv_total, sum(t.numel() * t.element_size() for t in (cache.k, cache.v, cache.key_valid)), 0.001)


def local_config(cfg, tp, ep=False):
    """One rank's shapes by the parallel rules, written out independently of plan.py's Shard."""
    experts = cfg.num_experts // tp if ep else cfg.num_experts
    return dataclasses.replace(
        cfg,
        num_heads=cfg.num_heads // tp,
        num_kv_heads=max(1, cfg.num_kv_heads // tp),
        intermediate_size=cfg.intermediate_size // tp,
        moe_intermediate_size=cfg.moe_intermediate_size if ep else cfg.moe_intermediate_size // tp,
        num_experts=experts,
        num_experts_per_tok=min(cfg.num_experts_per_tok, experts),
    )


@pytest.mark.parametrize("arch", ["grok-1", "grok-2"])
@pytest.mark.parametrize("tp, ep", [(2, False), (4, False), (2, True), (4, True)])
def test_sharded_bytes_match_a_local_model(arch, tp, ep):
    cfg = tiny_config(arch)
    local = local_config(cfg, tp, ep)
    got = measured(random_model(local, dtype=torch.bfloat16))
    if ep:  # the local model's gate would score only its own experts; the real router stays whole
        got["router"] = measured(tiny_model(arch))["router"]
    p = plan(cfg, f"{tp}x80GB", dtype="bf16", context=128, batch=2, ep=ep)
    for cls in WEIGHT_CLASSES:
        assert close(p.weights[cls], got[cls]), (cls, p.weights[cls], got[cls])
    cache = PagedKV(local, 2 * 128 // 16, 16, torch.bfloat16)
    assert close(p.kv_total, sum(t.numel() * t.element_size() for t in (cache.k, cache.v, cache.key_valid)))


def test_grok2_tp8_matches_a_meta_local_model():
    cfg = grok2_preset()
    got = measured(meta_model(local_config(cfg, 8), torch.bfloat16))
    p = plan(cfg, "8x80GB", dtype="bf16")
    assert close(p.weights_total, sum(got.values()), 0.001)
    assert p.shard.kv_heads == 1 and p.shard.q_heads == 8


def test_int4_cpu_packing_is_half_a_byte_per_weight():
    # torch's CPU int4 layout: [out, in/2] uint8, plus [groups, out, 2] bf16 scales and zeros.
    out, inp, group = 96, 256, 128
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (out, inp), dtype=torch.int32), 2)
    scales_zeros = torch.empty(inp // group, out, 2, dtype=torch.bfloat16)
    real = packed.numel() * packed.element_size() + scales_zeros.numel() * scales_zeros.element_size()
    assert matrix_bytes(out, inp, "int4", 2, group) == real


@pytest.mark.parametrize("scheme, group", [("int8", 128), ("fp8", 128), ("int4", 32), ("int4", 128)])
@pytest.mark.parametrize("out, inp", [(96, 256), (88, 64), (64, 88), (5, 130)])
def test_matrix_bytes_match_quant_py(scheme, group, out, inp):
    quant = pytest.importorskip("grokstack.quant")
    module = quant.QuantLinear.quantize(torch.randn(out, inp), quant.QuantSpec(scheme, group))
    real = sum(t.numel() * t.element_size() for t in module.buffers())
    assert matrix_bytes(out, inp, scheme, 4, group) == real  # padding included


def test_planner_constants_follow_quant_py():
    from grokstack import plan as plan_module

    quant = pytest.importorskip("grokstack.quant")
    assert plan_module.QUANT_CHUNK_ELEMS == quant.CHUNK_ELEMS
    assert plan_module.INT4_GROUP_SIZES == quant.GROUP_SIZES
    assert set(plan_module.QUANTS) == set(quant.MODES)


@pytest.mark.parametrize("arch", ["grok-1", "grok-2"])
@pytest.mark.parametrize(
    "dtype, scheme, group",
    [("bf16", "int8", 128), ("fp32", "int8", 128), ("bf16", "int4", 32), ("bf16", "int4", 128), ("bf16", "fp8", 128)],
)
def test_quantized_bytes_match_quant_py(arch, dtype, scheme, group):
    quant = pytest.importorskip("grokstack.quant")
    cfg = tiny_config(arch)
    model = quant.quantize_model(tiny_model(arch, DTYPES[dtype]), scheme, group_size=group)
    got = measured(model)
    p = plan(cfg, "1x80GB", dtype=dtype, quantize=scheme, group_size=group, context=128, batch=2)
    for cls in WEIGHT_CLASSES:
        assert close(p.weights[cls], got[cls]), (cls, p.weights[cls], got[cls])
    assert close(p.weights_total, quant.model_bytes(model))
    for cls in ("router", "norms", "embeddings"):  # never quantized
        assert p.weights[cls] == got[cls]


@pytest.mark.parametrize("arch", ["grok-1", "grok-2"])
@pytest.mark.parametrize("mode", ["tp", "ep"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_sharded_then_quantized_bytes_match(arch, mode, scheme):
    parallel = pytest.importorskip("grokstack.parallel")
    quant = pytest.importorskip("grokstack.quant")
    cfg = tiny_config(arch)
    model = parallel.shard_model(tiny_model(arch), parallel.ParallelContext(1, 2, mode))
    got = measured(quant.quantize_model(model, scheme, group_size=32))
    p = plan(cfg, "2x80GB", quantize=scheme, group_size=32, context=128, batch=2, ep=mode == "ep")
    for cls in WEIGHT_CLASSES:
        assert close(p.weights[cls], got[cls]), (cls, p.weights[cls], got[cls])


@pytest.mark.parametrize("arch", ["grok-1", "grok-2"])
@pytest.mark.parametrize("world, mode", [(2, "tp"), (4, "tp"), (2, "ep"), (4, "ep")])
def test_sharded_bytes_match_parallel_py(arch, world, mode):
    parallel = pytest.importorskip("grokstack.parallel")
    cfg = tiny_config(arch)
    p = plan(cfg, f"{world}x80GB", dtype="bf16", context=128, batch=2, ep=mode == "ep")
    for rank in (0, world - 1):  # every rank holds the same bytes
        ctx = parallel.ParallelContext(rank, world, mode)
        got = measured(parallel.shard_model(tiny_model(arch), ctx))
        for cls in WEIGHT_CLASSES:
            assert close(p.weights[cls], got[cls]), (rank, cls, p.weights[cls], got[cls])
        cache = PagedKV(parallel.local_config(cfg, ctx), 2 * 128 // 16, 16, torch.bfloat16)
        assert close(p.kv_total, sum(t.numel() * t.element_size() for t in (cache.k, cache.v, cache.key_valid)))


# ------------------------------------------------------------------------------------ sanity
@pytest.mark.parametrize("preset", [grok1_preset, grok2_preset])
def test_quantization_order(preset):
    cfg = preset()
    w = {q: plan(cfg, "8x80GB", quantize=q).weights_total for q in (None, "fp8", "int8", "int4")}
    assert w["int4"] < w["fp8"] < w[None]
    assert w["int8"] < w["fp8"] < 1.001 * w["int8"]  # 1 B/param + a bf16 or an fp32 scale per channel
    assert w["int4"] < 0.6 * w["int8"]  # 0.53 B/param against 1 B/param; the float embedding is in both


@pytest.mark.parametrize("preset", [grok1_preset, grok2_preset])
def test_more_gpus_hold_less_each(preset):
    cfg = preset()
    plans = [plan(cfg, f"{n}x80GB", quantize="fp8") for n in (1, 2, 4, 8)]
    for a, b in zip(plans, plans[1:], strict=False):
        assert b.weights_total < a.weights_total
        assert b.kv_total <= a.kv_total
        assert b.total < a.total
    # replicated classes stay whole on every rank
    for cls in ("router", "norms", "embeddings", "lm_head"):
        assert len({p.weights[cls] for p in plans}) == 1


def test_replicas_and_ep():
    cfg = grok2_preset()
    two_replicas = plan(cfg, "8x80GB", quantize="fp8", tp=4)
    assert two_replicas.replicas == 2
    assert two_replicas.weights_total == plan(cfg, "4x80GB", quantize="fp8").weights_total
    ep = plan(cfg, "8x80GB", quantize="fp8", ep=True)
    assert ep.shard.experts == 1 and ep.shard.expert_intermediate == cfg.moe_intermediate_size
    # the same weights, split by expert instead of by width (only the per-channel scale counts differ)
    tp_experts = plan(cfg, "8x80GB", quantize="fp8").weights["experts"]
    assert close(ep.weights["experts"], tp_experts, 0.001)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tp": 3}, "tp=3"),
        ({"tp": 16}, "tp=16"),
        ({"context": 10**6}, "context"),
        ({"batch": 0}, "batch"),
        ({"quantize": "int3"}, "quantize"),
        ({"dtype": "int8"}, "dtype"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        plan(grok2_preset(), "8x80GB", **kwargs)


def test_ep_needs_whole_experts():
    with pytest.raises(InvalidArgumentError, match="whole experts"):
        plan(grok2_preset(), "16x80GB", ep=True, context=8192)


# ------------------------------------------------------------------------------------ the H200 question
def test_grok2_int4_on_one_h200():
    cfg = grok2_preset()
    r = grok2_on_one_h200()
    # Cross-check the weights with the config's own parameter count: all but embeddings, router and norms are
    # int4 (0.5 B + 4 B of bf16 scale+zero per 128), the embedding stays bf16.
    d = cfg.hidden_size
    floats = cfg.vocab_size * d + cfg.num_layers * (cfg.num_experts * d + 4 * d) + d
    expect = (cfg.parameter_counts()["total"] - floats) * (0.5 + 4 / 128) + cfg.vocab_size * d * 2
    assert close(r["weights"], expect, 0.002)
    one, sixteen = r["batch1"], r["batch16"]
    assert r["weights"] > 141 * GB  # the weights alone overflow the card
    assert not one.fits and not sixteen.fits
    assert "weights overflow" in one.reason and "2 GPUs" in one.reason
    assert sixteen.kv["kv"] == 16 * one.kv["kv"]
    assert r["gpus_needed_batch16"] == 2
    assert plan(cfg, "2x141GB", quantize="int4", context=8192, batch=16).fits
    assert "does not fit at 8192 x 1" in r["answer"]


def test_reason_names_the_kv_cache_and_its_fixes_fit():
    cfg = grok2_preset()
    p = plan(cfg, "4x80GB", quantize="fp8", context=32768, batch=16)
    assert not p.fits and "KV cache overflow" in p.reason
    gpus = int(re.search(r"(\d+) GPUs", p.reason)[1])
    assert plan(cfg, f"{gpus}x80GB", quantize="fp8", context=32768, batch=16).fits
    assert not plan(cfg, f"{gpus // 2}x80GB", quantize="fp8", context=32768, batch=16).fits
    p = plan(cfg, "8x80GB", quantize="fp8", context=131072, batch=16)
    assert not p.fits and "KV cache overflow" in p.reason
    assert "GPUs" not in p.reason.split("Would fit with")[1]  # 8 KV heads: a 16th rank holds the same KV
    ctx = int(re.search(r"context <= (\d+)", p.reason)[1])
    assert plan(cfg, "8x80GB", quantize="fp8", context=ctx, batch=16).fits
    assert not plan(cfg, "8x80GB", quantize="fp8", context=ctx + 1, batch=16).fits
    batch = int(re.search(r"batch <= (\d+)", p.reason)[1])
    assert plan(cfg, "8x80GB", quantize="fp8", context=131072, batch=batch).fits
    assert not plan(cfg, "8x80GB", quantize="fp8", context=131072, batch=batch + 1).fits


def test_reason_names_the_weights():
    p = plan(grok2_preset(), "1x80GB", context=1024, batch=1)
    assert not p.fits and "weights overflow" in p.reason and "over by" in p.reason
    assert "DOES NOT FIT" in format_plan(p)


# ------------------------------------------------------------------------------------ model input and CLI
def test_plan_for_presets_and_hub_alias_offline():
    a = plan_for("xai-org/grok-2", "8x80GB", quantize="fp8")
    b = plan_for("grok-2", "8x80GB", quantize="fp8")
    assert a.to_dict()["per_gpu_bytes"] == b.to_dict()["per_gpu_bytes"]
    assert plan_for("grok-1", "8x80GB").weights["lm_head"] == 0  # tied


def test_plan_for_local_checkpoint_reads_no_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_grok2_hf_config()))
    (tmp_path / "model-00001.safetensors").write_bytes(b"not a safetensors file: reading it would fail")
    p = plan_for(tmp_path, "1x24GB", context=256, batch=4)
    assert p.fits and p.weights == plan(tiny_config("grok-2"), "1x24GB", context=256, batch=4).weights


def test_plan_for_unknown_reference():
    with pytest.raises(CheckpointError):
        plan_for("./no/such/folder", "8x80GB")


def run_cli(capsys, *argv):
    parser = argparse.ArgumentParser()
    add_plan_args(parser)
    code = cmd_plan(parser.parse_args(list(argv)))
    return code, capsys.readouterr().out


def test_cmd_plan(capsys):
    code, out = run_cli(capsys, "--model", "grok-2", "--gpus", "8x80GB", "--quantize", "fp8", "--json")
    data = json.loads(out)
    assert code == 0 and data["fits"] and data["per_gpu_bytes"]["total"] <= data["per_gpu_bytes"]["capacity"]
    assert data["context"] == 8192 and data["batch"] == 16 and data["tp"] == 8
    code, out = run_cli(capsys, "--model", "grok-2", "--gpus", "1x141GB", "--quantize", "int4", "--batch", "1")
    assert code == NO_FIT_EXIT and "DOES NOT FIT" in out and "weights overflow" in out


# ------------------------------------------------------------------------------------ activations on a GPU
def measure_peaks(cfg, batch, context, chunk, quantize=None):
    """Real peak bytes above weights + KV of one prefill chunk, one decode step and chunk logits on CUDA,
    and the model's weight bytes by class."""
    from grokstack.loading.weights import empty_model

    model = empty_model(cfg, torch.bfloat16, "cuda")
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    if quantize is not None:
        model = quantize(model)
    torch.cuda.empty_cache()
    block = 16
    per_row = context // block
    runner = Runner(model, PagedKV(cfg, batch * per_row + 1, block, torch.bfloat16, "cuda"))
    tables = [list(range(1 + r * per_row, 1 + (r + 1) * per_row)) for r in range(batch)]
    peaks = {}
    with torch.no_grad():
        tokens = torch.randint(3, cfg.vocab_size, (chunk,)).tolist()
        prefill = StepPlan([Row(0, context - chunk, tokens, tables[0], False, False)])
        decode = StepPlan([Row(r, context - 1, tokens[:1], tables[r], False, False) for r in range(batch)])
        steps = {
            "prefill": lambda: runner.forward(prefill),
            "decode": lambda: runner.forward(decode),
            "logits": lambda: model.logits(torch.randn(max(batch, chunk), cfg.hidden_size, device="cuda",
                                                       dtype=torch.bfloat16)),
        }
        for name, step in steps.items():
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            result = step()
            torch.cuda.synchronize()
            peaks[name] = torch.cuda.max_memory_allocated() - base
            del result
    return peaks, measured(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("preset", [grok1_preset, grok2_preset])
@pytest.mark.parametrize("tp", [1, 8])
def test_activation_estimate_bounds_real_peaks_on_cuda(preset, tp):
    # One layer at the release widths (one rank's shapes for tp 8): activations do not grow with depth.
    cfg = dataclasses.replace(local_config(preset(), tp), num_layers=1)
    if torch.cuda.mem_get_info()[0] < 40 * GB:
        pytest.skip("needs 40 GB free on the GPU")
    full = dataclasses.replace(preset(), num_layers=1)
    est = plan(full, f"{tp}x200GB", context=8192, batch=16).activations
    real, _ = measure_peaks(cfg, 16, 8192, 256)
    print(f"\n{cfg.arch} tp {tp}: real {({k: round(v / GB, 3) for k, v in real.items()})} "
          f"estimate {({k: round(v / GB, 3) for k, v in est.items()})}")
    for moment in ("prefill", "decode", "logits"):
        assert real[moment] <= est[moment] <= 3 * real[moment] + 64 * 2**20, moment
    torch.cuda.empty_cache()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
def test_quantized_estimate_on_cuda(scheme):
    # One TP-8 rank of Grok-2 (one layer), quantized on the GPU: CUDA's int4 layout and the kernels' workspace.
    quant = pytest.importorskip("grokstack.quant")
    if torch.cuda.mem_get_info()[0] < 40 * GB:
        pytest.skip("needs 40 GB free on the GPU")
    full = dataclasses.replace(grok2_preset(), num_layers=1)
    p = plan(full, "8x200GB", quantize=scheme, context=8192, batch=16)
    real, weights = measure_peaks(local_config(full, 8), 16, 8192, 256, lambda m: quant.quantize_model(m, scheme))
    est = p.activations
    print(f"\ngrok-2 tp 8 {scheme}: real {({k: round(v / GB, 3) for k, v in real.items()})} "
          f"estimate {({k: round(v / GB, 3) for k, v in est.items()})}")
    for cls in WEIGHT_CLASSES:
        assert close(p.weights[cls], weights[cls], 0.001), (cls, p.weights[cls], weights[cls])
    for moment in ("prefill", "decode", "logits"):
        assert real[moment] <= est[moment] + est["quant_workspace"], moment
    torch.cuda.empty_cache()


# the Grok-2 release's config.json values as the spec lists them (spec §1.2), written out by hand
GROK2_RELEASE_CONFIG = {
    "architectures": ["Grok1ForCausalLM"], "model_type": "git", "torch_dtype": "bfloat16",
    "vocab_size": 131072, "hidden_size": 8192, "num_hidden_layers": 64, "head_dim": 128,
    "num_attention_heads": 64, "num_key_value_heads": 8, "intermediate_size": 32768, "moe_intermediate_size": 16384,
    "num_local_experts": 8, "num_experts_per_tok": 2, "residual_moe": True, "rms_norm_eps": 1e-05,
    "embedding_multiplier_scale": 90.50966799187809, "output_multiplier_scale": 0.5, "attn_logit_softcapping": 30.0,
    "router_logit_softcapping": 30.0, "final_logit_softcapping": 50, "rope_theta": 208533496,
    "rope_type": "original", "original_max_position_embeddings": 8192, "scaling_factor": 16.0,
    "extrapolation_factor": 1.0, "attn_factor": 1.0, "beta_fast": 8, "beta_slow": 1,
    "max_position_embeddings": 131072, "attn_temperature_len": 1024, "sliding_window_size": -1,
    "global_attn_every_n": 1,
}


def test_plan_a_folder_holding_only_config_json(tmp_path, capsys):
    """People plan before they download 500 GB: a folder with the release's config.json alone is enough."""
    from grokstack.cli import main
    from grokstack.plan import config_for

    (tmp_path / "config.json").write_text(json.dumps(GROK2_RELEASE_CONFIG))
    cfg, _ = config_for(str(tmp_path))
    assert round(cfg.parameter_counts()["total"] / 1e9, 1) == 269.5
    assert main(["plan", "--model", str(tmp_path), "--gpus", "8x141GB", "--json"]) == 0  # 0: it fits
    out = json.loads(capsys.readouterr().out)
    assert out["per_gpu_bytes"]["weights"] == plan(grok2_preset(), "8x141GB").weights_total
