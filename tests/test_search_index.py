"""Tests for the live-search document model and SQLite FTS5 + vector index (spec live-search.md §3-5)."""

from __future__ import annotations

import random
import sqlite3
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from grokstack import minilm
from grokstack.errors import InvalidArgumentError
from grokstack.search import (
    Document,
    Filters,
    HashingEmbedder,
    Index,
    canonical_url,
    default_embedder,
    fts_query,
    is_temporal,
    make_document,
    recency,
    rrf,
)

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC).timestamp()
HOUR = 3600.0
DAY = 24 * HOUR


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat().replace("+00:00", "Z")


@pytest.fixture
def index(tmp_path):
    ix = Index(tmp_path / "search.db", embedder=HashingEmbedder())
    yield ix
    ix.close()


# ------------------------------------------------------------------------------------------------
# Documents


def test_canonical_url_drops_tracking_fragment_www_and_slash():
    assert canonical_url("HTTPS://WWW.Example.org/a/b/?utm_source=x&b=2&a=1&fbclid=z#top") == (
        "https://example.org/a/b?a=1&b=2"
    )
    assert canonical_url("http://example.org:80/a") == canonical_url("https://example.org/a")
    assert canonical_url("https://example.org:8080/a") == "https://example.org:8080/a"
    assert canonical_url("https://twitter.com/bob/status/1") == "https://x.com/bob/status/1"
    assert canonical_url("") == ""


def test_make_document_normalises_fields():
    doc = make_document(
        {"source": "x", "id": "123", "author": "@Bob", "text": "hi\u200b there",
         "published_at": "2026-11-28T10:15:00+02:00",
         "public_metrics": {"like_count": 20, "impression_count": 900, "retweet_count": 3}}
    )
    assert doc.id == "x:123" and doc.author == "bob"
    assert doc.url == "https://x.com/bob/status/123" and doc.domain == "x.com"
    assert doc.published_at == datetime(2026, 11, 28, 8, 15, tzinfo=UTC).timestamp()
    assert (doc.likes, doc.views, doc.reposts) == (20, 900, 3)
    news = make_document({"source": "news", "url": "https://www.example.org/a?utm_medium=rss",
                          "text": "body", "published_at": "2026-11-28T10:15:00Z"})
    assert news.id == make_document({"source": "news", "url": "https://example.org/a/", "text": "other",
                                     "published_at": 0}).id


@pytest.mark.parametrize(
    "raw, needle",
    [
        ({"source": "blog", "text": "t", "published_at": 0}, "source"),
        ({"source": "news", "text": "", "published_at": 0}, "text"),
        ({"source": "news", "text": "t"}, "published_at"),
        ({"source": "news", "text": "t", "published_at": "2026-11-28T10:15:00"}, "offset"),
        ({"source": "news", "text": "t", "published_at": "yesterday"}, "RFC 3339"),
        ({"source": "news", "text": "t", "published_at": 0, "metrics": {"likes": -1}}, "likes"),
        ({"source": "x", "text": "t", "published_at": 0}, "id"),
        ("not a dict", "object"),
    ],
)
def test_make_document_rejects_bad_input_with_clear_errors(raw, needle):
    with pytest.raises(InvalidArgumentError, match=needle):
        make_document(raw)


def test_hashing_embedder_is_deterministic_and_normalised():
    emb = HashingEmbedder(256)
    a = emb.embed(["Mars rover finds water", "Mars rover finds water", "", "the of and"])
    assert a.shape == (4, 256) and a.dtype == np.float32
    assert np.allclose(a[0], a[1]) and np.isclose(np.linalg.norm(a[0]), 1.0)
    assert not a[2].any() and not a[3].any()
    b = emb.embed(["elections", "election", "banana bread"])
    assert b[0] @ b[1] > b[0] @ b[2] + 0.2


