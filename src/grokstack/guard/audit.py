"""Append-only JSONL audit log of guard decisions (guardrails.md §8).

One line per decision: time (UTC ISO 8601), request id, key id, direction, codes, scores, action, profile,
guard version and the SHA-256 of the text. The raw text is stored only when the log is opened with
`content=True` (`--audit-content`), and even then obvious secrets in it are masked. API keys are never
stored: `key_id` is a short SHA-256 prefix, enough to tell keys apart and useless for calling the API.

Crash safety:
- Each record is one `os.write` of a whole line to a file opened with O_APPEND, with no user-space buffer.
  A killed process therefore loses no record whose `record()` call returned.
- `os.fsync` runs after every `fsync_every` records (default 1, i.e. per record). Only an OS crash or a
  power loss can lose the records of an unsynced batch, so `fsync_every=N` bounds that loss to N - 1.
- A crash can still leave a torn last line. It stays where it is: `read_records` skips every line that is
  not a whole JSON object, and a writer that opens a file whose last byte is not '\\n' first writes '\\n', so
  the next record starts on its own line and earlier lines are never touched.
- Rotation renames (`audit.jsonl` -> `.1` -> `.2` ... up to `backups`; the oldest beyond that is dropped)
  and never copies, so a crash mid-rotation leaves every record in exactly one file; the reader tolerates
  the gap a half-done rotation can leave. Renames are followed by an fsync of the directory.
- Retention: with `max_age_days`, files whose last write (mtime, i.e. their newest record) is older are
  removed at open, after each rotation and at most hourly.

One `AuditLog` per file per process: threads share it safely (one lock); two processes appending to the
same file keep whole lines (O_APPEND) but must not both rotate it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InvalidArgumentError

DIRECTIONS = ("input", "retrieved", "output")
KEY_ID_CHARS = 12  # 48 bits: tells keys apart in a log, reveals nothing usable
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
DEFAULT_BACKUPS = 10
PRUNE_INTERVAL = 3600.0  # seconds between retention sweeps
MASK = "[secret]"

# Secret shapes that must never reach the log even with content=True (rules.py carries the full set for
# detection; these are the ones that commonly sit in prompts).
_SECRETS = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)"
    r"|\b(?:xai|sk|hf|gsk|pk|rk)[-_][A-Za-z0-9_-]{16,}"
    r"|\bgh[pousr]_[A-Za-z0-9]{20,}|\bAKIA[0-9A-Z]{16}\b|\bAIza[0-9A-Za-z_-]{35}"
    r"|\b(?:Bearer|Basic)\s+[A-Za-z0-9._~+/=-]{16,}"
    r"|\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
    re.S,
)


def key_id(key: str) -> str:
    """Short SHA-256 prefix of an API key: names the key in logs without revealing it."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:KEY_ID_CHARS]


_hash_key = key_id  # `record` has a parameter named key_id


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def mask_secrets(text: str, extra: Iterable[str] = ()) -> str:
    """`text` with API keys, tokens and private keys (plus each string in `extra`) replaced by [secret]."""
    for secret in extra:
        if secret:
            text = text.replace(secret, MASK)
    return _SECRETS.sub(MASK, text)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _score(value: Any) -> float | None:
    value = float(value)
    return round(value, 4) if math.isfinite(value) else None


def _field(result: Any, name: str, default: Any = None) -> Any:
    if isinstance(result, Mapping):
        return result.get(name, default)
    return getattr(result, name, default)


