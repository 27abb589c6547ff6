"""The embedded search index: SQLite (WAL) with FTS5 for BM25 and float32 vectors for cosine similarity.

Search pipeline (spec `live-search.md` §4):
  SQL pre-filter → BM25 top-N (FTS5) ‖ cosine top-N (NumPy, brute force) → reciprocal rank fusion (k = 60)
  → + λ · 2^(−age / half_life[source]).
Filters are applied in SQL to both lists, so no document outside them can ever be returned. All SQL is
parameterised; user text reaches FTS5 only through `query.fts_query`, which quotes every term.
"""

from __future__ import annotations

import logging
import math
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, InvalidArgumentError
from .documents import SOURCES, Document, clean_text, make_document, normalize_handle
from .embed import Embedder, default_embedder
from .query import fts_query, is_temporal, query_terms

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
RRF_K = 60
TOP_N = 100  # depth of each ranked list before fusion
HOUR = 3600.0
DAY = 24 * HOUR
HALF_LIVES = {"x": 12 * HOUR, "news": 48 * HOUR, "web": 30 * DAY, "rss": 48 * HOUR}
RECENCY_WEIGHT = 0.1 / (RRF_K + 1)  # λ: a fresh document gains at most a tenth of a top rank
# A temporal cue ("latest", "today"…) states the user's own horizon: recency then weighs as much as a
# top rank in one list, and no source keeps a half-life longer than a day (a month-long web half-life
# would otherwise let a week-old page beat this morning's post).
TEMPORAL_BOOST = 10.0
TEMPORAL_HALF_LIFE = DAY
MAX_HANDLES = 10
MAX_WEBSITES = 5
_SITE = re.compile(r"^[a-z0-9-]+(\.[a-z0-9-]+)+$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS docs(
    rowid INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    source TEXT NOT NULL,
    feed_url TEXT NOT NULL,
    url TEXT NOT NULL,
    canonical_url TEXT NOT NULL,
    title TEXT NOT NULL,
    text TEXT NOT NULL,
    title_n TEXT NOT NULL,
    text_n TEXT NOT NULL,
    author TEXT NOT NULL,
    author_key TEXT NOT NULL,
    published_at REAL NOT NULL,
    ingested_at REAL NOT NULL,
    lang TEXT NOT NULL,
    domain TEXT NOT NULL,
    country TEXT NOT NULL,
    likes INTEGER NOT NULL,
    views INTEGER NOT NULL,
    reposts INTEGER NOT NULL,
    replies INTEGER NOT NULL,
    nsfw INTEGER NOT NULL,
    injection_flag INTEGER NOT NULL,
    is_retweet INTEGER NOT NULL,
    content_hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS docs_published ON docs(published_at);
CREATE INDEX IF NOT EXISTS docs_source ON docs(source, published_at);
CREATE INDEX IF NOT EXISTS docs_domain ON docs(domain);
CREATE INDEX IF NOT EXISTS docs_author ON docs(author_key);
CREATE INDEX IF NOT EXISTS docs_canonical ON docs(canonical_url);
CREATE INDEX IF NOT EXISTS docs_hash ON docs(content_hash);
CREATE VIRTUAL TABLE IF NOT EXISTS docs_fts USING fts5(
    title_n, text_n, content='docs', content_rowid='rowid',
    tokenize='porter unicode61 remove_diacritics 2'
);
CREATE TABLE IF NOT EXISTS vecs(rowid INTEGER PRIMARY KEY, emb BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS docs_ai AFTER INSERT ON docs BEGIN
    INSERT INTO docs_fts(rowid, title_n, text_n) VALUES (new.rowid, new.title_n, new.text_n);
END;
CREATE TRIGGER IF NOT EXISTS docs_ad AFTER DELETE ON docs BEGIN
    INSERT INTO docs_fts(docs_fts, rowid, title_n, text_n) VALUES ('delete', old.rowid, old.title_n, old.text_n);
    DELETE FROM vecs WHERE rowid = old.rowid;
END;
CREATE TRIGGER IF NOT EXISTS docs_au AFTER UPDATE ON docs BEGIN
    INSERT INTO docs_fts(docs_fts, rowid, title_n, text_n) VALUES ('delete', old.rowid, old.title_n, old.text_n);
    INSERT INTO docs_fts(rowid, title_n, text_n) VALUES (new.rowid, new.title_n, new.text_n);
END;
"""

_DOC_COLUMNS = (
    "id", "source", "feed_url", "url", "canonical_url", "title", "text", "title_n", "text_n", "author",
    "author_key", "published_at", "ingested_at", "lang", "domain", "country", "likes", "views", "reposts",
    "replies", "nsfw", "injection_flag", "is_retweet", "content_hash",
)
_DOC_FIELDS = tuple(c for c in _DOC_COLUMNS if c not in ("title_n", "text_n", "author_key"))


# ----------------------------------------------------------------------------------------------------
# Filters


def _day_start(value: date | datetime | str, name: str) -> tuple[float, bool]:
    """(epoch seconds, is_whole_day) for a `YYYY-MM-DD` string, a date, or an aware datetime."""
    if isinstance(value, str):
        try:
            value = date.fromisoformat(value.strip())
        except ValueError:
            raise InvalidArgumentError(f"{name} must be YYYY-MM-DD, got {value!r}") from None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)  # the API's dates are UTC days
        return value.timestamp(), False
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC).timestamp(), True
    raise InvalidArgumentError(f"{name} must be YYYY-MM-DD or a datetime, got {type(value).__name__}")


def _sites(values: Iterable[str] | None, name: str) -> tuple[str, ...]:
    out = []
    for raw in values or ():
        if not isinstance(raw, str):
            raise InvalidArgumentError(f"{name} entries must be strings, got {raw!r}")
        site = raw.strip().lower()
        site = re.sub(r"^[a-z]+://", "", site).split("/")[0].split(":")[0].removeprefix("www.").rstrip(".")
        if not _SITE.match(site):
            raise InvalidArgumentError(f"{name} entry {raw!r} is not a domain like example.org")
        out.append(site)
    if len(out) > MAX_WEBSITES:
        raise InvalidArgumentError(f"{name} takes at most {MAX_WEBSITES} websites, got {len(out)}")
    return tuple(dict.fromkeys(out))


def _handles(values: Iterable[str] | None, name: str) -> tuple[str, ...]:
    out = []
    for raw in values or ():
        handle = normalize_handle(raw) if isinstance(raw, str) else ""
        if not re.fullmatch(r"\w{1,50}", handle):
            raise InvalidArgumentError(f"{name} entry {raw!r} is not an X handle")
        out.append(handle)
    if len(out) > MAX_HANDLES:
        raise InvalidArgumentError(f"{name} takes at most {MAX_HANDLES} handles, got {len(out)}")
    return tuple(dict.fromkeys(out))


def _minimum(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgumentError(f"{name} must be a non-negative integer, got {value!r}")
    return value


@dataclass(frozen=True)
class Filters:
    """Exact constraints applied in SQL before ranking. Everything defaults to "no constraint".

    - `from_date`/`to_date`: inclusive UTC days (`YYYY-MM-DD` or `date`), or exact aware datetimes.
    - `sources`: allowed source types (None = all).
    - X posts only: `included_x_handles` / `excluded_x_handles` (≤ 10, mutually exclusive),
      `min_favorites` / `min_views` (both must hold). Posts by `grok` are dropped unless included.
    - Non-X documents only: `allowed_websites` / `excluded_websites` (≤ 5, mutually exclusive), matching
      the domain and its subdomains.
    - `safe_search` drops documents flagged NSFW at ingest; `country` keeps documents of that country or
      of unknown country; `feed_url` keeps only items of that feed.
    """

    from_date: date | datetime | str | None = None
    to_date: date | datetime | str | None = None
    sources: Sequence[str] | None = None
    included_x_handles: Sequence[str] = ()
    excluded_x_handles: Sequence[str] = ()
    allowed_websites: Sequence[str] = ()
    excluded_websites: Sequence[str] = ()
    min_favorites: int | None = None
    min_views: int | None = None
    safe_search: bool = True
    country: str | None = None
    feed_url: str | None = None
    # Derived and validated in __post_init__.
    start: float | None = field(default=None, init=False)
    end: float | None = field(default=None, init=False)  # inclusive

    def __post_init__(self) -> None:
        put = object.__setattr__
        start = end = None
        if self.from_date is not None:
            start, _ = _day_start(self.from_date, "from_date")
        if self.to_date is not None:
            end, whole_day = _day_start(self.to_date, "to_date")
            if whole_day:
                end = math.nextafter(end + DAY, -math.inf)  # last representable instant of that day
        if start is not None and end is not None and start > end:
            raise InvalidArgumentError("from_date must not be after to_date")
        put(self, "start", start)
        put(self, "end", end)
        if self.sources is not None:
            if isinstance(self.sources, str):
                raise InvalidArgumentError("sources must be a list of source types, not a string")
            unknown = [s for s in self.sources if s not in SOURCES]
            if unknown:
                raise InvalidArgumentError(f"unknown source type(s) {unknown}; use {', '.join(SOURCES)}")
            put(self, "sources", tuple(dict.fromkeys(self.sources)))
        put(self, "included_x_handles", _handles(self.included_x_handles, "included_x_handles"))
        put(self, "excluded_x_handles", _handles(self.excluded_x_handles, "excluded_x_handles"))
        if self.included_x_handles and self.excluded_x_handles:
            raise InvalidArgumentError("included_x_handles and excluded_x_handles cannot be used together")
        put(self, "allowed_websites", _sites(self.allowed_websites, "allowed_websites"))
        put(self, "excluded_websites", _sites(self.excluded_websites, "excluded_websites"))
        if self.allowed_websites and self.excluded_websites:
            raise InvalidArgumentError("allowed_websites and excluded_websites cannot be used together")
        _minimum(self.min_favorites, "min_favorites")
        _minimum(self.min_views, "min_views")
        if not isinstance(self.safe_search, bool):
            raise InvalidArgumentError("safe_search must be true or false")
        if self.country is not None:
            if not isinstance(self.country, str) or not re.fullmatch(r"[A-Za-z]{2}", self.country):
                raise InvalidArgumentError(f"country must be an ISO 3166 alpha-2 code, got {self.country!r}")
            put(self, "country", self.country.upper())

    def to_sql(self, alias: str = "d") -> tuple[str, list[Any]]:
        """A WHERE clause over `docs AS alias` and its parameters ('1' when nothing is constrained)."""
        a = alias
        where: list[str] = []
        params: list[Any] = []
        if self.start is not None:
            where.append(f"{a}.published_at >= ?")
            params.append(self.start)
        if self.end is not None:
            where.append(f"{a}.published_at <= ?")
            params.append(self.end)
        if self.sources is not None:
            where.append(f"{a}.source IN ({_marks(self.sources)})")
            params.extend(self.sources)
        if self.safe_search:
            where.append(f"{a}.nsfw = 0")
        if self.country is not None:
            where.append(f"({a}.country = '' OR {a}.country = ?)")
            params.append(self.country)
        if self.feed_url is not None:
            where.append(f"{a}.feed_url = ?")
            params.append(self.feed_url)

        x_rules, x_params = self._x_rules(a)
        if x_rules:
            where.append(f"({a}.source != 'x' OR ({' AND '.join(x_rules)}))")
            params.extend(x_params)
        site_rules, site_params = self._site_rules(a)
        if site_rules:
            where.append(f"({a}.source = 'x' OR ({site_rules}))")
            params.extend(site_params)
        return (" AND ".join(where) or "1"), params

    def _x_rules(self, a: str) -> tuple[list[str], list[Any]]:
        rules: list[str] = []
        params: list[Any] = []
        if self.included_x_handles:
            rules.append(f"{a}.author_key IN ({_marks(self.included_x_handles)})")
            params.extend(self.included_x_handles)
        else:
            # xAI leaves out Grok's own posts unless a request names it.
            excluded = tuple(dict.fromkeys((*self.excluded_x_handles, "grok")))
            rules.append(f"{a}.author_key NOT IN ({_marks(excluded)})")
            params.extend(excluded)
        if self.min_favorites:
            rules.append(f"{a}.likes >= ?")
            params.append(self.min_favorites)
        if self.min_views:
            rules.append(f"{a}.views >= ?")
            params.append(self.min_views)
        return rules, params

    def _site_rules(self, a: str) -> tuple[str, list[Any]]:
        sites = self.allowed_websites or self.excluded_websites
        if not sites:
            return "", []
        # Suffix comparison instead of LIKE, so no character of a site acts as a wildcard.
        one = f"({a}.domain = ? OR substr({a}.domain, -length(?) - 1) = '.' || ?)"
        any_site = " OR ".join([one] * len(sites))
        params = [p for s in sites for p in (s, s, s)]
        return (f"({any_site})" if self.allowed_websites else f"NOT ({any_site})"), params


def _marks(values: Sequence[Any]) -> str:
    return ", ".join("?" * len(values))


# ----------------------------------------------------------------------------------------------------
# Ranking helpers (pure functions, unit-tested on their own)


def rrf(ranked_lists: Sequence[Sequence[int]], k: int = RRF_K) -> dict[int, float]:
    """Reciprocal rank fusion: Σ 1 / (k + rank), ranks from 1."""
    scores: dict[int, float] = {}
    for ranked in ranked_lists:
        for rank, key in enumerate(ranked, start=1):
            scores[key] = scores.get(key, 0.0) + 1.0 / (k + rank)
    return scores


def recency(age_seconds: float, half_life_seconds: float) -> float:
    """2^(−age / half_life), 1 for documents dated in the future."""
    return 2.0 ** (-max(age_seconds, 0.0) / half_life_seconds)


@dataclass(frozen=True)
class Hit:
    document: Document
    score: float
    bm25_rank: int | None  # 1-based rank in the BM25 list, None when absent
    vector_rank: int | None


@dataclass(frozen=True)
class AddResult:
    added: int
    duplicates: int
    updated: int = 0


# ----------------------------------------------------------------------------------------------------
# The index


class Index:
    """A search index in one SQLite file. Thread-safe: one connection guarded by a lock."""

    def __init__(
        self,
        path: str | Path,
        embedder: Embedder | None = None,
        half_lives: Mapping[str, float] | None = None,
        feed_half_lives: Mapping[str, float] | None = None,
    ) -> None:
        self.path = str(path)
        self.embedder = embedder or default_embedder()
        self.half_lives = {**HALF_LIVES, **(half_lives or {})}
        self.feed_half_lives = dict(feed_half_lives or {})
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._check_fts5()
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL survives a process crash
        self._conn.execute("PRAGMA busy_timeout=5000")
        self._conn.executescript(_SCHEMA)
        self._vec_cache: tuple[int, np.ndarray, np.ndarray] | None = None  # (data_version, rowids, matrix)
        self._writes = 0
        self._check_embedder()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT count(*) FROM docs").fetchone()[0]

    # -- set-up ----------------------------------------------------------------------------------------

    def _check_fts5(self) -> None:
        options = {row[0] for row in self._conn.execute("PRAGMA compile_options")}
        if "ENABLE_FTS5" not in options:
            raise ConfigError(
                f"this Python's SQLite {sqlite3.sqlite_version} lacks FTS5; install a Python built with "
                "FTS5 (most are) or pysqlite3-binary"
            )

    def _check_embedder(self) -> None:
        """Record the embedder; if a different one built the stored vectors, re-embed everything."""
        meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
        want = {"schema": SCHEMA_VERSION, "embedder": self.embedder.name, "dim": str(self.embedder.dim)}
        if meta.get("schema", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise ConfigError(f"{self.path} has index schema {meta['schema']}, expected {SCHEMA_VERSION}")
        if meta == want:
            return
        stale = bool(meta) and (meta.get("embedder"), meta.get("dim")) != (want["embedder"], want["dim"])
        with self._write():
            if stale:
                log.info("embedder changed (%s → %s); re-embedding %s", meta.get("embedder"), want["embedder"],
                         self.path)
                self._reembed()
            self._conn.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", list(want.items()))

    def _reembed(self, batch: int = 256) -> None:
        rows = self._conn.execute("SELECT rowid, title_n, text_n FROM docs ORDER BY rowid").fetchall()
        for i in range(0, len(rows), batch):
            chunk = rows[i:i + batch]
            vecs = self._embed_docs([f"{t}\n{x}" for _, t, x in chunk])
            self._conn.executemany(
                "INSERT OR REPLACE INTO vecs(rowid, emb) VALUES (?, ?)",
                [(r[0], v.tobytes()) for r, v in zip(chunk, vecs, strict=True)],
            )

    def _write(self) -> _Transaction:
        return _Transaction(self)

    # -- writing ---------------------------------------------------------------------------------------

    def add(self, docs: Iterable[Document | Mapping[str, Any]]) -> AddResult:
        """Insert documents in one transaction; idempotent.

        A document is a duplicate when its id, canonical URL or content hash is already stored with the
        same content; a changed content hash under a known id or URL updates that row. A retweet stand-in
        never overwrites an original that is already stored.
        """
        items = [d if isinstance(d, Document) else make_document(d) for d in docs]
        added = duplicates = updated = 0
        pending: list[tuple[int, Document]] = []  # rows that need a (new) vector
        with self._lock, self._write():
            for doc in items:
                existing = self._find_existing(doc)
                if existing is None:
                    rowid = self._insert(doc)
                    added += 1
                    pending.append((rowid, doc))
                    continue
                rowid, stored_hash = existing
                if stored_hash == doc.content_hash or doc.is_retweet:
                    duplicates += 1
                    continue
                self._update(rowid, doc)
                updated += 1
                pending.append((rowid, doc))
            if pending:
                vecs = self._embed_docs([_embed_text(d) for _, d in pending])
                self._conn.executemany(
                    "INSERT OR REPLACE INTO vecs(rowid, emb) VALUES (?, ?)",
                    [(rowid, v.tobytes()) for (rowid, _), v in zip(pending, vecs, strict=True)],
                )
        return AddResult(added=added, duplicates=duplicates, updated=updated)

    def _find_existing(self, doc: Document) -> tuple[int, str] | None:
        lookups = [("id", doc.id)]
        if doc.canonical_url:
            lookups.append(("canonical_url", doc.canonical_url))
        lookups.append(("content_hash", doc.content_hash))
        for column, value in lookups:
            # column comes from the fixed list above, never from user input
            row = self._conn.execute(f"SELECT rowid, content_hash FROM docs WHERE {column} = ? LIMIT 1", (value,))
            found = row.fetchone()
            if found is not None:
                return found[0], found[1]
        return None

    def _insert(self, doc: Document) -> int:
        cursor = self._conn.execute(
            f"INSERT INTO docs({', '.join(_DOC_COLUMNS)}) VALUES ({_marks(_DOC_COLUMNS)})", _row(doc)
        )
        return int(cursor.lastrowid)

    def _update(self, rowid: int, doc: Document) -> None:
        # Keep the stored id: other components may already cite it.
        columns = [c for c in _DOC_COLUMNS if c != "id"]
        values = [v for c, v in zip(_DOC_COLUMNS, _row(doc), strict=True) if c != "id"]
        assignments = ", ".join(f"{c} = ?" for c in columns)
        self._conn.execute(f"UPDATE docs SET {assignments} WHERE rowid = ?", (*values, rowid))

    def _embed_docs(self, texts: list[str]) -> np.ndarray:
        vecs = np.asarray(self.embedder.embed(texts), dtype=np.float32)
        if vecs.shape != (len(texts), self.embedder.dim):
            raise ConfigError(f"embedder {self.embedder.name} returned shape {vecs.shape}")
        return vecs

    def purge(self, older_than: Mapping[str, float | timedelta], now: float | None = None) -> int:
        """Delete documents published more than `older_than[source]` (seconds or timedelta) before `now`.

        Sources without an entry are kept. Returns how many documents were removed.
        """
        now = time.time() if now is None else now
        removed = 0
        with self._lock, self._write():
            for source, ttl in older_than.items():
                if source not in SOURCES:
                    raise InvalidArgumentError(f"unknown source type {source!r}; use {', '.join(SOURCES)}")
                seconds = ttl.total_seconds() if isinstance(ttl, timedelta) else float(ttl)
                if not math.isfinite(seconds) or seconds < 0:
                    raise InvalidArgumentError(f"retention for {source} must be a non-negative duration")
                cursor = self._conn.execute(
                    "DELETE FROM docs WHERE source = ? AND published_at < ?", (source, now - seconds)
                )
                removed += cursor.rowcount
        if removed > 1000:
            with self._lock, self._write():
                self._conn.execute("INSERT INTO docs_fts(docs_fts) VALUES ('optimize')")
        return removed

    def get(self, doc_id: str) -> Document | None:
        with self._lock:
            row = self._conn.execute(
                f"SELECT {', '.join(_DOC_FIELDS)} FROM docs WHERE id = ?", (doc_id,)
            ).fetchone()
        return _document(row) if row else None

    def has_feed(self, feed_url: str) -> bool:
        """Whether any stored item came from this feed (an rss source must name an ingested feed)."""
        with self._lock:
            row = self._conn.execute("SELECT 1 FROM docs WHERE feed_url = ? LIMIT 1", (feed_url,)).fetchone()
        return row is not None

    # -- searching -------------------------------------------------------------------------------------

    def search(
        self,
        query: str,
        filters: Filters | None = None,
        limit: int = 15,
        now: float | None = None,
    ) -> list[Hit]:
        """Hybrid search: BM25 and cosine lists fused by RRF (k = 60), nudged by per-source recency.

        Temporal cues in the query ("latest", "today", a date…) multiply the recency weight by 10; a
        `to_date` in the past turns recency off. With no searchable word, results are newest first.
        """
        if not isinstance(query, str):
            raise InvalidArgumentError("query must be a string")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidArgumentError(f"limit must be a positive integer, got {limit!r}")
        filters = filters or Filters()
        now = time.time() if now is None else now
        where, params = filters.to_sql("d")
        with self._lock:
            bm25 = self._bm25(query, where, params)
            dense = self._dense(query, where, params)
            scores = rrf([bm25, dense])
            if not scores:
                return self._newest(where, params, limit)
            docs = self._load(list(scores))
        temporal = is_temporal(query, now)
        weight = RECENCY_WEIGHT * (TEMPORAL_BOOST if temporal else 1.0)
        if filters.end is not None and filters.end < now:
            weight = 0.0  # the user asked for a closed period in the past: freshness means nothing
        bm25_rank = {r: i for i, r in enumerate(bm25, start=1)}
        dense_rank = {r: i for i, r in enumerate(dense, start=1)}
        hits = []
        for rowid, base in scores.items():
            doc = docs[rowid]
            half_life = self._half_life(doc)
            if temporal:
                half_life = min(half_life, TEMPORAL_HALF_LIFE)
            score = base + weight * recency(now - doc.published_at, half_life)
            hits.append(Hit(doc, score, bm25_rank.get(rowid), dense_rank.get(rowid)))
        hits.sort(key=lambda h: (-h.score, -h.document.published_at, h.document.id))
        return hits[:limit]

    def _half_life(self, doc: Document) -> float:
        return self.feed_half_lives.get(doc.feed_url) or self.half_lives.get(doc.source, HALF_LIVES["web"])

    def _bm25(self, query: str, where: str, params: list[Any]) -> list[int]:
        expression = fts_query(query)
        if not expression:
            return []
        rows = self._conn.execute(
            "SELECT d.rowid FROM docs_fts JOIN docs AS d ON d.rowid = docs_fts.rowid "
            f"WHERE docs_fts MATCH ? AND {where} "
            "ORDER BY bm25(docs_fts, 2.0, 1.0), d.published_at DESC LIMIT ?",
            (expression, *params, TOP_N),
        )
        return [r[0] for r in rows]

    def _dense(self, query: str, where: str, params: list[Any]) -> list[int]:
        text = _query_embed_text(query)
        if not text:
            return []
        qvec = self._embed_docs([text])[0]
        if not np.any(qvec):
            return []
        rowids, matrix = self._vectors()
        if len(rowids) == 0:
            return []
        sims = matrix @ qvec
        # Only documents with some similarity enter the list; zero-overlap ones would be noise in RRF.
        keep = np.flatnonzero(sims > 1e-6)
        ranked = rowids[keep[np.lexsort((rowids[keep], -sims[keep]))]]
        # Walk down the similarity ranking and ask SQL which candidates pass the filters, a widening slice
        # at a time: exact, and it avoids listing every allowed row in Python for each query.
        out: list[int] = []
        start, width = 0, 4 * TOP_N
        while len(out) < TOP_N and start < len(ranked):
            if start >= 20 * TOP_N:  # a narrow filter: one pass over the rows it allows is cheaper
                rows = self._conn.execute(f"SELECT d.rowid FROM docs AS d WHERE {where}", params)
                rest = ranked[start:]
                rest = rest[np.isin(rest, np.fromiter((r[0] for r in rows), dtype=np.int64))]
                out += rest[: TOP_N - len(out)].tolist()
                break
            chunk = [int(r) for r in ranked[start : start + width]]
            allowed = self._allowed(chunk, where, params)
            out += [r for r in chunk if r in allowed]
            start, width = start + width, width * 4
        return out[:TOP_N]

    def _allowed(self, rowids: list[int], where: str, params: list[Any]) -> set[int]:
        """The given rows that pass the filters (SQLite caps bound parameters, so ask in slices)."""
        found: set[int] = set()
        for i in range(0, len(rowids), 900):
            part = rowids[i : i + 900]
            sql = f"SELECT d.rowid FROM docs AS d WHERE d.rowid IN ({_marks(part)}) AND ({where})"
            found.update(r[0] for r in self._conn.execute(sql, [*part, *params]))
        return found

    def _vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """All stored vectors, cached until this or another connection changes the file."""
        version = (self._conn.execute("PRAGMA data_version").fetchone()[0], self._writes)
        if self._vec_cache is None or self._vec_cache[0] != version:
            rows = self._conn.execute("SELECT rowid, emb FROM vecs ORDER BY rowid").fetchall()
            rowids = np.array([r[0] for r in rows], dtype=np.int64)
            dim = self.embedder.dim
            matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)
            self._vec_cache = (version, rowids, matrix)
        return self._vec_cache[1], self._vec_cache[2]

    def _newest(self, where: str, params: list[Any], limit: int) -> list[Hit]:
        rows = self._conn.execute(
            f"SELECT {', '.join('d.' + c for c in _DOC_FIELDS)} FROM docs AS d WHERE {where} "
            "ORDER BY d.published_at DESC, d.id LIMIT ?",
            (*params, limit),
        ).fetchall()
        return [Hit(_document(r), 0.0, None, None) for r in rows]

    def _load(self, rowids: list[int]) -> dict[int, Document]:
        out: dict[int, Document] = {}
        for i in range(0, len(rowids), 500):  # stay under SQLite's variable limit
            chunk = rowids[i:i + 500]
            rows = self._conn.execute(
                f"SELECT rowid, {', '.join(_DOC_FIELDS)} FROM docs WHERE rowid IN ({_marks(chunk)})", chunk
            )
            out.update({r[0]: _document(r[1:]) for r in rows})
        return out


class _Transaction:
    """BEGIN IMMEDIATE … COMMIT, or ROLLBACK on error, so a batch lands whole or not at all."""

    def __init__(self, index: Index) -> None:
        self.index = index

    def __enter__(self) -> None:
        self.index._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *exc: object) -> None:
        conn = self.index._conn
        if exc_type is None:
            conn.execute("COMMIT")
        else:
            conn.execute("ROLLBACK")
        self.index._writes += 1


def _embed_text(doc: Document) -> str:
    return f"{clean_text(doc.title)}\n{clean_text(doc.text)}"


def _query_embed_text(query: str) -> str:
    return " ".join(query_terms(query))


def _row(doc: Document) -> tuple[Any, ...]:
    values = {
        **doc.to_dict(),
        "title_n": clean_text(doc.title),
        "text_n": clean_text(doc.text),
        "author_key": normalize_handle(doc.author) if doc.source == "x" else doc.author.casefold(),
    }
    return tuple(int(v) if isinstance(v, bool) else v for v in (values[c] for c in _DOC_COLUMNS))


def _document(row: Sequence[Any]) -> Document:
    values = dict(zip(_DOC_FIELDS, row, strict=True))
    for flag in ("nsfw", "injection_flag", "is_retweet"):
        values[flag] = bool(values[flag])
    return Document(**values)
