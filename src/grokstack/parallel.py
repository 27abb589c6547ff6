"""Tensor and expert parallelism over `torch.distributed` (launched with `torchrun`), and TP serving.

Megatron-style split of one model over `world` ranks:
- attention by heads: each rank holds num_heads / world query heads and the KV heads they read (split
  when world divides num_kv_heads, one replicated KV head per rank when world is a multiple of it);
  o_proj holds the matching input columns, so its output is a partial sum;
- dense MLP: gate/up rows and down columns of the intermediate dim (partial sum);
- experts: "tp" splits every expert's intermediate dim F as the Grok-2 release does (w1/w3 rows, w2
  columns); "ep" gives each rank whole experts `first .. first + E/world - 1`. Either way a partial sum;
- router, norms, embeddings and lm_head are replicated.

Partial sums are all-reduced by forward hooks, so the model keeps its modules, types and parameter
names (quant.py's module swaps, the loaders' `param_for` and `forced_experts` work unchanged): the
attention output is reduced as it leaves `self_attn`, the FFN's where it enters `post_moe_norm` (one
all-reduce for Grok-2's dense + MoE sum), or, in pre-norm models, as it leaves each FFN module.

Serving: rank 0 schedules. Its engines run on a `LeadingRunner`, which broadcasts every step plan (rows,
positions, block tables, block copies) to the other ranks before running it; they run the same plans on
their own runners and paged caches in `follow` until `Lead.stop()`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import re
import threading
import weakref
from collections import defaultdict
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from .config import ModelConfig
from .errors import CheckpointError, ConfigError, InvalidArgumentError
from .kv_cache import PagedKV
from .lm import LM, _tokenizer_for, parse_dtype
from .loading import Checkpoint, inspect_checkpoint, load_weights
from .loading.hub import resolve
from .loading.safetensors_folder import SPLIT_DIM, TP_FILE, _check_complete, _plan, open_safetensors
from .model import Transformer
from .runner import Runner
from .scheduler import StepPlan

log = logging.getLogger("grokstack")

MODES = ("tp", "ep")
COMMAND_TIMEOUT = timedelta(days=365)  # followers wait on the command channel while the server idles
_EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")


# ------------------------------------------------------------------------------ context
@dataclasses.dataclass
class ParallelContext:
    """This process's place in the job. `group` carries the all-reduces (None = the default group),
    `commands` the serving commands (a gloo group, so idle followers wait on the CPU)."""

    rank: int
    world: int
    mode: str = "tp"  # "tp" | "ep": how the experts are split; attention and dense MLP are always TP
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    group: Any = None
    commands: Any = None


def init_distributed(
    backend: str | None = None, mode: str = "tp", world: int | None = None, device: str | torch.device | None = None
) -> ParallelContext:
    """Join the torchrun job described by RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.

    gloo on CPU, nccl on CUDA (with this process's device set: cuda:LOCAL_RANK unless `device` says
    otherwise). Outside torchrun (no WORLD_SIZE) this is a one-rank context with no process group.
    `world` is what the user asked for (`--tp N`); it must match the job.
    """
    if mode not in MODES:
        raise InvalidArgumentError(f"parallel mode must be one of {MODES}, not {mode!r}")
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if world is not None and world != size:
        raise InvalidArgumentError(
            f"--tp {world} needs {world} processes; start it as `torchrun --nproc-per-node {world} "
            f"-m grokstack.cli ...` (this job has {size})"
        )
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if size == 1 and not dist.is_initialized():
        return ParallelContext(0, 1, mode, device)
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise InvalidArgumentError(f"{', '.join(missing)} not set: start the job with torchrun")
        dist.init_process_group(
            backend, rank=int(os.environ["RANK"]), world_size=size, device_id=device if backend == "nccl" else None
        )
    commands = dist.new_group(backend="gloo", timeout=COMMAND_TIMEOUT)
    return ParallelContext(dist.get_rank(), dist.get_world_size(), mode, device, None, commands)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------ the split
def check_split(cfg: ModelConfig, ctx: ParallelContext) -> None:
    """Raise ConfigError unless this model splits evenly over ctx.world ranks in ctx.mode."""
    w = ctx.world
    if ctx.mode not in MODES:
        raise InvalidArgumentError(f"parallel mode must be one of {MODES}, not {ctx.mode!r}")
    if not 0 <= ctx.rank < w:
        raise InvalidArgumentError(f"rank {ctx.rank} is outside 0..{w - 1}")
    if w == 1:
        return

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ConfigError(f"this model cannot be split over {w} ranks: {what}")

    need(cfg.num_heads % w == 0, f"{cfg.num_heads} attention heads do not divide by {w}")
    hkv = cfg.num_kv_heads
    need(
        hkv % w == 0 if w <= hkv else w % hkv == 0,
        f"{hkv} KV heads: the rank count must divide them or be a multiple of them",
    )
    if cfg.has_dense_mlp:
        need(cfg.intermediate_size % w == 0, f"dense intermediate size {cfg.intermediate_size} does not divide")
    if cfg.num_experts and ctx.mode == "tp":
        need(cfg.moe_intermediate_size % w == 0, f"expert size {cfg.moe_intermediate_size} does not divide")
    if cfg.num_experts and ctx.mode == "ep":
        need(cfg.num_experts % w == 0, f"expert parallelism needs the rank count to divide {cfg.num_experts} experts")


def local_config(cfg: ModelConfig, ctx: ParallelContext) -> ModelConfig:
    """The config of one rank's slice: heads and intermediate sizes divided; vocab, ids, caps and the
    router's expert count stay global (the KV cache and the engine read this one)."""
    check_split(cfg, ctx)
    w = ctx.world
    if w == 1:
        return cfg
    return dataclasses.replace(
        cfg,
        num_heads=cfg.num_heads // w,
        num_kv_heads=max(1, cfg.num_kv_heads // w),
        intermediate_size=cfg.intermediate_size // w,
        moe_intermediate_size=cfg.moe_intermediate_size // w if ctx.mode == "tp" else cfg.moe_intermediate_size,
    )


def kv_heads(cfg: ModelConfig, ctx: ParallelContext) -> tuple[int, int]:
    """(first, count) of the KV heads this rank holds: its own share, or the one its query heads read."""
    w, hkv = ctx.world, cfg.num_kv_heads
    if w <= hkv:
        return ctx.rank * (hkv // w), hkv // w
    group = cfg.num_heads // hkv  # query head h reads kv head h // group
    return ctx.rank * (cfg.num_heads // w) // group, 1


class Shard(NamedTuple):
    dim: int
    start: int
    size: int


def shard_of(name: str, cfg: ModelConfig, ctx: ParallelContext) -> Shard | None:
    """The slice of full-model parameter `name` (Transformer naming) this rank holds; None = all of it."""
    w, r = ctx.world, ctx.rank
    if w == 1:
        return None
    hd, hq = cfg.head_dim, cfg.num_heads // w
    if name.endswith("self_attn.q_proj.weight"):
        return Shard(0, r * hq * hd, hq * hd)
    if name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
        first, n = kv_heads(cfg, ctx)
        return Shard(0, first * hd, n * hd)
    if name.endswith("self_attn.o_proj.weight"):
        return Shard(1, r * hq * hd, hq * hd)
    i = cfg.intermediate_size // w
    if name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")):
        return Shard(0, r * i, i)
    if name.endswith("mlp.down_proj.weight"):
        return Shard(1, r * i, i)
    if name.endswith(("experts.w1", "experts.w2", "experts.w3")):
        if ctx.mode == "ep":
            e = cfg.num_experts // w
            return Shard(0, r * e, e)  # [E, ...]: whole experts
        f = cfg.moe_intermediate_size // w
        return Shard(2 if name.endswith("w2") else 1, r * f, f)  # w1/w3 [E, F, D], w2 [E, D, F]
    return None


# ------------------------------------------------------------------------------ all-reduce hooks
def all_reduce(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    dist.all_reduce(x, group=group)
    return x


class _SumOverRanks:
    """Forward hooks turning a module's partial output (or input) into the sum over all ranks."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def output(self, module, args, out: torch.Tensor) -> torch.Tensor:
        return all_reduce(out, self.group)

    def input(self, module, args: tuple) -> tuple:
        return (all_reduce(args[0], self.group), *args[1:])


def _install_reductions(model: Transformer, ctx: ParallelContext) -> None:
    hook = _SumOverRanks(ctx.group)
    for layer in model.layers:
        layer.self_attn.register_forward_hook(hook.output)
        if layer.post_moe_norm is not None:  # the FFN's (dense + MoE) partial sum enters this norm
            layer.post_moe_norm.register_forward_pre_hook(hook.input)
            continue
        for ffn in (layer.mlp, layer.block_sparse_moe):
            if ffn is not None:
                ffn.register_forward_hook(hook.output)


def _become_local(model: Transformer, cfg: ModelConfig, ctx: ParallelContext) -> Transformer:
    """Point every module at the rank-local config, set the expert range and add the all-reduces."""
    local = local_config(cfg, ctx)
    model.cfg = local
    for layer in model.layers:
        layer.self_attn.cfg = local
        if layer.mlp is not None:
            layer.mlp.cfg = local
        if layer.block_sparse_moe is not None:
            layer.block_sparse_moe.cfg = local
            experts = layer.block_sparse_moe.experts
            experts.first = ctx.rank * experts.count if ctx.mode == "ep" and ctx.world > 1 else 0
        for linear in layer.modules():
            if isinstance(linear, torch.nn.Linear):
                linear.out_features, linear.in_features = linear.weight.shape
    if ctx.world > 1:
        _install_reductions(model, ctx)
    model.parallel = ctx
    return model.requires_grad_(False)  # inference only: the all-reduces are in place, outside autograd


@torch.no_grad()
def shard_model(model: Transformer, ctx: ParallelContext) -> Transformer:
    """Cut a full float model down to this rank's slice, in place (for tests and small models).

    Quantize after sharding, never before: the slices are taken from the float weights."""
    if getattr(model, "parallel", None) is not None:
        raise InvalidArgumentError("this model is already sharded")
    cfg = model.cfg
    check_split(cfg, ctx)
    for name, p in model.named_parameters():
        s = shard_of(name, cfg, ctx)
        if s is not None:
            p.data = p.data.narrow(s.dim, s.start, s.size).clone()
    return _become_local(model, cfg, ctx)


# ------------------------------------------------------------------------------ loading
def _local_skeleton(cfg: ModelConfig, ctx: ParallelContext, dtype: torch.dtype) -> Transformer:
    """This rank's model with allocated, unset weights: built on the meta device, then given storage."""
    with torch.device("meta"):
        model = Transformer(local_config(cfg, ctx), dtype)
    if ctx.mode == "ep" and ctx.world > 1:
        for i, layer in enumerate(model.layers):
            experts = layer.block_sparse_moe.experts
            for w in ("w1", "w2", "w3"):
                s = shard_of(f"layers.{i}.block_sparse_moe.experts.{w}", cfg, ctx)
                p = getattr(experts, w)
                p.data = p.data.narrow(s.dim, s.start, s.size)
    return model.to_empty(device=ctx.device)


class _Read(NamedTuple):
    name: str
    index: tuple  # what to take from the stored tensor
    target: torch.Tensor  # where it goes in the local model (a view)


def _whole_read(model: Transformer, cfg: ModelConfig, ctx: ParallelContext, name: str) -> _Read | None:
    """The part of a stored whole tensor this rank needs, or None."""
    m = _EXPERT.fullmatch(name)
    if m is None:
        pname = name.removeprefix("model.")
        target = model.get_parameter(pname).data
        s = shard_of(pname, cfg, ctx)
        index = () if s is None else (slice(None),) * s.dim + (slice(s.start, s.start + s.size),)
        return _Read(name, index, target)
    layer, e, w = int(m[1]), int(m[2]), m[3]
    stacked = getattr(model.layers[layer].block_sparse_moe.experts, w).data
    s = shard_of(f"layers.{layer}.block_sparse_moe.experts.{w}", cfg, ctx)
    if s is None:
        return _Read(name, (), stacked[e])
    if s.dim == 0:  # whole experts: only this rank's
        return _Read(name, (), stacked[e - s.start]) if s.start <= e < s.start + s.size else None
    d = s.dim - 1  # the stacked dim minus the expert dim
    return _Read(name, (slice(None),) * d + (slice(s.start, s.start + s.size),), stacked[e])


def _shard_reads(
    model: Transformer, cfg: ModelConfig, ctx: ParallelContext, name: str, files: dict[int, Path], tp: int
) -> tuple[list[tuple[Path, _Read]], int]:
    """Reads of release shards k = 0..tp-1 of expert tensor `name` that overlap this rank's range,
    and how many rows of the split dim this rank needs in all (0: not its expert)."""
    m = _EXPERT.fullmatch(name)
    layer, e, w = int(m[1]), int(m[2]), m[3]
    full = cfg.moe_intermediate_size
    if full % tp:
        stem = TP_FILE.fullmatch(next(iter(files.values())).name)["stem"]
        raise CheckpointError(
            f"{name!r}: {full} rows do not split into the {tp} TP shards found; a last shard file "
            f"({stem}-TP-{tp:03d}.safetensors) may be missing"
        )
    size = full // tp
    d = SPLIT_DIM[w]  # of the stored [F, D] / [D, F] tensor
    stacked = getattr(model.layers[layer].block_sparse_moe.experts, w).data
    s = shard_of(f"layers.{layer}.block_sparse_moe.experts.{w}", cfg, ctx)
    if s is None or s.dim == 0:  # whole experts
        if s is not None and not s.start <= e < s.start + s.size:
            return [], 0
        target, lo, hi = stacked[e if s is None else e - s.start], 0, full
    else:
        target, lo, hi = stacked[e], s.start, s.start + s.size
    reads = []
    for k, file in sorted(files.items()):
        a, b = max(lo, k * size), min(hi, (k + 1) * size)
        if a < b:
            index = (slice(None),) * d + (slice(a - k * size, b - k * size),)
            reads.append((file, _Read(name, index, target.narrow(d, a - lo, b - a))))
    return reads, hi - lo


@torch.no_grad()
def _load_safetensors_local(path: Path, cfg: ModelConfig, ctx: ParallelContext, dtype: torch.dtype) -> Transformer:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no .safetensors files")
    # Every rank checks the whole plan from the headers (a few KB a file), so a missing shard fails
    # on every rank with the same message; tensor data is then read only where this rank needs it.
    whole, shards = _plan(files)
    tp = _check_complete(cfg, whole, shards, files)
    model = _local_skeleton(cfg, ctx, dtype)
    by_file: dict[Path, list[_Read]] = defaultdict(list)
    for name, file in whole.items():
        read = _whole_read(model, cfg, ctx, name)
        if read is not None:
            by_file[file].append(read)
    need: dict[str, int] = {}
    for name, parts in shards.items():
        reads, rows = _shard_reads(model, cfg, ctx, name, parts, tp)
        if rows:
            need[name] = rows
        for file, read in reads:
            by_file[file].append(read)
    got: dict[str, int] = defaultdict(int)
    for file in files:
        if not by_file[file]:
            continue
        m = TP_FILE.fullmatch(file.name)
        sharded = bool(m) and m["part"] != "common"
        with open_safetensors(file) as st:
            for read in by_file[file]:
                tensor = st.get_slice(read.name)[read.index] if read.index else st.get_tensor(read.name)
                if tuple(tensor.shape) != tuple(read.target.shape):
                    raise CheckpointError(
                        f"{file.name}: {read.name!r} gives a slice of shape {list(tensor.shape)}, this rank "
                        f"expects {list(read.target.shape)}"
                    )
                read.target.copy_(tensor)
                if sharded:
                    got[read.name] += tensor.shape[SPLIT_DIM[_EXPERT.fullmatch(read.name)[3]]]
    short = [n for n, rows in need.items() if got[n] != rows]
    if short:  # the guard against loading part of the experts (sglang#36438)
        raise CheckpointError(f"rank {ctx.rank}: expert tensor(s) {short[:3]} were only partly loaded")
    return _become_local(model, cfg, ctx)


def load_sharded(
    path: str | Path,
    ctx: ParallelContext,
    dtype: torch.dtype | str = torch.float32,
    config: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Transformer:
    """This rank's slice of a checkpoint, ready to run under ctx.

    Safetensors folders (presharded like Grok-2's release or not) are read slice by slice into a
    model built for this rank: at TP = the release's TP, rank k reads tensor data from the common
    files and its own `-TP-00k` files only; at other sizes it reads the release slices covering its
    range (narrowing them where needed). Grok-1 `ckpt-0/` and GGUF files are loaded whole on every
    rank, then cut down (convert them with `grokstack convert --preshard` to load big ones per rank).
    """
    return _load_checkpoint(_inspect(path, config, overrides), ctx, dtype)


def _inspect(path: str | Path, config: str | Path | None, overrides: dict[str, Any] | None) -> Checkpoint:
    ckpt = inspect_checkpoint(Path(path), Path(config) if config else None)
    if overrides:
        ckpt.config = ckpt.config.with_overrides(overrides)
    return ckpt


def _load_checkpoint(ckpt: Checkpoint, ctx: ParallelContext, dtype: torch.dtype | str) -> Transformer:
    dtype = parse_dtype(dtype)
    check_split(ckpt.config, ctx)
    if ckpt.format == "safetensors":
        model = _load_safetensors_local(ckpt.path, ckpt.config, ctx, dtype)
    else:
        model = shard_model(load_weights(ckpt, dtype), ctx).to(ctx.device)
    return model.eval()


def load_lm(
    ref: str | Path, ctx: ParallelContext, dtype: torch.dtype | str = "float32", config: str | Path | None = None,
    **overrides: Any,
) -> LM:
    """`grokstack.load` for one rank: an LM over this rank's sharded model and the checkpoint's tokenizer."""
    ckpt = _inspect(resolve(ref), config, overrides)
    model = _load_checkpoint(ckpt, ctx, dtype)
    license = ckpt.gguf.metadata.get("general.license") if ckpt.gguf is not None else None
    return LM(model, _tokenizer_for(ckpt), ckpt.path, str(license) if license else None)


# ------------------------------------------------------------------------------ serving
def _send(ctx: ParallelContext, command: tuple) -> None:
    if ctx.world > 1:
        dist.broadcast_object_list([command], src=0, group=ctx.commands)


def _receive(ctx: ParallelContext) -> tuple:
    box: list = [None]
    dist.broadcast_object_list(box, src=0, group=ctx.commands)
    return box[0]


class Lead:
    """Rank 0's end of the command channel. Each engine's runner is a `LeadingRunner`: every step plan goes to
    the other ranks before it runs here, so all ranks run the same collectives in the same order; their
    runners keep KV caches with the same blocks. Logits need no collective (lm_head is replicated)."""

    def __init__(self, ctx: ParallelContext) -> None:
        if ctx.rank != 0:
            raise InvalidArgumentError("only rank 0 leads; the other ranks call follow()")
        self.ctx = ctx
        self.lock = threading.Lock()  # one command and its collectives at a time, whatever the thread
        self._ids = itertools.count()
        self._live: dict[int, weakref.ref] = {}
        self._stopped = False

    def send(self, command: tuple) -> None:
        if self._stopped:
            raise RuntimeError("the followers were stopped")
        _send(self.ctx, command)

    def runner_for(self, model: Transformer) -> Callable[[PagedKV], Runner]:
        def make(kv: PagedKV) -> Runner:
            with self.lock:
                gone = [cid for cid, ref in self._live.items() if ref() is None]  # engines no longer used
                for cid in gone:
                    del self._live[cid]
                runner = LeadingRunner(model, kv, self, next(self._ids))
                self.send(("cache", runner.id, kv.num_blocks, kv.block_size, gone))
                self._live[runner.id] = weakref.ref(runner)
                return runner

        return make

    def stop(self) -> None:
        """Release the followers (their `follow` returns); call once, when serving ends."""
        with self.lock:
            if not self._stopped:
                _send(self.ctx, ("stop",))
                self._stopped = True


class LeadingRunner(Runner):
    def __init__(self, model: Transformer, kv: PagedKV, lead: Lead, id: int) -> None:
        super().__init__(model, kv)
        self.lead = lead
        self.id = id

    def forward(self, plan: StepPlan) -> tuple[torch.Tensor | None, list[int]]:
        with self.lead.lock:
            self.lead.send(("step", self.id, plan))
            return super().forward(plan)


def lead(lm: LM, ctx: ParallelContext) -> tuple[LM, Lead]:
    """Rank 0: the LM whose engines lead the other ranks, and the lead to `stop` when done."""
    leader = Lead(ctx)
    return lm.with_runner(leader.runner_for(lm.model)), leader


@torch.no_grad()
def follow(model: Transformer, ctx: ParallelContext) -> int:
    """Ranks 1..N-1: run rank 0's step plans on this rank's model and caches until `stop`.

    Returns the number of steps run. A step that fails here fails on the leader too (same inputs, same
    checks before any collective), so the error is logged and the loop goes on.
    """
    runners: dict[int, Runner] = {}
    steps = 0
    while True:
        op, *args = _receive(ctx)
        if op == "stop":
            return steps
        try:
            if op == "cache":
                cid, num_blocks, block_size, gone = args
                for old in gone:
                    runners.pop(old, None)
                runners[cid] = Runner(model, PagedKV(model.cfg, num_blocks, block_size, model.dtype, ctx.device))
            elif op == "step":
                cid, plan = args
                runners[cid].forward(plan)
                steps += 1
            else:
                raise ValueError(f"unknown command {op!r}")
        except Exception:  # noqa: BLE001 - the leader reports it to its request
            log.exception("rank %d: command %r failed", ctx.rank, op)
