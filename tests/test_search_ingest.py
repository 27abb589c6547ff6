"""Feed ingestion: JSONL files (offsets, partial lines, bad lines, crash safety), RSS/Atom over real HTTP on
127.0.0.1 (ETag/304, 301, 410, 503, malformed XML) and an imitation of the X API v2 (recent search pages,
since_id, 429, partial errors, retweets, edits; the filtered stream with keep-alives and disconnects).

No traffic leaves the machine; clocks and sleeps are injected, so nothing here really waits for a rate limit.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from grokstack.search import Index
from grokstack.search.feeds import html_to_text, poll_feed, retry_after
from grokstack.search.ingest import Checkpoints, feed_status, ingest_jsonl, jsonl_feed_name
from grokstack.search.xapi import _Backoff, poll_x_recent, stream_x

FIXTURES = Path(__file__).parent / "fixtures" / "search"
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------
# A tiny HTTP server on 127.0.0.1 whose routes are plain functions


class Request:
    def __init__(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        self.path = parts.path
        self.query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        self.headers = {k.lower(): v for k, v in handler.headers.items()}
        self.handler = handler

    def reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        h = self.handler
        h.send_response(status)
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def start_stream(self) -> None:
        # HTTP/1.0 without Content-Length: the body ends when the connection closes, as a stream does.
        self.handler.send_response(200)
        self.handler.send_header("Content-Type", "application/json")
        self.handler.end_headers()
        self.handler.wfile.flush()

    def write(self, data: bytes) -> None:
        self.handler.wfile.write(data)
        self.handler.wfile.flush()


Route = Callable[[Request], None]


class FakeServer:
    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.log: list[Request] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's spelling)
                request = Request(self)
                server.log.append(request)
                route = server.routes.get(request.path)
                if route is None:
                    request.reply(404, b"not found")
                else:
                    route(request)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def hits(self, path: str) -> list[Request]:
        return [r for r in self.log if r.path == path]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


@pytest.fixture
def index(tmp_path):
    with Index(tmp_path / "search.db") as ix:
        yield ix


@pytest.fixture
def client():
    with httpx.Client(timeout=5.0) as c:
        yield c


class FakeClock:
    def __init__(self, now: float = 1_795_000_000.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def state_of(index: Index, feed: str) -> dict:
    with Checkpoints(index.path) as store:
        return store.load(feed)


# ----------------------------------------------------------------------------------------------------
# JSONL


def line(i: int, **extra: object) -> str:
    record = {"id": f"doc-{i}", "source": "news", "url": f"https://example.org/{i}",
              "title": f"Item {i}", "text": f"body of item number {i} with word{i}",
              "author": "desk", "published_at": "2026-11-28T10:15:00Z", "lang": "en",
              "metrics": {"likes": i}, **extra}
    return json.dumps(record) + "\n"


def write(path: Path, text: str, mode: str = "a") -> None:
    with path.open(mode, encoding="utf-8") as f:
        f.write(text)


def test_jsonl_resumes_from_offset(index, tmp_path):
    feed = tmp_path / "feed.jsonl"
    write(feed, "".join(line(i) for i in range(3)), "w")
    first = ingest_jsonl(index, feed)
    assert (first.seen, first.added, first.bad) == (3, 3, 0)
    write(feed, "".join(line(i) for i in range(3, 5)))
    second = ingest_jsonl(index, feed)
    assert (second.seen, second.added, second.duplicates) == (2, 2, 0)  # only the new lines were read
    assert len(index) == 5
    state = state_of(index, jsonl_feed_name(feed))
    assert state["offset"] == feed.stat().st_size and state["line"] == 5
    doc = index.get("doc-4")
    assert doc is not None and doc.likes == 4 and doc.published_at == 1_795_860_900.0


def test_jsonl_partial_last_line_waits(index, tmp_path):
    feed = tmp_path / "feed.jsonl"
    full = line(1)
    write(feed, line(0) + full[:25], "w")
    counts = ingest_jsonl(index, feed)
    assert counts.seen == 1 and counts.bad == 0 and len(index) == 1
    assert state_of(index, jsonl_feed_name(feed))["offset"] == len(line(0).encode())
    write(feed, full[25:])
    counts = ingest_jsonl(index, feed)
    assert counts.seen == 1 and index.get("doc-1") is not None and len(index) == 2


def test_jsonl_bad_lines_are_logged_with_number_and_skipped(index, tmp_path, caplog):
    feed = tmp_path / "feed.jsonl"
    bad_lines = ["{not json}\n", "[1, 2]\n", json.dumps({"source": "news", "text": "no date"}) + "\n",
                 json.dumps({"source": "tv", "text": "x", "published_at": 1}) + "\n", b"\xff\xfe\n".decode("latin-1")]
    write(feed, line(0) + bad_lines[0] + "\n" + "".join(bad_lines[1:]) + line(1), "w")
    with caplog.at_level(logging.WARNING, logger="grokstack.search.ingest"):
        counts = ingest_jsonl(index, feed)
    assert (counts.seen, counts.bad, len(index)) == (2, 5, 2)
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    # line 3 is blank (not an error); the bad ones are lines 2 and 4-7
    assert [m.split(" line ")[1].split()[0] for m in skipped] == ["2", "4", "5", "6", "7"]
    status = {row["feed"]: row for row in feed_status(index.path)}[jsonl_feed_name(feed)]
    assert status["bad"] == 5 and status["seen"] == 2 and status["added"] == 2


def test_jsonl_same_file_twice_is_stored_once(index, tmp_path):
    feed = tmp_path / "feed.jsonl"
    write(feed, "".join(line(i) for i in range(4)), "w")
    ingest_jsonl(index, feed)
    again = ingest_jsonl(index, feed, feed="a fresh checkpoint")  # forgets the offset: every line again
    assert (again.seen, again.added, again.duplicates) == (4, 0, 4)
    assert len(index) == 4


def test_jsonl_truncation_and_rotation_start_over(index, tmp_path):
    feed = tmp_path / "feed.jsonl"
    write(feed, "".join(line(i) for i in range(3)), "w")
    ingest_jsonl(index, feed)
    write(feed, line(10), "w")  # truncated and rewritten, shorter than the stored offset
    assert ingest_jsonl(index, feed).added == 1
    rotated = tmp_path / "new.jsonl"
    write(rotated, line(20) + line(21), "w")
    os.replace(rotated, feed)  # logrotate-style: a new inode under the old name
    assert ingest_jsonl(index, feed).added == 2
    assert len(index) == 6


def test_jsonl_follow_reads_appended_lines_until_stopped(index, tmp_path):
    feed = tmp_path / "feed.jsonl"
    write(feed, line(0), "w")
    stop = threading.Event()
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(counts=ingest_jsonl(index, feed, follow=True, poll_interval=0.02, stop=stop))
    )
    worker.start()
    try:
        for i in range(1, 4):
            write(feed, line(i))
            deadline = time.monotonic() + 5
            while index.get(f"doc-{i}") is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert index.get(f"doc-{i}") is not None
    finally:
        stop.set()
        worker.join(5)
    assert not worker.is_alive() and result["counts"].added == 4


_CHILD = """
import sys
from grokstack.search import Index
from grokstack.search.ingest import ingest_jsonl
ingest_jsonl(Index(sys.argv[1]), sys.argv[2], follow=True, poll_interval=0.05, batch_lines=50)
"""


def _offset(db: Path, feed: str) -> int:
    try:
        with sqlite3.connect(db, timeout=10) as conn:
            row = conn.execute("SELECT state FROM feed_state WHERE feed = ?", (feed,)).fetchone()
    except sqlite3.OperationalError:  # table not created yet
        return 0
    return json.loads(row[0])["offset"] if row else 0


def _run_until_progress(db: Path, feed: Path, above: int) -> int:
    """Start the ingester in a child process and SIGKILL it once its checkpoint passes `above`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(db), str(feed)], env=env)
    try:
        deadline = time.monotonic() + 30
        while (offset := _offset(db, jsonl_feed_name(feed))) <= above:
            assert child.poll() is None, "the ingester died on its own"
            assert time.monotonic() < deadline, "no progress from the ingester"
            time.sleep(0.01)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    return offset


