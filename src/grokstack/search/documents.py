"""The normalised `Document` every feed adapter produces, and the keys used to de-duplicate it.

A document is validated once, here, so the index can trust every field. Three identities matter:
- `id`: `x:<post id>` for X posts (the first id of an edit history, so edits update one row); otherwise
  the id the feed gave, else `sha1(canonical_url)`, else `sha1(content_hash)`.
- `canonical_url`: the URL with tracking parameters, fragment, `www.` and trailing slash removed.
- `content_hash`: sha256 of the case-folded, whitespace-collapsed text (plus the author for X posts,
  so two people posting "gm" stay two documents).
Retweets are rewritten onto their original post (`is_retweet=True`), so a retweet never adds a copy.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import InvalidArgumentError
from ..guard.injection import injection_score

SOURCES = ("x", "news", "web", "rss")

# Query parameters that identify a campaign or a click, never the page itself.
TRACKING_PARAMS = frozenset(
    {"fbclid", "gclid", "dclid", "msclkid", "yclid", "mc_cid", "mc_eid", "igshid", "ref_src", "ref_url",
     "_ga", "_gl", "spm", "cmpid", "si", "smid", "ocid"}
)
TRACKING_PREFIXES = ("utm_", "pk_", "hsa_", "vero_")
X_HOSTS = frozenset({"x.com", "twitter.com", "mobile.twitter.com", "mobile.x.com"})
DEFAULT_PORTS = {"http": 80, "https": 443}

_RT_PREFIX = re.compile(r"^RT @(\w{1,15}):\s*")
_SPACES = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """NFKC-normalise and drop invisible characters (zero-width, bidi controls, private use, C0/C1 controls).

    These characters let injected text hide from a reader or split a word so it dodges the index.
    """
    text = unicodedata.normalize("NFKC", text)
    kept = []
    for ch in text:
        cat = unicodedata.category(ch)
        if cat in ("Cf", "Co", "Cs") or (cat == "Cc" and ch not in "\n\t"):
            continue
        kept.append(ch)
    return "".join(kept)


def content_hash(text: str, author: str = "") -> str:
    """sha256 of the cleaned, case-folded, whitespace-collapsed text (and author, when given)."""
    body = _SPACES.sub(" ", clean_text(text).casefold()).strip()
    key = f"{author.casefold()}\n{body}" if author else body
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def canonical_url(url: str) -> str:
    """The URL two copies of one page share: lower-case scheme/host, no `www.`, default port, fragment,
    tracking parameters or trailing slash; remaining query parameters sorted. '' for an empty URL."""
    url = url.strip()
    if not url:
        return ""
    parts = urlsplit(url)
    scheme = (parts.scheme or "https").lower()
    if scheme == "http":
        scheme = "https"  # the same page is routinely linked over both
    host = (parts.hostname or "").lower().rstrip(".")
    host = host.removeprefix("www.")
    if host in X_HOSTS:
        host = "x.com"
    netloc = host
    try:
        port = parts.port
    except ValueError:
        port = None
    if port and port != DEFAULT_PORTS.get(parts.scheme.lower()):
        netloc = f"{host}:{port}"
    query = [
        (k, v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
        if k.lower() not in TRACKING_PARAMS and not k.lower().startswith(TRACKING_PREFIXES)
    ]
    path = parts.path.rstrip("/")
    return urlunsplit((scheme, netloc, path, urlencode(sorted(query)), ""))


def domain_of(url: str) -> str:
    """Host of the canonical URL without `www.` ('' when there is none)."""
    return urlsplit(canonical_url(url)).hostname or ""


def normalize_handle(handle: str) -> str:
    """X handles compare case-insensitively and without the leading `@`."""
    return handle.strip().lstrip("@").casefold()


def parse_time(value: Any, name: str = "published_at") -> float:
    """RFC 3339 text, an aware datetime, or epoch seconds → UTC epoch seconds.

    Naive timestamps are refused: guessing a zone would silently move documents across date filters.
    """
    if isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be an RFC 3339 timestamp or epoch seconds, got {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise InvalidArgumentError(f"{name} must be finite, got {value!r}")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if text.endswith(("z", "Z")):
            text = text[:-1] + "+00:00"
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            raise InvalidArgumentError(
                f"{name} is not an RFC 3339 timestamp: {value!r} (expected e.g. 2026-11-28T10:15:00Z)"
            ) from None
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise InvalidArgumentError(f"{name} has no time-zone offset: {value!r} (add Z or +HH:MM)")
        return value.astimezone(UTC).timestamp()
    if isinstance(value, date):
        raise InvalidArgumentError(f"{name} needs a time, not only a date: {value!r}")
    raise InvalidArgumentError(f"{name} must be an RFC 3339 timestamp or epoch seconds, got {type(value).__name__}")


@dataclass(frozen=True)
class Document:
    """One item from a feed. `title`/`text` keep the original for display; the index searches cleaned text."""

    id: str
    source: str
    text: str
    published_at: float  # UTC epoch seconds
    url: str = ""
    title: str = ""
    author: str = ""  # X username without '@', or a byline
    feed_url: str = ""
    lang: str = ""
    country: str = ""
    likes: int = 0
    views: int = 0
    reposts: int = 0
    replies: int = 0
    nsfw: bool = False
    injection_flag: bool = False
    is_retweet: bool = False  # a stand-in for an original post built from a retweet
    ingested_at: float = 0.0
    canonical_url: str = field(default="")
    domain: str = field(default="")
    content_hash: str = field(default="")

    def __post_init__(self) -> None:
        check_document(self)
        derived = {
            "canonical_url": self.canonical_url or canonical_url(self.url),
            "domain": self.domain or domain_of(self.url),
            "content_hash": self.content_hash
            or content_hash(self.text, self.author if self.source == "x" else ""),
        }
        for key, value in derived.items():
            object.__setattr__(self, key, value)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, now: float | None = None) -> Document:
        """Validate and normalise one feed record (JSONL line, adapter output); errors name the field."""
        return make_document(raw, now=now)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def check_document(doc: Document) -> None:
    if doc.source not in SOURCES:
        raise InvalidArgumentError(f"source must be one of {', '.join(SOURCES)}, got {doc.source!r}")
    if not isinstance(doc.id, str) or not doc.id.strip():
        raise InvalidArgumentError("id must be a non-empty string")
    if not isinstance(doc.text, str) or not doc.text.strip():
        raise InvalidArgumentError(f"text of document {doc.id!r} must be a non-empty string")
    if not isinstance(doc.published_at, int | float) or not math.isfinite(doc.published_at):
        raise InvalidArgumentError(f"published_at of document {doc.id!r} must be finite epoch seconds")
    for name in ("likes", "views", "reposts", "replies"):
        value = getattr(doc, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidArgumentError(f"{name} of document {doc.id!r} must be a non-negative integer")


# Feed records spell metrics in several ways (our JSONL, X public_metrics, xAI's "favorite").
_METRIC_ALIASES = {
    "likes": ("likes", "like_count", "favorites", "favourites", "favorite_count", "favourite_count"),
    "views": ("views", "view_count", "impression_count", "impressions"),
    "reposts": ("reposts", "retweets", "retweet_count", "repost_count"),
    "replies": ("replies", "reply_count"),
}


def _metric(metrics: Mapping[str, Any], name: str) -> int:
    for alias in _METRIC_ALIASES[name]:
        if alias in metrics and metrics[alias] is not None:
            value = metrics[alias]
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or value != int(value):
                raise InvalidArgumentError(f"metrics.{alias} must be a non-negative integer, got {value!r}")
            return int(value)
    return 0


def _text_field(raw: Mapping[str, Any], *names: str) -> str:
    for name in names:
        value = raw.get(name)
        if value is None:
            continue
        if not isinstance(value, str | int):
            raise InvalidArgumentError(f"{name} must be a string, got {type(value).__name__}")
        return str(value).strip()
    return ""


def _retweet_target(raw: Mapping[str, Any]) -> str:
    """Id of the original post when this X record is a retweet, else ''."""
    target = _text_field(raw, "retweet_of")
    if target:
        return target
    for ref in raw.get("referenced_tweets") or ():
        if isinstance(ref, Mapping) and ref.get("type") == "retweeted" and ref.get("id"):
            return str(ref["id"])
    return ""


def _x_identity(raw: Mapping[str, Any], author: str, text: str) -> tuple[str, str, str, bool]:
    """(post id, author, text, is_retweet) for an X record, mapping retweets onto their original."""
    post_id = _text_field(raw, "id").removeprefix("x:")
    history = raw.get("edit_history_tweet_ids")
    if isinstance(history, list | tuple) and history:
        post_id = str(history[0])  # edits get new ids; the first one names the post
    original = _retweet_target(raw).removeprefix("x:")
    if not original:
        return post_id, author, text, False
    prefix = _RT_PREFIX.match(text)
    original_author = _text_field(raw, "retweet_of_author") or (prefix.group(1) if prefix else "")
    if prefix:
        text = text[prefix.end():]
    return original, normalize_handle(original_author) or author, text, True


def make_document(raw: Mapping[str, Any], *, now: float | None = None) -> Document:
    """Build a `Document` from a mapping; see the module docstring for identity rules."""
    if not isinstance(raw, Mapping):
        raise InvalidArgumentError(f"a document must be a JSON object, got {type(raw).__name__}")
    source = _text_field(raw, "source").lower()
    if source not in SOURCES:
        raise InvalidArgumentError(f"source must be one of {', '.join(SOURCES)}, got {raw.get('source')!r}")
    text = _text_field(raw, "text")
    if not text:
        raise InvalidArgumentError("text is required and must be non-empty")
    published = raw.get("published_at", raw.get("created_at"))
    if published is None:
        raise InvalidArgumentError("published_at is required (RFC 3339, e.g. 2026-11-28T10:15:00Z)")
    published_at = parse_time(published)
    author = _text_field(raw, "author", "handle", "username")
    url = _text_field(raw, "url")
    metrics = raw.get("metrics") or raw.get("public_metrics") or {}
    if not isinstance(metrics, Mapping):
        raise InvalidArgumentError("metrics must be an object")
    counts = {name: _metric(metrics, name) for name in _METRIC_ALIASES}

    is_retweet = False
    if source == "x":
        author = normalize_handle(author)
        post_id, author, text, is_retweet = _x_identity(raw, author, text)
        if not post_id:
            raise InvalidArgumentError("an X post needs its id")
        if not text:
            raise InvalidArgumentError(f"retweet of {post_id} has no text")
        doc_id = f"x:{post_id}"
        if is_retweet or not url:
            url = f"https://x.com/{author or 'i'}/status/{post_id}"
        if is_retweet:
            counts = dict.fromkeys(counts, 0)  # the retweeter's numbers say nothing about the original
    else:
        doc_id = _text_field(raw, "id")
        if not doc_id and url:
            doc_id = hashlib.sha1(canonical_url(url).encode("utf-8")).hexdigest()
        if not doc_id:
            doc_id = hashlib.sha1(content_hash(text).encode("ascii")).hexdigest()

    ingested = raw.get("ingested_at")
    title = _text_field(raw, "title")
    return Document(
        id=doc_id,
        source=source,
        text=text,
        published_at=published_at,
        url=url,
        title=title,
        author=author,
        feed_url=_text_field(raw, "feed_url", "feed"),
        lang=_text_field(raw, "lang").lower(),
        country=_text_field(raw, "country").upper(),
        nsfw=bool(raw.get("nsfw", False)),
        injection_flag=bool(raw.get("injection_flag", False)) or injection_score(f"{title}\n{text}").flagged,
        is_retweet=is_retweet,
        ingested_at=parse_time(ingested, "ingested_at") if ingested is not None else (now or time.time()),
        **counts,
    )
