"""An independent float64 NumPy forward pass, written from spec §2 (not from grokstack.model).

Weights come as a dict of NumPy arrays under Grok-2 release names (experts one by one); the
config as the few numbers the spec's skeleton needs. One sequence at a time, no cache, no
shortcuts: this is the slow, obvious version of the math.
"""

from __future__ import annotations

import math

import numpy as np

_erf = np.vectorize(math.erf)


def rms(x, w, eps):
    return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def gelu(x, kind):
    if kind == "silu":
        return x / (1 + np.exp(-x))
    if kind == "tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def cap(x, c):
    return c * np.tanh(x / c) if c else x


def rope(x, positions, theta):
    """x [T, H, D]; NeoX halves; inv_freq and phase in fp32 as the spec requires."""
    d = x.shape[-1]
    inv = (np.float32(1.0) / (np.float32(theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))))
    phase = (positions.astype(np.float32)[:, None] * inv[None, :]).astype(np.float64)  # [T, D/2]
    cos, sin = np.cos(phase)[:, None, :], np.sin(phase)[:, None, :]
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def forward(c: dict, W: dict, tokens: np.ndarray, return_hidden: bool = False):
    """Logits [T, V] for one sequence of token ids (positions 0..T-1)."""
    T = len(tokens)
    pos = np.arange(T)
    Hq, Hkv, D = c["num_heads"], c["num_kv_heads"], c["head_dim"]
    x = W["model.embed_tokens.weight"][tokens] * c["embedding_multiplier"]
    hidden = []
    for layer in range(c["num_layers"]):
        p = f"model.layers.{layer}."
        a = rms(x, W[p + "pre_attn_norm.weight"], c["eps"])
        q = (a @ W[p + "self_attn.q_proj.weight"].T).reshape(T, Hq, D)
        k = (a @ W[p + "self_attn.k_proj.weight"].T).reshape(T, Hkv, D)
        v = (a @ W[p + "self_attn.v_proj.weight"].T).reshape(T, Hkv, D)
        q, k = rope(q, pos, c["rope_theta"]), rope(k, pos, c["rope_theta"])
        o = np.zeros((T, Hq, D))
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            s = (q[:, h] @ k[:, kh].T) * c["qk_scale"]  # [T, T]
            s = cap(s, c["attn_softcap"])
            L = c["attn_temperature_len"]
            if L > 0:
                factor = np.where(pos > L, np.log2(np.maximum(pos, 1)) / math.log2(L), 1.0)
                s = s * factor[:, None]
            allowed = pos[None, :] <= pos[:, None]
            if c["mask_pad_keys"]:
                allowed = allowed & (tokens != c["pad_token_id"])[None, :]
            s = np.where(allowed, s, -1e30)
            e = np.exp(s - s.max(axis=1, keepdims=True))
            o[:, h] = (e / e.sum(axis=1, keepdims=True)) @ v[:, kh]
        hout = o.reshape(T, Hq * D) @ W[p + "self_attn.o_proj.weight"].T
        x = x + (rms(hout, W[p + "post_attn_norm.weight"], c["eps"]) if c["sandwich"] else hout)
        m = rms(x, W[p + "pre_moe_norm.weight"], c["eps"])
        moe = np.zeros_like(m)
        if c["num_experts"]:
            r = cap(m @ W[p + "block_sparse_moe.gate.weight"].T, c["router_softcap"])  # [T, E]
            pr = np.exp(r - r.max(axis=1, keepdims=True))
            pr = pr / pr.sum(axis=1, keepdims=True)
            for t in range(T):
                order = sorted(range(pr.shape[1]), key=lambda e, t=t: (-pr[t, e], e))[: c["top_k"]]
                for e in order:
                    ep = p + f"block_sparse_moe.experts.{e}."
                    hid = gelu(m[t] @ W[ep + "w1.weight"].T, c["gelu"]) * (m[t] @ W[ep + "w3.weight"].T)
                    moe[t] += pr[t, e] * (hid @ W[ep + "w2.weight"].T)
        if c["dense"]:
            dense = gelu(m @ W[p + "mlp.gate_proj.weight"].T, c["gelu"]) * (m @ W[p + "mlp.up_proj.weight"].T)
            dense = dense @ W[p + "mlp.down_proj.weight"].T
        f = (dense + moe) / math.sqrt(2) if c["num_experts"] and c["dense"] else (moe if c["num_experts"] else dense)
        x = x + (rms(f, W[p + "post_moe_norm.weight"], c["eps"]) if c["sandwich"] else f)
        hidden.append(x)
    h = rms(x, W["model.norm.weight"], c["eps"])
    out = W.get("lm_head.weight", W["model.embed_tokens.weight"])
    logits = cap((h @ out.T) * c["output_multiplier"], c["final_softcap"])
    return (logits, hidden) if return_hidden else logits


def config_dict(cfg) -> dict:
    """The numbers above, read off a grokstack ModelConfig (plain data, no model code)."""
    return {
        "num_layers": cfg.num_layers, "num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "eps": cfg.rms_norm_eps, "embedding_multiplier": cfg.embedding_multiplier,
        "output_multiplier": cfg.output_multiplier, "qk_scale": cfg.qk_scale, "attn_softcap": cfg.attn_softcap,
        "router_softcap": cfg.router_softcap, "final_softcap": cfg.final_softcap,
        "attn_temperature_len": cfg.attn_temperature_len, "rope_theta": cfg.rope_theta,
        "mask_pad_keys": cfg.mask_pad_keys, "pad_token_id": cfg.pad_token_id, "top_k": cfg.num_experts_per_tok,
        "gelu": "silu" if cfg.hidden_act == "silu" else cfg.gelu, "num_experts": cfg.num_experts,
        "dense": cfg.residual_moe or cfg.num_experts == 0, "sandwich": cfg.norm_style == "sandwich",
    }