def test_jsonl_survives_sigkill_without_loss_or_duplicates(tmp_path):
    n = 6000
    feed = tmp_path / "big.jsonl"
    write(feed, "".join(line(i) for i in range(n)), "w")
    size = feed.stat().st_size
    db = tmp_path / "crash.db"
    first = _run_until_progress(db, feed, 0)
    second = _run_until_progress(db, feed, first)
    assert 0 < first < second < size, "both kills must land mid-file for this test to mean anything"
    resume_at = _offset(db, jsonl_feed_name(feed))  # may be past `second`: the kill is not instant
    with Index(db) as ix:
        counts = ingest_jsonl(ix, feed)
        assert len(ix) == n
        # The restart reads exactly the lines after the checkpoint; a batch the kill caught uncommitted
        # is among them, and one committed without its checkpoint comes back as duplicates.
        assert counts.seen == n - feed.read_bytes()[:resume_at].count(b"\n")
        assert counts.added + counts.duplicates == counts.seen and counts.bad == 0
    with sqlite3.connect(db) as conn:
        ids = {r[0] for r in conn.execute("SELECT id FROM docs")}
        total = conn.execute("SELECT count(*) FROM docs").fetchone()[0]
    assert ids == {f"doc-{i}" for i in range(n)} and total == len(ids)
    assert _offset(db, jsonl_feed_name(feed)) == size


