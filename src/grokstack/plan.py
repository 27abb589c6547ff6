"""Memory planner: will this model, quantized this way, serve this context and batch on these GPUs?

Everything is computed PER GPU from the config's shapes alone (no weights are read):

- weights, per tensor class (attention, dense MLP, experts, router, norms, embeddings, lm_head), under the
  rules of `quant.py` (weight-only; router gate, norms and embeddings stay float; a tied head is the
  embedding and stays float; an untied lm_head is quantized) and `parallel.py` (TP splits attention heads,
  the dense MLP and the experts on their intermediate dim, KV heads replicated once TP > KV heads; EP
  gives whole experts to each rank; router, norms, embeddings and lm_head are on every rank);
- the KV cache as `engine.py` allocates it: max_batch x max_model_len rows of k and v for every layer, plus
  the [B, S] bool `key_valid` mask every rank keeps whole;
- activations and workspace of the largest forward step (see `activation_terms`);
- a reserve for the CUDA context, library workspaces and allocator fragmentation (`RESERVE_*`).

Byte formulas for one weight matrix [out, in] in quant.py's runtime form (`matrix_bytes`):
    float   out*in*elem                         (elem = 4 fp32, 2 bf16/fp16)
    int8    out*in + out*2                      (int8 codes + one bf16 scale per output channel)
    fp8     out*in + out*4                      (e4m3 codes + one fp32 scale per output channel)
    int4    Np*Kp/2 + (Kp/group)*Np*2*2         (packed nibbles + bf16 scale and zero per group; Np = out
                                                 padded to 16, Kp = in padded to the group size)
Both int4 kernel layouts (CPU `_convert_weight_to_int4pack_for_cpu`: [Np, Kp/2] uint8; CUDA tinygemm:
[Np/8, Kp/(16 k_tiles), 32, k_tiles/2] int32) hold exactly 0.5 B per padded weight. Grok's dims are
multiples of 128, so padding only shows in tiny models (tiny Grok-1's 88-wide experts: +9 %).

Answer to "Grok-2 on one 141 GB GPU (H200) with int4?": see `grok2_on_one_h200`. In short: no. Grok-2 is
268.4B quantizable parameters; int4 with 128-wide groups costs 0.53125 B each (0.5 packed + 4 B of bf16
scale+zero per 128), i.e. 142.6 GB, plus 2.1 GB of bf16 embeddings: ~144.8 GB of weights before any KV
cache, above the 141 GB, and above what a real H200 gives CUDA (measured: 139.8 GiB = 150.1e9 B, of which
the CUDA context and cuBLAS take 0.67 GiB) once the 5 % reserve is kept.
Two GPUs (TP=2, ~72 GB of weights each) run ctx 8192 x batch 16 with room to spare.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .config import ModelConfig, grok1_preset, grok2_preset
from .errors import CheckpointError, InvalidArgumentError
from .model import ATTN_CHUNK_ELEMS

GB = 10**9
GIB = 1 << 30
UNITS = {"mb": 10**6, "mib": 1 << 20, "gb": GB, "gib": GIB, "tb": 10**12, "tib": 1 << 40}

# Reserve on every GPU: CUDA context + cuBLAS workspace (~0.5-1 GiB on Hopper), NCCL buffers when TP > 1,
# and a share of the capacity for the caching allocator's fragmentation and the peaks this planner does
# not model. A CPU "device" has no CUDA context; it keeps the fractional share only.
RESERVE_FIXED = 1 * GIB
RESERVE_NCCL = GIB // 2
RESERVE_FRACTION = 0.05

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float": "fp32"}
KV_DTYPE_BYTES = {**DTYPE_BYTES, "fp8": 1}
QUANTS = ("int8", "int4", "fp8")
INT4_META_BYTES = 4  # bf16 scale + bf16 zero per group
INT4_ROW_PAD = 16  # quant.py pads int4 rows to a multiple of 16 (and columns to a multiple of the group)
INT4_GROUP_SIZES = (32, 64, 128, 256)  # quant.GROUP_SIZES
QUANT_CHUNK_ELEMS = 1 << 22  # quant.CHUNK_ELEMS: weight elements fp8 emulation converts to floats per step
WEIGHT_CLASSES = ("attention", "dense_mlp", "experts", "router", "norms", "embeddings", "lm_head")
NO_FIT_EXIT = 4  # cmd_plan's exit code when the plan does not fit (1-3 are errors in cli.main)
PRESETS = {"grok-1": grok1_preset, "grok-2": grok2_preset}
HUB_ALIASES = {"xai-org/grok-1": "grok-1", "xai-org/grok-2": "grok-2"}  # planned offline, nothing downloaded
_GPU_SPEC = re.compile(r"(?:(?P<kind>cpu|cuda|gpu):)?(?:(?P<count>\d+)\s*[x×*]\s*)?(?P<size>\d+(?:\.\d+)?)\s*"
                       r"(?P<unit>[a-z]+)")


# ------------------------------------------------------------------------------------ GPUs
@dataclass(frozen=True)
class GPUs:
    count: int
    bytes_each: int
    kind: str = "cuda"  # "cuda" or "cpu" (no CUDA context reserve)
    spec: str = ""


def parse_gpus(spec: str) -> GPUs:
    """'8x80GB', '141GB', '1x141GB', '2x24GiB', '4 x 40 GB', 'cpu:64GB'. GB = 1e9 B, GiB = 2**30 B.

    Note GPU makers' "80GB" (A100/H100) is about 80 GiB, and an H200 ("141GB") gives CUDA 139.8 GiB
    (measured): write GiB for the real capacity, GB for a conservative one.
    """
    text = str(spec).strip().lower()
    m = _GPU_SPEC.fullmatch(text)
    if not m or m["unit"] not in UNITS:
        raise InvalidArgumentError(
            f"cannot read GPUs {spec!r}: expected [COUNTx]SIZE UNIT like 8x80GB, 141GB, 2x24GiB or cpu:64GB "
            "(units: MB, MiB, GB, GiB, TB, TiB)"
        )
    count = int(m["count"]) if m["count"] else 1
    size = int(float(m["size"]) * UNITS[m["unit"]])
    if count < 1 or size <= 0:
        raise InvalidArgumentError(f"GPUs {spec!r}: the count and the size must be positive")
    kind = "cpu" if m["kind"] == "cpu" else "cuda"
    return GPUs(count, size, kind, str(spec).strip())


# ------------------------------------------------------------------------------------ sharding
@dataclass(frozen=True)
class Shard:
    """What one rank holds of each sharded dimension (splits are even: every rank holds the same)."""

    tp: int
    ep: bool
    q_heads: int
    kv_heads: int
    intermediate: int  # dense MLP
    experts: int  # experts held
    expert_intermediate: int  # each held expert's F


def shard_of(cfg: ModelConfig, tp: int, ep: bool) -> Shard:
    """parallel.py's split; raises InvalidArgumentError for a TP size the model's shapes do not allow."""
    if tp < 1:
        raise InvalidArgumentError(f"tp must be >= 1, got {tp}")
    if cfg.num_heads % tp:
        raise InvalidArgumentError(f"tp={tp} does not divide the {cfg.num_heads} attention heads")
    hkv = cfg.num_kv_heads
    if (tp <= hkv and hkv % tp) or (tp > hkv and tp % hkv):
        raise InvalidArgumentError(f"tp={tp} and the {hkv} KV heads: one must divide the other")
    if cfg.has_dense_mlp and cfg.intermediate_size % tp:
        raise InvalidArgumentError(f"tp={tp} does not divide the dense MLP width {cfg.intermediate_size}")
    experts, ff = cfg.num_experts, cfg.moe_intermediate_size
    if ep and experts:
        if experts % tp:
            raise InvalidArgumentError(f"--ep puts whole experts on each of {tp} ranks: {experts} experts do not split")
        experts //= tp
    elif experts:
        if ff % tp:
            raise InvalidArgumentError(f"tp={tp} does not divide the expert width {ff}")
        ff //= tp
    return Shard(tp, ep, cfg.num_heads // tp, max(1, hkv // tp),
                 cfg.intermediate_size // tp if cfg.has_dense_mlp else 0, experts, ff)


# ------------------------------------------------------------------------------------ weights
def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def matrix_bytes(out: int, inp: int, quantize: str | None, elem: int, group_size: int = 128) -> int:
    """Bytes of one [out, in] weight in memory, float (quantize None) or in quant.py's runtime form."""
    if quantize is None:
        return out * inp * elem
    if quantize == "int8":
        return out * inp + out * 2  # int8 codes + bf16 scale per output channel
    if quantize == "fp8":
        return out * inp + out * 4  # e4m3 codes + fp32 scale per output channel (what _scaled_mm takes)
    if quantize == "int4":
        rows, cols = _pad(out, INT4_ROW_PAD), _pad(inp, group_size)  # the kernels' padded [Np, Kp]
        return rows * cols // 2 + (cols // group_size) * rows * INT4_META_BYTES
    raise InvalidArgumentError(f"quantize must be one of {QUANTS} or None, got {quantize!r}")


