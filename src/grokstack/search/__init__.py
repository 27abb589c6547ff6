"""Live search over the user's own feeds: documents, embedders and the SQLite FTS5 + vector index.

See `../shared/spec/live-search.md`. Typical use::

    index = Index("search.db")
    index.add([{"source": "news", "url": "https://example.org/a", "text": "...",
                "published_at": "2026-11-28T10:15:00Z"}])
    hits = index.search("latest on the election", Filters(sources=["news", "x"]))
"""

from .documents import SOURCES, Document, canonical_url, content_hash, make_document
from .embed import Embedder, HashingEmbedder, default_embedder
from .index import AddResult, Filters, Hit, Index, recency, rrf
from .query import fts_query, is_temporal

__all__ = [
    "SOURCES",
    "AddResult",
    "Document",
    "Embedder",
    "Filters",
    "HashingEmbedder",
    "Hit",
    "Index",
    "canonical_url",
    "content_hash",
    "default_embedder",
    "fts_query",
    "is_temporal",
    "make_document",
    "recency",
    "rrf",
]