# ----------------------------------------------------------------------------------------------------
# RSS / Atom


def serve_feed(server: FakeServer, path: str, fixture: str, etag: str, content_type: str) -> None:
    body = (FIXTURES / fixture).read_bytes()
    modified = "Sat, 28 Nov 2026 10:00:00 GMT"

    def route(req: Request) -> None:
        if req.headers.get("if-none-match") == etag or req.headers.get("if-modified-since") == modified:
            req.reply(304, headers={"ETag": etag})
        else:
            req.reply(200, body, {"Content-Type": content_type, "ETag": etag, "Last-Modified": modified})

    server.routes[path] = route


def test_rss_poll_then_304(server, index, client):
    serve_feed(server, "/rss.xml", "rss.xml", '"v1"', "application/rss+xml; charset=utf-8")
    url = server.url("/rss.xml")
    counts = poll_feed(index, url, client=client)
    assert (counts.seen, counts.added, counts.error, counts.not_modified) == (3, 3, None, False)
    hits = index.search("harbour bridge")
    bridge = hits[0].document
    assert bridge.source == "news" and bridge.feed_url == url and bridge.lang == "en"
    assert bridge.text == "The harbour bridge reopened on Saturday.\nTraffic is flowing again."  # no script
    assert bridge.published_at == 1_795_857_300.0  # 10:15 +01:00 is 09:15 UTC
    assert bridge.canonical_url == "https://news.example.org/2026/11/bridge"
    library = index.search("library budget")[0].document
    assert library.text == "The council voted 7 to 2 for the library budget."
    state = state_of(index, url)
    assert state["etag"] == '"v1"' and state["ttl"] == 1800

    again = poll_feed(index, url, client=client)
    assert again.not_modified and again.seen == 0 and again.requests == 1
    conditional = server.hits("/rss.xml")[-1].headers
    assert conditional["if-none-match"] == '"v1"'
    assert conditional["if-modified-since"] == "Sat, 28 Nov 2026 10:00:00 GMT"
    assert len(index) == 3


def test_atom_feed_as_web_documents(server, index, client):
    serve_feed(server, "/atom.xml", "atom.xml", 'W/"a1"', "application/atom+xml")
    url = server.url("/atom.xml")
    counts = poll_feed(index, url, client=client, kind="web")
    assert (counts.added, counts.error) == (2, None)
    fts5 = index.search("external content tables")[0].document
    assert fts5.source == "web" and fts5.title == "Notes on SQLite FTS5" and fts5.author == "Ada"
    assert fts5.lang == "de" and fts5.published_at == 1_795_856_400.0
    relative = index.search("relative links resolve")[0].document
    assert relative.url == server.url("/relative")
    assert relative.published_at == 1_795_168_800.0  # <published> wins over <updated>, in UTC
    # The same entries again (server forgot the ETag): stored once.
    with Checkpoints(index.path) as store:
        store.save(url, "web", {"url": url})
    assert poll_feed(index, url, client=client, kind="web").duplicates == 2 and len(index) == 2


