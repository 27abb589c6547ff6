"""Weight-only quantization: int8 (per-channel), int4 (group-wise, asymmetric) and fp8 (e4m3, per-channel).

`quantize_model` turns every `nn.Linear` of the transformer (attention q/k/v/o, the dense MLP, an untied
lm_head) into a `QuantLinear` and every expert stack into a `QuantExperts`. The router gate
(`block_sparse_moe.gate`), the embedding, the norms and therefore a tied head stay float: the router
decides which experts run, and the embedding is a lookup, not a matmul.

Each quantized matrix W [N, K] lives in two forms:
- storage form, device-independent and what a checkpoint holds (`<name>.weight.qweight`, `.scales`, `.zeros`):
  int8 qweight int8 [N, K] + scales bf16 [N];  fp8 qweight float8_e4m3fn [N, K] + scales fp32 [N];
  int4 qweight uint8 [N, Kp/2] (two codes a byte, even column in the high nibble; K padded to Kp, a multiple
  of the group size) + scales, zeros bf16 [N, Kp/g] with W ~= (q - 8) * scale + zero (tinygemm's convention);
- runtime form, what the kernels read: the same tensors for int8/fp8; for int4 the device-specific layout
  of `_convert_weight_to_int4pack[_for_cpu]` + scales_and_zeros bf16 [Kp/g, Np, 2] (N padded to Np, a
  multiple of 16). It is packed on the device the module sits on and repacked when the module moves.

Kernels: int8 `torch._weight_int8pack_mm` on CPU (on CUDA, chunks of W dequantized to bf16 for cuBLAS; see
INT8_CUDA_KERNEL); int4 `_weight_int4pack_mm_for_cpu` / `_weight_int4pack_mm`; all run with bf16 activations (the
CPU kernels are 5-50x slower with fp32 ones, the CUDA int4 one takes bf16 only), output cast back to the model
dtype. fp8 on CUDA: `torch._scaled_mm` with per-token fp8 activations (W8A8, row-wise scales; tensor-wise if
row-wise is refused); on CPU, and on CUDA for dims that are not multiples of 16, it is emulated weight-only:
chunks of W are converted to the activation dtype per call.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .errors import CheckpointError, InvalidArgumentError
from .model import Experts, MoE, Transformer

MODES = ("int8", "int4", "fp8")
GROUP_SIZES = (32, 64, 128, 256)
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
CHUNK_ELEMS = 1 << 22  # weight elements one quantize / emulation step turns into floats (16 MiB in fp32)
CUDA_CHUNK_ELEMS = 1 << 26  # the same for a dequantized matmul on a GPU: fewer, larger cuBLAS calls
PART_SUFFIXES = {"int8": ("qweight", "scales"), "fp8": ("qweight", "scales"), "int4": ("qweight", "scales", "zeros")}
EXAMPLE_SPEC = '{"mode": "int4", "group_size": 128}'
ROW_BLOCK = 64  # int4 layouts keep blocks of 64 rows contiguous (CPU: 32/64-row blocks, CUDA: 8-row tiles)


@dataclass(frozen=True)
class QuantSpec:
    mode: str
    group_size: int = 128

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidArgumentError(f"unknown quantization mode {self.mode!r}; use one of {', '.join(MODES)}")
        if self.group_size not in GROUP_SIZES:
            raise InvalidArgumentError(
                f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {self.group_size}"
            )

    def to_json(self) -> dict:
        return {"mode": self.mode, "group_size": self.group_size}


def padded(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _row_slices(n: int, k: int, elems: int = CHUNK_ELEMS) -> list[slice]:
    """Slices of rows of an [n, k] matrix holding about `elems` elements each."""
    rows = max(1, elems // max(1, k))
    return [slice(r, r + rows) for r in range(0, n, rows)]


# ------------------------------------------------------------------------------ storage form
def quantize_matrix(w: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """Storage form of one float matrix w [N, K], computed in fp32 a chunk of rows at a time."""
    parts = [_QUANTIZERS[spec.mode](w[rows].float(), spec) for rows in _row_slices(*w.shape)]
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


def _quantize_int8(w: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    # The scale is rounded to bf16 (the kernels' dtype) first, and the codes computed with the rounded one.
    scales = (w.abs().amax(-1) / 127).clamp(min=1e-12).to(torch.bfloat16)  # [N]
    q = (w / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
    return {"qweight": q, "scales": scales}


def _quantize_int4(w: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    n, k = w.shape
    g = spec.group_size
    wg = F.pad(w, (0, padded(k, g) - k)).view(n, -1, g)  # [N, G, g]; padding columns quantize zeros
    lo, hi = wg.amin(-1), wg.amax(-1)  # [N, G]
    scales = ((hi - lo) / 15).clamp(min=1e-12).to(torch.bfloat16)
    zeros = (lo + 8 * scales.float()).to(torch.bfloat16)  # W = (q - 8) * scale + zero, so q = 0 is lo
    base = zeros.float() - 8 * scales.float()
    q = ((wg - base[..., None]) / scales.float()[..., None]).round().clamp(0, 15).to(torch.uint8).view(n, -1)
    return {"qweight": (q[:, 0::2] << 4) | q[:, 1::2], "scales": scales, "zeros": zeros}


def _quantize_fp8(w: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    scales = (w.abs().amax(-1) / FP8_MAX).clamp(min=1e-12)  # [N] fp32: _scaled_mm takes fp32 scales
    return {"qweight": (w / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), "scales": scales}


_QUANTIZERS = {"int8": _quantize_int8, "int4": _quantize_int4, "fp8": _quantize_fp8}


def dequantize(storage: dict[str, torch.Tensor], spec: QuantSpec, in_features: int) -> torch.Tensor:
    """fp32 [N, K] from the storage form: the reference every quantized matmul approximates."""
    q, s = storage["qweight"], storage["scales"].float()
    if spec.mode != "int4":
        return q.float() * s[:, None]
    codes = torch.stack([q >> 4, q & 15], dim=-1).view(q.shape[0], -1).float()  # [N, Kp]
    g = spec.group_size
    w = (codes.view(q.shape[0], -1, g) - 8) * s[..., None] + storage["zeros"].float()[..., None]
    return w.view(q.shape[0], -1)[:, :in_features]


def storage_shapes(spec: QuantSpec, n: int, k: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of each storage tensor of a [N, K] matrix (what a checkpoint must hold)."""
    if spec.mode == "int8":
        return {"qweight": ((n, k), torch.int8), "scales": ((n,), torch.bfloat16)}
    if spec.mode == "fp8":
        return {"qweight": ((n, k), FP8), "scales": ((n,), torch.float32)}
    kp = padded(k, spec.group_size)
    groups = kp // spec.group_size
    return {
        "qweight": ((n, kp // 2), torch.uint8),
        "scales": ((n, groups), torch.bfloat16),
        "zeros": ((n, groups), torch.bfloat16),
    }


# ------------------------------------------------------------------------------ int4 layouts
def _inner_k_tiles(kp: int) -> int:
    return 8 if kp % 128 == 0 else 4 if kp % 64 == 0 else 2


def _pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """The kernel layout of storage-form codes uint8 [R, Kp/2] (R a multiple of 16), on their device."""
    kt = _inner_k_tiles(codes.shape[1] * 2)
    if codes.device.type == "cuda":
        return torch._convert_weight_to_int4pack(codes.contiguous(), kt)
    if codes.device.type != "cpu":
        raise InvalidArgumentError(f"int4 kernels exist for cpu and cuda only, not {codes.device.type}")
    values = torch.stack([codes >> 4, codes & 15], dim=-1).view(codes.shape[0], -1).to(torch.int32)  # [R, Kp]
    return torch._convert_weight_to_int4pack_for_cpu(values, kt)


@lru_cache(maxsize=32)
def _layout_positions(rows: int, kp: int, device: str) -> torch.Tensor:
    """For each nibble of the packed form of a [rows, kp] block (low nibble first), the flat index of the
    code it holds. Found by packing the digits (base 16) of each position's own index: the layouts are
    pure nibble permutations that differ by device and CPU capability, so they are probed, not hard-coded."""
    index = torch.arange(rows * kp, device=device)
    where = torch.zeros(rows * kp, dtype=torch.int64, device=device)
    for d in range(math.ceil(max(1, (rows * kp - 1).bit_length()) / 4)):
        digit = ((index >> (4 * d)) & 15).to(torch.uint8).view(rows, kp)
        packed = _pack_int4((digit[:, 0::2] << 4) | digit[:, 1::2]).reshape(-1).view(torch.uint8)
        where |= torch.stack([packed & 15, packed >> 4], dim=-1).view(-1).long() << (4 * d)
    return where


def _unpack_int4(packed: torch.Tensor, rows: int, kp: int) -> torch.Tensor:
    """Storage-form codes uint8 [rows, Kp/2] back from the kernel layout of a [rows, Kp] matrix (rows a
    multiple of 16), block by block of ROW_BLOCK rows; checked by packing the result again."""
    flat = packed.reshape(-1).view(torch.uint8)  # rows * kp / 2 bytes in every layout
    out = torch.empty(rows * kp, dtype=torch.uint8, device=packed.device)
    full = rows // ROW_BLOCK * ROW_BLOCK
    for r0, r1 in ((0, full), (full, rows)):
        if r1 == r0:
            continue
        size = min(ROW_BLOCK, r1 - r0)
        nib = flat[r0 * kp // 2 : r1 * kp // 2].view(-1, size * kp // 2)
        nib = torch.stack([nib & 15, nib >> 4], dim=-1).view(-1, size * kp)  # [blocks, size * kp]
        block = torch.empty_like(nib)
        block[:, _layout_positions(size, kp, str(packed.device))] = nib
        out[r0 * kp : r1 * kp] = block.view(-1)
    values = out.view(rows, kp)
    codes = (values[:, 0::2] << 4) | values[:, 1::2]
    if not torch.equal(_pack_int4(codes).reshape(-1).view(torch.uint8), flat):
        raise RuntimeError("unrecognised int4 kernel layout: cannot unpack (this torch packs rows differently)")
    return codes


# ------------------------------------------------------------------------------ runtime form
def pack(storage: dict[str, torch.Tensor], spec: QuantSpec) -> dict[str, torch.Tensor]:
    """Runtime form of one matrix, on the device its storage tensors are on."""
    if spec.mode != "int4":
        return dict(storage)
    q = storage["qweight"]
    n, np_ = q.shape[0], padded(q.shape[0], 16)
    sz = torch.stack([storage["scales"], storage["zeros"]], dim=-1).transpose(0, 1)  # [G, N, 2]
    return {
        "qweight": _pack_int4(F.pad(q, (0, 0, 0, np_ - n))),
        "scales_and_zeros": F.pad(sz, (0, 0, 0, np_ - n)).contiguous(),  # [G, Np, 2]
    }


def unpack(runtime: dict[str, torch.Tensor], spec: QuantSpec, n: int, k: int) -> dict[str, torch.Tensor]:
    """Storage form of one matrix from its runtime form, on the same device."""
    if spec.mode != "int4":
        return {name: t.clone() for name, t in runtime.items()}
    kp = padded(k, spec.group_size)
    codes = _unpack_int4(runtime["qweight"], padded(n, 16), kp)[:n]
    sz = runtime["scales_and_zeros"][:, :n]  # [G, N, 2]
    return {"qweight": codes, "scales": sz[..., 0].T.contiguous(), "zeros": sz[..., 1].T.contiguous()}


# ------------------------------------------------------------------------------ matmuls
# torch 2.11's CUDA _weight_int8pack_mm reads W at 1-5 % of an H200's HBM bandwidth (benchmarks/gpu_quant.py), so
# CUDA converts chunks of W to bf16 for cuBLAS instead (~1/2.5 of bf16's speed, half its memory). Set this to
# True where a newer torch's kernel measures faster.
INT8_CUDA_KERNEL = False
_INT8_KERNEL: dict[str, bool] = {}  # device type -> whether torch._weight_int8pack_mm ran there


def _int8_mm(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    # The CPU kernel crashes or errs with bf16 activations unless K % 16 == 0 (torch 2.13), and an older torch
    # or another device may lack it: those fall back to a chunk-wise dequantized matmul, never the whole W.
    kind = x.device.type
    wanted = kind == "cpu" or (kind == "cuda" and INT8_CUDA_KERNEL)
    if wanted and q.shape[1] % 16 == 0 and _INT8_KERNEL.get(kind, hasattr(torch, "_weight_int8pack_mm")):
        xb = x.to(torch.bfloat16).contiguous()
        try:
            out = torch._weight_int8pack_mm(xb, q, scales.to(xb.dtype))
            _INT8_KERNEL[kind] = True
            return out
        except (NotImplementedError, RuntimeError):
            if _INT8_KERNEL.get(kind):
                raise  # it ran here before: a real error
            _INT8_KERNEL[kind] = False
    return _dequant_mm(x, q, scales)


def _int4_mm(x: torch.Tensor, q: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    kpad = sz.shape[0] * group - x.shape[1]
    xb = x.to(torch.bfloat16)
    if kpad:
        xb = F.pad(xb, (0, kpad))  # [M, Kp]
    xb = xb.contiguous()
    if xb.is_cuda:
        return torch._weight_int4pack_mm(xb, q, group, sz)
    return torch._weight_int4pack_mm_for_cpu(xb, q, group, sz)  # [M, Np]


def _dequant_mm(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (q * scales).T with W converted a chunk of rows at a time (fp8 emulation, int8 fallback)."""
    n, k = q.shape
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    for rows in _row_slices(n, k, CUDA_CHUNK_ELEMS if x.is_cuda else CHUNK_ELEMS):
        out[:, rows] = (x @ q[rows].to(x.dtype).T) * scales[rows].to(x.dtype)
    return out


_ROWWISE_FP8: dict[str, bool] = {}  # device -> whether _scaled_mm took row-wise scales there


def _fp8_mm(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    if x.device.type != "cuda" or n % 16 or k % 16:  # _scaled_mm needs both dims multiples of 16
        return _dequant_mm(x, q, scales)
    xf = x.float()
    dev = str(x.device)
    if _ROWWISE_FP8.get(dev, True):
        xs = (xf.abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)  # [M, 1] per-token scale
        xq = (xf / xs).to(FP8)
        try:
            out = torch._scaled_mm(xq, q.T, scale_a=xs, scale_b=scales[None, :], out_dtype=torch.bfloat16)
            _ROWWISE_FP8[dev] = True
            return out
        except RuntimeError:
            _ROWWISE_FP8[dev] = False  # an older GPU or torch: fall back to one activation scale
    xs = (xf.abs().amax() / FP8_MAX).clamp(min=1e-12)
    one = torch.ones((), device=x.device)
    out = torch._scaled_mm((xf / xs).to(FP8), q.T, scale_a=xs, scale_b=one, out_dtype=torch.float32)
    return (out * scales).to(torch.bfloat16)


# ------------------------------------------------------------------------------ modules
class QuantLinear(nn.Module):
    """y = x @ W.T for a quantized W [out_features, in_features], or for matrix e of a stack of `stack` of
    them (an expert stack). Buffers hold the runtime form, stacked: qweight [S, ...], scales [S, ...] or
    scales_and_zeros [S, ...]. A module built without weights is a shell that `set_matrix` fills."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, stack: int = 1) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.spec, self.stack = spec, stack

    @classmethod
    @torch.no_grad()
    def quantize(cls, weight: torch.Tensor, spec: QuantSpec) -> QuantLinear:
        """From a float weight [N, K] or a stack [S, N, K], one matrix at a time."""
        stack = weight.shape[0] if weight.dim() == 3 else 1
        mats = weight if weight.dim() == 3 else weight[None]
        module = cls(weight.shape[-1], weight.shape[-2], spec, stack)
        for e in range(stack):
            module.set_matrix(e, quantize_matrix(mats[e], spec))
        return module

    @torch.no_grad()
    def set_matrix(self, e: int, storage: dict[str, torch.Tensor]) -> None:
        """Pack matrix e from its storage form (on the device it is on) into the stacked buffers."""
        runtime = pack(storage, self.spec)
        for name, t in runtime.items():
            buf = self._buffers.get(name)
            if buf is None or buf.device != t.device:
                buf = torch.empty((self.stack, *t.shape), dtype=t.dtype, device=t.device)
                self.register_buffer(name, buf)
            buf[e].copy_(t)

    def storage(self, e: int = 0) -> dict[str, torch.Tensor]:
        """Storage form of matrix e (for checkpoints and device moves)."""
        runtime = {name: buf[e] for name, buf in self._buffers.items()}
        return unpack(runtime, self.spec, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, 0)

    def matmul(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """x [..., K] @ W[e].T -> [..., N] in x's dtype. Lean on purpose: decode calls it ~10x per layer."""
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)  # [M, K]
        mode = self.spec.mode
        if mode == "int4":
            y = _int4_mm(x2, self.qweight[e], self.scales_and_zeros[e], self.spec.group_size)
            if y.shape[1] != self.out_features:
                y = y[:, : self.out_features]  # the kernel's rows padded to a multiple of 16
        elif mode == "int8":
            y = _int8_mm(x2, self.qweight[e], self.scales[e])
        else:
            y = _fp8_mm(x2, self.qweight[e], self.scales[e])
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        # Follow device moves only: the scales keep the dtype the kernels need, and int4's packed layout is
        # device-specific, so it is unpacked on the old device and packed again on the new one.
        if "qweight" not in self._buffers:
            return self
        old = self.qweight.device
        new = fn(torch.empty(0, device=old)).device
        if new == old:
            return self
        if self.spec.mode == "int4" and "meta" not in (old.type, new.type):
            parts = [self.storage(e) for e in range(self.stack)]
            self._buffers.clear()
            for e, part in enumerate(parts):
                self.set_matrix(e, {name: t.to(new) for name, t in part.items()})
            return self
        for name, buf in self._buffers.items():
            self._buffers[name] = torch.empty_like(buf, device=new) if old.type == "meta" else buf.to(new)
        return self

    def extra_repr(self) -> str:
        stack = f", stack={self.stack}" if self.stack > 1 else ""
        group = f", group_size={self.spec.group_size}" if self.spec.mode == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.spec.mode}{group}{stack}"


class QuantExperts(Experts):
    """A quantized expert stack: w1, w3 [E, F, D] and w2 [E, D, F] as stacked QuantLinears; `first` and
    `count` keep expert parallelism working (a rank holds experts first .. first + count - 1)."""

    def __init__(self, w1: QuantLinear, w2: QuantLinear, w3: QuantLinear, first: int = 0) -> None:
        nn.Module.__init__(self)  # not Experts.__init__: that allocates the float stacks
        self.w1, self.w2, self.w3 = w1, w2, w3
        self.first = first

    @classmethod
    def quantize(cls, experts: Experts, spec: QuantSpec) -> QuantExperts:
        stacks = [QuantLinear.quantize(getattr(experts, name).data, spec) for name in ("w1", "w2", "w3")]
        return cls(*stacks, first=experts.first)

    @property
    def count(self) -> int:
        return self.w1.stack

    def project(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, name).matmul(x, e)


# ------------------------------------------------------------------------------ whole models
@torch.no_grad()
def quantize_model(model: nn.Module, mode: str, group_size: int = 128) -> nn.Module:
    """Quantize every nn.Linear (except MoE router gates) and every Experts stack in place, whatever their
    (possibly sharded) shapes. Each float module is dropped as soon as its replacement exists, so the peak
    is the float model plus one module. Subclasses of nn.Linear are left alone: their forward may do more
    than a matmul (wrap a plain nn.Linear instead)."""
    spec = QuantSpec(mode, group_size)
    done = quant_spec(model)
    if done not in (None, spec):
        raise InvalidArgumentError(f"the model is already quantized as {done.to_json()}; load it float to requantize")
    for parent_name in [name for name, _ in model.named_modules()]:
        parent = model.get_submodule(parent_name)
        for name in [n for n, _ in parent.named_children()]:
            child = getattr(parent, name)
            if type(child) is nn.Linear and not (isinstance(parent, MoE) and name == "gate"):
                setattr(parent, name, QuantLinear.quantize(child.weight.data, spec))
            elif type(child) is Experts:
                setattr(parent, name, QuantExperts.quantize(child, spec))
            del child
    return model


def quant_spec(model: nn.Module) -> QuantSpec | None:
    """The spec of a quantized model (None for a float one)."""
    specs = {m.spec for m in model.modules() if isinstance(m, QuantLinear)}
    if len(specs) > 1:
        raise InvalidArgumentError(f"model mixes quantization specs {sorted(map(str, specs))}")
    return specs.pop() if specs else None


def model_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, each storage counted once."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


# ------------------------------------------------------------------------------ checkpoints
def release_name(param_path: str) -> str:
    """Grok-2 release name of a module path's weight: `layers.0.self_attn.q_proj` -> `model.layers...weight`."""
    return (param_path if param_path == "lm_head" else "model." + param_path) + ".weight"


def _quantized_matrices(model: nn.Module) -> list[tuple[str, QuantLinear, int]]:
    """(release name, QuantLinear, index in its stack) of every quantized matrix, experts one by one."""
    out = []
    experts = {path for path, m in model.named_modules() if isinstance(m, QuantExperts)}
    for path, module in model.named_modules():
        if isinstance(module, QuantExperts):
            for w in ("w1", "w2", "w3"):
                stack = getattr(module, w)
                out += [(f"model.{path}.{module.first + e}.{w}.weight", stack, e) for e in range(module.count)]
        elif isinstance(module, QuantLinear) and path.rpartition(".")[0] not in experts:
            out.append((release_name(path), module, 0))
    return out


def _float_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    out = {}
    for path, p in model.named_parameters():
        out[path if path == "lm_head.weight" else "model." + path] = p.data
    experts = {f"model.{n}": m for n, m in model.named_modules() if type(m) is Experts}
    for prefix, m in experts.items():  # a float expert stack is written per expert, as the release does
        for w in ("w1", "w2", "w3"):
            del out[f"{prefix}.{w}"]
            for e in range(m.count):
                out[f"{prefix}.{m.first + e}.{w}.weight"] = getattr(m, w).data[e]
    return out


@torch.no_grad()
def save_quantized(model: Transformer, out_dir: str | Path, max_shard_bytes: int = 4 << 30) -> list[Path]:
    """Write a quantized model: float tensors under release names, each quantized matrix as
    `<release name>.qweight/.scales/.zeros` in storage form, and config.json with a `quantization` entry."""
    from safetensors.torch import save_file

    from .loading.safetensors_folder import shard_files, write_shard_index

    spec = quant_spec(model)
    if spec is None:
        raise InvalidArgumentError("the model is not quantized; call quantize_model first")
    for m in model.modules():
        if isinstance(m, QuantExperts) and m.count != model.cfg.num_experts:
            raise InvalidArgumentError("save_quantized needs all experts: save before sharding experts")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Plan shards from sizes alone, then build (int4: unpack) one shard's tensors at a time.
    items = [(t.numel() * t.element_size(), lambda k=k, t=t: {k: t}) for k, t in _float_tensors(model).items()]
    for name, module, e in _quantized_matrices(model):
        shapes = storage_shapes(spec, module.out_features, module.in_features)
        size = sum(math.prod(shape) * dtype.itemsize for shape, dtype in shapes.values())
        items.append((size, lambda name=name, m=module, e=e: {f"{name}.{p}": t for p, t in m.storage(e).items()}))
    files = shard_files([size for size, _ in items], max_shard_bytes)
    shards: dict[str, list] = defaultdict(list)
    for (_, get), fname in zip(items, files, strict=True):
        shards[fname].append(get)
    weight_map = {}
    for fname, shard in shards.items():
        # clone: views into one stacked buffer share storage, which safetensors refuses
        tensors = {key: t.detach().to("cpu").clone() for get in shard for key, t in get().items()}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
    write_shard_index(out, weight_map)
    config = model.cfg.to_hf_config()
    config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    config["quantization"] = spec.to_json()
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return [out / f for f in shards]


def is_quantized_checkpoint(path: str | Path) -> bool:
    """A folder whose config.json has a `quantization` entry (written by save_quantized)."""
    cfg = Path(path) / "config.json"
    if not (Path(path).is_dir() and cfg.is_file()):
        return False
    try:
        return "quantization" in json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False


def checkpoint_spec(path: str | Path) -> QuantSpec:
    q = json.loads((Path(path) / "config.json").read_text()).get("quantization")
    if not isinstance(q, dict) or "mode" not in q:
        raise CheckpointError(f"{path}/config.json: 'quantization' must be an object like {EXAMPLE_SPEC}")
    try:
        return QuantSpec(str(q["mode"]), int(q.get("group_size", 128)))
    except InvalidArgumentError as exc:
        raise CheckpointError(f"{path}/config.json: {exc}") from None


def _shells(cfg: ModelConfig, dtype: torch.dtype, spec: QuantSpec, names: set[str]) -> Transformer:
    """A meta-device model whose modules with `<name>.qweight` among the checkpoint's names are empty
    quantized shells (so a checkpoint may keep some matrices float, e.g. an lm_head)."""
    with torch.device("meta"):
        model = Transformer(cfg, dtype)
    for parent_name in [name for name, _ in model.named_modules()]:
        parent = model.get_submodule(parent_name)
        for name, child in list(parent.named_children()):
            path = f"{parent_name}.{name}" if parent_name else name
            if type(child) is nn.Linear and release_name(path) + ".qweight" in names:
                setattr(parent, name, QuantLinear(child.in_features, child.out_features, spec))
            elif type(child) is Experts and f"model.{path}.0.w1.weight.qweight" in names:
                stacks = [QuantLinear(t.shape[2], t.shape[1], spec, t.shape[0]) for t in (child.w1, child.w2, child.w3)]
                setattr(parent, name, QuantExperts(*stacks))
    return model


def _expected(model: Transformer, spec: QuantSpec) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """Every tensor name the checkpoint must hold for this (shell) model, with its shape (dtype for parts)."""
    want: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {
        name: (tuple(t.shape), None) for name, t in _float_tensors(model).items()
    }
    for name, module, _ in _quantized_matrices(model):
        for part, (shape, dtype) in storage_shapes(spec, module.out_features, module.in_features).items():
            want[f"{name}.{part}"] = (shape, dtype)
    return want


@torch.no_grad()
def load_quantized(
    path: str | Path, cfg: ModelConfig, dtype: torch.dtype, progress=None, device: str | torch.device = "cpu"
) -> Transformer:
    """Build a quantized model straight from a save_quantized folder: quantized modules are made as empty
    shells on the meta device and filled from the stored codes (packed on `device`); nothing is re-quantized."""
    from safetensors import safe_open

    path = Path(path)
    spec = checkpoint_spec(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no .safetensors files")
    where: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                if key in where:
                    raise CheckpointError(f"tensor {key!r} appears twice: in {where[key].name} and {file.name}")
                where[key] = file
    model = _shells(cfg, dtype, spec, set(where))
    want = _expected(model, spec)
    missing, extra = sorted(set(want) - set(where)), sorted(set(where) - set(want))
    if missing:
        raise CheckpointError(f"quantized checkpoint {path} is missing tensor(s) {missing[:5]}")
    if extra:
        raise CheckpointError(f"quantized checkpoint {path} has tensor(s) this config does not use: {extra[:5]}")
    model.to_empty(device=device)  # float parts only: the shells hold no buffers yet
    params = _float_tensors(model)
    matrices = {name: (module, e) for name, module, e in _quantized_matrices(model)}
    pending: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for file in files:
        with safe_open(str(file), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118
                tensor = st.get_tensor(key)
                shape, dtype_ = want[key]
                if tuple(tensor.shape) != shape or (dtype_ is not None and tensor.dtype != dtype_):
                    raise CheckpointError(
                        f"{file.name}: {key!r} is {tensor.dtype} {list(tensor.shape)}, expected {list(shape)}"
                    )
                if key in params:
                    params[key].copy_(tensor)
                    continue
                name, part = key.rsplit(".", 1)
                pending[name][part] = tensor.to(device)
                if len(pending[name]) == len(PART_SUFFIXES[spec.mode]):
                    module, e = matrices[name]
                    module.set_matrix(e, pending.pop(name))
        if progress:
            progress(1)
    return model


# ------------------------------------------------------------------------------ quality
@torch.no_grad()
def quality(
    ref_model: nn.Module | None, q_model: Callable, ids: torch.Tensor, ref_logits: torch.Tensor | None = None
) -> dict[str, float]:
    """Next-token agreement of a quantized model with its float reference on token ids [1, T] (or [T]):
    top-1 agreement of the argmax over all positions, mean KL(p_ref || p_quant) in nats, and the
    perplexity of each model on the text itself. `ref_logits` [1, T, V] spares recomputing the reference."""
    ids = ids.view(1, -1)
    if ref_logits is None:
        ref_logits = ref_model(ids)
    ref = torch.log_softmax(ref_logits[0].float(), dim=-1)  # [T, V]
    got = torch.log_softmax(q_model(ids)[0].float(), dim=-1)
    kl = (ref.exp() * (ref - got)).sum(-1)  # [T]
    target = ids[0, 1:]

    def ppl(logp: torch.Tensor) -> float:
        return math.exp(-logp[:-1].gather(1, target[:, None]).mean().item())

    return {
        "top1": (ref.argmax(-1) == got.argmax(-1)).float().mean().item(),
        "kl": kl.mean().item(),
        "ppl_ref": ppl(ref),
        "ppl_quant": ppl(got),
    }
