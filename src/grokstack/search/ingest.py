"""Feed ingestion shared parts: per-feed checkpoints, counts, and the JSONL file adapter.

Checkpoints live in the index's own SQLite file, in a `feed_state` table next to `docs`, so one file
holds everything an ingester must not lose. Every adapter follows the same write-ahead order:

1. add a batch of documents with `Index.add` (one transaction, committed);
2. then advance the feed's checkpoint (a second, small transaction).

`Index.add` owns its transaction, so the two cannot share one. The order makes that safe: a crash between
(1) and (2) leaves the old checkpoint, so the next run reads the same batch again, and `Index.add` is
idempotent (upsert by id, canonical URL or content hash), so the repeat only counts duplicates. A crash
can therefore re-ingest but never skip. Both writes go through the same WAL file in order, so even after
a power loss SQLite replays a prefix of them: a checkpoint is never durable without its documents.

The RSS/Atom adapter is in `feeds.py`, the X API v2 adapters in `xapi.py`.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import GrokstackError, InvalidArgumentError
from .documents import Document, make_document
from .index import AddResult, Index

log = logging.getLogger(__name__)

BATCH_LINES = 256
POLL_INTERVAL = 1.0  # seconds between looks at a followed file that has not grown
BUSY_TIMEOUT_MS = 10_000

Clock = Callable[[], float]
Sleep = Callable[[float], None]
Stop = threading.Event | Callable[[], bool] | None

_STATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS feed_state(
    feed TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    last_item REAL,
    last_error TEXT,
    updated REAL NOT NULL,
    seen INTEGER NOT NULL DEFAULT 0,
    added INTEGER NOT NULL DEFAULT 0,
    changed INTEGER NOT NULL DEFAULT 0,
    duplicates INTEGER NOT NULL DEFAULT 0,
    bad INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0
);
"""


# ----------------------------------------------------------------------------------------------------
# Counts


@dataclass
class IngestCounts:
    """What one call of an adapter did. `error` is the last remote or parse failure, None when clean."""

    feed: str = ""
    seen: int = 0  # items read: lines, feed entries, posts
    added: int = 0
    updated: int = 0  # stored documents whose content changed (an edited post, a revised article)
    duplicates: int = 0
    bad: int = 0  # items skipped as invalid
    requests: int = 0
    not_modified: bool = False
    error: str | None = None
    last_item: float | None = None  # newest published_at among the items read

    def absorb(self, result: AddResult) -> None:
        self.added += result.added
        self.updated += result.updated
        self.duplicates += result.duplicates

    def note_item(self, doc: Document) -> None:
        self.seen += 1
        if self.last_item is None or doc.published_at > self.last_item:
            self.last_item = doc.published_at

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Delta:
    """Counter increments for one checkpoint write (so a batch is counted once, with its checkpoint)."""

    seen: int = 0
    added: int = 0
    changed: int = 0
    duplicates: int = 0
    bad: int = 0
    errors: int = 0
    last_item: float | None = None
    error: str | None = field(default=None)


# ----------------------------------------------------------------------------------------------------
# Checkpoints


class Checkpoints:
    """Per-feed state in the `feed_state` table of an index file (its own connection, WAL, busy timeout)."""

    def __init__(self, path: str | Path, clock: Clock = time.time) -> None:
        self.path = str(path)
        self.clock = clock
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                     timeout=BUSY_TIMEOUT_MS / 1000)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        self._conn.executescript(_STATE_SCHEMA)
        self._lock = threading.Lock()

    @classmethod
    def of(cls, index: Index, clock: Clock = time.time) -> Checkpoints:
        return cls(index.path, clock)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def load(self, feed: str) -> dict[str, Any]:
        """The stored state of `feed` ({} before its first checkpoint)."""
        with self._lock:
            row = self._conn.execute("SELECT state FROM feed_state WHERE feed = ?", (feed,)).fetchone()
        if row is None:
            return {}
        try:
            state = json.loads(row[0])
        except json.JSONDecodeError:
            log.warning("checkpoint of %s is unreadable; starting that feed over", feed)
            return {}
        return state if isinstance(state, dict) else {}

    def save(self, feed: str, kind: str, state: Mapping[str, Any], delta: _Delta | None = None) -> None:
        """Replace the feed's state and add `delta` to its counters, atomically."""
        d = delta or _Delta()
        with self._lock:
            self._conn.execute(
                """
                INSERT INTO feed_state(feed, kind, state, last_item, last_error, updated,
                                       seen, added, changed, duplicates, bad, errors)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT(feed) DO UPDATE SET
                    kind = excluded.kind,
                    state = excluded.state,
                    -- SQLite's max() is NULL when either side is NULL; coalesce keeps the known one
                    last_item = coalesce(max(feed_state.last_item, excluded.last_item),
                                         feed_state.last_item, excluded.last_item),
                    last_error = excluded.last_error,
                    updated = excluded.updated,
                    seen = feed_state.seen + excluded.seen,
                    added = feed_state.added + excluded.added,
                    changed = feed_state.changed + excluded.changed,
                    duplicates = feed_state.duplicates + excluded.duplicates,
                    bad = feed_state.bad + excluded.bad,
                    errors = feed_state.errors + excluded.errors
                """,
                (feed, kind, json.dumps(dict(state), sort_keys=True), d.last_item, d.error, self.clock(),
                 d.seen, d.added, d.changed, d.duplicates, d.bad, d.errors),
            )


