"""Deferred chat completions (xAI): jobs and results in SQLite, so a restart loses none (api.md §9).

A job is written before it is queued; its result replaces it when done; the first successful retrieval
deletes it, and so do 24 hours. Jobs still pending at start-up are run again.

Each job records its owner (`auth.owner_for`): a job another owner asks for reads as unknown, pending or
done, and is left untouched. Jobs written before owners existed have none and stay readable by any key.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from .auth import Key, can_see

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
            "result TEXT, status INTEGER, owner TEXT)"
        )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "owner" not in columns:  # a store from before owners: its jobs keep no owner
            self._db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT")

    def add(self, request: dict[str, Any], owner: str | None = None) -> str:
        job = str(uuid.uuid4())
        with self._lock:
            self._db.execute("INSERT INTO jobs (id, created, request, owner) VALUES (?, ?, ?, ?)",
                             (job, time.time(), json.dumps(request), owner))
        return job

    def finish(self, job: str, status: int, result: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET result = ?, status = ? WHERE id = ?", (json.dumps(result), status, job))

    def take(self, job: str, key: Key) -> tuple[str, int, dict[str, Any] | None]:
        """("unknown" | "pending" | "done", status, result) as `key` may see it: another owner's job is
        "unknown" and stays stored; a done job is deleted as it is handed out."""
        with self._lock:
            self._expire()
            row = self._db.execute("SELECT result, status, owner FROM jobs WHERE id = ?", (job,)).fetchone()
            if row is None or not can_see(row[2], key):
                return "unknown", 404, None
            if row[0] is None:
                return "pending", 202, None
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job,))
            return "done", int(row[1]), json.loads(row[0])

    def pending(self) -> list[tuple[str, dict[str, Any], str | None]]:
        """(id, request, owner) of the jobs not finished yet, oldest first."""
        with self._lock:
            self._expire()
            rows = self._db.execute(
                "SELECT id, request, owner FROM jobs WHERE result IS NULL ORDER BY created"
            ).fetchall()
        return [(job, json.loads(req), owner) for job, req, owner in rows]

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
