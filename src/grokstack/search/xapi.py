"""X API v2: recent search (`GET /2/tweets/search/recent`) and the filtered stream (`GET /2/tweets/search/stream`).

Both use an app-only Bearer token (`X_BEARER_TOKEN`), plain httpx (injectable client, clock and sleep)
and the same post → `Document` mapping:
- IDs are 64-bit strings; the author's username comes from `includes.users`; the citation URL is
  `https://x.com/{username}/status/{id}`.
- A retweet is replaced by its original from `includes.tweets` when the expansion delivered it (full
  text, original author and metrics); otherwise `make_document` strips the `RT @user:` prefix.
- An edited post has a new id but the same first `edit_history_tweet_ids` entry, which `make_document`
  uses as the document id; within one poll only the newest version of a post is stored.

Recent search resumes from `since_id` (the previous poll's `meta.newest_id`), saved only after every page
of the poll is committed: a crash in between repeats the poll, never skips posts (see `ingest.py`).

Back-off, as X documents it: on 429 wait until `x-rate-limit-reset` (epoch seconds; without it,
exponentially from 60 s); the stream reconnects after network errors linearly (+250 ms, up to 16 s),
after HTTP errors exponentially (from 5 s, up to 320 s) and after 429 exponentially from 60 s.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from ..errors import ConfigError, GrokstackError
from .documents import Document, make_document
from .index import Index
from .ingest import Checkpoints, Clock, IngestCounts, Sleep, Stop, _Delta, add_batch, default_sleep, should_stop

log = logging.getLogger(__name__)

BASE_URL = "https://api.x.com"
RECENT_PATH = "/2/tweets/search/recent"
STREAM_PATH = "/2/tweets/search/stream"
EXPANSIONS = "author_id,referenced_tweets.id,referenced_tweets.id.author_id"
TWEET_FIELDS = "created_at,public_metrics,lang,referenced_tweets,edit_history_tweet_ids,author_id"
USER_FIELDS = "username"
MAX_RESULTS = 100
MAX_ATTEMPTS = 5  # per recent-search request, counting 429 waits and server errors
RATE_LIMIT_BACKOFF = 60.0  # 429 without a reset header: 60 s, doubling
SERVER_ERROR_BACKOFF = 5.0  # 5xx on recent search: 5 s, doubling
RESET_MARGIN = 1.0  # the reset instant is when the window reopens; a second more avoids an instant 429
NETWORK_STEP, NETWORK_MAX = 0.25, 16.0
HTTP_START, HTTP_MAX = 5.0, 320.0
RATE_START, RATE_MAX = 60.0, 960.0
KEEPALIVE_TIMEOUT = 20.0


def bearer_token(token: str | None = None) -> str:
    token = token or os.environ.get("X_BEARER_TOKEN", "")
    if not token:
        raise ConfigError("no X API bearer token: set X_BEARER_TOKEN (an app-only token from the X developer portal)")
    return token


def _headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "User-Agent": "grokstack-x/0.1"}


def _fields() -> dict[str, str]:
    return {"expansions": EXPANSIONS, "tweet.fields": TWEET_FIELDS, "user.fields": USER_FIELDS}


# ----------------------------------------------------------------------------------------------------
# Posts → documents


def _by_id(items: Iterable[Mapping[str, Any]] | None) -> dict[str, Mapping[str, Any]]:
    return {str(item["id"]): item for item in items or () if isinstance(item, Mapping) and "id" in item}


def _retweeted_id(post: Mapping[str, Any]) -> str:
    for ref in post.get("referenced_tweets") or ():
        if isinstance(ref, Mapping) and ref.get("type") == "retweeted":
            return str(ref.get("id", ""))
    return ""


def post_record(post: Mapping[str, Any], users: Mapping[str, Mapping[str, Any]], feed: str) -> dict[str, Any]:
    """An X API post (plus the expanded users) → the mapping `make_document` takes."""
    user = users.get(str(post.get("author_id", ""))) or {}
    username = str(user.get("username", ""))
    post_id = str(post["id"])
    return {
        "source": "x",
        "id": post_id,
        "text": post.get("text", ""),
        "created_at": post.get("created_at"),
        "author": username,
        "url": f"https://x.com/{username or 'i'}/status/{post_id}",
        "lang": post.get("lang", "") if post.get("lang") not in ("und", "zxx", "qme", "qht") else "",
        "public_metrics": post.get("public_metrics") or {},
        "referenced_tweets": post.get("referenced_tweets") or [],
        "edit_history_tweet_ids": post.get("edit_history_tweet_ids") or [],
        "feed_url": feed,
    }


def post_document(
    post: Mapping[str, Any], includes: Mapping[str, Any] | None, feed: str, now: float
) -> Document:
    """One post → Document; a retweet whose original was expanded becomes that original."""
    includes = includes or {}
    users = _by_id(includes.get("users"))
    original = _by_id(includes.get("tweets")).get(_retweeted_id(post))
    if original is not None and original.get("text") and original.get("created_at"):
        return make_document(post_record(original, users, feed), now=now)
    return make_document(post_record(post, users, feed), now=now)


def _post_key(post: Mapping[str, Any]) -> tuple[str, int]:
    """(post identity, version) — edits share the first id of their history; later ids are newer."""
    history = post.get("edit_history_tweet_ids") or [post.get("id")]
    return str(history[0]), int(post.get("id", 0))


def _documents(
    body: Mapping[str, Any], feed: str, counts: IngestCounts, delta: _Delta, newest: dict[str, int], now: float
) -> list[Document]:
    """The page's posts as documents, skipping versions older than one already seen in this poll."""
    docs: list[Document] = []
    for post in body.get("data") or ():
        try:
            root, version = _post_key(post)
            if newest.get(root, -1) > version:
                continue  # pages run newest first: an older version of an edited post must not win
            newest[root] = version
            doc = post_document(post, body.get("includes"), feed, now)
        except (GrokstackError, KeyError, TypeError, ValueError) as exc:
            counts.bad += 1
            delta.bad += 1
            log.warning("%s: post %r skipped: %s", feed, post.get("id") if isinstance(post, Mapping) else post, exc)
            continue
        counts.note_item(doc)
        delta.seen += 1
        delta.last_item = counts.last_item
        docs.append(doc)
    return docs