def weight_bytes(
    cfg: ModelConfig, shard: Shard, dtype: str, quantize: str | None = None, group_size: int = 128
) -> dict[str, int]:
    """Bytes of each tensor class on one rank."""
    elem = DTYPE_BYTES[dtype]
    d, hd, L = cfg.hidden_size, cfg.head_dim, cfg.num_layers

    def mat(out: int, inp: int) -> int:
        return matrix_bytes(out, inp, quantize, elem, group_size)

    q, kv = shard.q_heads * hd, shard.kv_heads * hd
    attention = mat(q, d) + 2 * mat(kv, d) + mat(d, q)  # q, k, v [out, D]; o [D, Hq*hd]
    dense = 2 * mat(shard.intermediate, d) + mat(d, shard.intermediate) if cfg.has_dense_mlp else 0
    f = shard.expert_intermediate
    experts = shard.experts * (2 * mat(f, d) + mat(d, f)) if cfg.num_experts else 0  # w1, w3 [F, D]; w2 [D, F]
    router_elem = 4 if cfg.router_dtype == "float32" else elem
    router = cfg.num_experts * d * router_elem
    norms = (4 if cfg.norm_style == "sandwich" else 2) * d * 4  # RMSNorm weights are fp32 always
    return {
        "attention": L * attention,
        "dense_mlp": L * dense,
        "experts": L * experts,
        "router": L * router,
        "norms": L * norms + d * 4,  # + final norm
        "embeddings": cfg.vocab_size * d * elem,
        "lm_head": 0 if cfg.tie_word_embeddings else mat(cfg.vocab_size, d),
    }


