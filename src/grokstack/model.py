"""The Grok-1 / Grok-2 transformer: the math of spec §2, nothing else.

One skeleton serves both models; `ModelConfig` says which caps, multipliers, GELU and router
rules apply. Activations stay in the weight dtype (fp32 or bf16) and the parts the references
compute in fp32 (norms, RoPE, router, attention scores and softmax, caps) are done in fp32,
which puts the bf16 rounding points where spec §3 says they are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kv_cache import StepContext

MASK_VALUE = -1e30  # xAI's JAX code masks with -1e30, not -inf (a fully masked row stays finite)
ATTN_CHUNK_ELEMS = 1 << 26  # fp32 score elements per attention chunk (256 MiB)


class RMSNorm(nn.Module):
    """y = w * x * rsqrt(mean(x^2) + eps), in fp32, cast back; w multiplies as is (not 1 + w)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return y.to(x.dtype)


def activation(x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """The gated FFN's activation: GELU (erf or tanh, per the `gelu` knob) for Grok, SiLU for Llama."""
    if cfg.hidden_act == "silu":
        return F.silu(x)
    return F.gelu(x, approximate="tanh" if cfg.gelu == "tanh" else "none")


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return cap * torch.tanh(x / cap) if cap > 0 else x


# ---------------------------------------------------------------------------------------- RoPE
def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    rot = cfg.head_dim
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))  # [D/2]


