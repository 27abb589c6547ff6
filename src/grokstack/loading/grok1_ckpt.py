"""Grok-1's official JAX checkpoint folder `ckpt-0/` (spec §6.1), read and written without jax.

Each file `tensor{i:05d}_000` is one pickled leaf: an fp32 numpy array, or a
`QuantizedWeight8bit(weight=int8, scales=bf16)`. We never unpickle: the opcode stream is walked
with `pickletools`' argument readers, byte payloads are located (not read), and shapes come from
the model config, checked against the payload sizes. Leaf i is the i-th parameter of the Haiku
tree in JAX's flatten order, i.e. module paths sorted as strings (layers 0, 1, 10, 11, ..., 2, ...).
"""

from __future__ import annotations

import io
import pickletools
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import CheckpointError
from ..model import Transformer
from .weights import empty_model

# (module path under decoder_layer_N, param name, role, quantized)
LAYER_LEAVES = [
    ("moe/linear", "w", "w1", True),
    ("moe/linear_1", "w", "w2", True),
    ("moe/linear_v", "w", "w3", True),
    ("multi_head_attention/key", "w", "k_proj", True),
    ("multi_head_attention/linear", "w", "o_proj", True),
    ("multi_head_attention/query", "w", "q_proj", True),
    ("multi_head_attention/value", "w", "v_proj", True),
    ("rms_norm", "scale", "pre_attn_norm", False),
    ("rms_norm_1", "scale", "post_attn_norm", False),
    ("rms_norm_2", "scale", "pre_moe_norm", False),
    ("rms_norm_3", "scale", "post_moe_norm", False),
    ("router", "w", "gate", False),
]
_BYTES_OPS = {"SHORT_BINBYTES", "BINBYTES", "BINBYTES8"}


@dataclass(frozen=True)
class Leaf:
    path: str  # e.g. "transformer/decoder_layer_10/moe/linear/w"
    layer: int | None  # None for the embedding and the final norm
    role: str  # "embed", "norm", or a LAYER_LEAVES role
    quantized: bool


def leaf_order(num_layers: int) -> list[Leaf]:
    """Leaves in file order: JAX sorts Haiku's {module: {param: array}} keys level by level."""
    leaves = [
        Leaf("language_model/in_out_embed/embeddings", None, "embed", False),
        Leaf("language_model/rms_norm/scale", None, "norm", False),
    ]
    for i in range(num_layers):
        for module, param, role, quantized in LAYER_LEAVES:
            leaves.append(Leaf(f"transformer/decoder_layer_{i}/{module}/{param}", i, role, quantized))
    return sorted(leaves, key=lambda leaf: tuple(leaf.path.rsplit("/", 1)))


def jax_shape(cfg: ModelConfig, leaf: Leaf) -> tuple[int, ...]:
    """The stored (JAX [in, out]) shape of a leaf's weight."""
    d, f, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {
        "embed": (cfg.vocab_size, d),
        "norm": (d,),
        "w1": (e, d, f),
        "w2": (e, f, d),
        "w3": (e, d, f),
        "k_proj": (d, kv),
        "o_proj": (q, d),
        "q_proj": (d, q),
        "v_proj": (d, kv),
        "pre_attn_norm": (d,),
        "post_attn_norm": (d,),
        "pre_moe_norm": (d,),
        "post_moe_norm": (d,),
        "gate": (d, e),
    }[leaf.role]