def test_default_embedder_is_hashing_unless_minilm_is_asked_for(monkeypatch):
    monkeypatch.delenv("GROKSTACK_SEARCH_EMBEDDER", raising=False)
    assert isinstance(default_embedder(), HashingEmbedder)
    monkeypatch.setenv("GROKSTACK_SEARCH_EMBEDDER", "minilm")
    emb = default_embedder()
    if not minilm.available():  # the wheel is missing: a warning and the hashing embedder, never a failure
        assert isinstance(emb, HashingEmbedder)
        return
    assert emb.name == "all-minilm-l6-v2-384" and emb.dim == 384
    v = emb.embed(["How do I bake bread at home?", "A simple recipe for a sourdough loaf", "Who won the vote?"])
    assert v.shape == (3, 384) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2  # related by meaning, with no word in common


# ------------------------------------------------------------------------------------------------
# Pure ranking helpers


def test_rrf_and_recency():
    scores = rrf([[1, 2, 3], [3, 1]], k=60)
    assert scores[1] == pytest.approx(1 / 61 + 1 / 62)
    assert scores[3] == pytest.approx(1 / 63 + 1 / 61)
    assert scores[2] == pytest.approx(1 / 62)
    assert recency(0, 10) == 1.0 and recency(10, 10) == 0.5 and recency(-5, 10) == 1.0


def test_temporal_cues():
    assert is_temporal("What's the latest on the election?")
    assert is_temporal("breaking news about rates")
    assert is_temporal("what happened this week")
    assert is_temporal("results on 2026-11-27")
    assert is_temporal("best phones of 2026", now=NOW)
    assert not is_temporal("history of the 1990 world cup", now=NOW)
    assert not is_temporal("how do rovers drive on mars")


# ------------------------------------------------------------------------------------------------
# Idempotent ingest


def news(i: int, text: str = "", **extra) -> dict:
    return {"source": "news", "url": f"https://example.org/story/{i}", "title": f"Story {i}",
            "text": text or f"story number {i} about topic {i}", "published_at": iso(NOW - i * HOUR), **extra}


def test_same_document_twice_is_stored_once(index):
    assert index.add([news(1), news(2)]).added == 2
    result = index.add([news(1), news(2), news(1)])
    assert (result.added, result.duplicates) == (0, 3)
    assert len(index) == 2


def test_same_url_with_tracking_params_is_stored_once(index):
    doc = news(1)
    variant = {**doc, "id": "guid-42", "url": "https://WWW.example.org/story/1/?utm_source=rss&fbclid=abc#comments"}
    result = index.add([doc, variant])
    assert (result.added, result.duplicates) == (1, 1)
    assert len(index) == 1


def test_same_text_under_another_url_is_stored_once(index):
    result = index.add([news(1, "Identical wire copy."), news(2, "identical   WIRE copy.")])
    assert (result.added, result.duplicates) == (1, 1)


def test_retweet_maps_onto_original(index):
    original = {"source": "x", "id": "100", "author": "nasa", "text": "Rover lands on Mars",
                "published_at": iso(NOW - HOUR), "metrics": {"likes": 50}}
    retweet = {"source": "x", "id": "200", "author": "fan", "text": "RT @nasa: Rover lands on Mars",
               "published_at": iso(NOW), "referenced_tweets": [{"type": "retweeted", "id": "100"}]}
    assert index.add([original]).added == 1
    assert index.add([retweet]).duplicates == 1
    assert len(index) == 1
    assert index.get("x:100").likes == 50  # the stand-in did not overwrite the original

    # A retweet seen before its original stands in for it, under the original's id and author.
    other = {"source": "x", "id": "201", "author": "fan", "text": "RT @esa: Comet flyby tonight",
             "published_at": iso(NOW), "retweet_of": "101"}
    assert index.add([other]).added == 1
    stored = index.get("x:101")
    assert stored.author == "esa" and stored.text == "Comet flyby tonight" and stored.is_retweet
    assert index.add([{**other, "id": "202", "author": "someone_else"}]).duplicates == 1


def test_edits_update_one_row(index):
    first = {"source": "x", "id": "300", "author": "bob", "text": "Launch at 9", "published_at": iso(NOW),
             "edit_history_tweet_ids": ["300"]}
    edit = {**first, "id": "301", "text": "Launch at 10", "edit_history_tweet_ids": ["300", "301"]}
    index.add([first])
    result = index.add([edit])
    assert (result.added, result.updated) == (0, 1)
    assert len(index) == 1 and index.get("x:300").text == "Launch at 10"
    assert [h.document.id for h in index.search("launch 10", now=NOW)] == ["x:300"]
    assert not any(h.bm25_rank for h in index.search("9", now=NOW))