def feed_status(index_path: str | Path, now: float | None = None) -> list[dict[str, Any]]:
    """One row per known feed for `grokstack feeds`: last item time, lag, last error and counters.

    `lag` is seconds since the newest item seen (None before any item). Opens the file read-only, so
    it works while an ingester is writing.
    """
    path = Path(index_path)
    if not path.exists():
        return []
    now = time.time() if now is None else now
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        has_table = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'feed_state'"
        ).fetchone()
        if not has_table:
            return []
        conn.row_factory = sqlite3.Row
        rows = conn.execute("SELECT * FROM feed_state ORDER BY feed").fetchall()
    finally:
        conn.close()
    out = []
    for row in rows:
        item = dict(row)
        try:
            item["state"] = json.loads(item["state"])
        except json.JSONDecodeError:
            item["state"] = {}
        item["lag"] = None if item["last_item"] is None else max(now - item["last_item"], 0.0)
        out.append(item)
    return out


# ----------------------------------------------------------------------------------------------------
# Helpers shared by the adapters


def should_stop(stop: Stop) -> bool:
    if stop is None:
        return False
    if isinstance(stop, threading.Event):
        return stop.is_set()
    return bool(stop())


def default_sleep(stop: Stop) -> Sleep:
    """Sleep that wakes early when `stop` is an Event (so Ctrl-C handlers can end a follow loop fast)."""
    if isinstance(stop, threading.Event):
        return stop.wait
    return time.sleep


def add_batch(index: Index, docs: list[Document], counts: IngestCounts, delta: _Delta) -> None:
    """Store a batch and record what it did in both the call's counts and the checkpoint delta."""
    if not docs:
        return
    result = index.add(docs)
    counts.absorb(result)
    delta.added += result.added
    delta.changed += result.updated
    delta.duplicates += result.duplicates


# ----------------------------------------------------------------------------------------------------
# JSONL files


def jsonl_feed_name(path: str | Path) -> str:
    return f"jsonl:{Path(path).resolve()}"


@dataclass
class _FilePosition:
    offset: int = 0
    line: int = 0  # complete lines consumed before `offset` (for 1-based line numbers in logs)
    inode: int = 0
    device: int = 0

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> _FilePosition:
        return cls(int(state.get("offset", 0)), int(state.get("line", 0)), int(state.get("inode", 0)),
                   int(state.get("device", 0)))

    def to_state(self) -> dict[str, Any]:
        return {"offset": self.offset, "line": self.line, "inode": self.inode, "device": self.device}


def _check_rotation(pos: _FilePosition, st: os.stat_result, feed: str) -> _FilePosition:
    """Start over when the file was replaced (new inode) or truncated below the stored offset."""
    same_file = (pos.inode, pos.device) == (st.st_ino, st.st_dev)
    if pos.inode and not same_file:
        log.info("%s was replaced (rotated); reading the new file from the start", feed)
        return _FilePosition(inode=st.st_ino, device=st.st_dev)
    if st.st_size < pos.offset:
        log.warning("%s shrank below the checkpoint (%d < %d bytes); reading it from the start",
                    feed, st.st_size, pos.offset)
        return _FilePosition(inode=st.st_ino, device=st.st_dev)
    return _FilePosition(pos.offset, pos.line, st.st_ino, st.st_dev)