def test_permanent_redirect_is_remembered(server, index, client):
    serve_feed(server, "/new.xml", "rss.xml", '"v1"', "application/rss+xml")
    server.routes["/old.xml"] = lambda req: req.reply(301, headers={"Location": server.url("/new.xml")})
    old = server.url("/old.xml")
    assert poll_feed(index, old, client=client).added == 3
    assert state_of(index, old)["url"] == server.url("/new.xml")
    assert poll_feed(index, old, client=client).not_modified
    assert len(server.hits("/old.xml")) == 1 and len(server.hits("/new.xml")) == 2
    assert {h.document.feed_url for h in index.search("frost")} == {old}  # the feed keeps its name


def test_malformed_feed_is_recorded_not_raised(server, index, client):
    body = (FIXTURES / "malformed.xml").read_bytes()
    server.routes["/bad.xml"] = lambda req: req.reply(200, body, {"Content-Type": "application/rss+xml",
                                                                 "ETag": '"bad"'})
    url = server.url("/bad.xml")
    counts = poll_feed(index, url, client=client)
    assert counts.error and "malformed" in counts.error
    state = state_of(index, url)
    assert not state.get("etag")  # a broken document is fetched whole next time
    (row,) = feed_status(index.path)
    assert row["last_error"] == counts.error and row["errors"] == 1
    assert poll_feed(index, url, client=client).requests == 1  # not disabled, not backing off


def test_gone_disables_and_503_backs_off(server, index, client):
    clock = FakeClock()
    server.routes["/gone.xml"] = lambda req: req.reply(410)
    server.routes["/busy.xml"] = lambda req: req.reply(503, headers={"Retry-After": "120"})
    gone, busy = server.url("/gone.xml"), server.url("/busy.xml")
    assert poll_feed(index, gone, client=client, clock=clock).error
    assert poll_feed(index, gone, client=client, clock=clock).requests == 0
    assert poll_feed(index, busy, client=client, clock=clock).error == "HTTP 503"
    assert state_of(index, busy)["retry_at"] == clock.now + 120
    clock.now += 60
    assert poll_feed(index, busy, client=client, clock=clock).requests == 0  # still inside Retry-After
    clock.now += 61
    assert poll_feed(index, busy, client=client, clock=clock).requests == 1
    assert len(server.hits("/gone.xml")) == 1 and len(server.hits("/busy.xml")) == 2


def test_network_error_is_recorded(index, client):
    counts = poll_feed(index, "http://127.0.0.1:9/feed.xml", client=client)  # discard port: refused
    assert counts.error and "request failed" in counts.error
    assert state_of(index, "http://127.0.0.1:9/feed.xml")["failures"] == 1


def test_html_to_text_and_retry_after():
    assert html_to_text("<p>a&amp;b</p><style>p{}</style><ul><li>one</li><li>two</li></ul>") == "a&b\none\ntwo"
    assert retry_after("30", 0) == 30
    assert retry_after("Thu, 01 Jan 1970 00:01:40 GMT", 40.0) == 60
    assert retry_after("soon", 0) is None


# ----------------------------------------------------------------------------------------------------
# X API v2 recent search


