"""`ModelConfig`: every number and switch the forward pass reads.

Built from Grok-2's `config.json` (`from_hf_config`), from the official Grok-1 JSON field names
(`from_grok1_json`) or from the real Grok-1 preset (`grok1_preset`). The knobs at the bottom of the
dataclass reproduce known disagreements between engines (spec §5); their defaults for each model are
the reference: xAI's JAX code for Grok-1, SGLang's default Triton kernels for Grok-2.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

ARCHES = ("grok-1", "grok-2", "llama")  # llama: the dense family the bundled default model uses
GELUS = ("erf", "tanh")
HIDDEN_ACTS = ("gelu", "silu")
NORM_STYLES = ("sandwich", "pre")
TEMPERATURE_STYLES = ("log2_after_cap", "log2_before_cap", "inv_linear", "none")
ROPE_ORIGINAL_AS = ("plain", "yarn")
ROUTER_DTYPES = ("float32", "model")

# Keys of the `grokstack` object that config.json may carry next to the HF fields.
KNOBS = (
    "gelu",
    "router_renormalize",
    "router_dtype",
    "attn_temperature_style",
    "attn_temperature_pos_offset",
    "rope_original_as",
    "attn_out_multiplier_on_o",
    "dense_gelu_round_bf16",
    "norm_style",
    "hidden_act",
)


@dataclass
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    intermediate_size: int = 0  # dense MLP of residual MoE (Grok-2); 0 = none
    residual_moe: bool = False
    rms_norm_eps: float = 1e-5
    embedding_multiplier: float = 1.0
    output_multiplier: float = 1.0
    qk_scale: float = 0.0  # 0 = head_dim ** -0.5
    attn_softcap: float = 30.0  # 0 = off
    router_softcap: float = 0.0  # 0 = off
    final_softcap: float = 0.0  # 0 = off
    attn_temperature_len: int = 0  # L of Grok-2's attention temperature; <= 0 = off
    rope_theta: float = 10000  # Grok-2 reads it as int (SGLang's int(rope_theta))
    rope_type: str = "default"  # Grok-2 says "original" (plain RoPE in SGLang)
    original_max_position_embeddings: int = 8192
    scaling_factor: float = 1.0
    extrapolation_factor: float = 1.0
    attn_factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    max_position_embeddings: int = 8192
    sliding_window_size: int = -1
    global_attn_every_n: int = 1
    tie_word_embeddings: bool = False
    mask_pad_keys: bool = False  # Grok-1 masks keys whose token id is pad_token_id
    pad_token_id: int = 0
    bos_token_id: int | None = None
    eos_token_id: int = 2
    # Model family switches (not engine disagreements): Grok = sandwich norms + GELU; Llama = pre-norm + SiLU.
    norm_style: str = "sandwich"
    hidden_act: str = "gelu"

    # --- knobs: one per known disagreement between engines ----------------------------------
    # "erf" = SGLang / vLLM / hpcai (Grok-2 reference); "tanh" = xAI JAX, llama.cpp, sgl-jax.
    gelu: str = "erf"
    # True = llama.cpp (both models) and vLLM Grok-1; references never renormalise top-k.
    router_renormalize: bool = False
    # "model" = hpcai HF port / vLLM Grok-1 (router in bf16); references route in fp32.
    router_dtype: str = "float32"
    # SGLang Triton default = log2_after_cap; unified_attention.py = log2_before_cap;
    # SGLang deterministic mode = inv_linear; vLLM / llama.cpp = none.
    attn_temperature_style: str = "log2_after_cap"
    # 1 = sgl-jax native backend (decode position off by one).
    attn_temperature_pos_offset: int = 0
    # "yarn" = llama.cpp's reading of rope_type "original".
    rope_original_as: str = "plain"
    # True = keyfan Grok-1 HF port (attention multiplier applied to o_proj output too).
    attn_out_multiplier_on_o: bool = False
    # SGLang rounds the dense MLP's GELU output to bf16 before the up-projection product.
    dense_gelu_round_bf16: bool = True

    def __post_init__(self) -> None:
        if not self.qk_scale:
            self.qk_scale = self.head_dim**-0.5
        self.validate()

    # ------------------------------------------------------------------ checks and sizes
    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"invalid model config: {msg}")

        need(self.arch in ARCHES, f"arch {self.arch!r} is not one of {ARCHES}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(
            self.num_experts > 0 or self.arch == "llama",
            "num_local_experts is 0; Grok models without experts are not supported (SGLang raises too)",
        )
        if self.num_experts:
            need(self.moe_intermediate_size > 0, "moe_intermediate_size must be positive")
            need(
                0 < self.num_experts_per_tok <= self.num_experts,
                f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..{self.num_experts}",
            )
        else:
            need(self.intermediate_size > 0, "a model without experts needs intermediate_size > 0")
        need(
            self.num_heads % self.num_kv_heads == 0,
            f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads="
            f"{self.num_kv_heads}",
        )
        need(self.head_dim % 2 == 0, "head_dim must be even for RoPE")
        need(not self.residual_moe or self.intermediate_size > 0, "residual_moe needs intermediate_size > 0")
        need(self.gelu in GELUS, f"gelu must be one of {GELUS}")
        need(self.hidden_act in HIDDEN_ACTS, f"hidden_act must be one of {HIDDEN_ACTS}")
        need(self.norm_style in NORM_STYLES, f"norm_style must be one of {NORM_STYLES}")
        need(self.router_dtype in ROUTER_DTYPES, f"router_dtype must be one of {ROUTER_DTYPES}")
        need(
            self.attn_temperature_style in TEMPERATURE_STYLES,
            f"attn_temperature_style must be one of {TEMPERATURE_STYLES}",
        )
        need(self.attn_temperature_pos_offset in (0, 1), "attn_temperature_pos_offset must be 0 or 1")
        need(self.rope_original_as in ROPE_ORIGINAL_AS, f"rope_original_as must be one of {ROPE_ORIGINAL_AS}")
        need(
            self.sliding_window_size in (-1, 0) and self.global_attn_every_n in (0, 1),
            "sliding-window attention (sliding_window_size > 0) is not supported",
        )
        need(self.max_position_embeddings > 0, "max_position_embeddings must be positive")

    @property
    def has_dense_mlp(self) -> bool:
        return self.residual_moe or self.num_experts == 0

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings

    @property
    def temperature_on(self) -> bool:
        return self.attn_temperature_len > 0 and self.attn_temperature_style != "none"

    @property
    def use_yarn(self) -> bool:
        return self.rope_type == "original" and self.rope_original_as == "yarn"

    def parameter_counts(self) -> dict[str, int]:
        """Total and per-token active parameter counts, from the shapes alone."""
        d, f, e = self.hidden_size, self.moe_intermediate_size, self.num_experts
        attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        expert = 3 * d * f
        dense = 3 * d * self.intermediate_size if self.has_dense_mlp else 0
        norms = (4 if self.norm_style == "sandwich" else 2) * d
        per_layer_fixed = attn + dense + d * e + norms
        embed = self.vocab_size * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        fixed = embed + head + d + self.num_layers * per_layer_fixed
        return {
            "total": fixed + self.num_layers * e * expert,
            "active": fixed + self.num_layers * self.num_experts_per_tok * expert,
        }

    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * bytes_per_value

    def with_overrides(self, overrides: dict[str, Any]) -> ModelConfig:
        """A copy with some fields changed (knobs from the CLI `--set` or the Python API)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known: {sorted(names)}")
        typed = {k: _coerce(getattr(self, k), v, k) for k, v in overrides.items()}
        return dataclasses.replace(self, **typed)

    # ------------------------------------------------------------------ HF config.json
    def to_hf_config(self) -> dict[str, Any]:
        """Grok-2's config.json field names, plus a `grokstack` object for what they cannot say."""
        out = {
            "architectures": ["Grok1ForCausalLM"],
            "model_type": "git",
            "torch_dtype": "bfloat16",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "head_dim": self.head_dim,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "residual_moe": self.residual_moe,
            "rms_norm_eps": self.rms_norm_eps,
            "embedding_multiplier_scale": self.embedding_multiplier,
            "output_multiplier_scale": self.output_multiplier,
            "attn_logit_softcapping": self.attn_softcap,
            "router_logit_softcapping": self.router_softcap,
            "final_logit_softcapping": self.final_softcap,
            "rope_theta": self.rope_theta,
            "rope_type": self.rope_type,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "scaling_factor": self.scaling_factor,
            "extrapolation_factor": self.extrapolation_factor,
            "attn_factor": self.attn_factor,
            "beta_fast": self.beta_fast,
            "beta_slow": self.beta_slow,
            "max_position_embeddings": self.max_position_embeddings,
            "attn_temperature_len": self.attn_temperature_len,
            "sliding_window_size": self.sliding_window_size,
            "global_attn_every_n": self.global_attn_every_n,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if self.bos_token_id is not None:
            out["bos_token_id"] = self.bos_token_id
        out["grokstack"] = {
            "arch": self.arch,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attn_output_multiplier": self.qk_scale,
            "mask_pad_keys": self.mask_pad_keys,
            **{k: getattr(self, k) for k in KNOBS},
        }
        return out


def _coerce(current: Any, value: Any, name: str) -> Any:
    """Turn a CLI string like 'false' or '30' into the type of the field it replaces."""
    if not isinstance(value, str) or isinstance(current, str):
        return value
    try:
        if isinstance(current, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return value.lower() in ("true", "1")
        if isinstance(current, int):
            return int(value)
        if isinstance(current, float):
            return float(value)
    except ValueError:
        raise ConfigError(f"config field {name}: cannot read {value!r} as {type(current).__name__}") from None
    return value


def _num(cfg: dict, key: str, default: Any = None) -> Any:
    value = cfg.get(key, default)
    if value is None:
        raise ConfigError(f"config.json has no {key!r}")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"config.json field {key!r} must be a number, got {value!r}")
    return value


def from_hf_config(cfg: dict[str, Any]) -> ModelConfig:
    """Read Grok-2's config.json (spec §1.2 reading rules); never resolve it through AutoConfig."""
    ext = cfg.get("grokstack") or {}
    arch = ext.get("arch", "grok-2")
    head_dim = int(_num(cfg, "head_dim", 128))
    acap = cfg.get("attn_logit_softcapping", 30.0)
    acap = 30.0 if acap is None else max(float(acap), 0.0)
    fcap = cfg.get("final_logit_softcapping")
    fcap = float(fcap) if fcap and float(fcap) > 0 else 0.0
    rcap = cfg.get("router_logit_softcapping", 30.0)
    rcap = float(rcap) if rcap and float(rcap) > 0 else 0.0
    experts = int(_num(cfg, "num_local_experts", 8))
    moe_ff = cfg.get("moe_intermediate_size") or cfg.get("intermediate_size")
    if not moe_ff:
        raise ConfigError("config.json has neither 'moe_intermediate_size' nor 'intermediate_size'")
    residual = bool(cfg.get("residual_moe", False))
    knobs = {k: ext[k] for k in KNOBS if k in ext}
    if arch == "grok-1":
        knobs.setdefault("gelu", "tanh")
    return ModelConfig(
        arch=arch,
        vocab_size=int(_num(cfg, "vocab_size")),
        hidden_size=int(_num(cfg, "hidden_size")),
        num_layers=int(_num(cfg, "num_hidden_layers")),
        num_heads=int(_num(cfg, "num_attention_heads")),
        num_kv_heads=int(_num(cfg, "num_key_value_heads", cfg.get("num_attention_heads"))),
        head_dim=head_dim,
        moe_intermediate_size=int(moe_ff),
        num_experts=experts,
        num_experts_per_tok=int(_num(cfg, "num_experts_per_tok", 2)),
        intermediate_size=int(cfg.get("intermediate_size") or 0) if residual or experts == 0 else 0,
        residual_moe=residual,
        rms_norm_eps=float(_num(cfg, "rms_norm_eps", 1e-5)),
        embedding_multiplier=float(_num(cfg, "embedding_multiplier_scale", 1.0)),
        output_multiplier=float(_num(cfg, "output_multiplier_scale", 1.0)),
        qk_scale=float(ext.get("attn_output_multiplier") or head_dim**-0.5),
        attn_softcap=acap,
        router_softcap=rcap,
        final_softcap=fcap,
        attn_temperature_len=int(cfg.get("attn_temperature_len") or 0),
        rope_theta=int(_num(cfg, "rope_theta", 10000)),
        rope_type=str(cfg.get("rope_type") or "default"),
        original_max_position_embeddings=int(_num(cfg, "original_max_position_embeddings", 8192)),
        scaling_factor=float(_num(cfg, "scaling_factor", 1.0)),
        extrapolation_factor=float(_num(cfg, "extrapolation_factor", 1.0)),
        attn_factor=float(_num(cfg, "attn_factor", 1.0)),
        beta_fast=float(_num(cfg, "beta_fast", 32.0)),
        beta_slow=float(_num(cfg, "beta_slow", 1.0)),
        max_position_embeddings=int(_num(cfg, "max_position_embeddings", 8192)),
        sliding_window_size=int(cfg.get("sliding_window_size", -1) or -1),
        global_attn_every_n=int(cfg.get("global_attn_every_n", 1) or 1),
        # SGLang never ties Grok-2's head; only grokstack's own Grok-1 conversions say otherwise.
        tie_word_embeddings=bool(ext.get("tie_word_embeddings", False)),
        mask_pad_keys=bool(ext.get("mask_pad_keys", arch == "grok-1")),
        pad_token_id=int(cfg.get("pad_token_id") or 0),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=int(cfg.get("eos_token_id") or 2),
        **knobs,
    )


def grok1_ffn_size(emb_size: int, widening_factor: float) -> int:
    """The official Grok-1 expert width: 2/3 of widening*emb, rounded up to a multiple of 8."""
    size = int(widening_factor * emb_size) * 2 // 3
    return size + (8 - size) % 8


def from_grok1_json(cfg: dict[str, Any]) -> ModelConfig:
    """Read the official Grok-1 field names: `language_model` and `transformer` objects."""
    try:
        lm, tr = cfg["language_model"], cfg["transformer"]
    except (KeyError, TypeError):
        raise ConfigError("a Grok-1 config needs 'language_model' and 'transformer' objects") from None
    emb = int(_num(tr, "emb_size", lm.get("model_size")))
    ffn = tr.get("ffn_size") or grok1_ffn_size(emb, _num(tr, "widening_factor"))
    return ModelConfig(
        arch="grok-1",
        vocab_size=int(_num(lm, "vocab_size")),
        hidden_size=emb,
        num_layers=int(_num(tr, "num_layers")),
        num_heads=int(_num(tr, "num_q_heads")),
        num_kv_heads=int(_num(tr, "num_kv_heads")),
        head_dim=int(_num(tr, "key_size")),
        moe_intermediate_size=int(ffn),
        num_experts=int(_num(tr, "num_experts", 8)),
        num_experts_per_tok=int(_num(tr, "num_selected_experts", 2)),
        rms_norm_eps=1e-5,
        embedding_multiplier=float(_num(lm, "embedding_multiplier_scale", 1.0)),
        output_multiplier=float(_num(lm, "output_multiplier_scale", 1.0)),
        qk_scale=float(_num(tr, "attn_output_multiplier", 1.0)),
        attn_softcap=30.0,  # hard-coded in the official model.py
        router_softcap=0.0,
        final_softcap=0.0,
        rope_theta=10000,
        max_position_embeddings=int(_num(lm, "sequence_len", 8192)),
        tie_word_embeddings=True,
        mask_pad_keys=True,
        pad_token_id=int(lm.get("pad_token", 0)),
        bos_token_id=1,
        eos_token_id=int(lm.get("eos_token", 2)),
        gelu="tanh",
    )


def grok1_preset() -> ModelConfig:
    """The released Grok-1 (xai-org/grok-1 run.py)."""
    return from_grok1_json(
        {
            "language_model": {
                "vocab_size": 128 * 1024,
                "pad_token": 0,
                "eos_token": 2,
                "sequence_len": 8192,
                "embedding_multiplier_scale": 78.38367176906169,
                "output_multiplier_scale": 0.5773502691896257,
            },
            "transformer": {
                "emb_size": 48 * 128,
                "key_size": 128,
                "num_q_heads": 48,
                "num_kv_heads": 8,
                "num_layers": 64,
                "widening_factor": 8,
                "attn_output_multiplier": 0.08838834764831845,
                "num_experts": 8,
                "num_selected_experts": 2,
            },
        }
    )


def grok2_preset() -> ModelConfig:
    """The released Grok-2 config.json values (spec §1.2, C1)."""
    return from_hf_config(
        {
            "vocab_size": 131072, "hidden_size": 8192, "num_hidden_layers": 64, "head_dim": 128,
            "num_attention_heads": 64, "num_key_value_heads": 8, "intermediate_size": 32768,
            "moe_intermediate_size": 16384, "num_local_experts": 8, "num_experts_per_tok": 2,
            "residual_moe": True, "rms_norm_eps": 1e-05,
            "embedding_multiplier_scale": 90.50966799187809, "output_multiplier_scale": 0.5,
            "attn_logit_softcapping": 30.0, "router_logit_softcapping": 30.0,
            "final_logit_softcapping": 50, "rope_theta": 208533496, "rope_type": "original",
            "original_max_position_embeddings": 8192, "scaling_factor": 16.0,
            "extrapolation_factor": 1.0, "attn_factor": 1.0, "beta_fast": 8, "beta_slow": 1,
            "max_position_embeddings": 131072, "attn_temperature_len": 1024,
            "sliding_window_size": -1, "global_attn_every_n": 1,
        }
    )


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path} as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def load_config_file(path: Path) -> ModelConfig:
    """A JSON file in either form: official Grok-1 field names or HF/Grok-2 config.json."""
    data = read_json(path)
    if "language_model" in data and "transformer" in data:
        return from_grok1_json(data)
    return from_hf_config(data)