def _yarn_mix(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """llama.cpp's YaRN reading of rope_type "original": per-frequency blend and magnitude scale."""
    rot, base = cfg.head_dim, float(cfg.rope_theta)

    def corr_dim(n_rot: float) -> float:
        return rot * math.log(cfg.original_max_position_embeddings / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(0.0, math.floor(corr_dim(cfg.beta_fast)))
    high = min(rot - 1.0, math.ceil(corr_dim(cfg.beta_slow)))
    i = torch.arange(rot // 2, dtype=torch.float32)
    ramp = 1 - ((i - low) / max(0.001, high - low)).clamp(0, 1)
    mix = ramp * cfg.extrapolation_factor
    mscale = cfg.attn_factor
    if cfg.extrapolation_factor != 0:
        mscale *= 1.0 + 0.1 * math.log(cfg.scaling_factor)
    return mix, mscale


def rope_cos_sin(cfg: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, D] in fp32 for absolute positions [B, T]; phase computed in fp32 (spec §2.3)."""
    inv_freq = rope_inv_freq(cfg).to(positions.device)
    phase = positions.to(torch.float32)[..., None] * inv_freq  # [B, T, D/2]
    scale = 1.0
    if cfg.use_yarn:
        mix, scale = _yarn_mix(cfg)
        mix = mix.to(positions.device)
        phase = phase / cfg.scaling_factor * (1 - mix) + phase * mix
    phase = torch.cat([phase, phase], dim=-1)
    return torch.cos(phase) * scale, torch.sin(phase) * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX rotate-half RoPE on x [B, T, H, D], in fp32, cast back."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos[:, :, None] + rotated * sin[:, :, None]).to(x.dtype)


# ----------------------------------------------------------------------------------- attention
def temperature_factor(cfg: ModelConfig, q_pos: torch.Tensor) -> torch.Tensor:
    """Grok-2's per-query score multiplier [B, T] in fp32; q_pos is 0-based and absolute."""
    L = float(cfg.attn_temperature_len)
    p = (q_pos + cfg.attn_temperature_pos_offset).to(torch.float32)
    if cfg.attn_temperature_style == "inv_linear":
        return torch.where(p < L, torch.ones_like(p), L / (p + 1))
    return torch.where(p > L, torch.log2(p.clamp(min=1.0)) / math.log2(L), torch.ones_like(p))


def attend(
    cfg: ModelConfig,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    key_valid: torch.Tensor | None,
) -> torch.Tensor:
    """Scores, caps, temperature, mask, softmax. q [B, T, Hq, D]; k, v [B, S, Hkv, D] -> [B, T, Hq*D].

    Key index j is absolute position j, so the causal mask is j <= q_pos. Plain softmax attention (no cap,
    no temperature: the Llama-family default model) runs as PyTorch's fused kernel; Grok's takes the steps
    below, which put the caps where the references put them.
    """
    if cfg.attn_softcap <= 0 and not cfg.temperature_on:
        return _attend_fused(cfg, q, k, v, q_pos, key_valid)
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv  # query head h reads kv head h // G
    qg = q.view(B, T, Hkv, G, D).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, T, D]
    kt = k.permute(0, 2, 3, 1)[:, :, None]  # [B, Hkv, 1, D, S]
    vg = v.permute(0, 2, 1, 3)[:, :, None]  # [B, Hkv, 1, S, D]
    key_pos = torch.arange(S, device=q.device)
    factor = temperature_factor(cfg, q_pos) if cfg.temperature_on else None  # [B, T]
    chunk = max(1, ATTN_CHUNK_ELEMS // max(1, B * Hq * S))
    outs = []
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        s = (qg[:, :, :, t0:t1] @ kt).float() * cfg.qk_scale  # [B, Hkv, G, t, S]
        f = factor[:, None, None, t0:t1, None] if factor is not None else None
        if f is not None and cfg.attn_temperature_style == "log2_before_cap":
            s = s * f
        s = softcap(s, cfg.attn_softcap)
        if f is not None and cfg.attn_temperature_style != "log2_before_cap":
            s = s * f
        allowed = key_pos[None, None, :] <= q_pos[:, t0:t1, None]  # [B, t, S]
        if key_valid is not None:
            allowed = allowed & key_valid[:, None, :]
        s = s.masked_fill(~allowed[:, None, None], MASK_VALUE)
        p = torch.softmax(s, dim=-1).to(v.dtype)
        outs.append(p @ vg)  # [B, Hkv, G, t, D]
    o = torch.cat(outs, dim=3) if len(outs) > 1 else outs[0]
    return o.permute(0, 3, 1, 2, 4).reshape(B, T, Hq * D)


def _attend_fused(cfg: ModelConfig, q, k, v, q_pos, key_valid) -> torch.Tensor:
    """softmax(q k^T * qk_scale, causal and key mask) v by scaled_dot_product_attention; same shapes as attend."""
    B, T, Hq, D = q.shape
    allowed = torch.arange(k.shape[1], device=q.device)[None, None, :] <= q_pos[:, :, None]  # [B, T, S]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=allowed[:, None], scale=cfg.qk_scale, enable_gqa=True)
    return o.transpose(1, 2).reshape(B, T, Hq * D)  # [B, T, Hq*D]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=False, dtype=dtype)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=False, dtype=dtype)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=False, dtype=dtype)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=False, dtype=dtype)

    def forward(self, x, cos, sin, positions, layer, step: StepContext | None, key_valid) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).view(B, T, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).view(B, T, cfg.num_kv_heads, cfg.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if step is None:
            o = attend(cfg, q, k, v, positions, key_valid)
        else:
            o = attend_paged(cfg, q[0], k[0], v[0], layer, step)[None]
        h = self.o_proj(o)
        if cfg.attn_out_multiplier_on_o:
            h = h * cfg.qk_scale
        return h


def attend_paged(cfg: ModelConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
                 step: StepContext) -> torch.Tensor:
    """A flat step's attention: store k, v [N, Hkv, D] in the paged cache, then each group of rows attends
    to its keys through its block tables. q [N, Hq, D] -> [N, Hq*D]."""
    kv = step.kv
    kv.write(layer, step.slots, k, v)
    out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
    for g in step.groups:
        keys, values = kv.read(layer, g.tables, g.length)  # [R, S, Hkv, D]
        valid = kv.valid_keys(g.tables, g.length) if cfg.mask_pad_keys else None
        if g.whole:  # one group of equal rows (e.g. decode only): no gather, no scatter
            return attend(cfg, q.view(*g.index.shape, *q.shape[1:]), keys, values, g.q_pos, valid).flatten(0, 1)
        o = attend(cfg, q[g.index], keys, values, g.q_pos, valid)  # [R, T, Hq*D]
        out[g.index[g.present]] = o[g.present]
    return out


# ------------------------------------------------------------------------------- MoE and MLP
class Experts(nn.Module):
    """All experts' weights stacked: w1 = gate, w3 = up [E, F, D]; w2 = down [E, D, F].

    A rank under expert parallelism holds experts `first .. first + E_local - 1` only; quantized
    stacks (`quant.py`) subclass this and override `project`.
    """

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        e, f, d = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.w1 = nn.Parameter(torch.empty(e, f, d, dtype=dtype))
        self.w2 = nn.Parameter(torch.empty(e, d, f, dtype=dtype))
        self.w3 = nn.Parameter(torch.empty(e, f, d, dtype=dtype))
        self.first = 0

    @property
    def count(self) -> int:
        return self.w1.shape[0]

    def project(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        """x [n, in] @ W[e].T for stack `name` (w1, w2 or w3) and local expert index e -> [n, out]."""
        return x @ getattr(self, name)[e].T


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.cfg = cfg
        router_dtype = torch.float32 if cfg.router_dtype == "float32" else dtype
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False, dtype=router_dtype)
        self.experts = Experts(cfg, dtype)
        # Parity hook: force these expert ids [N, k] (references route chaotically in bf16).
        self.forced_experts: torch.Tensor | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids and weights [N, k]: softmax over all experts, top-k by repeated argmax."""
        cfg = self.cfg
        logits = self.gate(x.to(self.gate.weight.dtype)).float()  # [N, E]
        probs = torch.softmax(softcap(logits, cfg.router_softcap), dim=-1)
        if self.forced_experts is not None:
            ids = self.forced_experts.reshape(x.shape[0], -1).to(torch.long)
        else:
            # argmax returns the first maximum, so ties go to the lower expert id (SGLang's kernel).
            remaining, picks = probs.clone(), []
            for _ in range(cfg.num_experts_per_tok):
                i = remaining.argmax(dim=-1)
                picks.append(i)
                remaining.scatter_(1, i[:, None], -1.0)
            ids = torch.stack(picks, dim=1)
        weights = probs.gather(1, ids)
        if cfg.router_renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        ids, weights = self.route(x)
        out = torch.zeros_like(x)
        w = self.experts
        for e in torch.unique(ids).tolist():
            local = e - w.first
            if not 0 <= local < w.count:  # another rank's expert (expert parallelism)
                continue
            rows, slot = torch.nonzero(ids == e, as_tuple=True)
            h = x[rows]
            g, u = w.project("w1", local, h), w.project("w3", local, h)
            a = (activation(g.float(), self.cfg) * u.float()).to(x.dtype)
            y = w.project("w2", local, a)  # [n, D]
            out.index_add_(0, rows, (y.float() * weights[rows, slot, None]).to(x.dtype))
        return out.view(shape)


class DenseMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = activation(self.gate_proj(x).float(), self.cfg)
        u = self.up_proj(x)
        if self.cfg.dense_gelu_round_bf16:
            a = g.to(x.dtype) * u
        else:
            a = (g * u.float()).to(x.dtype)
        return self.down_proj(a)


class DecoderLayer(nn.Module):
    """Grok: sandwich norms, each post-norm before its residual add. Llama: pre-norms only."""

    def __init__(self, cfg: ModelConfig, index: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.index = index
        self.self_attn = Attention(cfg, dtype)
        self.block_sparse_moe = MoE(cfg, dtype) if cfg.num_experts else None
        self.mlp = DenseMLP(cfg, dtype) if cfg.has_dense_mlp else None
        eps, d = cfg.rms_norm_eps, cfg.hidden_size
        sandwich = cfg.norm_style == "sandwich"
        self.pre_attn_norm = RMSNorm(d, eps)
        self.post_attn_norm = RMSNorm(d, eps) if sandwich else None
        self.pre_moe_norm = RMSNorm(d, eps)
        self.post_moe_norm = RMSNorm(d, eps) if sandwich else None

    def forward(self, x, cos, sin, positions, step, key_valid) -> torch.Tensor:
        h = self.self_attn(self.pre_attn_norm(x), cos, sin, positions, self.index, step, key_valid)
        x = x + (self.post_attn_norm(h) if self.post_attn_norm is not None else h)
        m = self.pre_moe_norm(x)
        if self.block_sparse_moe is None:
            f = self.mlp(m)
        elif self.mlp is None:
            f = self.block_sparse_moe(m)
        else:
            f = (self.mlp(m) + self.block_sparse_moe(m)) / math.sqrt(2)  # Grok-2 residual MoE
        return x + (self.post_moe_norm(f) if self.post_moe_norm is not None else f)


# ------------------------------------------------------------------------------------ model
class Transformer(nn.Module):
    """Parameter names follow Grok-2's release without the leading `model.` (experts stacked)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, dtype) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = (
            None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype)
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def hidden(self, tokens: torch.Tensor, step: StepContext | None = None) -> torch.Tensor:
        """Final-normed hidden states.

        Without a step: tokens [B, T] are whole sequences from position 0 -> [B, T, D]. With a step: tokens [N]
        are the step's flat tokens at step.positions, attending through the paged cache -> [N, D].
        """
        cfg = self.cfg
        if step is None:
            B, T = tokens.shape
            positions = torch.arange(T, device=tokens.device).expand(B, T)
            key_valid = tokens != cfg.pad_token_id if cfg.mask_pad_keys else None  # Grok-1 masks pad keys
        else:
            tokens, positions = tokens[None], step.positions[None]  # one row of N tokens: [1, N]
            key_valid = None
            if cfg.mask_pad_keys:
                step.kv.key_valid[step.slots] = tokens[0] != cfg.pad_token_id
        cos, sin = rope_cos_sin(cfg, positions)
        x = self.embed_tokens(tokens) * cfg.embedding_multiplier  # [B, T, D]
        for layer in self.layers:
            x = layer(x, cos, sin, positions, step, key_valid)
        x = self.norm(x)
        return x if step is None else x[0]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits [..., V] from normed hidden states [..., D]."""
        out = (h @ self.embed_tokens.weight.T if self.lm_head is None else self.lm_head(h)) * self.cfg.output_multiplier
        return softcap(out.float(), self.cfg.final_softcap)

    def forward(self, tokens: torch.Tensor, step: StepContext | None = None) -> torch.Tensor:
        return self.logits(self.hidden(tokens, step))  # [B, T, V], or [N, V] for a step