def test_failed_batch_leaves_nothing_behind(index):
    class Broken(HashingEmbedder):
        def embed(self, texts):
            raise RuntimeError("boom")

    index.embedder = Broken()
    with pytest.raises(RuntimeError):
        index.add([news(1), news(2)])
    assert len(index) == 0


def test_reopening_keeps_everything(tmp_path):
    path = tmp_path / "durable.db"
    with Index(path, embedder=HashingEmbedder()) as ix:
        ix.add([news(i, f"durable fact {i} about lighthouses") for i in range(20)])
        before = [h.document.id for h in ix.search("lighthouses", now=NOW)]
    with Index(path, embedder=HashingEmbedder()) as ix:
        assert len(ix) == 20
        assert [h.document.id for h in ix.search("lighthouses", now=NOW)] == before
        assert ix.add([news(3, "durable fact 3 about lighthouses")]).duplicates == 1
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_changing_embedder_reembeds(tmp_path):
    path = tmp_path / "re.db"
    with Index(path, embedder=HashingEmbedder(256)) as ix:
        ix.add([news(1, "glaciers are melting fast")])
    with Index(path, embedder=HashingEmbedder(128)) as ix:
        hits = ix.search("glaciers melting", now=NOW)
        assert hits and hits[0].vector_rank == 1


# ------------------------------------------------------------------------------------------------
# FTS5 safety

HOSTILE = [
    '"', '""', '"""', "'", "*", "-", "+", "^", ":", "(", ")", "()", "{", "}", "[", "]", "NEAR(", "NEAR(a b, 3)",
    "AND", "OR", "NOT", "AND OR NOT", "a AND", "OR b", "NOT NOT", "title_n:", "col:foo", "text_n:x*", "x*y",
    "^start", "a + b", "\\", "\x00", "%", "_", "a_b", "'; DROP TABLE docs; --", "docs_fts MATCH 'x'",
    "\u200b", "\u202e", "ñandú", "日本語のテキスト", "😀🔥", "\ufeff", "ﬁ", "a\"b", "\"unterminated", "(((", ")))",
    "{title_n text_n}: x", "- x", "x -y", "NEAR", "near/2", "@handle", "#tag", "https://x.com/a?b=c#d",
]


def random_hostile(rng: random.Random) -> str:
    alphabet = list('"\'*^:-+(){}[],./\\%_ ') + ["AND", "OR", "NOT", "NEAR", "\u200b", "é", "字", "😀", "x", "7"]
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))


def test_search_never_raises_on_hostile_text(index):
    index.add([news(i, f"normal text {i} with AND OR NOT words and quotes \" here") for i in range(10)])
    rng = random.Random(7)
    queries = HOSTILE + [random_hostile(rng) for _ in range(300)]
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE VIRTUAL TABLE t USING fts5(a, tokenize='porter unicode61 remove_diacritics 2')")
    for q in queries:
        index.search(q, now=NOW)
        index.search(q, Filters(sources=["news"], from_date="2026-11-01"), now=NOW)
        expression = fts_query(q)
        if expression:
            conn.execute("SELECT * FROM t WHERE t MATCH ?", (expression,)).fetchall()


def test_fts_query_quotes_every_term():
    assert fts_query('say "hi" AND NEAR(x*') == '"hi" OR "near" OR "x"'
    assert fts_query("the of and") == ""


# ------------------------------------------------------------------------------------------------
# Filters are exact

HANDLES = ["alice", "Bob", "carol", "grok", "dave"]
DOMAINS = ["example.org", "news.example.org", "example.org.evil.com", "other.net", "myexample.org", "blog.other.net"]
WORDS = ["storm", "market", "rover", "vote", "goal", "vaccine", "battery", "quake", "chess", "coin", "river", "city"]