def _log_partial_errors(body: Mapping[str, Any], feed: str) -> None:
    for err in body.get("errors") or ():
        if isinstance(err, Mapping):
            log.warning("%s: partial error: %s — %s (%s %s)", feed, err.get("title"), err.get("detail"),
                        err.get("resource_type", ""), err.get("resource_id", err.get("value", "")))


# ----------------------------------------------------------------------------------------------------
# Recent search


class XApiError(GrokstackError):
    """The X API refused a request in a way retrying now will not fix (auth, bad query, retries spent)."""


@dataclass
class _Requester:
    client: httpx.Client
    token: str
    clock: Clock
    sleep: Sleep
    counts: IngestCounts

    pending_wait: float = 0.0  # set when the last response spent the rate-limit window

    def get(self, url: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """GET with the documented waits for 429 and 5xx; returns the JSON body of a 200."""
        if self.pending_wait:
            log.info("%s: rate-limit window spent; waiting %.1f s for its reset", self.counts.feed,
                     self.pending_wait)
            self.sleep(self.pending_wait)
            self.pending_wait = 0.0
        for attempt in range(MAX_ATTEMPTS):
            response = self.client.get(url, params=params, headers=_headers(self.token))
            self.counts.requests += 1
            if response.status_code == 200:
                self._pace(response)
                return response.json()
            if response.status_code == 429:
                wait = self._reset_wait(response) or RATE_LIMIT_BACKOFF * 2**attempt
            elif response.status_code >= 500:
                wait = SERVER_ERROR_BACKOFF * 2**attempt
            else:
                raise XApiError(f"HTTP {response.status_code} from {RECENT_PATH}: {_detail(response)}")
            log.warning("%s: HTTP %d; waiting %.1f s (attempt %d of %d)", self.counts.feed, response.status_code,
                        wait, attempt + 1, MAX_ATTEMPTS)
            self.sleep(wait)
        raise XApiError(f"{RECENT_PATH} still failing after {MAX_ATTEMPTS} attempts")

    def _reset_wait(self, response: httpx.Response) -> float | None:
        reset = response.headers.get("x-rate-limit-reset", "")
        if not reset.strip().isdigit():
            return None
        return max(int(reset) - self.clock(), 0.0) + RESET_MARGIN

    def _pace(self, response: httpx.Response) -> None:
        """When the window is spent, the next request waits for its reset instead of collecting a 429."""
        if response.headers.get("x-rate-limit-remaining", "").strip() == "0":
            self.pending_wait = self._reset_wait(response) or 0.0


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, Mapping):
        return str(body.get("detail") or body.get("title") or body.get("errors") or body)[:300]
    return str(body)[:300]