def fixture_json(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def test_x_recent_pages_since_id_429_errors_retweets_edits(server, index, client, monkeypatch, caplog):
    monkeypatch.setenv("X_BEARER_TOKEN", "test-token")
    clock = FakeClock()
    rate_limited = {"once": False}

    def recent(req: Request) -> None:
        assert req.headers["authorization"] == "Bearer test-token"
        since = req.query.get("since_id")
        if since == "1850000000000000005" and not rate_limited["once"]:
            rate_limited["once"] = True
            req.reply(429, b'{"title": "Too Many Requests", "status": 429}',
                      {"x-rate-limit-reset": str(int(clock.now) + 30), "x-rate-limit-remaining": "0"})
        elif since == "1850000000000000005":
            req.reply(200, fixture_json("x_recent_page3.json"), {"Content-Type": "application/json"})
        elif since == "1850000000000000007":
            req.reply(200, b'{"meta": {"result_count": 0}}', {"Content-Type": "application/json"})
        elif req.query.get("next_token") == "b26v89c19zqg8o3fpds":
            req.reply(200, fixture_json("x_recent_page2.json"), {"Content-Type": "application/json"})
        else:
            req.reply(200, fixture_json("x_recent_page1.json"), {"Content-Type": "application/json"})

    server.routes["/2/tweets/search/recent"] = recent
    query = "(bridge OR library OR frost) -is:reply"
    with caplog.at_level(logging.WARNING, logger="grokstack.search.xapi"):
        first = poll_x_recent(index, query, client=client, base_url=server.base, clock=clock, sleep=clock.sleep)
    assert first.error is None and first.requests == 2 and clock.sleeps == []
    first_request = server.hits("/2/tweets/search/recent")[0].query
    assert first_request["query"] == query and "since_id" not in first_request
    assert "author_id" in first_request["expansions"].split(",")
    assert set(first_request["tweet.fields"].split(",")) >= {
        "created_at", "public_metrics", "lang", "referenced_tweets", "edit_history_tweet_ids", "author_id"}
    assert first_request["user.fields"] == "username"
    assert any("Not Found Error" in r.getMessage() for r in caplog.records)  # partial error: logged only

    # The edit is stored under its first id with the newest text, not overwritten by page 2's original.
    edited = index.get("x:1850000000000000001")
    assert edited.text.endswith("(edited: both lanes)") and edited.likes == 31 and edited.author == "alice"
    assert edited.url == "https://x.com/alice/status/1850000000000000005"
    # The retweet became its original: full text, original author and metrics; no copy of the retweet.
    original = index.get("x:1849999999999999900")
    assert original.author == "harbourmaster" and original.text.endswith("reopening expected by noon")
    assert original.likes == 250 and original.url == "https://x.com/harbourmaster/status/1849999999999999900"
    assert index.get("x:1850000000000000004") is None
    library = index.get("x:1850000000000000003")
    assert library.url == "https://x.com/bob/status/1850000000000000003" and library.views == 300
    assert len(index) == 4
    assert state_of(index, f"x-recent:{query}")["since_id"] == "1850000000000000005"

    second = poll_x_recent(index, query, client=client, base_url=server.base, clock=clock, sleep=clock.sleep)
    assert second.error is None and second.added == 1 and second.requests == 2
    assert clock.sleeps == [31.0]  # waited for x-rate-limit-reset (+1 s), through the injected sleep
    assert len(index) == 5
    assert state_of(index, f"x-recent:{query}")["since_id"] == "1850000000000000007"
    third = poll_x_recent(index, query, client=client, base_url=server.base, clock=clock, sleep=clock.sleep)
    assert (third.seen, third.error) == (0, None)
    assert state_of(index, f"x-recent:{query}")["since_id"] == "1850000000000000007"  # empty poll keeps it


def test_x_recent_auth_failure_is_recorded(server, index, client):
    server.routes["/2/tweets/search/recent"] = lambda req: req.reply(
        401, b'{"title": "Unauthorized", "detail": "Unauthorized", "status": 401}')
    counts = poll_x_recent(index, "q", client=client, bearer="wrong", base_url=server.base, sleep=lambda s: None)
    assert counts.error and "401" in counts.error
    (row,) = feed_status(index.path)
    assert row["last_error"] == counts.error and row["state"] == {}


def test_x_recent_needs_a_token(index, monkeypatch):
    monkeypatch.delenv("X_BEARER_TOKEN", raising=False)
    from grokstack.errors import ConfigError

    with pytest.raises(ConfigError, match="X_BEARER_TOKEN"):
        poll_x_recent(index, "q")


# ----------------------------------------------------------------------------------------------------
# X API v2 filtered stream


def stream_post(n: int, user: str = "carol") -> bytes:
    post_id = str(1860000000000000000 + n)
    message = {"data": {"id": post_id, "text": f"stream post {n} about ferries", "author_id": "201",
                        "created_at": "2026-11-28T12:00:00.000Z", "edit_history_tweet_ids": [post_id],
                        "public_metrics": {"like_count": n, "retweet_count": 0, "reply_count": 0,
                                           "impression_count": 10 * n}},
               "includes": {"users": [{"id": "201", "username": user}]},
               "matching_rules": [{"id": "1", "tag": "ferries"}]}
    return json.dumps(message).encode() + b"\r\n"


DISCONNECT = json.dumps({"errors": [{
    "title": "operational-disconnect", "disconnect_type": "UpstreamOperationalDisconnect",
    "detail": "This stream has been disconnected upstream for operational reasons.",
    "type": "https://api.twitter.com/2/problems/operational-disconnect"}]}).encode()


def test_x_stream_keepalives_disconnects_429_and_silence(server, index, monkeypatch):
    monkeypatch.setenv("X_BEARER_TOKEN", "test-token")
    connections = []

    def stream(req: Request) -> None:
        connections.append(req)
        n = len(connections)
        if n == 2:
            req.reply(429, b'{"title": "Too Many Requests"}')
            return
        req.start_stream()
        if n == 1:  # keep-alives, two posts, then X says it is disconnecting
            for chunk in (b"\r\n", stream_post(1), b"\r\n", stream_post(2), DISCONNECT + b"\r\n"):
                req.write(chunk)
                time.sleep(0.02)
        elif n == 3:  # a post, then silence longer than the keep-alive timeout
            req.write(stream_post(3))
            time.sleep(1.0)
        else:  # the same post again after the reconnect (stored once), then a new one
            for chunk in (b"\r\n", stream_post(3), stream_post(4), b"\r\n"):
                req.write(chunk)
            time.sleep(0.5)

    server.routes["/2/tweets/search/stream"] = stream
    sleeps: list[float] = []
    started = time.monotonic()
    counts = stream_x(index, base_url=server.base, keepalive_timeout=0.2, sleep=sleeps.append,
                      stop=lambda: len(index) >= 4, max_connections=6)
    assert time.monotonic() - started < 5
    assert len(connections) == 4 and counts.requests == 4
    # disconnect → 250 ms; 429 → 60 s; silence (read timeout) → 250 ms again (the counter reset on data)
    assert sleeps == [0.25, 60.0, 0.25]
    assert {f"x:{1860000000000000000 + n}" for n in (1, 2, 3, 4)} == {h.document.id for h in index.search("ferries")}
    assert counts.added == 4 and counts.duplicates == 1
    assert connections[0].query["expansions"].startswith("author_id")
    assert index.get("x:1860000000000000004").url == "https://x.com/carol/status/1860000000000000004"
    assert state_of(index, "x-stream")["newest_id"] == "1860000000000000004"


def test_stream_backoff_schedule():
    b = _Backoff()
    assert [b.after_network_error() for _ in range(66)][-3:] == [16.0, 16.0, 16.0]
    b.reset()
    assert [b.after_network_error() for _ in range(3)] == [0.25, 0.5, 0.75]
    assert [b.after_http_error() for _ in range(8)] == [5, 10, 20, 40, 80, 160, 320, 320]
    assert [b.after_rate_limit() for _ in range(3)] == [60, 120, 240]


def test_x_recent_waits_when_the_window_is_spent(server, index, client):
    clock = FakeClock()

    def recent(req: Request) -> None:
        name = "x_recent_page2.json" if req.query.get("next_token") else "x_recent_page1.json"
        req.reply(200, fixture_json(name), {"x-rate-limit-remaining": "0",
                                            "x-rate-limit-reset": str(int(clock.now) + 10)})

    server.routes["/2/tweets/search/recent"] = recent
    counts = poll_x_recent(index, "bridge", client=client, bearer="t", base_url=server.base, clock=clock,
                           sleep=clock.sleep)
    assert counts.requests == 2 and counts.error is None
    assert clock.sleeps == [11.0]  # before the next page, rather than collecting a 429; none after the last


def test_feed_status_rows_and_lag(index, tmp_path):
    assert feed_status(tmp_path / "missing.db") == []
    assert feed_status(index.path) == []  # no feed has run yet
    feed = tmp_path / "feed.jsonl"
    write(feed, line(0), "w")
    ingest_jsonl(index, feed)
    (row,) = feed_status(index.path, now=1_795_860_900.0 + 90)
    assert row["feed"] == jsonl_feed_name(feed) and row["kind"] == "jsonl"
    assert row["last_item"] == 1_795_860_900.0 and row["lag"] == 90 and row["last_error"] is None
    assert (row["seen"], row["added"], row["bad"]) == (1, 1, 0)