def random_corpus(rng: random.Random, n: int = 300) -> list[dict]:
    docs = []
    for i in range(n):
        source = rng.choice(["x", "news", "web", "rss"])
        doc = {
            "source": source,
            "id": str(1000 + i),
            "text": " ".join(rng.choice(WORDS) for _ in range(6)) + f" item{i}",
            "published_at": iso(NOW - rng.uniform(0, 60) * DAY),
            "nsfw": rng.random() < 0.1,
            "country": rng.choice(["", "US", "FR"]),
        }
        if source == "x":
            doc["author"] = rng.choice(HANDLES)
            doc["metrics"] = {"likes": rng.randint(0, 100), "views": rng.randint(0, 5000)}
        else:
            doc["url"] = f"https://{rng.choice(DOMAINS)}/p/{i}"
            doc["feed_url"] = rng.choice(["https://feeds.a/rss", "https://feeds.b/rss"])
        docs.append(doc)
    return docs


def random_filters(rng: random.Random) -> Filters:
    kwargs: dict = {}
    if rng.random() < 0.6:
        start = datetime.fromtimestamp(NOW - rng.uniform(0, 60) * DAY, tz=UTC).date()
        kwargs["from_date"] = start.isoformat()
        if rng.random() < 0.7:
            kwargs["to_date"] = (start + timedelta(days=rng.randint(0, 20))).isoformat()
    elif rng.random() < 0.3:
        kwargs["to_date"] = datetime.fromtimestamp(NOW - rng.uniform(0, 60) * DAY, tz=UTC).date()
    if rng.random() < 0.5:
        kwargs["sources"] = rng.sample(["x", "news", "web", "rss"], rng.randint(1, 3))
    choice = rng.random()
    if choice < 0.3:
        kwargs["included_x_handles"] = ["@" + h.upper() for h in rng.sample(HANDLES, 2)]
    elif choice < 0.6:
        kwargs["excluded_x_handles"] = rng.sample(HANDLES, 2)
    choice = rng.random()
    if choice < 0.3:
        kwargs["allowed_websites"] = rng.sample(["example.org", "other.net", "https://www.other.net/x"], 1)
    elif choice < 0.6:
        kwargs["excluded_websites"] = rng.sample(["example.org", "other.net"], 1)
    if rng.random() < 0.4:
        kwargs["min_favorites"] = rng.randint(0, 80)
    if rng.random() < 0.4:
        kwargs["min_views"] = rng.randint(0, 4000)
    kwargs["safe_search"] = rng.random() < 0.7
    if rng.random() < 0.3:
        kwargs["country"] = rng.choice(["US", "fr"])
    if rng.random() < 0.2:
        kwargs["feed_url"] = "https://feeds.a/rss"
    return Filters(**kwargs)


def on_site(domain: str, sites: tuple[str, ...]) -> bool:
    return any(domain == s or domain.endswith("." + s) for s in sites)


def passes(doc: Document, f: Filters) -> bool:
    """An independent restatement of the filter rules."""
    day = datetime.fromtimestamp(doc.published_at, tz=UTC).date()
    if f.from_date is not None and day < datetime.fromisoformat(str(f.from_date)).date():
        return False
    if f.to_date is not None and day > datetime.fromisoformat(str(f.to_date)).date():
        return False
    if f.sources is not None and doc.source not in f.sources:
        return False
    if f.safe_search and doc.nsfw:
        return False
    if f.country and doc.country not in ("", f.country):
        return False
    if f.feed_url and doc.feed_url != f.feed_url:
        return False
    if doc.source == "x":
        handle = doc.author.lower()
        if f.included_x_handles and handle not in f.included_x_handles:
            return False
        if not f.included_x_handles and handle in (*f.excluded_x_handles, "grok"):
            return False
        if doc.likes < (f.min_favorites or 0) or doc.views < (f.min_views or 0):
            return False
    else:
        if f.allowed_websites and not on_site(doc.domain, f.allowed_websites):
            return False
        if f.excluded_websites and on_site(doc.domain, f.excluded_websites):
            return False
    return True