def kv_cache_bytes(cfg: ModelConfig, shard: Shard, batch: int, context: int, kv_dtype: str) -> dict[str, int]:
    """KVCache's k and v [L, B, S, Hkv_local, hd] and its key_valid [B, S] bool (whole on every rank)."""
    kv = 2 * cfg.num_layers * batch * context * shard.kv_heads * cfg.head_dim * KV_DTYPE_BYTES[kv_dtype]
    return {"kv": kv, "key_valid": batch * context}


# ------------------------------------------------------------------------------------ activations
def _step_bytes(cfg: ModelConfig, s: Shard, rows: int, new: int, keys: int, elem: int, gather: bool) -> dict:
    """Peak transient bytes of one layer for `rows` sequences x `new` tokens reading `keys` keys.

    Mirrors model.py's order: rope works in fp32 (3 temporaries of q's size); attention scores go through
    ATTN_CHUNK_ELEMS-sized chunks, each living as ~3 fp32 copies at once (scores, softcap temporaries,
    softmax) plus its bf16 matmul output; GQA's broadcast matmul copies keys and values to query-head width;
    a prefill window gathers its rows' keys and values (a copy); one expert may receive every token (worst
    routing), holding gate and up outputs in the model dtype and 3 fp32 intermediates.
    """
    n, hd, d = rows * new, cfg.head_dim, cfg.hidden_size
    resident = 4 * n * d * elem + 2 * n * hd * 4  # residual, normed input, branch output, new residual; cos/sin
    qkv = n * (s.q_heads + 2 * s.kv_heads) * hd * elem + 3 * n * s.q_heads * hd * 4  # projections + fp32 rope
    t_chunk = min(new, max(1, ATTN_CHUNK_ELEMS // max(1, rows * s.q_heads * keys)))
    scores = rows * s.q_heads * t_chunk * keys
    kv_read = rows * keys * hd * elem * (s.q_heads + (2 * s.kv_heads if gather else 0))
    mask = rows * t_chunk * keys  # the bool `allowed` [B, t, S]
    attn = qkv + kv_read + scores * (3 * 4 + elem) + mask + 2 * n * s.q_heads * hd * elem  # + outputs, cat
    dense = n * s.intermediate * (3 * elem + 8) if cfg.has_dense_mlp else 0
    moe = 0
    if cfg.num_experts:
        moe = n * s.expert_intermediate * (2 * elem + 12) + 3 * n * d * elem + n * cfg.num_experts * 4 * 3
    ffn = max(dense, moe) + (n * d * elem if cfg.has_dense_mlp and cfg.num_experts else 0)  # residual MoE sum
    return {"resident": resident, "attention": attn, "ffn": ffn, "peak": resident + max(attn, ffn)}


def activation_terms(
    cfg: ModelConfig, s: Shard, batch: int, context: int, dtype: str, quantize: str | None,
    prefill_chunk: int = 256,
) -> dict[str, int]:
    """The estimate of transient memory: the worst of three moments, plus the quantized matmuls' workspace.

    - prefill: one chunk of `prefill_chunk` tokens at the end of a `context`-long prompt (reads all keys);
    - decode: `batch` sequences, one token each, every one at full context;
    - logits: [max(batch, chunk), vocab] (prompt logprobs score a whole chunk): the matmul output and its
      multiplied copy in the model dtype, then fp32 + softcap temporaries (the vocab is never sharded);
    - quant_workspace (quantized models only): quant.py's kernels read packed weights directly (int8pack /
      int4pack matmuls, fp8 `_scaled_mm`), never a whole dequantized matrix; what they add is fp32 + fp8 +
      bf16 copies of the widest input [rows, K] and, where fp8 is emulated, one QUANT_CHUNK_ELEMS chunk of
      W in floats.

    Measured on an H200 (bf16, one layer at the release widths, context 8192, batch 16; see the CUDA test):
    real/estimated GB: Grok-2 TP1 prefill 0.99/1.16, decode 2.20/2.27, logits 0.47/0.54; TP8 prefill
    0.22/0.28, decode 0.28/0.29; Grok-1 TP1 prefill 0.88/1.11, decode 1.65/1.70, logits 0.20/0.54.
    Decode is dominated by GQA's broadcast copy of the keys and values (B x Hq x S x hd per layer).
    Quantized (int8 / int4 / fp8, TP8 rank) the real peaks were the float ones, within the estimate, and the
    weights on the GPU (CUDA int4 layout included) matched `weight_bytes` per class within 0.1 %.
    """
    elem = DTYPE_BYTES[dtype]
    chunk = min(prefill_chunk, context)
    prefill = _step_bytes(cfg, s, 1, chunk, context, elem, gather=True)
    decode = _step_bytes(cfg, s, batch, 1, context, elem, gather=False)
    rows = max(batch, chunk)
    logits = rows * cfg.vocab_size * (2 * elem + 3 * 4) + rows * cfg.hidden_size * elem
    quant = 0
    if quantize:
        widest = max(cfg.hidden_size, s.q_heads * cfg.head_dim, s.intermediate, s.expert_intermediate)
        quant = rows * widest * (4 + 1 + 2) + QUANT_CHUNK_ELEMS * 4
    peak = max(prefill["peak"], decode["peak"], logits) + quant
    return {"prefill": prefill["peak"], "decode": decode["peak"], "logits": logits, "quant_workspace": quant,
            "peak": peak}


# ------------------------------------------------------------------------------------ plan
@dataclass
class Plan:
    model: str
    gpus: GPUs
    tp: int
    ep: bool
    replicas: int
    quantize: str | None
    dtype: str
    kv_dtype: str
    context: int
    batch: int
    group_size: int
    prefill_chunk: int
    shard: Shard
    weights: dict[str, int]
    kv: dict[str, int]
    activations: dict[str, int]
    reserve: int
    reason: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def capacity(self) -> int:
        return self.gpus.bytes_each

    @property
    def weights_total(self) -> int:
        return sum(self.weights.values())

    @property
    def kv_total(self) -> int:
        return sum(self.kv.values())

    @property
    def total(self) -> int:
        return self.weights_total + self.kv_total + self.activations["peak"] + self.reserve

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    @property
    def headroom(self) -> int:
        return self.capacity - self.total

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "gpus": asdict(self.gpus),
            "tp": self.tp, "ep": self.ep, "replicas": self.replicas,
            "quantize": self.quantize, "dtype": self.dtype, "kv_dtype": self.kv_dtype,
            "context": self.context, "batch": self.batch, "group_size": self.group_size,
            "prefill_chunk": self.prefill_chunk,
            "shard": asdict(self.shard),
            "per_gpu_bytes": {
                "weights": self.weights_total, "weights_by_class": dict(self.weights),
                "kv_cache": self.kv_total, "kv_by_part": dict(self.kv),
                "activations": self.activations["peak"], "activations_by_moment": dict(self.activations),
                "reserve": self.reserve, "total": self.total, "capacity": self.capacity,
                "headroom": self.headroom,
            },
            "fits": self.fits,
            "reason": self.reason,
            "notes": list(self.notes),
        }


def _canon_dtype(name: str, table: dict[str, int], what: str) -> str:
    key = DTYPE_ALIASES.get(str(name).lower(), str(name).lower())
    if key not in table:
        raise InvalidArgumentError(f"{what} must be one of {sorted(table)}, got {name!r}")
    return key


def reserve_bytes(gpus: GPUs, tp: int) -> int:
    fixed = 0 if gpus.kind == "cpu" else RESERVE_FIXED + (RESERVE_NCCL if tp > 1 else 0)
    return fixed + int(RESERVE_FRACTION * gpus.bytes_each)


def plan(
    cfg: ModelConfig,
    gpus: str | GPUs,
    quantize: str | None = None,
    dtype: str = "bf16",
    context: int = 8192,
    batch: int = 16,
    tp: int | None = None,
    ep: bool = False,
    group_size: int = 128,
    kv_dtype: str | None = None,
    prefill_chunk: int = 256,
    model: str = "",
) -> Plan:
    """Per-GPU memory of serving `cfg` with `batch` sequences of up to `context` tokens (engine: max_batch,
    max_model_len). tp defaults to the GPU count; fewer TP ranks than GPUs means count/tp replicas, each
    serving `batch`. A plan that does not fit carries `reason` (the overflowing term and what would fit)."""
    p = _compute(cfg, gpus, quantize, dtype, context, batch, tp, ep, group_size, kv_dtype, prefill_chunk, model)
    if not p.fits:
        p.reason = _explain(cfg, p)
    return p


def _compute(cfg, gpus, quantize, dtype, context, batch, tp, ep, group_size, kv_dtype, prefill_chunk, model) -> Plan:
    gpus = parse_gpus(gpus) if isinstance(gpus, str) else gpus
    quantize = None if quantize in (None, "", "none") else str(quantize).lower()
    if quantize is not None and quantize not in QUANTS:
        raise InvalidArgumentError(f"quantize must be one of {QUANTS} or none, got {quantize!r}")
    dtype = _canon_dtype(dtype, DTYPE_BYTES, "dtype")
    kv_dtype = _canon_dtype(kv_dtype or dtype, KV_DTYPE_BYTES, "kv_dtype")
    for name, value in (("context", context), ("batch", batch), ("group_size", group_size),
                        ("prefill_chunk", prefill_chunk)):
        if int(value) < 1:
            raise InvalidArgumentError(f"{name} must be >= 1, got {value}")
    if context > cfg.context_length:
        raise InvalidArgumentError(f"context {context} is longer than the model's {cfg.context_length} tokens")
    if quantize == "int4" and group_size not in INT4_GROUP_SIZES:
        raise InvalidArgumentError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    tp = gpus.count if tp is None else int(tp)
    if tp > gpus.count or gpus.count % tp:
        raise InvalidArgumentError(f"tp={tp} must divide the {gpus.count} GPU(s) (the rest run replicas)")
    shard = shard_of(cfg, tp, ep)
    notes = []
    if tp > cfg.num_kv_heads:
        notes.append(f"tp {tp} > {cfg.num_kv_heads} KV heads: each KV head is replicated on {tp // cfg.num_kv_heads} "
                     "ranks")
    if gpus.count > tp:
        notes.append(f"{gpus.count // tp} replicas of TP={tp}, each serving batch {batch}")
    if kv_dtype != dtype:
        notes.append(f"KV cache in {kv_dtype}; grokstack's engine stores it in the model dtype ({dtype}) today")
    if cfg.tie_word_embeddings:
        notes.append("tied embeddings: the head is the float embedding (nothing quantized or stored for lm_head)")
    if quantize:
        notes.append("router gate, norms and embeddings stay unquantized")
    return Plan(
        model=model or cfg.arch, gpus=gpus, tp=tp, ep=bool(ep), replicas=gpus.count // tp, quantize=quantize,
        dtype=dtype, kv_dtype=kv_dtype, context=int(context), batch=int(batch), group_size=int(group_size),
        prefill_chunk=int(prefill_chunk), shard=shard,
        weights=weight_bytes(cfg, shard, dtype, quantize, group_size),
        kv=kv_cache_bytes(cfg, shard, batch, context, kv_dtype),
        activations=activation_terms(cfg, shard, batch, context, dtype, quantize, prefill_chunk),
        reserve=reserve_bytes(gpus, tp), notes=notes,
    )


def _fits(cfg: ModelConfig, p: Plan, **changes: Any) -> bool:
    args = {
        "gpus": p.gpus, "quantize": p.quantize, "dtype": p.dtype, "context": p.context, "batch": p.batch,
        "tp": p.tp, "ep": p.ep, "group_size": p.group_size, "kv_dtype": p.kv_dtype,
        "prefill_chunk": p.prefill_chunk, "model": p.model,
    }
    args.update(changes)
    try:
        return _compute(cfg, **args).fits
    except InvalidArgumentError:
        return False


def _largest(cfg: ModelConfig, p: Plan, name: str, hi: int) -> int:
    """The largest value of `name` (context or batch) in 1..hi that fits, 0 if none (fits is monotone)."""
    if not _fits(cfg, p, **{name: 1}):
        return 0
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if _fits(cfg, p, **{name: mid}) else (lo, mid - 1)
    return lo


def _explain(cfg: ModelConfig, p: Plan) -> str:
    """Which term overflows (first of weights, KV cache, activations to cross the usable memory) and by
    how much, then what would make it fit."""
    usable = p.capacity - p.reserve
    terms = (("weights", "the weights overflow", p.weights_total), ("KV cache", "the KV cache overflows", p.kv_total),
             ("activations", "activations overflow", p.activations["peak"]))
    running, names, over, term = 0, [], "", "activations"
    for term, verb, nbytes in terms:
        running += nbytes
        names.append(term)
        if running > usable:
            over = (f"{verb}: {' + '.join(names)} = {_gb(running)} > {_gb(usable)} usable "
                    f"({_gb(p.capacity)} - {_gb(p.reserve)} reserve), over by {_gb(running - usable)}")
            break
    if term == "weights":
        big = max(p.weights, key=p.weights.get)
        over += f" (largest class: {big} {_gb(p.weights[big])})"
    fixes = []
    for count in (2, 4, 8, 16, 32, 64):
        n = p.gpus.count * count
        if n <= 64 and _fits(cfg, p, gpus=replace(p.gpus, count=n), tp=p.tp * count):
            fixes.append(f"{n} GPUs (tp {p.tp * count})")
            break
    if p.quantize != "int4" and _fits(cfg, p, quantize="int4"):
        fixes.append("--quantize int4")
    if term == "KV cache" and p.tp >= cfg.num_kv_heads and not fixes:
        fixes.append(f"(more TP ranks do not shrink the KV cache: {cfg.num_kv_heads} KV heads, one per rank already)")
    if term == "weights":
        fixes.append("(a smaller context or batch cannot help: the weights alone do not fit)")
    else:
        ctx = _largest(cfg, p, "context", p.context - 1)
        if ctx:
            fixes.append(f"context <= {ctx} at batch {p.batch}")
        b = _largest(cfg, p, "batch", p.batch - 1)
        if b:
            fixes.append(f"batch <= {b} at context {p.context}")
    return f"does not fit: {over}. Would fit with: " + ("; ".join(fixes) or "bigger GPUs (64 of these do not do)")


# ------------------------------------------------------------------------------------ model input
def config_for(ref: str | Path, config: str | Path | None = None) -> tuple[ModelConfig, str]:
    """The config of a preset ('grok-1', 'grok-2'), a known Hub id (planned offline as its preset), a local
    checkpoint (loading.inspect_checkpoint: no weights read) or another Hub id (its config.json only)."""
    name = str(ref)
    preset = HUB_ALIASES.get(name.lower(), name.lower())
    if preset in PRESETS and not Path(name).exists():
        if config is not None:  # a preset name with an explicit config file: the file wins
            from .config import load_config_file

            return load_config_file(Path(config)), name
        return PRESETS[preset](), name
    from .loading import inspect_checkpoint
    from .loading.hub import _HUB_ID, DEFAULT, resolve

    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").is_file() and config is None and not _has_weights(path):
        from .config import load_config_file  # people plan before they download the weights

        return load_config_file(path / "config.json"), name
    if name == DEFAULT or path.exists():
        return inspect_checkpoint(resolve(name), Path(config) if config else None).config, name
    if _HUB_ID.fullmatch(name) and ":" not in name:
        return _hub_config(name), name
    raise CheckpointError(
        f"cannot plan {name!r}: give grok-1, grok-2, xai-org/grok-2, a local checkpoint folder or .gguf file, "
        "or a Hub repository id with a config.json"
    )


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.gguf")) or (folder / "ckpt-0").exists()


def _hub_config(repo: str) -> ModelConfig:
    """Only the repository's config.json (kilobytes), never its weights."""
    from huggingface_hub import hf_hub_download

    from .config import load_config_file
    from .loading.hub import offline

    try:
        return load_config_file(Path(hf_hub_download(repo, "config.json", local_files_only=offline())))
    except Exception as exc:  # noqa: BLE001 - any Hub failure reads the same to the user
        raise CheckpointError(
            f"cannot get {repo}'s config.json ({type(exc).__name__}); pass a local checkpoint path instead"
        ) from None


def plan_for(model: str | Path, gpus: str | GPUs, config: str | Path | None = None, **kwargs: Any) -> Plan:
    """`plan` for a model reference: see `config_for`. kwargs are plan()'s."""
    cfg, name = config_for(model, config)
    return plan(cfg, gpus, model=name, **kwargs)


# ------------------------------------------------------------------------------------ the H200 question
def grok2_on_one_h200(gpus: str = "1x141GB", context: int = 8192) -> dict[str, Any]:
    """"Grok-2 on one 141 GB GPU with int4?" answered from the planner's own figures.

    Returns the int4 plans at `context` x batch 1 and x batch 16, the fewest GPUs of that size that run
    batch 16, and a one-paragraph answer. (With the defaults: no; weights alone ~144.8 GB; 2 GPUs do.)
    """
    cfg = grok2_preset()
    one = plan(cfg, gpus, quantize="int4", context=context, batch=1, model="grok-2")
    sixteen = plan(cfg, gpus, quantize="int4", context=context, batch=16, model="grok-2")
    base = parse_gpus(gpus)
    need = next(n for n in (1, 2, 4, 8, 16, 32, 64)
                if _fits(cfg, sixteen, gpus=replace(base, count=n), tp=n))
    w = one.weights_total
    verdict = "fits" if one.fits else "does not fit"
    answer = (
        f"Grok-2 int4 (group {one.group_size}, bf16 scales+zeros; embeddings bf16) needs {_gb(w)} of weights; "
        f"KV cache is {_gb(one.kv_total)} at {context} x 1 and {_gb(sixteen.kv_total)} at {context} x 16. "
        f"On one {_gb(base.bytes_each)} GPU it {verdict} at {context} x 1"
        + (f" ({one.reason.split('. Would fit')[0].removeprefix('does not fit: ')})" if one.reason else "")
        + f" and {'fits' if sixteen.fits else 'does not fit'} at {context} x 16. "
        f"It takes {need} such GPU(s) (tp {need}) to serve {context} x 16."
    )
    return {"weights": w, "batch1": one, "batch16": sixteen, "gpus_needed_batch16": need, "answer": answer}


# ------------------------------------------------------------------------------------ output
def _gb(n: int) -> str:
    return f"{n / GB:.2f} GB"


def format_plan(p: Plan) -> str:
    """A human table of the per-GPU plan."""
    q = p.quantize or "none"
    head = (
        f"{p.model}: {p.gpus.count} x {_gb(p.gpus.bytes_each)} ({p.gpus.kind}), tp {p.tp}"
        + (" + ep" if p.ep else "") + (f", {p.replicas} replicas" if p.replicas > 1 else "")
        + f"; weights {p.dtype}, quantize {q}" + (f" (group {p.group_size})" if p.quantize == "int4" else "")
        + f"; KV {p.kv_dtype}; context {p.context} x batch {p.batch}"
    )
    rows = [(f"  {name}", nbytes) for name, nbytes in p.weights.items() if nbytes]
    a = p.activations
    lines = [head, "per GPU:", f"{'weights':24s}{_gb(p.weights_total):>14s}"]
    lines += [f"{name:24s}{_gb(nbytes):>14s}" for name, nbytes in rows]
    lines += [
        f"{'KV cache':24s}{_gb(p.kv_total):>14s}   k+v {_gb(p.kv['kv'])}, key_valid {_gb(p.kv['key_valid'])}"
        f"; {p.shard.kv_heads} KV head(s) here",
        f"{'activations':24s}{_gb(a['peak']):>14s}   max(prefill {_gb(a['prefill'])}, decode {_gb(a['decode'])}, "
        f"logits {_gb(a['logits'])}) + quant workspace {_gb(a['quant_workspace'])}",
        f"{'reserve':24s}{_gb(p.reserve):>14s}   CUDA context/workspaces + {RESERVE_FRACTION:.0%} of capacity",
        f"{'total':24s}{_gb(p.total):>14s}",
        f"{'capacity':24s}{_gb(p.capacity):>14s}",
        (f"FITS, {_gb(p.headroom)} free" if p.fits else f"DOES NOT FIT, short by {_gb(-p.headroom)}"),
    ]
    if p.reason:
        lines.append(p.reason)
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ CLI
def add_plan_args(parser: argparse.ArgumentParser) -> None:
    """Options of `grokstack plan`."""
    parser.add_argument("--model", required=True,
                        help="grok-1, grok-2, xai-org/grok-2 (planned offline), a checkpoint folder or .gguf")
    parser.add_argument("--config", help="config JSON for a checkpoint folder")
    parser.add_argument("--gpus", required=True, help="COUNTxSIZE, e.g. 8x80GB, 1x141GB, 2x24GiB (GB = 1e9 B)")
    parser.add_argument("--quantize", choices=["none", *QUANTS], default="none", help="weight-only quantization")
    parser.add_argument("--dtype", default="bf16", help="weights/activations dtype: bf16, fp16 or fp32")
    parser.add_argument("--kv-dtype", help="KV cache dtype (default: --dtype)")
    parser.add_argument("--context", type=int, default=None,
                        help="max tokens per sequence (default min(8192, the model's context))")
    parser.add_argument("--batch", type=int, default=16, help="sequences served at once (engine max_batch)")
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel ranks (default: all GPUs)")
    parser.add_argument("--ep", action="store_true", help="expert parallelism: whole experts per rank")
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size")
    parser.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per prefill step")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the plan; exit 0 if it fits, NO_FIT_EXIT (4) if not (1-3 mean errors in cli.main)."""
    cfg, name = config_for(args.model, args.config)
    context = args.context if args.context is not None else min(8192, cfg.context_length)
    p = plan(
        cfg, args.gpus, quantize=args.quantize, dtype=args.dtype, context=context, batch=args.batch, tp=args.tp,
        ep=args.ep, group_size=args.group_size, kv_dtype=args.kv_dtype, prefill_chunk=args.prefill_chunk,
        model=name,
    )
    sys.stdout.write((json.dumps(p.to_dict(), indent=2) if args.json else format_plan(p)) + "\n")
    return 0 if p.fits else NO_FIT_EXIT
