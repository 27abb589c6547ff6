"""RSS and Atom feeds: conditional GET with httpx, parsing with feedparser, entries → `Document`s.

Per feed the checkpoint keeps the current URL (a 301/308 moves it for good), `ETag` and `Last-Modified`
for the next conditional request, and the back-off state. Outcomes of one poll:
- 200: entries are stored, then the validators are saved (documents first; see `ingest.py`);
- 304: nothing new;
- 410: the feed is disabled (polls return at once until its state is cleared);
- 429/503: wait for `Retry-After`; other errors and network failures: exponential back-off per feed;
- malformed XML: what feedparser recovered is kept and the error is recorded, never raised.
"""

from __future__ import annotations

import calendar
import hashlib
import io
import logging
import re
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from html.parser import HTMLParser
from typing import Any

import feedparser
import httpx

from ..errors import InvalidArgumentError
from ..guard.injection import injection_score
from .documents import SOURCES, Document, make_document
from .index import Index
from .ingest import Checkpoints, Clock, IngestCounts, _Delta, add_batch

log = logging.getLogger(__name__)

USER_AGENT = "grokstack-feeds/0.1 (+https://github.com/grokstack)"
ACCEPT = "application/atom+xml, application/rss+xml, application/xml;q=0.9, */*;q=0.5"
TIMEOUT = httpx.Timeout(30.0, connect=10.0)
BACKOFF_BASE = 60.0  # first retry delay after a failed poll, doubled per consecutive failure
BACKOFF_MAX = 6 * 3600.0
MAX_REDIRECTS = 5
PERMANENT_REDIRECTS = (301, 308)
# feedparser flags these on well-formed feeds (a charset header that disagrees with the XML prolog).
_HARMLESS_BOZO = (feedparser.CharacterEncodingOverride, feedparser.NonXMLContentType)