def test_filters_are_exact_on_a_random_corpus(index):
    rng = random.Random(1234)
    corpus = random_corpus(rng)
    assert index.add(corpus).added == len(corpus)
    stored = [index.get(("x:" if d["source"] == "x" else "") + d["id"]) for d in corpus]
    matched = 0
    for _ in range(150):
        f = random_filters(rng)
        expected = {d.id for d in stored if passes(d, f)}
        query = " ".join(rng.sample(WORDS, 2))
        hits = index.search(query, f, limit=500, now=NOW)
        assert {h.document.id for h in hits} <= expected
        # With no searchable word the index lists every matching document: the filter is exact both ways.
        everything = index.search("", f, limit=500, now=NOW)
        assert {h.document.id for h in everything} == expected
        matched += len(hits)
    assert matched > 1000  # the filters left plenty of documents to check


def test_date_bounds_are_inclusive_utc_days(index):
    index.add([news(1, "edge case early", published_at="2026-11-20T00:00:00Z"),
               news(2, "edge case late", published_at="2026-11-20T23:59:59.999Z"),
               news(3, "edge case next", published_at="2026-11-21T00:00:00Z"),
               news(4, "edge case before", published_at="2026-11-19T23:59:59Z")])
    hits = index.search("edge case", Filters(from_date="2026-11-20", to_date="2026-11-20"), now=NOW)
    assert {h.document.text for h in hits} == {"edge case early", "edge case late"}


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"from_date": "2026-11-30", "to_date": "2026-11-01"}, "after"),
        ({"from_date": "30/11/2026"}, "YYYY-MM-DD"),
        ({"sources": ["blog"]}, "source"),
        ({"sources": "x"}, "list"),
        ({"included_x_handles": ["a"], "excluded_x_handles": ["b"]}, "together"),
        ({"included_x_handles": [f"h{i}" for i in range(11)]}, "at most 10"),
        ({"excluded_x_handles": ["not a handle!"]}, "handle"),
        ({"allowed_websites": ["a.com"], "excluded_websites": ["b.com"]}, "together"),
        ({"allowed_websites": [f"s{i}.com" for i in range(6)]}, "at most 5"),
        ({"excluded_websites": ["%.com"]}, "domain"),
        ({"min_favorites": -1}, "min_favorites"),
        ({"min_views": 1.5}, "min_views"),
        ({"country": "USA"}, "country"),
    ],
)
def test_filters_validation(kwargs, needle):
    with pytest.raises(InvalidArgumentError, match=needle):
        Filters(**kwargs)


# ------------------------------------------------------------------------------------------------
# Retrieval quality on a labelled corpus