class AuditLog:
    """Append-only JSONL log of guard decisions with size rotation; see the module docstring."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        backups: int = DEFAULT_BACKUPS,
        fsync_every: int = 1,
        max_age_days: float | None = None,
        content: bool = False,
        guard_version: str = "",
    ) -> None:
        if max_bytes < 256:
            raise ConfigError(f"audit log max_bytes must be at least 256, got {max_bytes}")
        if backups < 1:
            raise ConfigError(f"audit log backups must be at least 1 (rotation renames into .1), got {backups}")
        if fsync_every < 1:
            raise ConfigError(f"audit log fsync_every must be at least 1, got {fsync_every}")
        if max_age_days is not None and not max_age_days > 0:
            raise ConfigError(f"audit log max_age_days must be positive, got {max_age_days}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.fsync_every = fsync_every
        self.max_age_days = max_age_days
        self.content = content
        self.guard_version = guard_version
        self._lock = threading.Lock()
        self._unsynced = 0
        self._last_prune = 0.0
        self._fd: int | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._prune(include_current=True)
            self._open()

    # -- public

    def record(
        self,
        *,
        direction: str,
        action: str,
        codes: Iterable[str] = (),
        scores: Mapping[str, float] | None = None,
        text: str | None = None,
        request_id: str = "",
        key: str | None = None,
        key_id: str | None = None,
        profile: str = "",
        guard_version: str | None = None,
        flagged: bool | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Append one decision and return the record as written. Pass the API key as `key` (only its
        `key_id` is stored) or pass `key_id` directly."""
        if direction not in DIRECTIONS:
            raise InvalidArgumentError(f"audit direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
        if not isinstance(action, str) or not action:
            raise InvalidArgumentError(f"audit action must be a non-empty string, got {action!r}")
        rec: dict[str, Any] = {
            "time": utc_now(),
            "request_id": request_id,
            "key_id": key_id if key_id is not None else (_hash_key(key) if key else ""),
            "direction": direction,
            "action": action,
            "flagged": bool(flagged) if flagged is not None else action != "allow",
            "codes": sorted({str(c) for c in codes}),
            "scores": {str(k): _score(v) for k, v in sorted((scores or {}).items())},
            "profile": profile,
            "guard_version": guard_version if guard_version is not None else self.guard_version,
            "text_sha256": text_sha256(text) if text is not None else None,
            "text_chars": len(text) if text is not None else None,
        }
        if self.content and text is not None:
            rec["text"] = mask_secrets(text, [key] if key else ())
        if extra:
            rec["extra"] = dict(extra)
        line = json.dumps(rec, ensure_ascii=True, separators=(",", ":"), allow_nan=False, default=str)
        self._append((line + "\n").encode("ascii"))
        return rec

    def record_result(self, result: Any, *, direction: str, text: str | None = None, **kwargs: Any) -> dict:
        """`record` for a guard result object or dict with `action`, `codes`, `scores`, `flagged` and
        `guard_version` fields (guardrails.md §4); keyword arguments override them."""
        fields = {
            "action": _field(result, "action", "allow"),
            "codes": _field(result, "codes", ()) or (),
            "scores": _field(result, "scores", None),
            "flagged": _field(result, "flagged", None),
        }
        version = _field(result, "guard_version", None)
        if version is not None:
            fields["guard_version"] = version
        return self.record(direction=direction, text=text, **(fields | kwargs))

    def flush(self) -> None:
        """fsync what has been written so far (records are already in the OS after `record` returns)."""
        with self._lock:
            self._sync()

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                self._sync()
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals (callers hold the lock)

    def _open(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        self._size = os.fstat(fd).st_size
        if self._size and os.pread(fd, 1, self._size - 1) != b"\n":
            # A torn line from a crash: end it, so it stays one unreadable line and the next record is whole.
            self._write_all(fd, b"\n")
            os.fsync(fd)
            self._size += 1
        self._fd = fd

    def _append(self, data: bytes) -> None:
        with self._lock:
            if self._fd is None:
                raise InvalidArgumentError(f"audit log {self.path} is closed")
            if self._size and self._size + len(data) > self.max_bytes:
                self._rotate()
            self._write_all(self._fd, data)
            self._size += len(data)
            self._unsynced += 1
            if self._unsynced >= self.fsync_every:
                self._sync()
            if self.max_age_days is not None and time.monotonic() - self._last_prune > PRUNE_INTERVAL:
                self._prune(include_current=False)

    @staticmethod
    def _write_all(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]

    def _sync(self) -> None:
        if self._fd is not None and self._unsynced:
            os.fsync(self._fd)
            self._unsynced = 0

    def _rotate(self) -> None:
        assert self._fd is not None
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd, self._unsynced = None, 0
        try:
            for n in range(self.backups - 1, 0, -1):
                older = backup_path(self.path, n)
                if older.exists():
                    os.replace(older, backup_path(self.path, n + 1))
            os.replace(self.path, backup_path(self.path, 1))
            _fsync_dir(self.path.parent)
            self._prune(include_current=False)
        finally:
            self._open()  # even after a failed rename, keep appending to whatever file is current

    def _prune(self, *, include_current: bool) -> None:
        """Drop backups beyond `backups` and, with `max_age_days`, files whose newest record is too old."""
        self._last_prune = time.monotonic()
        cutoff = time.time() - self.max_age_days * 86400 if self.max_age_days is not None else None
        removed = False
        for n, file in _numbered(self.path):
            too_old = cutoff is not None and file.stat().st_mtime < cutoff
            if n > self.backups or too_old:
                file.unlink(missing_ok=True)
                removed = True
        if include_current and cutoff is not None and self.path.exists() and self.path.stat().st_mtime < cutoff:
            self.path.unlink()
            removed = True
        if removed:
            _fsync_dir(self.path.parent)


def backup_path(path: str | Path, n: int) -> Path:
    path = Path(path)
    return path.with_name(f"{path.name}.{n}")


def _numbered(path: Path) -> list[tuple[int, Path]]:
    """Rotated files of `path` as (n, file), newest (.1) first."""
    if not path.parent.is_dir():
        return []
    pattern = re.compile(re.escape(path.name) + r"\.(\d+)")
    found = [(int(m.group(1)), path.parent / name) for name in os.listdir(path.parent)
             if (m := pattern.fullmatch(name))]
    return sorted(found)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the renames are still ordered
    finally:
        os.close(fd)


def log_files(path: str | Path) -> list[Path]:
    """The files of an audit log, oldest first: .N ... .1, then the current file."""
    path = Path(path)
    files = [file for _, file in reversed(_numbered(path))]
    return files + ([path] if path.exists() else [])


def iter_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Every whole record of the log, oldest first; torn or foreign lines are skipped."""
    for file in log_files(path):
        try:
            data = file.read_bytes()
        except FileNotFoundError:  # rotated away while we looked
            continue
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                yield rec


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """All whole records of the log (every rotated file), oldest first; torn lines are skipped."""
    return list(iter_records(path))
