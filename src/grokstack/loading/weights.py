"""Grok-2 tensor names <-> model parameters, and the checked copy of one tensor into the model.

Every loader speaks Grok-2's release names (`model.layers.L.block_sparse_moe.experts.E.w1.weight`,
...): Grok-1 leaves are renamed to them, and `convert` writes them back out.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from ..config import ModelConfig
from ..errors import CheckpointError
from ..model import Transformer

_EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")


def empty_model(cfg: ModelConfig, dtype: torch.dtype, device: str | torch.device = "cpu") -> Transformer:
    """A model with allocated but unset weights: built on the meta device, then given storage once."""
    with torch.device("meta"):
        model = Transformer(cfg, dtype)
    return model.to_empty(device=device)


def hf_names(cfg: ModelConfig) -> list[str]:
    """Every tensor name a complete checkpoint of this config holds (Grok-2 naming)."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    norms = ("pre_attn_norm", "post_attn_norm", "pre_moe_norm", "post_moe_norm")
    if cfg.norm_style == "pre":
        norms = ("pre_attn_norm", "pre_moe_norm")
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        names += [p + f"self_attn.{n}_proj.weight" for n in "qkvo"]
        names += [p + f"{n}.weight" for n in norms]
        if cfg.num_experts:
            names.append(p + "block_sparse_moe.gate.weight")
            names += [
                p + f"block_sparse_moe.experts.{e}.{w}.weight"
                for e in range(cfg.num_experts)
                for w in ("w1", "w2", "w3")
            ]
        if cfg.has_dense_mlp:
            names += [p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
    return names


def param_for(model: Transformer, name: str) -> torch.Tensor:
    """The parameter (or the expert's slice of it) that the release tensor `name` fills."""
    m = _EXPERT.fullmatch(name)
    try:
        if m:
            layer, expert, w = int(m[1]), int(m[2]), m[3]
            stacked = getattr(model.layers[layer].block_sparse_moe.experts, w)
            if expert >= stacked.shape[0]:
                raise KeyError(name)
            return stacked.data[expert]
        key = name.removeprefix("model.")
        return model.get_parameter(key).data
    except (AttributeError, IndexError, KeyError):
        raise CheckpointError(f"tensor {name!r} does not belong to this model config") from None


def assign(model: Transformer, name: str, tensor: torch.Tensor, source: str) -> None:
    """Copy one checkpoint tensor into the model, converting dtype; shapes must match exactly."""
    target = param_for(model, name)
    if tuple(tensor.shape) != tuple(target.shape):
        raise CheckpointError(
            f"{source}: tensor {name!r} has shape {list(tensor.shape)}, expected {list(target.shape)}"
        )
    target.copy_(tensor)


def iter_hf_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights under release names, experts one by one (views, no copies)."""
    for name in hf_names(model.cfg):
        yield name, param_for(model, name)