TOPICS = {
    "mars": [
        "NASA rover Perseverance collects a new rock sample from the Jezero crater on Mars",
        "Mars rover spots ancient river delta layers, hinting at past water on the red planet",
        "Engineers extend the Mars helicopter mission after its seventy-second flight",
        "Perseverance rover drills into Martian bedrock in search of signs of ancient life",
        "The Mars sample return plan faces budget cuts at NASA",
        "Dust storm on Mars forces the rover team to pause driving for a week",
    ],
    "rates": [
        "Central bank raises interest rates by a quarter point to fight inflation",
        "Inflation cools to 3 percent, raising hopes the central bank will pause rate hikes",
        "Mortgage rates climb after the central bank signals more interest rate increases",
        "Economists expect the central bank to cut interest rates next year as inflation eases",
        "Bond yields jump as the central bank keeps interest rates on hold",
        "Consumer prices rise again; inflation stays above the central bank target",
    ],
    "worldcup": [
        "Argentina beat France on penalties to win the football World Cup final",
        "World Cup qualifiers: Brazil score three goals in a football win over Peru",
        "The football World Cup will expand to 48 teams in the next tournament",
        "Star striker injured ahead of the World Cup, a blow for the national football team",
        "Record crowd watches the women's World Cup football semi-final",
        "World Cup host cities prepare stadiums for the football tournament",
    ],
    "wildfire": [
        "Wildfire in California forces thousands to evacuate as flames spread",
        "Firefighters contain half of the California wildfire after winds ease",
        "Smoke from the wildfire blankets the Bay Area; air quality alerts issued",
        "Evacuation orders lifted as the wildfire near Los Angeles is contained",
        "Drought and heat raise wildfire risk across California this summer",
        "Wildfire destroys hundreds of homes in a California mountain town",
    ],
    "ev": [
        "Electric vehicle maker unveils a solid-state battery with a longer range",
        "Battery prices for electric cars fall to a record low, boosting EV sales",
        "New fast-charging network lets electric vehicles charge a battery in ten minutes",
        "Electric vehicle sales overtake petrol cars in Norway",
        "Lithium shortage threatens electric vehicle battery production",
        "Automaker recalls electric vehicles over battery fire risk",
    ],
    "python": [
        "Python 3.14 release adds free-threaded builds without the GIL",
        "The Python language steering council approves a new packaging standard",
        "Python overtakes JavaScript as the most used programming language on GitHub",
        "A faster CPython interpreter speeds up Python programs by 25 percent",
        "Python typing gets new syntax for generics in the latest language release",
        "Security release fixes a vulnerability in the Python standard library",
    ],
    "quake": [
        "Magnitude 7.1 earthquake strikes off the coast of Japan, tsunami warning issued",
        "Tsunami waves reach the Japan coast after the strong earthquake",
        "Aftershocks rattle Japan a day after the earthquake; trains suspended",
        "Japan lifts tsunami advisory following the offshore earthquake",
        "Earthquake damages buildings in northern Japan, no deaths reported",
        "Scientists explain why Japan has so many earthquakes along its trench",
    ],
    "chess": [
        "Chess world championship match ends in a draw after twelve games",
        "The young challenger wins the chess world championship on tiebreaks",
        "Chess grandmaster sets a record for the longest unbeaten streak",
        "Online chess boom continues as the championship draws millions of viewers",
        "Chess olympiad gold goes to India for the open section",
        "Cheating scandal shakes professional chess after a grandmaster is accused",
    ],
    "flu": [
        "Flu season arrives early; doctors urge people to get the flu vaccine",
        "Hospitals see a surge in influenza and flu cases this winter",
        "New flu vaccine offers broader protection against influenza strains",
        "Health officials report flu cases rising among children",
        "Pharmacies run short of flu vaccine doses during a busy season",
        "Study finds the annual flu shot cuts hospital visits for influenza by half",
    ],
    "bitcoin": [
        "Bitcoin price tops 100,000 dollars for the first time",
        "Cryptocurrency markets tumble as bitcoin falls 10 percent in a day",
        "Bitcoin ETF inflows reach a record as investors buy the cryptocurrency",
        "Regulators propose new rules for cryptocurrency exchanges after bitcoin rally",
        "Bitcoin halving cuts miner rewards; price reacts calmly",
        "Central bank warns about cryptocurrency risks as bitcoin volatility returns",
    ],
}

DISTRACTORS = [
    "A simple recipe for sourdough bread with a crisp crust",
    "Gardening tips: how to grow tomatoes on a balcony",
    "Review: the new superhero movie is loud but fun",
    "Ten hiking trails with the best autumn colours",
    "Jazz festival returns to the city park this weekend",
    "How to train a puppy to walk on a leash",
    "The history of the printing press in Europe",
    "Museum opens an exhibition of impressionist paintings",
    "Coffee prices rise as harvests shrink in Brazil",
    "A guide to choosing running shoes for beginners",
    "Local bakery wins a national croissant contest",
    "Opera house announces its winter programme",
    "Birdwatchers count rare owls in the northern forest",
    "Tips for reducing household energy bills",
    "New ferry route connects two island towns",
    "Knitting makes a comeback among young people",
    "Architecture award goes to a wooden library",
    "Street food market opens near the harbour",
    "Marathon runner breaks the course record",
    "Film festival jury names its best documentary",
]

QUERIES = {
    "mars": ["what is the rover doing on Mars", "latest Mars rover news"],
    "rates": ["central bank interest rate decision and inflation", "latest on interest rates"],
    "worldcup": ["football World Cup", "breaking World Cup football news"],
    "wildfire": ["California wildfire evacuation", "wildfire updates today"],
    "ev": ["electric vehicle battery", "latest electric vehicle news"],
    "python": ["Python programming language release", "newest Python release"],
    "quake": ["earthquake and tsunami in Japan", "latest Japan earthquake"],
    "chess": ["chess world championship", "latest chess news"],
    "flu": ["flu vaccine and influenza season", "flu cases today"],
    "bitcoin": ["bitcoin cryptocurrency price", "latest bitcoin price"],
}


