"""Deferred chat completions (xAI): jobs and results in SQLite, so a restart loses none (api.md §9).

A job is written before it is queued; its result replaces it when done; the first successful retrieval
deletes it, and so do 24 hours. Jobs still pending at start-up are run again.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

KEEP_SECONDS = 24 * 3600


class DeferredStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, created REAL NOT NULL, request TEXT NOT NULL, "
            "result TEXT, status INTEGER)"
        )

    def add(self, request: dict[str, Any]) -> str:
        job = str(uuid.uuid4())
        with self._lock:
            self._db.execute("INSERT INTO jobs (id, created, request) VALUES (?, ?, ?)",
                             (job, time.time(), json.dumps(request)))
        return job

    def finish(self, job: str, status: int, result: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET result = ?, status = ? WHERE id = ?", (json.dumps(result), status, job))

    def take(self, job: str) -> tuple[str, int, dict[str, Any] | None]:
        """("unknown" | "pending" | "done", status, result); a done job is deleted as it is handed out."""
        with self._lock:
            self._expire()
            row = self._db.execute("SELECT result, status FROM jobs WHERE id = ?", (job,)).fetchone()
            if row is None:
                return "unknown", 404, None
            if row[0] is None:
                return "pending", 202, None
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job,))
            return "done", int(row[1]), json.loads(row[0])

    def pending(self) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            self._expire()
            rows = self._db.execute("SELECT id, request FROM jobs WHERE result IS NULL ORDER BY created").fetchall()
        return [(job, json.loads(req)) for job, req in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT result IS NULL, COUNT(*) FROM jobs GROUP BY result IS NULL"
            ).fetchall()
        out = {"pending": 0, "done": 0}
        for is_pending, n in rows:
            out["pending" if is_pending else "done"] = n
        return out

    def _expire(self) -> None:
        self._db.execute("DELETE FROM jobs WHERE created < ?", (time.time() - KEEP_SECONDS,))

    def close(self) -> None:
        with self._lock:
            self._db.close()
