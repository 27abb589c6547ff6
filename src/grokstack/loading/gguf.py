"""GGUF files (llama.cpp's format): config from the metadata, weights dequantized at load.

Two architectures: `llama` (the family of the bundled default model) and llama.cpp's `grok`
(community Grok-1 and Grok-2 quants). The `gguf` package reads the file and dequantizes blocks.
llama.cpp stores llama's Q/K rows permuted for its interleaved RoPE; they are put back here so the
NeoX RoPE of `model.py` applies. Grok tensors are stored unpermuted (llama.cpp runs Grok with NeoX RoPE).

Where llama.cpp's Grok graph differs from the references (top-2 renormalisation, tanh GELU for Grok-2,
no router softcap or attention temperature, YaRN for Grok-2's rope_type "original"), the config here
keeps the reference math; the knobs in `config.py` reproduce llama.cpp on request.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from ..model import Transformer
from .weights import empty_model

log = logging.getLogger("grokstack")

ARCHITECTURES = ("llama", "grok")
# Block types loaded and tested here; others raise a clear error rather than guess.
QUANT_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)
# llama.cpp's Grok loader defaults for keys that old GGUFs lack (the released Grok-1 values).
GROK1_EMBEDDING_SCALE = 78.38367176906169
GROK1_LOGIT_SCALE = 0.5773502691896257
GROK1_ATTN_OUT_SCALE = 0.08838834764831845


@dataclass
class GGUFFile:
    """An opened GGUF: scalar metadata, and tensors by name (data stays memory-mapped)."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, Any]  # name -> gguf.ReaderTensor
    reader: Any  # gguf.GGUFReader

    def field(self, key: str, default: Any = None) -> Any:
        """Any metadata value, the large token arrays included (read on demand)."""
        if key in self.metadata:
            return self.metadata[key]
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def key(self, name: str, default: Any = None) -> Any:
        """An architecture key such as `attention.head_count` (prefix `llama.` / `grok.` added)."""
        return self.metadata.get(f"{self.arch}.{name}", default)

    def need(self, name: str) -> Any:
        value = self.key(name)
        if value is None:
            raise CheckpointError(f"{self.path}: GGUF metadata lacks {self.arch}.{name}")
        return value

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape in PyTorch order (GGUF lists dimensions innermost first)."""
        return tuple(int(n) for n in reversed(self.tensors[name].shape))


# Array fields read lazily (by the tokenizer builder) since they are large.
_BIG_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")


SPLIT_NAME = re.compile(r"(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf")


def split_parts(path: Path) -> list[Path]:
    """All files of a split GGUF (llama.cpp's `-00001-of-0000N.gguf` parts), or just `path`."""
    m = SPLIT_NAME.fullmatch(Path(path).name)
    if not m:
        return [Path(path)]
    count = int(m["count"])
    return [Path(path).with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def open_gguf(path: Path) -> GGUFFile:
    """Read the header (of every part of a split GGUF); malformed or truncated files become CheckpointErrors."""
    parts = split_parts(path)
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise CheckpointError(f"{path} is one part of a split GGUF; missing part(s): {', '.join(missing)}")
    gf = _open_one(parts[0])
    count = int(gf.metadata.get("split.count", 1))
    if count != len(parts):
        raise CheckpointError(f"{parts[0]} says it has {count} split part(s), but its name says {len(parts)}")
    for part in parts[1:]:
        more = _open_one(part)
        dup = set(more.tensors) & set(gf.tensors)
        if dup:
            raise CheckpointError(f"{part}: tensor {sorted(dup)[0]} is also in an earlier part")
        gf.tensors.update(more.tensors)
    expected = int(gf.metadata.get("split.tensors.count", len(gf.tensors)))
    if len(gf.tensors) != expected:
        raise CheckpointError(f"{path}: the parts hold {len(gf.tensors)} tensors, the header says {expected}")
    return gf


def _open_one(path: Path) -> GGUFFile:
    from gguf import GGUFReader

    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if magic != b"GGUF":
        raise CheckpointError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        reader = GGUFReader(path, "r")
        metadata = {k: f.contents() for k, f in reader.fields.items() if k not in _BIG_ARRAYS}
        tensors = {t.name: t for t in reader.tensors}
    except Exception as exc:  # the reader raises ValueError, IndexError, struct/numpy errors on bad bytes
        raise CheckpointError(f"{path} is a damaged or truncated GGUF file ({type(exc).__name__}: {exc})") from None
    gf = GGUFFile(path, metadata, tensors, reader)
    for t in tensors.values():  # a truncated file leaves short memory maps behind
        if t.data.nbytes != int(t.n_bytes):
            raise CheckpointError(f"{path} is truncated: tensor {t.name} has {t.data.nbytes} of {t.n_bytes} bytes")
    return gf


# ----------------------------------------------------------------------------- config
def gguf_config(gf: GGUFFile) -> ModelConfig:
    if gf.arch not in ARCHITECTURES:
        raise CheckpointError(
            f"{gf.path}: GGUF architecture {gf.arch!r} is not supported; grokstack runs {list(ARCHITECTURES)}"
        )
    if "token_embd.weight" not in gf.tensors:
        raise CheckpointError(f"{gf.path}: no token_embd.weight tensor")
    n_embd, n_head = int(gf.need("embedding_length")), int(gf.need("attention.head_count"))
    head_dim = int(gf.key("attention.key_length") or n_embd // n_head)
    if int(gf.key("attention.value_length") or head_dim) != head_dim:
        raise CheckpointError(f"{gf.path}: value head size differs from key head size; not supported")
    common = dict(
        vocab_size=gf.shape("token_embd.weight")[0],
        hidden_size=n_embd,
        num_layers=int(gf.need("block_count")),
        num_heads=n_head,
        num_kv_heads=int(gf.key("attention.head_count_kv") or n_head),
        head_dim=head_dim,
        rms_norm_eps=float(gf.need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(gf.key("rope.freq_base") or 10000.0),
        max_position_embeddings=int(gf.key("context_length") or 8192),
        tie_word_embeddings="output.weight" not in gf.tensors,
        eos_token_id=int(gf.field("tokenizer.ggml.eos_token_id", 2)),
        bos_token_id=gf.field("tokenizer.ggml.bos_token_id"),
        pad_token_id=int(gf.field("tokenizer.ggml.padding_token_id", 0)),
    )
    rope_dims = int(gf.key("rope.dimension_count") or head_dim)
    if rope_dims != head_dim:
        raise CheckpointError(f"{gf.path}: partial RoPE ({rope_dims} of {head_dim} dims) is not supported")
    try:
        return _llama_config(gf, common) if gf.arch == "llama" else _grok_config(gf, common)
    except ConfigError as exc:
        raise CheckpointError(f"{gf.path}: {exc}") from None


def _llama_config(gf: GGUFFile, common: dict) -> ModelConfig:
    if int(gf.key("expert_count") or 0):
        raise CheckpointError(f"{gf.path}: llama GGUFs with experts (Mixtral-style) are not supported")
    scaling = str(gf.key("rope.scaling.type") or "none")
    if scaling != "none" and float(gf.key("rope.scaling.factor") or 1.0) != 1.0:
        raise CheckpointError(f"{gf.path}: rope scaling {scaling!r} is not supported for llama models")
    if "rope_freqs.weight" in gf.tensors:
        raise CheckpointError(f"{gf.path}: Llama-3.1-style rope_freqs scaling is not supported")
    return ModelConfig(
        arch="llama",
        moe_intermediate_size=0,
        num_experts=0,
        num_experts_per_tok=0,
        intermediate_size=int(gf.need("feed_forward_length")),
        attn_softcap=0.0,
        norm_style="pre",
        hidden_act="silu",
        attn_temperature_len=0,
        **common,
    )


def _grok_config(gf: GGUFFile, common: dict) -> ModelConfig:
    grok2 = "blk.0.ffn_up.weight" in gf.tensors  # Grok-2's residual dense MLP
    ff = int(gf.need("feed_forward_length"))
    yarn = str(gf.key("rope.scaling.type") or "none") == "yarn"
    rope = {}
    if yarn:  # llama.cpp's reading of Grok-2's rope_type "original"; the reference runs plain RoPE
        rope = dict(
            rope_type="original",
            scaling_factor=float(gf.key("rope.scaling.factor") or 1.0),
            original_max_position_embeddings=int(gf.key("rope.scaling.original_context_length") or 8192),
            extrapolation_factor=float(gf.key("rope.scaling.yarn_ext_factor") or 1.0),
            attn_factor=float(gf.key("rope.scaling.yarn_attn_factor") or 1.0),
            beta_fast=float(gf.key("rope.scaling.yarn_beta_fast") or 8.0),
            beta_slow=float(gf.key("rope.scaling.yarn_beta_slow") or 1.0),
        )
    return ModelConfig(
        arch="grok-2" if grok2 else "grok-1",
        moe_intermediate_size=int(gf.key("expert_feed_forward_length") or ff),
        num_experts=int(gf.need("expert_count")),
        num_experts_per_tok=int(gf.need("expert_used_count")),
        intermediate_size=ff if grok2 else 0,
        residual_moe=grok2,
        embedding_multiplier=float(gf.key("embedding_scale") or GROK1_EMBEDDING_SCALE),
        output_multiplier=float(gf.key("logit_scale") or GROK1_LOGIT_SCALE),
        qk_scale=float(gf.key("attention.output_scale") or GROK1_ATTN_OUT_SCALE),
        attn_softcap=float(gf.key("attn_logit_softcapping") or 30.0),
        # Grok-1's reference (xAI's JAX code) has no router softcap, whatever the converter wrote.
        router_softcap=float(gf.key("router_logit_softcapping") or 30.0) if grok2 else 0.0,
        final_softcap=float(gf.key("final_logit_softcapping") or 0.0),
        attn_temperature_len=int(gf.key("attention.temperature_length") or 0) if grok2 else 0,
        mask_pad_keys=not grok2,
        gelu="erf" if grok2 else "tanh",
        **rope,
        **common,
    )


# ----------------------------------------------------------------------------- weights
_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj.weight",
    "attn_k": "self_attn.k_proj.weight",
    "attn_v": "self_attn.v_proj.weight",
    "attn_output": "self_attn.o_proj.weight",
    "attn_norm": "pre_attn_norm.weight",
    "attn_output_norm": "post_attn_norm.weight",
    "ffn_norm": "pre_moe_norm.weight",
    "layer_output_norm": "post_moe_norm.weight",
    "post_ffw_norm": "post_moe_norm.weight",
    "ffn_gate_inp": "block_sparse_moe.gate.weight",
    "ffn_gate_exps": "block_sparse_moe.experts.w1",
    "ffn_up_exps": "block_sparse_moe.experts.w3",
    "ffn_down_exps": "block_sparse_moe.experts.w2",
    "ffn_gate": "mlp.gate_proj.weight",
    "ffn_up": "mlp.up_proj.weight",
    "ffn_down": "mlp.down_proj.weight",
}
_TOP_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
              "output.weight": "lm_head.weight"}


def param_name(gguf_name: str) -> str | None:
    """The model parameter a GGUF tensor fills, or None if it is not one grokstack knows."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = _LAYER.fullmatch(gguf_name)
    if m and m[2] in _LAYER_NAMES:
        return f"layers.{m[1]}.{_LAYER_NAMES[m[2]]}"
    return None


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's llama converter: rows of each head go from interleaved pairs back to halves."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(gf: GGUFFile, name: str) -> np.ndarray:
    """One tensor as float32 in PyTorch order; 3-D expert stacks one expert at a time."""
    from gguf.quants import dequantize as gguf_dequantize

    t = gf.tensors[name]
    kind = t.tensor_type.name
    if kind not in QUANT_TYPES:
        raise CheckpointError(
            f"{gf.path}: tensor {name} uses quant type {kind}, which grokstack does not load; "
            f"supported: {', '.join(QUANT_TYPES)}"
        )
    shape = gf.shape(name)
    out = np.empty(shape, dtype=np.float32)
    data = t.data
    if len(shape) == 3:  # data rows are [E, F, bytes] for quantized stacks
        for e in range(shape[0]):
            out[e] = gguf_dequantize(data[e], t.tensor_type).reshape(shape[1:])
    else:
        out[...] = gguf_dequantize(data, t.tensor_type).reshape(shape)
    return out


def load_gguf(gf: GGUFFile, cfg: ModelConfig, dtype: torch.dtype, progress=None) -> Transformer:
    """Every tensor of the file into a new model; unknown, missing or mis-shaped tensors are errors."""
    if cfg.rope_type == "original" and not cfg.use_yarn:
        log.warning(
            "%s asks for YaRN RoPE (llama.cpp's reading of Grok-2's rope_type 'original'); using plain RoPE "
            "as the reference (SGLang) does. Set rope_original_as=yarn to follow llama.cpp.", gf.path.name
        )
    model = empty_model(cfg, dtype)
    params = dict(model.named_parameters())
    filled: set[str] = set()
    for name in gf.tensors:
        key = param_name(name)
        if key is None or key not in params:
            raise CheckpointError(f"{gf.path}: tensor {name!r} does not belong to a {cfg.arch} model of this config")
        target = params[key]
        if gf.shape(name) != tuple(target.shape):
            raise CheckpointError(
                f"{gf.path}: tensor {name} has shape {list(gf.shape(name))}, expected {list(target.shape)}"
            )
        w = dequantize(gf, name)
        if cfg.arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            w = unpermute_qk(w, cfg.num_heads if "attn_q" in name else cfg.num_kv_heads)
        with torch.no_grad():
            target.copy_(torch.from_numpy(w))
        filled.add(key)
        if progress:
            progress(1)
    missing = sorted(set(params) - filled)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CheckpointError(f"{gf.path}: {len(missing)} weights missing from the GGUF: {shown}")
    return model