def poll_x_recent(
    index: Index,
    query: str,
    *,
    client: httpx.Client | None = None,
    bearer: str | None = None,
    base_url: str = BASE_URL,
    max_results: int = MAX_RESULTS,
    feed: str | None = None,
    clock: Clock = time.time,
    sleep: Sleep = time.sleep,
) -> IngestCounts:
    """Run one recent-search poll for `query`, following `next_token`, from the stored `since_id`.

    Each page is committed as it arrives; `meta.newest_id` of the first page becomes the next
    `since_id` once the last page is stored. Partial `errors` in a 200 are logged. Remote failures
    are recorded in the checkpoint and returned in `error`; a missing token raises ConfigError.
    """
    token = bearer_token(bearer)
    feed = feed or f"x-recent:{query}"
    counts = IngestCounts(feed=feed)
    own_client = client is None
    client = client or httpx.Client(timeout=httpx.Timeout(30.0, connect=10.0))
    try:
        with Checkpoints(index.path, clock) as store:
            state = store.load(feed)
            requester = _Requester(client, token, clock, sleep, counts)
            try:
                _search(index, store, requester, base_url, query, max_results, state, counts)
            except (XApiError, httpx.HTTPError, ValueError) as exc:
                counts.error = f"{type(exc).__name__}: {exc}"
                log.error("%s: %s", feed, counts.error)
                store.save(feed, "x-recent", state, _Delta(errors=1, error=counts.error))
    finally:
        if own_client:
            client.close()
    return counts


def _search(
    index: Index, store: Checkpoints, requester: _Requester, base_url: str, query: str, max_results: int,
    state: dict[str, Any], counts: IngestCounts,
) -> None:
    params: dict[str, Any] = {"query": query, "max_results": max(10, min(max_results, 100)), **_fields()}
    if state.get("since_id"):
        params["since_id"] = state["since_id"]
    url = base_url.rstrip("/") + RECENT_PATH
    newest_id: str | None = None
    newest_versions: dict[str, int] = {}
    while True:
        body = requester.get(url, params)
        _log_partial_errors(body, counts.feed)
        meta = body.get("meta") or {}
        newest_id = newest_id or meta.get("newest_id")
        delta = _Delta()
        docs = _documents(body, counts.feed, counts, delta, newest_versions, requester.clock())
        add_batch(index, docs, counts, delta)
        token = meta.get("next_token")
        if token:
            # Progress counters only; since_id must not move until the last page is stored.
            store.save(counts.feed, "x-recent", state, delta)
            params["next_token"] = token
            continue
        if newest_id:
            state["since_id"] = str(newest_id)
        store.save(counts.feed, "x-recent", state, delta)
        return


# ----------------------------------------------------------------------------------------------------
# Filtered stream


class _Backoff:
    """Reconnect delays per X's handling-disconnections guide; `reset()` once a connection delivers."""

    def __init__(self) -> None:
        self.network = self.http = self.rate = 0

    def reset(self) -> None:
        self.network = self.http = self.rate = 0

    def after_network_error(self) -> float:
        self.network += 1
        return min(NETWORK_STEP * self.network, NETWORK_MAX)

    def after_http_error(self) -> float:
        self.http += 1
        return min(HTTP_START * 2 ** (self.http - 1), HTTP_MAX)

    def after_rate_limit(self) -> float:
        self.rate += 1
        return min(RATE_START * 2 ** (self.rate - 1), RATE_MAX)


class _Disconnect(Exception):
    """The server said it is closing the connection (an `operational-disconnect` message)."""


def _is_disconnect(message: Mapping[str, Any]) -> bool:
    return "data" not in message and any(
        isinstance(e, Mapping) and (e.get("disconnect_type") or "disconnect" in str(e.get("title", "")))
        for e in message.get("errors") or ()
    )


