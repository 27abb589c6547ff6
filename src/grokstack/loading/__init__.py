"""Detect a checkpoint's format and load it: one function, one way in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig, from_hf_config, grok1_preset, load_config_file, read_json
from ..errors import CheckpointError
from ..model import Transformer
from .gguf import GGUFFile, gguf_config, load_gguf, open_gguf, split_parts
from .grok1_ckpt import find_ckpt_dir, load_grok1
from .safetensors_folder import load_safetensors_folder


@dataclass
class Checkpoint:
    path: Path
    format: str  # "grok1-ckpt" | "safetensors" | "gguf"
    config: ModelConfig
    grok1_dir: Path | None = None
    gguf: GGUFFile | None = None


def inspect_checkpoint(path: Path, config: Path | None = None) -> Checkpoint:
    """Find the format and the config of a checkpoint without reading its weights."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such file or folder: {path}")
    if path.is_dir() and not any(path.glob("*.safetensors")) and find_ckpt_dir(path) is None:
        ggufs = sorted(path.glob("*.gguf"))  # a downloaded GGUF repository holding one quant
        if ggufs and all(g in split_parts(ggufs[0]) for g in ggufs):
            ggufs = ggufs[:1]  # the parts of one split GGUF: open it by its first part
        if len(ggufs) > 1:
            names = ", ".join(g.name for g in ggufs)
            raise CheckpointError(f"{path} holds several GGUF files ({names}); pass one of them")
        path = ggufs[0] if ggufs else path
    if path.is_file():
        if config is not None:
            raise CheckpointError("--config applies to checkpoint folders; a GGUF carries its own config")
        if path.suffix != ".gguf":
            raise CheckpointError(
                f"{path} is a file but not a .gguf; give a .gguf file or a checkpoint folder "
                "(Grok-2 safetensors folder or Grok-1 folder with ckpt-0/)"
            )
        gf = open_gguf(path)
        return Checkpoint(path, "gguf", gguf_config(gf), gguf=gf)
    ckpt = find_ckpt_dir(path)
    if ckpt is not None:
        if config is None:  # a config.json in official Grok-1 form next to ckpt-0/, else the real preset
            for cand in (path / "config.json", ckpt.parent / "config.json"):
                if cand.is_file() and {"language_model", "transformer"} <= set(read_json(cand)):
                    config = cand
                    break
        cfg = load_config_file(config) if config else grok1_preset()
        return Checkpoint(path, "grok1-ckpt", cfg, ckpt)
    if any(path.glob("*.safetensors")):
        cfg_file = Path(config) if config else path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{path} has safetensors files but no config.json")
        return Checkpoint(path, "safetensors", from_hf_config(read_json(cfg_file)))
    raise CheckpointError(
        f"{path} is not a checkpoint: expected *.safetensors with config.json (Grok-2), "
        "ckpt-0/tensor00000_000 (Grok-1) or a .gguf file"
    )


def load_weights(ckpt: Checkpoint, dtype: torch.dtype, progress=None) -> Transformer:
    if ckpt.format == "gguf":
        return load_gguf(ckpt.gguf, ckpt.config, dtype, progress)
    if ckpt.format == "grok1-ckpt":
        return load_grok1(ckpt.grok1_dir, ckpt.config, dtype, progress)
    from ..quant import is_quantized_checkpoint, load_quantized

    if is_quantized_checkpoint(ckpt.path):  # written by `convert --quantize`: loads as stored, never re-quantized
        return load_quantized(ckpt.path, ckpt.config, dtype, progress)
    return load_safetensors_folder(ckpt.path, ckpt.config, dtype, progress)
