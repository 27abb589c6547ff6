"""Hugging Face-style safetensors folders with Grok-2's tensor names, presharded release included.

xAI's Grok-2 ships `pytorch_model-NNNNN-TP-common.safetensors` (whole tensors) and
`pytorch_model-NNNNN-TP-00k.safetensors` (slice k of every expert weight: w1/w3 split on dim 0,
w2 on dim 1). The plan is checked from the headers alone before any weight is read: every
tensor present once, every expert shard present for every k, nothing unexpected. Then each tensor
is copied straight into its slice of the model, so no expert is ever joined in a temporary.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import ModelConfig
from ..errors import CheckpointError
from ..model import Transformer
from .weights import assign, empty_model, hf_names, iter_hf_tensors, param_for

TP_FILE = re.compile(r"(?P<stem>.+)-TP-(?P<part>common|\d{3})\.safetensors")
SPLIT_DIM = {"w1": 0, "w3": 0, "w2": 1}  # w1/w3 slice the output dim, w2 the input dim
_EXPERT_W = re.compile(r".*\.experts\.\d+\.(w[123])\.weight")

# The release's file numbering (spec §6.3): NNNNN -> which tensors; experts live in TP-k files.
RELEASE_FILES = [
    "model.embed_tokens.weight",
    "lm_head.weight",
    "model.norm.weight",
    "mlp.gate_proj.weight",
    "mlp.down_proj.weight",
    "mlp.up_proj.weight",
    "experts.*.w1.weight",
    "experts.*.w2.weight",
    "experts.*.w3.weight",
    "self_attn.k_proj.weight",
    "self_attn.o_proj.weight",
    "self_attn.q_proj.weight",
    "self_attn.v_proj.weight",
    "pre_attn_norm.weight",
    "post_attn_norm.weight",
    "pre_moe_norm.weight",
    "post_moe_norm.weight",
    "block_sparse_moe.gate.weight",
]


@contextmanager
def open_safetensors(path: Path):
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except SafetensorError as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc}); re-download it") from None


def _plan(files: list[Path]) -> tuple[dict[str, Path], dict[str, dict[int, Path]]]:
    """Whole tensors -> file, sharded expert tensors -> {k: file}; duplicates fail here."""
    whole: dict[str, Path] = {}
    shards: dict[str, dict[int, Path]] = defaultdict(dict)
    for file in files:
        m = TP_FILE.fullmatch(file.name)
        part = m["part"] if m and m["part"] != "common" else None
        with open_safetensors(file) as st:
            names = list(st.keys())
        for name in names:
            if part is None:
                if name in whole:
                    raise CheckpointError(f"tensor {name!r} appears twice: in {whole[name].name} and {file.name}")
                whole[name] = file
                continue
            if not _EXPERT_W.fullmatch(name):
                raise CheckpointError(f"{file.name}: only expert weights may be sharded, found {name!r}")
            k = int(part)
            if k in shards[name]:
                raise CheckpointError(
                    f"shard {k} of tensor {name!r} appears twice: in {shards[name][k].name} and {file.name}"
                )
            shards[name][k] = file
    for name in set(whole) & set(shards):
        raise CheckpointError(f"tensor {name!r} is present both whole ({whole[name].name}) and as TP shards")
    return whole, dict(shards)


def _check_complete(cfg: ModelConfig, whole: dict, shards: dict, files: list[Path]) -> int:
    parts = sorted({int(m["part"]) for f in files if (m := TP_FILE.fullmatch(f.name)) and m["part"] != "common"})
    tp = len(parts)
    if parts and parts != list(range(tp)):
        missing = sorted(set(range(parts[-1] + 1)) - set(parts))
        raise CheckpointError(f"TP shard files for k={missing} are missing (found k={parts}); re-download them")
    for name, got in shards.items():
        if len(got) != tp:
            missing = sorted(set(range(tp)) - set(got))
            some = next(iter(got.values())).name
            stem = TP_FILE.fullmatch(some)["stem"]
            hint = f"{stem}-TP-{missing[0]:03d}.safetensors"
            raise CheckpointError(
                f"tensor {name!r} is missing TP shard(s) {missing} of {tp} (expected in {hint}); "
                "refusing to load a model with part of its experts"
            )
    expected = set(hf_names(cfg))
    present = set(whole) | set(shards)
    missing = sorted(expected - present)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint is missing tensor(s) {missing[:5]}{more}")
    unexpected = sorted(present - expected)
    if unexpected:
        raise CheckpointError(f"checkpoint has tensor(s) this config does not use: {unexpected[:5]}")
    return tp


@torch.no_grad()
def load_safetensors_folder(path: Path, cfg: ModelConfig, dtype: torch.dtype, progress=None) -> Transformer:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no .safetensors files")
    whole, shards = _plan(files)
    tp = _check_complete(cfg, whole, shards, files)
    model = empty_model(cfg, dtype)
    for file in files:
        m = TP_FILE.fullmatch(file.name)
        k = int(m["part"]) if m and m["part"] != "common" else None
        with open_safetensors(file) as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensor = st.get_tensor(name)
                if k is None:
                    assign(model, name, tensor, file.name)
                else:
                    _assign_shard(model, name, tensor, k, tp, file.name)
        if progress:
            progress(1)
    return model


def _assign_shard(model: Transformer, name: str, tensor: torch.Tensor, k: int, tp: int, source: str) -> None:
    target = param_for(model, name)
    dim = SPLIT_DIM[_EXPERT_W.fullmatch(name)[1]]
    full = target.shape[dim]
    if full % tp:
        raise CheckpointError(f"{source}: {name!r} dim {dim} ({full}) does not split into {tp} shards")
    size = full // tp
    want = list(target.shape)
    want[dim] = size
    if list(tensor.shape) != want:
        raise CheckpointError(f"{source}: shard {k} of {name!r} has shape {list(tensor.shape)}, expected {want}")
    target.narrow(dim, k * size, size).copy_(tensor)


# ------------------------------------------------------------------------------ writing
def _release_index(name: str) -> int:
    for i, pattern in enumerate(RELEASE_FILES):
        if re.fullmatch(r"(.*\.)?" + re.escape(pattern).replace(r"\*", r"\d+"), name):
            return i
    raise ValueError(name)


def shard_files(sizes: list[int], max_shard_bytes: int) -> list[str]:
    """The HF-style file each item goes to when items (of these byte sizes) fill shards in order:
    `model.safetensors`, or `model-0000i-of-0000n.safetensors` when they need more than one."""
    index, total, shard = [], 0, 0
    for size in sizes:
        if total and total + size > max_shard_bytes:
            shard, total = shard + 1, 0
        index.append(shard)
        total += size
    n = shard + 1
    return ["model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in index]


def write_shard_index(out: Path, weight_map: dict[str, str]) -> None:
    """`model.safetensors.index.json` (tensor name -> file) when the tensors span more than one file."""
    if len(set(weight_map.values())) > 1:
        index = {"metadata": {}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def save_safetensors_folder(
    model: Transformer,
    out: Path,
    dtype: torch.dtype = torch.bfloat16,
    preshard: int = 0,
    max_shard_bytes: int = 5 << 30,
) -> list[Path]:
    """Write the model with Grok-2 names: presharded like the release (TP = preshard) or HF shards."""
    out.mkdir(parents=True, exist_ok=True)
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    cast = {}
    for name, t in iter_hf_tensors(model):
        cast[name] = t.to(dtype).contiguous()
    if preshard:
        for name, t in cast.items():
            i = _release_index(name)
            m = _EXPERT_W.fullmatch(name)
            if not m:
                groups[f"pytorch_model-{i:05d}-TP-common.safetensors"][name] = t
                continue
            dim = SPLIT_DIM[m[1]]
            if t.shape[dim] % preshard:
                raise CheckpointError(f"cannot split {name} dim {dim} ({t.shape[dim]}) into {preshard} shards")
            for k, piece in enumerate(t.chunk(preshard, dim=dim)):
                groups[f"pytorch_model-{i:05d}-TP-{k:03d}.safetensors"][name] = piece.contiguous()
    else:
        files = shard_files([t.numel() * t.element_size() for t in cast.values()], max_shard_bytes)
        for (name, t), fname in zip(cast.items(), files, strict=True):
            groups[fname][name] = t
        write_shard_index(out, dict(zip(cast, files, strict=True)))
    written = []
    for fname, tensors in sorted(groups.items()):
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        written.append(out / fname)
    (out / "config.json").write_text(json.dumps(model.cfg.to_hf_config(), indent=2) + "\n")
    return written