def labelled_corpus() -> tuple[list[dict], dict[str, set[str]]]:
    rng = random.Random(99)
    docs, relevant = [], {}
    sources = ["news", "x", "web", "rss"]
    for t, (topic, texts) in enumerate(TOPICS.items()):
        relevant[topic] = set()
        for i, text in enumerate(texts):
            doc_id = f"{topic}-{i}"
            # The first text of each topic is the newest; the rest are spread over the past ten days.
            age = 0.5 * HOUR + t * 60 if i == 0 else rng.uniform(1, 10) * DAY
            source = sources[(t + i) % 4]
            doc = {"source": source, "id": doc_id if source != "x" else str(t * 100 + i), "title": "",
                   "text": text, "published_at": iso(NOW - age)}
            if source == "x":
                doc["author"] = f"user{t}{i}"
                doc_id = f"x:{t * 100 + i}"
            else:
                doc["url"] = f"https://site{t}.example/{topic}/{i}"
            docs.append(doc)
            relevant[topic].add(doc_id)
    for i, text in enumerate(DISTRACTORS):
        # Distractors are the freshest items of all, to check recency never swamps relevance.
        docs.append({"source": "news", "id": f"misc-{i}", "url": f"https://misc.example/{i}", "text": text,
                     "published_at": iso(NOW - i * 60)})
    return docs, relevant


def test_recall_at_10_and_latest_first(index):
    docs, relevant = labelled_corpus()
    assert index.add(docs).added == len(docs)
    recalls = []
    for topic, queries in QUERIES.items():
        for query in queries:
            hits = index.search(query, limit=10, now=NOW)
            found = {h.document.id for h in hits}
            recalls.append(len(found & relevant[topic]) / len(relevant[topic]))
            if is_temporal(query, NOW):
                newest = max(relevant[topic], key=lambda i: index.get(i).published_at)
                assert hits[0].document.id == newest, (query, [h.document.id for h in hits[:3]])
    recall = sum(recalls) / len(recalls)
    assert recall >= 0.9, recall


def test_recency_does_not_apply_when_to_date_is_past(index):
    index.add([news(1, "glacier report glacier glacier", published_at=iso(NOW - 20 * DAY)),
               news(2, "glacier report", published_at=iso(NOW - 10 * DAY))])
    hits = index.search("latest glacier", Filters(to_date="2026-11-25"), now=NOW)
    assert len(hits) == 2
    for hit in hits:  # the score is the fused rank alone
        assert hit.score == pytest.approx(sum(1 / (60 + r) for r in (hit.bm25_rank, hit.vector_rank) if r))


# ------------------------------------------------------------------------------------------------
# Retention


def test_purge_removes_exactly_the_old_ones(index):
    ages = {"x": [1, 5, 8, 40], "news": [10, 89, 91, 200], "web": [1, 400]}
    docs = []
    for source, days in ages.items():
        for d in days:
            doc = {"source": source, "text": f"{source} item aged {d} days", "published_at": iso(NOW - d * DAY)}
            if source == "x":
                doc.update(id=f"{d}", author="someone")
            else:
                doc["url"] = f"https://{source}.example/{d}"
            docs.append(doc)
    index.add(docs)
    removed = index.purge({"x": timedelta(days=7), "news": 90 * DAY}, now=NOW)
    assert removed == 4
    left = {(h.document.source, round((NOW - h.document.published_at) / DAY)) for h in index.search("", limit=50)}
    assert left == {("x", 1), ("x", 5), ("news", 10), ("news", 89), ("web", 1), ("web", 400)}
    assert not any(h.document.source == "x" and "40" in h.document.text for h in index.search("aged 40", now=NOW))
    with pytest.raises(InvalidArgumentError):
        index.purge({"blog": 1.0})