# ------------------------------------------------------------------------------ reading
def scan_payloads(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of every bytes payload in a pickle, found without executing or reading it."""
    out = []
    with open(path, "rb") as f:
        while True:
            code = f.read(1)
            if not code:
                raise CheckpointError(f"{path}: truncated pickle (no STOP opcode)")
            op = pickletools.code2op.get(code.decode("latin-1"))
            if op is None:
                raise CheckpointError(f"{path}: not a pickle (unknown opcode {code!r} at {f.tell() - 1})")
            if op.name in _BYTES_OPS:
                width = {"SHORT_BINBYTES": 1, "BINBYTES": 4, "BINBYTES8": 8}[op.name]
                raw = f.read(width)
                if len(raw) != width:
                    raise CheckpointError(f"{path}: truncated pickle")
                n = int.from_bytes(raw, "little")
                start = f.tell()
                if op.name == "SHORT_BINBYTES" and n == 1 and f.read(1) == b"b":
                    continue  # numpy's `_reconstruct(ndarray, (0,), b'b')` marker, not data
                out.append((start, n))
                f.seek(start + n)
            elif op.name == "STOP":
                break
            elif op.arg is not None:
                try:
                    op.arg.reader(f)
                except ValueError as exc:
                    raise CheckpointError(f"{path}: truncated or corrupt pickle ({exc})") from None
    size = path.stat().st_size
    for start, n in out:
        if start + n > size:
            raise CheckpointError(f"{path}: truncated (a payload runs past the end of the file)")
    return out


def _read(path: Path, offset: int, length: int, dtype: torch.dtype) -> torch.Tensor:
    buf = torch.empty(length, dtype=torch.uint8)
    with open(path, "rb") as f:
        f.seek(offset)
        if f.readinto(memoryview(buf.numpy())) != length:
            raise CheckpointError(f"{path}: truncated")
    return buf.view(dtype)


def read_leaf(path: Path, leaf: Leaf, shape: tuple[int, ...]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """An fp32 array, or (int8 weight, bf16 scales [..., blocks, out]) for a quantized leaf."""
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file {path} (leaf {leaf.path})")
    payloads = scan_payloads(path)
    numel = int(np.prod(shape))
    if not leaf.quantized:
        if len(payloads) != 1 or payloads[0][1] != numel * 4:
            raise CheckpointError(
                f"{path}: expected one fp32 array {list(shape)} ({numel * 4} bytes) for {leaf.path}, "
                f"found payloads of {[n for _, n in payloads]} bytes"
            )
        return _read(path, *payloads[0], torch.float32).view(shape)
    if len(payloads) != 2 or payloads[0][1] != numel:
        raise CheckpointError(
            f"{path}: expected int8 weight {list(shape)} ({numel} bytes) + bf16 scales for {leaf.path}, "
            f"found payloads of {[n for _, n in payloads]} bytes"
        )
    lead, rows, cols = shape[:-2], shape[-2], shape[-1]
    lead_n = int(np.prod(lead)) if lead else 1
    blocks, rest = divmod(payloads[1][1], 2 * lead_n * cols)
    if rest or blocks < 1 or rows % blocks:
        raise CheckpointError(f"{path}: scales of {payloads[1][1]} bytes do not fit weight {list(shape)}")
    weight = _read(path, *payloads[0], torch.int8).view(shape)
    scales = _read(path, *payloads[1], torch.bfloat16).view(*lead, blocks, cols)
    return weight, scales


def dequantize(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W[r, c] = q[r, c] * s[r // (R / blocks), c], exactly in fp32 (what XLA:CPU computes)."""
    rows, blocks = weight.shape[-2], scales.shape[-2]
    return weight.float() * scales.float().repeat_interleave(rows // blocks, dim=-2)


def find_ckpt_dir(path: Path) -> Path | None:
    for cand in (path, path / "ckpt-0"):
        if (cand / "tensor00000_000").is_file():
            return cand
    return None


@torch.no_grad()
def load_grok1(path: Path, cfg: ModelConfig, dtype: torch.dtype, progress=None) -> Transformer:
    """Stream every leaf of a `ckpt-0/` folder into a model (dequantised per expert)."""
    ckpt = find_ckpt_dir(path)
    if ckpt is None:
        raise CheckpointError(f"{path} holds no Grok-1 checkpoint (no tensor00000_000 here or in ckpt-0/)")
    leaves = leaf_order(cfg.num_layers)
    extra = ckpt / f"tensor{len(leaves):05d}_000"
    if extra.exists():
        raise CheckpointError(
            f"{ckpt} has more leaves than the config's {cfg.num_layers} layers need ({extra.name} exists); "
            "pass the matching config (--config)"
        )
    model = empty_model(cfg, dtype)
    for index, leaf in enumerate(leaves):
        file = ckpt / f"tensor{index:05d}_000"
        value = read_leaf(file, leaf, jax_shape(cfg, leaf))
        _place(model, leaf, value)
        if progress:
            progress(1)
    return model


def _place(model: Transformer, leaf: Leaf, value) -> None:
    if leaf.role == "embed":
        model.embed_tokens.weight.copy_(value)
        return
    if leaf.role == "norm":
        model.norm.weight.copy_(value)
        return
    layer = model.layers[leaf.layer]
    if leaf.role in ("w1", "w2", "w3"):
        weight, scales = value
        target = getattr(layer.block_sparse_moe.experts, leaf.role)
        for e in range(weight.shape[0]):  # one expert at a time keeps the fp32 temporary small
            target.data[e].copy_(dequantize(weight[e], scales[e]).T)
        return
    if leaf.quantized:
        value = dequantize(*value)
    if leaf.role.endswith("_proj"):
        getattr(layer.self_attn, leaf.role).weight.copy_(value.T)
    elif leaf.role == "gate":
        layer.block_sparse_moe.gate.weight.copy_(value.T)
    else:
        getattr(layer, leaf.role).weight.copy_(value)


# ------------------------------------------------------------------------------ writing
class _PickleWriter:
    """Emits the protocol-4 opcode stream of the official `checkpoint.fast_pickle` files."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.buf.write(b"\x80\x04")  # PROTO 4

    def text(self, s: str) -> None:
        raw = s.encode()
        self.buf.write(b"\x8c" + bytes([len(raw)]) + raw)  # SHORT_BINUNICODE

    def glob(self, module: str, name: str) -> None:
        self.text(module)
        self.text(name)
        self.buf.write(b"\x93")  # STACK_GLOBAL

    def int(self, v: int) -> None:
        if 0 <= v < 256:
            self.buf.write(b"K" + bytes([v]))
        elif 0 <= v < 65536:
            self.buf.write(b"M" + struct.pack("<H", v))
        else:
            self.buf.write(b"J" + struct.pack("<i", v))

    def data(self, raw: bytes) -> None:
        if len(raw) < 2**32:
            self.buf.write(b"B" + struct.pack("<I", len(raw)) + raw)  # BINBYTES
        else:
            self.buf.write(b"\x8e" + struct.pack("<Q", len(raw)) + raw)  # BINBYTES8

    def dtype(self, kind: str) -> None:
        self.glob("numpy", "dtype")
        if kind == "bfloat16":
            self.glob("ml_dtypes", "bfloat16")
        else:
            self.text(kind)
        self.buf.write(b"\x89\x88\x87R(")  # NEWFALSE NEWTRUE TUPLE3 REDUCE MARK
        self.int(3)
        self.text("|" if kind == "i1" else "<")
        self.buf.write(b"NNN")
        for v in (2, 2, 64) if kind == "bfloat16" else (-1, -1, 0):
            self.int(v)
        self.buf.write(b"tb")  # TUPLE BUILD

    def ndarray(self, shape: tuple[int, ...], kind: str, raw: bytes) -> None:
        self.glob("numpy.core.multiarray", "_reconstruct")
        self.glob("numpy", "ndarray")
        self.int(0)
        self.buf.write(b"\x85C\x01b\x87R(")  # TUPLE1 SHORT_BINBYTES b'b' TUPLE3 REDUCE MARK
        self.int(1)
        self.buf.write(b"(")
        for n in shape:
            self.int(n)
        self.buf.write(b"t")
        self.dtype(kind)
        self.buf.write(b"\x89")  # NEWFALSE (not Fortran order)
        self.data(raw)
        self.buf.write(b"tb")

    def finish(self) -> bytes:
        return self.buf.getvalue() + b"."  # STOP


def write_leaf(path: Path, value: np.ndarray | tuple[np.ndarray, torch.Tensor]) -> None:
    """One leaf file: an fp32 array, or (int8 weight, bf16 scales) as `__main__.QuantizedWeight8bit`."""
    w = _PickleWriter()
    if isinstance(value, tuple):
        weight, scales = value
        w.glob("__main__", "QuantizedWeight8bit")
        w.buf.write(b")\x81}(")  # EMPTY_TUPLE NEWOBJ EMPTY_DICT MARK
        w.text("weight")
        w.ndarray(weight.shape, "i1", np.ascontiguousarray(weight, dtype=np.int8).tobytes())
        w.text("scales")
        raw = scales.contiguous().view(torch.int16).numpy().tobytes()
        w.ndarray(tuple(scales.shape), "bfloat16", raw)
        w.buf.write(b"ub")  # SETITEMS BUILD
    else:
        arr = np.ascontiguousarray(value, dtype=np.float32)
        w.ndarray(arr.shape, "f4", arr.tobytes())
    path.write_bytes(w.finish())