class _TextExtractor(HTMLParser):
    """HTML → plain text: keeps text, turns block elements into line breaks, drops script/style."""

    BLOCKS = frozenset({"p", "br", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "pre"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._skip = max(self._skip - 1, 0)
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """Visible text of an HTML fragment, whitespace collapsed within lines."""
    if "<" not in html and "&" not in html:
        return html.strip()
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    lines = (re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in "".join(parser.parts).split("\n"))
    return "\n".join(line for line in lines if line)


def _entry_time(entry: Mapping[str, Any]) -> float | None:
    for key in ("published_parsed", "updated_parsed"):
        parsed = entry.get(key)
        if parsed:
            return float(calendar.timegm(parsed))  # feedparser's struct_time is already UTC
    return None


def _entry_html(entry: Mapping[str, Any]) -> str:
    content = entry.get("content") or []
    if content and content[0].get("value"):
        return content[0]["value"]
    return entry.get("summary", "") or ""


def entry_document(entry: Mapping[str, Any], feed: str, kind: str, lang: str, now: float) -> Document:
    """One feedparser entry → Document (raises InvalidArgumentError when it has no usable text).

    Identity: the entry's Atom id / RSS guid, scoped to the feed (a bare guid like "42" is only unique
    within its feed); else the link (the index then keys it by canonical URL); else title + date.
    """
    title = html_to_text(entry.get("title", "") or "")
    body = _entry_html(entry)
    text = html_to_text(body) or title
    link = (entry.get("link") or "").strip()
    published = _entry_time(entry)
    if published is None:
        log.debug("%s: entry %r has no date; using the ingest time", feed, title or link)
    guid = (entry.get("id") or "").strip()
    if guid:
        doc_id = hashlib.sha1(f"{feed}\n{guid}".encode()).hexdigest()
    elif link:
        doc_id = ""  # make_document derives sha1(canonical_url)
    else:
        doc_id = hashlib.sha1(f"{title}\n{published}".encode()).hexdigest()
    raw = {
        "id": doc_id,
        "source": kind,
        "url": link,
        "title": title,
        "text": text,
        "author": entry.get("author", "") or "",
        "published_at": published if published is not None else now,
        "feed_url": feed,
        "lang": lang,
        # hidden HTML text (display:none, zero-size, same colour) is where injected instructions hide
        # (the visible text is checked in make_document, like every other source's)
        "injection_flag": injection_score("", html=body).flagged,
    }
    return make_document(raw, now=now)


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta seconds or an HTTP date), None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(parsedate_to_datetime(value).timestamp() - now, 0.0)
    except (TypeError, ValueError):
        return None


def _conditional_headers(state: Mapping[str, Any]) -> dict[str, str]:
    headers = {"User-Agent": USER_AGENT, "Accept": ACCEPT}
    if state.get("etag"):
        headers["If-None-Match"] = state["etag"]
    if state.get("modified"):
        headers["If-Modified-Since"] = state["modified"]
    return headers


def _permanent_target(response: httpx.Response, start: str) -> str:
    """The URL an unbroken chain of permanent redirects from `start` leads to (`start` if none)."""
    url = start
    hops = [*response.history, response]
    for hop, after in zip(hops, hops[1:], strict=False):
        if hop.status_code not in PERMANENT_REDIRECTS:
            break
        url = str(after.request.url)
    return url


def _fail(state: dict[str, Any], counts: IngestCounts, message: str, now: float, wait: float | None = None) -> None:
    """Record a failed poll and schedule the next try (given wait, else exponential back-off)."""
    failures = int(state.get("failures", 0)) + 1
    if wait is None:
        wait = min(BACKOFF_BASE * 2 ** (failures - 1), BACKOFF_MAX)
    state["failures"] = failures
    state["retry_at"] = now + wait
    counts.error = message
    log.warning("%s: %s; next try in %.0f s", counts.feed, message, wait)


def _fetch(client: httpx.Client, state: dict[str, Any], counts: IngestCounts, now: float) -> httpx.Response | None:
    try:
        response = client.get(state["url"], headers=_conditional_headers(state), follow_redirects=True)
    except httpx.HTTPError as exc:
        _fail(state, counts, f"request failed: {type(exc).__name__}: {exc}", now)
        return None
    counts.requests += 1
    moved = _permanent_target(response, state["url"])
    if moved != state["url"]:
        log.info("%s moved permanently to %s", counts.feed, moved)
        state["url"] = moved
    return response


def _parse(response: httpx.Response, counts: IngestCounts) -> Any:
    headers = {k.lower(): v for k, v in response.headers.items()}
    headers.setdefault("content-location", str(response.url))  # base for relative links
    # BytesIO, never raw bytes or str: feedparser treats a string as a path or URL to open.
    parsed = feedparser.parse(io.BytesIO(response.content), response_headers=headers)
    if parsed.get("bozo") and not isinstance(parsed.get("bozo_exception"), _HARMLESS_BOZO):
        exc = parsed.get("bozo_exception")
        counts.error = f"malformed feed ({len(parsed.entries)} entries recovered): {type(exc).__name__}: {exc}"
        log.warning("%s: %s", counts.feed, counts.error)
    return parsed


def _store_entries(
    index: Index, parsed: Any, feed: str, kind: str, counts: IngestCounts, delta: _Delta, now: float
) -> None:
    lang = (parsed.feed.get("language") or "").split("-")[0].lower() if parsed.get("feed") else ""
    docs: list[Document] = []
    for entry in parsed.entries:
        try:
            doc = entry_document(entry, feed, kind, lang, now)
        except InvalidArgumentError as exc:
            counts.bad += 1
            delta.bad += 1
            log.warning("%s: entry %r skipped: %s", feed, entry.get("id") or entry.get("link"), exc)
            continue
        counts.note_item(doc)
        delta.seen += 1
        delta.last_item = counts.last_item
        docs.append(doc)
    add_batch(index, docs, counts, delta)


def poll_feed(
    index: Index,
    url: str,
    *,
    client: httpx.Client | None = None,
    kind: str = "news",
    clock: Clock = time.time,
    force: bool = False,
) -> IngestCounts:
    """Fetch one RSS/Atom feed once (conditionally) and store its new or changed entries.

    `url` names the feed for good (its checkpoint key and the documents' `feed_url`) even after a
    permanent redirect moves where it is fetched from. `kind` is the documents' source type. A feed
    inside its back-off window, or disabled by a 410, is skipped unless `force`. Never raises for
    remote problems: they are in the returned counts' `error` and in `feed_status`.
    """
    if kind not in SOURCES or kind == "x":
        raise InvalidArgumentError(f"feed kind must be one of news, web, rss; got {kind!r}")
    counts = IngestCounts(feed=url)
    own_client = client is None
    client = client or httpx.Client(timeout=TIMEOUT)
    try:
        with Checkpoints(index.path, clock) as store:
            _poll(index, store, client, url, kind, counts, clock, force)
    finally:
        if own_client:
            client.close()
    return counts


def _poll(
    index: Index, store: Checkpoints, client: httpx.Client, feed: str, kind: str, counts: IngestCounts,
    clock: Clock, force: bool,
) -> None:
    state: dict[str, Any] = {"url": feed, **store.load(feed)}
    now = clock()
    if not force and state.get("disabled"):
        log.info("%s is disabled (%s); skipping", feed, state["disabled"])
        return
    if not force and state.get("retry_at", 0) > now:
        log.info("%s is backing off until %.0f; skipping", feed, state["retry_at"])
        return
    delta = _Delta()
    response = _fetch(client, state, counts, now)
    if response is None:
        pass
    elif response.status_code == 304:
        counts.not_modified = True
        state.pop("failures", None)
        state.pop("retry_at", None)
    elif response.status_code == 410:
        state["disabled"] = "410 Gone"
        counts.error = "the feed is gone (HTTP 410); disabled"
        log.warning("%s: %s", feed, counts.error)
    elif response.status_code in (429, 503):
        _fail(state, counts, f"HTTP {response.status_code}", now, retry_after(response.headers.get("retry-after"), now))
    elif response.status_code != 200:
        _fail(state, counts, f"HTTP {response.status_code}", now)
    else:
        parsed = _parse(response, counts)
        _store_entries(index, parsed, feed, kind, counts, delta, now)
        if counts.error is None:
            # Only a clean parse earns the validators; a broken document must be fetched whole next time.
            state["etag"] = response.headers.get("etag") or None
            state["modified"] = response.headers.get("last-modified") or None
        ttl = parsed.feed.get("ttl") if parsed.get("feed") else None
        if ttl and str(ttl).isdigit():
            state["ttl"] = int(ttl) * 60  # RSS <ttl> is minutes; a scheduler may poll no more often
        state.pop("failures", None)
        state.pop("retry_at", None)
    if counts.error:
        delta.errors += 1
        delta.error = counts.error
    store.save(feed, kind, state, delta)
