"""API keys, who owns what they store, and per-key rate limits (token buckets for requests/min and
tokens/min, api.md §2).

Keys come from `--api-key` and a keys file (`GROKSTACK_API_KEYS`): one key per line, optionally followed by
`name=... rpm=N tpm=N profile=P admin` (P: the guard profile for that key's requests; `admin`: may call
admin-only routes); `#` starts a comment. With no key configured the server is open (and should stay on
loopback). Tokens are reserved at admission (prompt + max_tokens) and unused ones refunded at the end.

Stored objects (deferred completions today, stored responses later) record an owner, never the raw key: the
key's `name=` when the keys file gives one, so that a rotated key under the same name keeps its objects, else
a SHA-256 of the key. Another owner's object reads as unknown (`can_see`).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import AuthenticationError, ConfigError, PermissionDeniedError, RateLimitError


class Bucket:
    """A token bucket: `capacity` per minute, refilled continuously; capacity 0 = unlimited."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.level = float(capacity)
        self.stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.capacity / 60.0)
        self.stamp = now

    def take(self, amount: float, what: str) -> None:
        if not self.capacity:
            return
        self._refill()
        if amount > self.capacity:
            err = RateLimitError(f"this request needs {amount:.0f} {what} but the limit is {self.capacity}/min",
                                 retry_after=60)
            err.no_retry = True  # waiting will never make it fit
            raise err
        if amount > self.level:
            wait = (amount - self.level) * 60.0 / self.capacity
            raise RateLimitError(f"rate limit exceeded: {what} per minute ({self.capacity})", retry_after=wait)
        self.level -= amount

    def give(self, amount: float) -> None:
        if self.capacity:
            self._refill()
            self.level = min(self.capacity, self.level + amount)

    def headers(self, kind: str) -> dict[str, str]:
        if not self.capacity:
            return {}
        self._refill()
        reset = (self.capacity - self.level) * 60.0 / self.capacity
        return {
            f"x-ratelimit-limit-{kind}": str(self.capacity),
            f"x-ratelimit-remaining-{kind}": str(int(self.level)),
            f"x-ratelimit-reset-{kind}": f"{reset:.1f}s",
        }


@dataclass
class Key:
    secret: str
    name: str
    requests: Bucket
    tokens: Bucket
    profile: str | None = None  # guard profile for this key; None = the server's
    owner: str | None = None  # what its stored objects are filed under; None = the open server's anonymous key
    admin: bool = False


def owner_for(secret: str, name: str | None) -> str:
    """The owner a key's objects are stored under: its explicit name, else a hash (the raw key is never stored)."""
    if name:
        return "name:" + name
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()


def can_see(stored_owner: str | None, key: Key) -> bool:
    """Whether `key` may read, continue or delete an object stored under `stored_owner`. Objects without an
    owner (stored before owners existed, or by an open server) and requests to an open server see all."""
    return stored_owner is None or key.owner is None or hmac.compare_digest(stored_owner, key.owner)


class Keys:
    """The configured keys; `check` maps an Authorization header to a Key (or the anonymous one)."""

    def __init__(self, secrets: list[str], keys_file: str | Path | None, rpm: int = 0, tpm: int = 0) -> None:
        self.keys: list[Key] = [Key(s, f"key-{i}", Bucket(rpm), Bucket(tpm), owner=owner_for(s, None))
                                for i, s in enumerate(secrets) if s]
        if keys_file:
            self.keys += _read_keys_file(Path(keys_file), rpm, tpm)
        self.anonymous = Key("", "anonymous", Bucket(rpm), Bucket(tpm))

    @property
    def open(self) -> bool:
        return not self.keys

    def check(self, authorization: str | None) -> Key:
        if self.open:
            return self.anonymous
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
        token = token.strip()
        for key in self.keys:
            if hmac.compare_digest(key.secret.encode(), token.encode()):
                return key
        shown = token[:3] + "***" + token[-2:] if len(token) > 6 else "***"
        raise AuthenticationError(f"incorrect API key provided: {shown}")

    def check_admin(self, authorization: str | None) -> Key:
        """An admin key (401 without a valid key, 403 for a valid key without `admin`)."""
        key = self.check(authorization)
        if not key.admin:
            raise PermissionDeniedError("this route needs an admin key ('admin' in the API keys file)")
        return key

    @property
    def has_admin(self) -> bool:
        return any(k.admin for k in self.keys)

    def by_owner(self, owner: str | None) -> Key:
        """A key of `owner` (to run a stored job under its key's profile after a restart); the anonymous key
        when none is configured any more."""
        return next((k for k in self.keys if owner is not None and k.owner == owner), self.anonymous)


def _read_keys_file(path: Path, rpm: int, tpm: int) -> list[Key]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read the API keys file {path}: {exc}") from None
    keys = []
    for n, line in enumerate(lines, 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        opts = {"name": None, "rpm": rpm, "tpm": tpm, "profile": None}
        admin = False
        for word in words[1:]:
            if word == "admin":
                admin = True
                continue
            k, sep, v = word.partition("=")
            if not sep or k not in opts:
                raise ConfigError(
                    f"{path}:{n}: expected KEY [name=NAME] [rpm=N] [tpm=N] [profile=P] [admin], got {word!r}"
                )
            try:
                opts[k] = v if k in ("name", "profile") else int(v)
            except ValueError:
                raise ConfigError(f"{path}:{n}: {k} must be an integer") from None
        name = opts["name"] or None
        keys.append(Key(words[0], name or f"{path.name}:{n}", Bucket(int(opts["rpm"])), Bucket(int(opts["tpm"])),
                        opts["profile"], owner=owner_for(words[0], name), admin=admin))
    return keys
