"""API keys and per-key rate limits (token buckets for requests/min and tokens/min, api.md §2).

Keys come from `--api-key` and a keys file (`GROKSTACK_API_KEYS`): one key per line, optionally followed by
`name=... rpm=N tpm=N profile=P` (P: the guard profile for that key's requests); `#` starts a comment. With
no key configured the server is open (and should stay on loopback). Tokens are reserved at admission
(prompt + max_tokens) and unused ones refunded at the end.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import AuthenticationError, ConfigError, RateLimitError


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


class Keys:
    """The configured keys; `check` maps an Authorization header to a Key (or the anonymous one)."""

    def __init__(self, secrets: list[str], keys_file: str | Path | None, rpm: int = 0, tpm: int = 0) -> None:
        self.keys: list[Key] = [Key(s, f"key-{i}", Bucket(rpm), Bucket(tpm)) for i, s in enumerate(secrets) if s]
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
        opts = {"name": f"{path.name}:{n}", "rpm": rpm, "tpm": tpm, "profile": None}
        for word in words[1:]:
            k, sep, v = word.partition("=")
            if not sep or k not in opts:
                raise ConfigError(
                    f"{path}:{n}: expected KEY [name=NAME] [rpm=N] [tpm=N] [profile=P], got {word!r}"
                )
            try:
                opts[k] = v if k in ("name", "profile") else int(v)
            except ValueError:
                raise ConfigError(f"{path}:{n}: {k} must be an integer") from None
        keys.append(Key(words[0], str(opts["name"]), Bucket(int(opts["rpm"])), Bucket(int(opts["tpm"])),
                        opts["profile"]))
    return keys