def stream_x(
    index: Index,
    *,
    client: httpx.Client | None = None,
    bearer: str | None = None,
    base_url: str = BASE_URL,
    stop: Stop = None,
    keepalive_timeout: float = KEEPALIVE_TIMEOUT,
    feed: str = "x-stream",
    clock: Clock = time.time,
    sleep: Sleep | None = None,
    max_connections: int | None = None,
) -> IngestCounts:
    """Consume the filtered stream until `stop` (or `max_connections` connections), storing each post.

    Blank lines are keep-alives; if nothing at all arrives for `keepalive_timeout` seconds the
    connection is presumed dead and reopened. Disconnect messages, closed connections and HTTP errors
    reconnect with the documented back-off. The newest post id is checkpointed (for a recent-search
    backfill with `since_id` after an outage). Rules are managed elsewhere; they persist server-side.
    `stop` is checked after every line (keep-alives included), so it takes effect within about
    `keepalive_timeout` seconds.
    """
    token = bearer_token(bearer)
    sleep = sleep or default_sleep(stop)
    counts = IngestCounts(feed=feed)
    own_client = client is None
    client = client or httpx.Client()
    # The read timeout is what detects a silent connection; a little slack keeps an on-time keep-alive
    # from racing it.
    timeout = httpx.Timeout(10.0, read=keepalive_timeout + min(2.0, keepalive_timeout / 10))
    url = base_url.rstrip("/") + STREAM_PATH
    backoff = _Backoff()
    connections = 0
    try:
        with Checkpoints(index.path, clock) as store:
            state = store.load(feed)
            while not should_stop(stop) and (max_connections is None or connections < max_connections):
                connections += 1
                wait = _connect(index, store, client, url, token, timeout, state, counts, backoff, stop, clock)
                if wait and not should_stop(stop):
                    log.info("%s: reconnecting in %.2f s", feed, wait)
                    sleep(wait)
    finally:
        if own_client:
            client.close()
    return counts


def _connect(
    index: Index, store: Checkpoints, client: httpx.Client, url: str, token: str, timeout: httpx.Timeout,
    state: dict[str, Any], counts: IngestCounts, backoff: _Backoff, stop: Stop, clock: Clock,
) -> float:
    """One connection's life; returns how long to wait before the next (0 when stopping)."""
    try:
        with client.stream("GET", url, params=_fields(), headers=_headers(token), timeout=timeout) as response:
            counts.requests += 1
            if response.status_code == 429:
                response.read()
                return _record(store, state, counts, "HTTP 429", backoff.after_rate_limit())
            if response.status_code != 200:
                response.read()
                message = f"HTTP {response.status_code}: {_detail(response)}"
                return _record(store, state, counts, message, backoff.after_http_error())
            for line in response.iter_lines():
                backoff.reset()  # data or keep-alive: this connection works
                if line.strip():
                    _handle_line(index, store, line, state, counts, clock)
                if should_stop(stop):
                    return 0.0
    except _Disconnect as exc:
        return _record(store, state, counts, f"disconnect: {exc}", backoff.after_network_error())
    except httpx.TransportError as exc:  # read timeout (no keep-alive), refused, reset
        return _record(store, state, counts, f"{type(exc).__name__}: {exc}", backoff.after_network_error())
    return _record(store, state, counts, "stream closed by the server", backoff.after_network_error())


def _handle_line(
    index: Index, store: Checkpoints, line: str, state: dict[str, Any], counts: IngestCounts, clock: Clock
) -> None:
    try:
        message = json.loads(line)
    except json.JSONDecodeError:
        counts.bad += 1
        log.warning("%s: unreadable stream line skipped: %.200s", counts.feed, line)
        return
    if not isinstance(message, Mapping):
        counts.bad += 1
        return
    if _is_disconnect(message):
        raise _Disconnect(str(message["errors"])[:300])
    _log_partial_errors(message, counts.feed)
    post = message.get("data")
    if not isinstance(post, Mapping):
        return
    delta = _Delta()
    docs = _documents({"data": [post], "includes": message.get("includes")}, counts.feed, counts, delta, {}, clock())
    add_batch(index, docs, counts, delta)
    post_id = str(post.get("id", ""))
    if post_id.isdigit() and int(post_id) > int(state.get("newest_id", "0") or 0):
        state["newest_id"] = post_id
    store.save(counts.feed, "x-stream", state, delta)


def _record(store: Checkpoints, state: dict[str, Any], counts: IngestCounts, message: str, wait: float) -> float:
    counts.error = message
    log.warning("%s: %s", counts.feed, message)
    store.save(counts.feed, "x-stream", state, _Delta(errors=1, error=message))
    return wait
