"""GGUF files laid out the way llama.cpp's converter writes them, for the loader tests.

Written with the `gguf` package's writer from grokstack models, with names, shapes, Q/K permutation and
metadata keys following llama.cpp (convert_hf_to_gguf.py `LlamaModel` / `GrokModel`). Independent of
`grokstack.loading.gguf` on purpose: the tests check that loader against this writer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, RopeScalingType, quants

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp tensor names per grokstack parameter suffix; grok uses the Grok-2 post-MoE norm name.
LAYER = {
    "self_attn.q_proj.weight": "attn_q",
    "self_attn.k_proj.weight": "attn_k",
    "self_attn.v_proj.weight": "attn_v",
    "self_attn.o_proj.weight": "attn_output",
    "pre_attn_norm.weight": "attn_norm",
    "post_attn_norm.weight": "attn_output_norm",
    "pre_moe_norm.weight": "ffn_norm",
    "post_moe_norm.weight": "post_ffw_norm",
    "block_sparse_moe.gate.weight": "ffn_gate_inp",
    "block_sparse_moe.experts.w1": "ffn_gate_exps",
    "block_sparse_moe.experts.w3": "ffn_up_exps",
    "block_sparse_moe.experts.w2": "ffn_down_exps",
    "mlp.gate_proj.weight": "ffn_gate",
    "mlp.up_proj.weight": "ffn_up",
    "mlp.down_proj.weight": "ffn_down",
}
TOP = {
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

GROK2_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ 'System: ' + m['content'] | trim + '<|separator|>\n\n' }}"
    "{% elif m['role'] == 'user' %}{{ 'Human: ' + m['content'] | trim + '<|separator|>\n\n' }}"
    "{% else %}{{ 'Assistant: ' + m['content'] + '<|separator|>\n\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def gguf_name(param: str, post_moe: str = "post_ffw_norm") -> str:
    if param in TOP:
        return TOP[param]
    _, layer, rest = param.split(".", 2)
    name = LAYER[rest] if rest != "post_moe_norm.weight" else post_moe
    return f"blk.{layer}.{name}.weight"


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: each head's two rotary halves become interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def add_weights(w: GGUFWriter, model, arch: str, qtype: Q = Q.F32, post_moe: str = "post_ffw_norm") -> None:
    cfg = model.cfg
    for param, t in model.named_parameters():
        name = gguf_name(param, post_moe)
        a = t.detach().float().numpy()
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            a = permute(a, cfg.num_heads if "attn_q" in name else cfg.num_kv_heads)
        if a.ndim == 1 or qtype == Q.F32:
            w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
        else:
            w.add_tensor(name, quants.quantize(a, qtype), raw_dtype=qtype)


# ----------------------------------------------------------------------------- tokenizers
def bytes_to_unicode() -> dict[int, str]:
    keep = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    out, n = {}, 0
    for b in range(256):
        out[b] = chr(b) if b in keep else chr(256 + n)
        n += b not in keep
    return out


def tiktoken_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge that builds each multi-byte token: BPE over its bytes using only lower ranks."""
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) < 2:
            continue
        parts = [bytes([b]) for b in tok]
        while len(parts) > 2:
            best = min(
                (ranks.get(parts[i] + parts[i + 1], 1 << 60), i) for i in range(len(parts) - 1)
            )
            if best[0] >= rank:
                break
            i = best[1]
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def add_grok2_tokenizer(w: GGUFWriter, tok_json: Path) -> None:
    data = json.loads(Path(tok_json).read_text())
    ranks = {bytes(t["bytes"]): t["token"] for t in data["regular_tokens"]}
    specials = {t["token"]: bytes(t["bytes"]).decode() for t in data["special_tokens"]}
    size = max([*ranks.values(), *specials]) + 1
    table = bytes_to_unicode()
    tokens = [f"[UNUSED_{i}]" for i in range(size)]
    types = [UNUSED] * size
    for b, i in ranks.items():
        tokens[i], types[i] = "".join(table[x] for x in b), NORMAL
    for i, s in specials.items():
        tokens[i], types[i] = s, CONTROL
    merges = [" ".join("".join(table[x] for x in part) for part in m) for m in tiktoken_merges(ranks)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("grok-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id({v: k for k, v in specials.items()}["<|eos|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(GROK2_TEMPLATE)


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = buf[i]
        n |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if b < 0x80:
            return n, i


def sentencepiece_pieces(proto: bytes) -> list[tuple[str, float, int]]:
    """(piece, score, type) from a serialized ModelProto: a minimal protobuf reader."""
    import struct

    def fields(buf: bytes):
        i = 0
        while i < len(buf):
            key, i = _varint(buf, i)
            num, wire = key >> 3, key & 7
            if wire == 0:
                val, i = _varint(buf, i)
            elif wire == 5:
                val, i = struct.unpack("<f", buf[i : i + 4])[0], i + 4
            elif wire == 1:
                val, i = buf[i : i + 8], i + 8
            else:
                size, i = _varint(buf, i)
                val, i = buf[i : i + size], i + size
            yield num, val

    out = []
    for num, val in fields(proto):
        if num == 1:
            piece = dict(fields(val))
            out.append((piece[1].decode(), float(piece.get(2, 0.0)), int(piece.get(3, NORMAL))))
    return out


def add_sentencepiece_tokenizer(w: GGUFWriter, model_file: Path) -> None:
    pieces = sentencepiece_pieces(Path(model_file).read_bytes())
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([p for p, _, _ in pieces])
    w.add_token_scores([s for _, s, _ in pieces])
    w.add_token_types([t for _, _, t in pieces])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_space_prefix(True)
    w.add_add_bos_token(False)


# ----------------------------------------------------------------------------- whole files
def start_gguf(path: Path, arch: str, cfg, feed_forward: int, split: int = 0) -> GGUFWriter:
    """A writer with the shape keys every architecture has (what llama.cpp's TextModel writes)."""
    w = GGUFWriter(str(path), arch, split_max_tensors=split)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(feed_forward)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    return w


def write_grok_gguf(path: Path, model, tokenizer_file: Path | None, qtype: Q = Q.F32, split: int = 0) -> Path:
    """A Grok-1 or Grok-2 model as llama.cpp's GrokModel converter writes it (`split`: tensors per part)."""
    cfg = model.cfg
    ff = cfg.intermediate_size if cfg.residual_moe else cfg.moe_intermediate_size
    w = start_gguf(path, "grok", cfg, ff, split)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_attn_logit_softcapping(cfg.attn_softcap)
    w.add_router_logit_softcapping(cfg.router_softcap or 30.0)  # the converter's default for Grok-1
    if cfg.final_softcap:
        w.add_final_logit_softcapping(cfg.final_softcap)
    if cfg.residual_moe:
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if cfg.rope_type == "original":
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(cfg.scaling_factor)
        w.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
        w.add_rope_scaling_yarn_ext_factor(cfg.extrapolation_factor)
        w.add_rope_scaling_yarn_attn_factor(cfg.attn_factor)
        w.add_rope_scaling_yarn_beta_fast(cfg.beta_fast)
        w.add_rope_scaling_yarn_beta_slow(cfg.beta_slow)
    if cfg.attn_temperature_len:
        w.add_attn_temperature_length(cfg.attn_temperature_len)
    w.add_attn_output_scale(cfg.qk_scale)
    w.add_embedding_scale(cfg.embedding_multiplier)
    w.add_logit_scale(cfg.output_multiplier)
    if tokenizer_file is not None and tokenizer_file.name.endswith(".tok.json"):
        add_grok2_tokenizer(w, tokenizer_file)
    elif tokenizer_file is not None:
        add_sentencepiece_tokenizer(w, tokenizer_file)
    add_weights(w, model, "grok", qtype, post_moe="post_ffw_norm" if cfg.residual_moe else "layer_output_norm")
    return _finish(w, path)


def write_llama_gguf(path: Path, model, qtype: Q = Q.F32, tokenizer: dict | None = None) -> Path:
    cfg = model.cfg
    w = start_gguf(path, "llama", cfg, cfg.intermediate_size)
    w.add_rope_dimension_count(cfg.head_dim)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(tokenizer.get("pre", "default"))
        w.add_token_list(tokenizer["tokens"])
        w.add_token_types(tokenizer["types"])
        w.add_token_merges(tokenizer["merges"])
        w.add_eos_token_id(tokenizer["eos"])
    add_weights(w, model, "llama", qtype)
    return _finish(w, path)


def _finish(w: GGUFWriter, path: Path) -> Path:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
