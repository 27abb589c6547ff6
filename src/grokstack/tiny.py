"""Tiny random checkpoints in the exact release layouts, for tests and the laptop demo.

Values deliberately differ from the releases (caps, theta, multipliers, temperature length), so a
hard-coded release constant anywhere fails the tests, and weights are scaled so the attention,
router and final softcaps actually bite.
"""

from __future__ import annotations

import math

import torch

from .config import ModelConfig, from_grok1_json, from_hf_config
from .loading.weights import empty_model
from .model import Transformer


def tiny_grok2_hf_config() -> dict:
    return {
        "architectures": ["Grok1ForCausalLM"], "model_type": "git", "torch_dtype": "bfloat16",
        "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 3, "head_dim": 16,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
        "moe_intermediate_size": 64, "num_local_experts": 8, "num_experts_per_tok": 2,
        "residual_moe": True, "rms_norm_eps": 1e-05, "embedding_multiplier_scale": 7.0,
        "output_multiplier_scale": 0.75, "attn_logit_softcapping": 20.0,
        "router_logit_softcapping": 12.0, "final_logit_softcapping": 25.0, "rope_theta": 50000,
        "rope_type": "original", "original_max_position_embeddings": 64, "scaling_factor": 4.0,
        "extrapolation_factor": 1.0, "attn_factor": 1.0, "beta_fast": 8, "beta_slow": 1,
        "max_position_embeddings": 256, "attn_temperature_len": 5, "sliding_window_size": -1,
        "global_attn_every_n": 1, "pad_token_id": 0, "eos_token_id": 2,
    }


def tiny_grok1_json() -> dict:
    return {
        "language_model": {
            "vocab_size": 512, "pad_token": 0, "eos_token": 2, "sequence_len": 256,
            "embedding_multiplier_scale": 5.0, "output_multiplier_scale": 0.6, "model_size": 64,
        },
        "transformer": {
            "emb_size": 64, "key_size": 16, "num_q_heads": 4, "num_kv_heads": 2, "num_layers": 12,
            "widening_factor": 2, "attn_output_multiplier": 0.3, "num_experts": 8, "num_selected_experts": 2,
        },
    }


def tiny_config(arch: str) -> ModelConfig:
    return from_grok1_json(tiny_grok1_json()) if arch == "grok-1" else from_hf_config(tiny_grok2_hf_config())


@torch.no_grad()
def random_model(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> Transformer:
    """Random weights whose scores, router logits and logits reach the caps."""
    g = torch.Generator().manual_seed(seed)
    model = empty_model(cfg, torch.float32)
    d = cfg.hidden_size
    for name, p in model.named_parameters():
        fan_in = p.shape[-1]
        if "norm" in name:
            value = 1 + 0.1 * torch.randn(p.shape, generator=g)
        elif name == "embed_tokens.weight":
            value = torch.randn(p.shape, generator=g)
        elif name.endswith(("q_proj.weight", "k_proj.weight")):
            value = torch.randn(p.shape, generator=g) * (6.0 / math.sqrt(fan_in)) / math.sqrt(cfg.qk_scale * 16)
        elif name.endswith("gate.weight") and "block_sparse_moe" in name:
            value = torch.randn(p.shape, generator=g) * (8.0 / math.sqrt(d))
        elif name == "lm_head.weight":
            value = torch.randn(p.shape, generator=g) * (5.0 / math.sqrt(d)) / cfg.output_multiplier
        else:
            value = torch.randn(p.shape, generator=g) / math.sqrt(fan_in)
        p.copy_(value)
    if dtype == torch.float32:
        return model
    cast = empty_model(cfg, dtype)  # keeps norms and the router in fp32
    cast.load_state_dict(model.state_dict())
    return cast