def _complete_lines(handle: Any, limit: int) -> Iterator[bytes]:
    """Up to `limit` newline-terminated lines from the handle's position; an unfinished tail is left."""
    for _ in range(limit):
        start = handle.tell()
        line = handle.readline()
        if not line:
            return
        if not line.endswith(b"\n"):
            handle.seek(start)  # the writer has not finished this line yet
            return
        yield line


def parse_line(line: bytes, now: float) -> Document | None:
    """One JSONL line → Document; None for a blank line. Raises ValueError/GrokstackError when bad."""
    text = line.decode("utf-8").strip()
    if not text:
        return None
    raw = json.loads(text)
    if not isinstance(raw, dict):
        raise InvalidArgumentError(f"expected a JSON object, got {type(raw).__name__}")
    return make_document(raw, now=now)


def _read_batch(
    handle: Any, pos: _FilePosition, feed: str, counts: IngestCounts, delta: _Delta, batch: int, now: float
) -> list[Document]:
    docs: list[Document] = []
    for line in _complete_lines(handle, batch):
        pos.line += 1
        pos.offset += len(line)
        try:
            doc = parse_line(line, now)
        except (ValueError, GrokstackError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            log.warning("%s line %d skipped: %s", feed, pos.line, exc)
            counts.bad += 1
            delta.bad += 1
            continue
        if doc is None:
            continue
        counts.note_item(doc)
        delta.seen += 1
        if delta.last_item is None or doc.published_at > delta.last_item:
            delta.last_item = doc.published_at
        docs.append(doc)
    return docs


def _drain(
    index: Index, store: Checkpoints, path: Path, feed: str, counts: IngestCounts, batch: int, clock: Clock,
    stop: Stop, on_batch: Callable[[IngestCounts], None] | None,
) -> bool:
    """Ingest every complete line from the checkpoint on, one committed batch at a time.

    Returns True when a partial (unterminated) line is waiting at the end of the file.
    """
    st = path.stat()
    pos = _check_rotation(_FilePosition.from_state(store.load(feed)), st, feed)
    with path.open("rb") as handle:
        handle.seek(pos.offset)
        while True:
            delta = _Delta()
            before = pos.offset
            docs = _read_batch(handle, pos, feed, counts, delta, batch, clock())
            if pos.offset == before:
                return handle.read(1) != b""
            add_batch(index, docs, counts, delta)
            # After the documents are committed: a crash before this line re-reads the batch, harmlessly.
            store.save(feed, "jsonl", pos.to_state(), delta)
            if on_batch is not None:
                on_batch(counts)
            if should_stop(stop):
                return False


def ingest_jsonl(
    index: Index,
    path: str | Path,
    *,
    follow: bool = False,
    poll_interval: float = POLL_INTERVAL,
    stop: Stop = None,
    batch_lines: int = BATCH_LINES,
    feed: str | None = None,
    clock: Clock = time.time,
    sleep: Sleep | None = None,
    on_batch: Callable[[IngestCounts], None] | None = None,
) -> IngestCounts:
    """Ingest a JSONL feed file (one `Document` object per line) from its stored byte offset.

    Only newline-terminated lines are read: an unfinished last line waits for its newline (so a file
    written by hand must end with one). Bad lines are logged with their 1-based line number, counted
    and skipped. Every `batch_lines` lines (and at end of file) the batch is committed, then the
    checkpoint. With `follow`, keeps reading as the file grows (like `tail -f`), noticing rotation and
    truncation, until `stop` (an Event or a callable) says so. `on_batch` gets the running counts
    after each commit (for a progress bar).
    """
    if batch_lines < 1:
        raise InvalidArgumentError(f"batch_lines must be at least 1, got {batch_lines}")
    path = Path(path)
    feed = feed or jsonl_feed_name(path)
    sleep = sleep or default_sleep(stop)
    counts = IngestCounts(feed=feed)
    with Checkpoints(index.path, clock) as store:
        while True:
            waiting = False
            if path.exists():
                waiting = _drain(index, store, path, feed, counts, batch_lines, clock, stop, on_batch)
            elif not follow:
                raise InvalidArgumentError(f"JSONL feed file {path} does not exist")
            if not follow or should_stop(stop):
                break
            sleep(poll_interval)
    if waiting:
        log.info("%s ends in an unfinished line; it will be read once its newline is written", feed)
    log.info("%s: %d read, %d added, %d updated, %d duplicates, %d bad", feed, counts.seen, counts.added,
             counts.updated, counts.duplicates, counts.bad)
    return counts
