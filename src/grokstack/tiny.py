"""Tiny random checkpoints in the exact release layouts, for tests and the laptop demo.

Values deliberately differ from the releases (caps, theta, multipliers, temperature length), so a
hard-coded release constant anywhere fails the tests, and weights are scaled so the attention,
router and final softcaps actually bite.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ModelConfig, from_grok1_json, from_hf_config
from .errors import InvalidArgumentError
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


def tiny_config(arch: str, **hf_fields: Any) -> ModelConfig:
    """The tiny config of `arch`; for grok-2, `hf_fields` change HF config.json fields (a wider bench model)."""
    if arch == "grok-1":
        if hf_fields:
            raise InvalidArgumentError("field overrides apply to the grok-2 HF config only")
        return from_grok1_json(tiny_grok1_json())
    return from_hf_config({**tiny_grok2_hf_config(), **hf_fields})


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


# ----------------------------------------------------------------------------- tokenizers
CORPUS = """\
Grok is an AI model built by xAI. It answers questions about science, history and everyday life.
The quick brown fox jumps over the lazy dog. Human: What is the capital of France? Assistant: Paris.
Numbers like 0123456789 and dates like 2024-03-17 appear in text, as do emails and code: def f(x): return x * 2.
Über naïve café, 東京 and Zürich: unicode text must round-trip, emoji too 🚀✨. Tabs\tand
newlines\r\nmatter.
The universe is large; the answer to life, the universe and everything is forty-two.
"""


def train_bpe(text: str, pat: str, merges: int) -> list[bytes]:
    """Byte-level BPE merges learned from `text` (most frequent pair first; ties by bytes)."""
    import regex

    words: dict[tuple[bytes, ...], int] = {}
    for w in regex.findall(pat, text):
        key = tuple(bytes([b]) for b in w.encode())
        words[key] = words.get(key, 0) + 1
    learned = []
    for _ in range(merges):
        pairs: dict[tuple[bytes, bytes], int] = {}
        for w, n in words.items():
            for a, b in zip(w, w[1:], strict=False):
                pairs[(a, b)] = pairs.get((a, b), 0) + n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        learned.append(best[0] + best[1])
        merged = {}
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        words = merged
    return learned


def write_tiny_tok_json(path: Path, vocab_size: int = 512) -> None:
    """A small tokenizer.tok.json in Grok-2's form: specials first, then bytes, then merges."""
    from .tokenizer import V1_PAT

    specials = ["<|pad|>", "<|separator|>", "<|eos|>"] + [f"<|control{i}|>" for i in range(1, 9)]
    specials += [f"<|reserved_{i}|>" for i in range(3, 8)]
    regular = [bytes([b]) for b in range(256)]
    regular += train_bpe(CORPUS * 3, V1_PAT, vocab_size - len(specials) - len(regular))
    data = {
        "regular_tokens": [{"token": len(specials) + i, "bytes": list(b)} for i, b in enumerate(regular)],
        "special_tokens": [{"token": i, "bytes": list(s.encode())} for i, s in enumerate(specials)],
        "word_split": "V1",
        "pat_str": V1_PAT,
        "vocab_size": len(specials) + len(regular),
        "default_allowed_special": None,
    }
    path.write_text(json.dumps(data))


def write_tiny_sentencepiece(path: Path, vocab_size: int = 512) -> None:
    """A small SentencePiece BPE model with Grok-1's id layout (pad 0, bos 1, eos 2, unk 3, ...)."""
    import sentencepiece as spm

    user = ["\n" * n for n in range(1, 11)] + [str(d) for d in range(10)] + ["\t" * n for n in range(1, 9)]
    user += [" " * n for n in range(2, 17)] + ["<|separator|>", "<|mask|>"]
    user += [f"<|control{i}|>" for i in range(1, 21)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines() * 4), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, split_digits=True, user_defined_symbols=user,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]", bos_piece="[BOS]", eos_piece="[EOS]",
        unk_piece="[UNK]", add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", hard_vocab_limit=False, num_threads=1, minloglevel=2,
    )
    path.write_bytes(model.getvalue())


# ----------------------------------------------------------------------------- make-tiny
def make_tiny(arch: str, out: Path, seed: int = 0) -> Path:
    """Write a tiny random checkpoint in the exact release layout of `arch` into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    if arch == "grok-2":
        from .loading.safetensors_folder import save_safetensors_folder

        model = random_model(tiny_config("grok-2"), seed)
        save_safetensors_folder(model, out, torch.bfloat16, preshard=8)
        (out / "config.json").write_text(json.dumps(tiny_grok2_hf_config(), indent=2) + "\n")
        write_tiny_tok_json(out / "tokenizer.tok.json")
    elif arch == "grok-1":
        write_grok1_ckpt(out, tiny_grok1_json(), seed)
        (out / "config.json").write_text(json.dumps(tiny_grok1_json(), indent=2) + "\n")
        write_tiny_sentencepiece(out / "tokenizer.model")
    else:
        raise InvalidArgumentError(f"--arch must be grok-1 or grok-2, not {arch!r}")
    return out


def write_grok1_ckpt(out: Path, official: dict, seed: int) -> None:
    """`ckpt-0/` as the official code writes it: int8 weights with bf16 scales (8 row blocks for
    the down projection and attention output, as in the release), fp32 norms, router, embedding."""
    from .loading.grok1_ckpt import jax_shape, leaf_order, write_leaf

    cfg = from_grok1_json(official)
    rng = np.random.default_rng(seed)
    ckpt = out / "ckpt-0"
    ckpt.mkdir(parents=True, exist_ok=True)
    d = cfg.hidden_size
    for index, leaf in enumerate(leaf_order(cfg.num_layers)):
        shape = jax_shape(cfg, leaf)
        if leaf.quantized:
            q = np.clip(np.round(rng.normal(0, 45, shape)), -127, 127).astype(np.int8)
            blocks = 8 if leaf.role in ("w2", "o_proj") else 1
            fan_in = shape[-2]
            scale = rng.uniform(0.5, 1.5, (*shape[:-2], blocks, shape[-1])) / (45 * math.sqrt(fan_in))
            if leaf.role in ("q_proj", "k_proj"):
                scale *= 6.0 / math.sqrt(cfg.qk_scale * 16)
            value = (q, torch.from_numpy(scale.astype(np.float32)).to(torch.bfloat16))
        elif leaf.role == "embed":
            value = rng.normal(0, 1, shape)
        elif leaf.role == "gate":
            value = rng.normal(0, 8 / math.sqrt(d), shape)
        else:
            value = 1 + 0.1 * rng.normal(0, 1, shape)
        write_leaf(ckpt / f"tensor{index:05d}_000", value)
