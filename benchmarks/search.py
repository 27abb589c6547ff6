"""Search index throughput and latency on this machine.

For each corpus size, into a fresh temporary SQLite file, with the index's default embedder:
1. ingest rate: seeded synthetic documents (short X posts, news, web pages, RSS items; a Zipf-distributed
   vocabulary of a few thousand words, several handles and domains, 30 days of timestamps, metrics)
   added through `Index.add` in batches; only the `add` calls are timed, not building the documents;
2. ingest → searchable: add one document carrying a unique term, then search for that term until it is
   returned (median of a few tries); split into the `add` (commit) and the first search after it;
3. query latency p50/p95 over a mixed set: plain keywords, "latest …" temporal queries, and queries with
   filters (a date range, a source, an X handle, a website, a minimum of likes);
4. on-disk size (database + WAL).

Run: .venv/bin/python benchmarks/search.py [--sizes 10000,100000] [--queries 200] [--batch 1000].
Prints a table, writes benchmarks/results/search.json (rewritten after each size, so a run cut short
keeps the sizes it finished). The default sizes (10k, 100k) take about 3 minutes on a 2-core machine.
1M documents does not fit in 10 minutes there: ingest runs at ~1,500 docs/s at best (~11+ min), every
query scans all rows (~2 s each), so expect 20-30 minutes and ~3 GB of disk; run it on its own, e.g.
.venv/bin/python benchmarks/search.py --sizes 1000000 --queries 50 --out /tmp/search-1m.json [--tmpdir DIR].
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from grokstack.search.documents import Document
from grokstack.search.index import Filters, Index

NOW = datetime(2026, 3, 1, 12, tzinfo=UTC).timestamp()  # fixed "now", so runs are comparable
SPAN = 30 * 86400.0


def _words(text: str) -> list[str]:
    return text.split()


SOURCE_MIX = {"x": 0.55, "news": 0.2, "web": 0.1, "rss": 0.15}
HANDLES = 500
DOMAINS = (
    "reuters.com", "apnews.com", "bbc.co.uk", "nytimes.com", "theguardian.com", "techcrunch.com",
    "arstechnica.com", "wired.com", "nature.com", "espn.com", "bloomberg.com", "ft.com", "lemonde.fr",
    "spiegel.de", "news.ycombinator.com", "blog.example.org", "docs.python.org", "en.wikipedia.org",
)
TOPICS = _words(
    "election vote senate parliament minister policy budget tax inflation market stocks bitcoin crypto "
    "rocket launch mars moon satellite climate storm flood wildfire earthquake football league cup final "
    "transfer tennis championship model release chip gpu startup funding lawsuit court ruling strike "
    "vaccine hospital virus study research energy solar battery oil gas trade tariff war ceasefire summit"
)
FILLER = _words(
    "the a of to in and is for on with at by from this that new after over says will has more about "
    "just now big first report update people city today week year time back very"
)
SYLLABLES = _words("ka ro mi tu le sa no vi da pe zo lu ri ma te bo ni gu fa ke si po ra de yu")
MARKER = "qxbenchmark"  # no generated word contains "qx"


# ----------------------------------------------------------------------------------------------------
# Synthetic corpus


class Corpus:
    """Seeded generator of documents; word frequencies follow a Zipf law over ~3,000 words."""

    def __init__(self, seed: int, vocab_size: int = 3000) -> None:
        self.rng = np.random.default_rng(seed)
        words = list(dict.fromkeys(TOPICS + FILLER))
        while len(words) < vocab_size:
            n = int(self.rng.integers(2, 5))
            word = "".join(self.rng.choice(SYLLABLES, n))
            if word not in words:
                words.append(word)
        # Filler words are the most frequent, topic words next, invented words form the long tail.
        order = FILLER + [w for w in words if w not in FILLER]
        self.words = np.array(order)
        weights = 1.0 / np.arange(1, len(order) + 1) ** 1.05
        self.p = weights / weights.sum()
        self.handles = [f"user_{i:04d}" for i in range(HANDLES)]
        self.handle_p = _zipf(HANDLES)
        self.domain_p = _zipf(len(DOMAINS))
        self.next_id = 0

    def sentence(self, n: int) -> str:
        return " ".join(self.rng.choice(self.words, n, p=self.p))

    def batch(self, n: int) -> list[Document]:
        rng = self.rng
        sources = rng.choice(list(SOURCE_MIX), n, p=list(SOURCE_MIX.values()))
        ages = rng.random(n) ** 1.5 * SPAN  # more recent material than old
        likes = rng.lognormal(2.0, 2.0, n).astype(np.int64)
        views = likes * rng.integers(5, 200, n) + rng.integers(0, 1000, n)
        docs = []
        for i in range(n):
            self.next_id += 1
            docs.append(self.document(self.next_id, str(sources[i]), NOW - float(ages[i]), int(likes[i]),
                                      int(views[i])))
        return docs

    def document(self, num: int, source: str, published: float, likes: int, views: int,
                 extra: str = "") -> Document:
        rng = self.rng
        if source == "x":
            handle = self.handles[rng.choice(HANDLES, p=self.handle_p)]
            text = self.sentence(int(rng.integers(8, 40)))
            if rng.random() < 0.2:
                text += " #" + str(rng.choice(TOPICS))
            return Document(id=f"x:{num}", source="x", text=text + extra, published_at=published, author=handle,
                            likes=likes, views=views, reposts=likes // 10, replies=likes // 20,
                            ingested_at=published + 5)
        domain = DOMAINS[rng.choice(len(DOMAINS), p=self.domain_p)]
        title = self.sentence(int(rng.integers(5, 12))).capitalize()
        text = ". ".join(self.sentence(int(rng.integers(10, 25))) for _ in range(int(rng.integers(2, 6))))
        return Document(
            id=f"{source}:{num}", source=source, title=title, text=text + extra, published_at=published,
            url=f"https://{domain}/{source}/{num}", author=f"Reporter {num % 97}",
            feed_url=f"https://{domain}/feed.xml" if source == "rss" else "", lang="en",
            country="US" if num % 3 else "", nsfw=num % 200 == 0, ingested_at=published + 60,
        )

    def queries(self, n: int) -> list[tuple[str, str, Filters | None]]:
        """(kind, text, filters): 40% plain keywords, 20% "latest …", 40% filtered."""
        rng = self.rng
        topical = self.words[len(FILLER):len(FILLER) + 400]  # frequent content words, as people search

        def keywords() -> str:
            return " ".join(rng.choice(topical, int(rng.integers(1, 4)), replace=False))

        out: list[tuple[str, str, Filters | None]] = []
        for i in range(n):
            slot = i % 10
            if slot < 4:
                out.append(("keywords", keywords(), None))
            elif slot < 6:
                out.append(("latest", f"latest {keywords()} news", None))
            elif slot == 6:
                end = NOW - float(rng.integers(0, 20)) * 86400
                day = datetime.fromtimestamp(end, tz=UTC).date()
                start = datetime.fromtimestamp(end - 7 * 86400, tz=UTC).date()
                out.append(("date range", keywords(), Filters(from_date=start, to_date=day)))
            elif slot == 7:
                out.append(("source", keywords(), Filters(sources=[str(rng.choice(["news", "web", "rss"]))])))
            elif slot == 8:
                picks = rng.choice(HANDLES, int(rng.integers(1, 4)), replace=False, p=self.handle_p)
                out.append(("x handles", keywords(), Filters(included_x_handles=[self.handles[h] for h in picks],
                                                             min_favorites=int(rng.choice([0, 10, 100])))))
            else:
                site = DOMAINS[int(rng.integers(len(DOMAINS)))]
                out.append(("website", keywords(), Filters(allowed_websites=[site], sources=["news", "web", "rss"])))
        return out


def _zipf(n: int) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1)
    return w / w.sum()


# ----------------------------------------------------------------------------------------------------
# Measurements


def ingest(index: Index, corpus: Corpus, size: int, batch: int) -> dict:
    """Add `size` documents in batches; time only the `add` calls."""
    spent = 0.0
    added = 0
    report_every = max(size // 10, batch)
    next_report = report_every
    for done in range(0, size, batch):
        docs = corpus.batch(min(batch, size - done))
        t = time.perf_counter()
        result = index.add(docs)
        spent += time.perf_counter() - t
        added += result.added
        if done + len(docs) >= next_report and size >= 100_000:
            next_report += report_every
            print(f"  … {done + len(docs):,} docs, {added / spent:,.0f} docs/s so far", file=sys.stderr, flush=True)
    return {"docs": added, "seconds": spent, "docs_per_s": added / spent}


def visibility(index: Index, corpus: Corpus, tries: int = 5) -> dict:
    """Add one document with a unique term, then search for it until it comes back."""
    add_ms, first_ms, total_ms, polls = [], [], [], []
    for k in range(tries):
        term = f"{MARKER}{k}"
        doc = corpus.document(10**9 + k, "x", NOW - 60, 1, 10, extra=f" {term}")
        t0 = time.perf_counter()
        index.add([doc])
        t1 = time.perf_counter()
        n = 0
        first = None
        while True:
            hits = index.search(term, limit=5, now=NOW)
            n += 1
            if first is None:
                first = time.perf_counter() - t1
            if any(h.document.id == doc.id for h in hits):
                break
            if time.perf_counter() - t0 > 60:
                raise RuntimeError(f"document {doc.id} not searchable after 60 s")
        t2 = time.perf_counter()
        add_ms.append((t1 - t0) * 1e3)
        first_ms.append(first * 1e3)
        total_ms.append((t2 - t0) * 1e3)
        polls.append(n)
    return {"add_ms": statistics.median(add_ms), "first_search_ms": statistics.median(first_ms),
            "visible_ms": statistics.median(total_ms), "polls": max(polls), "tries": tries}


def query_latency(index: Index, queries: list[tuple[str, str, Filters | None]]) -> dict:
    t = time.perf_counter()
    index.search("warm up query", now=NOW)  # loads the vector cache; reported apart
    cold_ms = (time.perf_counter() - t) * 1e3
    by_kind: dict[str, list[float]] = {}
    empty = 0
    for kind, text, filters in queries:
        t = time.perf_counter()
        hits = index.search(text, filters, limit=15, now=NOW)
        by_kind.setdefault(kind, []).append((time.perf_counter() - t) * 1e3)
        empty += not hits
    every = [ms for values in by_kind.values() for ms in values]
    return {
        "count": len(every), "cold_ms": cold_ms, "empty_results": empty, **_percentiles(every),
        "by_kind": {kind: {"count": len(v), **_percentiles(v)} for kind, v in by_kind.items()},
    }


def _percentiles(ms: list[float]) -> dict:
    a = np.array(ms)
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "mean_ms": float(a.mean()), "max_ms": float(a.max())}


def disk_bytes(path: Path) -> dict:
    files = {suffix: path.with_name(path.name + suffix) for suffix in ("", "-wal")}
    sizes = {("db" if s == "" else s.lstrip("-")): (f.stat().st_size if f.exists() else 0) for s, f in files.items()}
    return {**sizes, "total": sum(sizes.values())}


def bench_size(size: int, n_queries: int, batch: int, seed: int, tmpdir: str | None) -> dict:
    corpus = Corpus(seed)
    queries = corpus.queries(n_queries)
    with tempfile.TemporaryDirectory(prefix="search-bench-", dir=tmpdir) as tmp:
        path = Path(tmp) / "index.db"
        index = Index(path)
        try:
            row: dict = {"size": size, "embedder": index.embedder.name, "batch": batch}
            row["ingest"] = ingest(index, corpus, size, batch)
            row["disk_bytes"] = disk_bytes(path)
            row["visibility"] = visibility(index, corpus)
            row["queries"] = query_latency(index, queries)
        finally:
            index.close()
    return row


def print_table(rows: list[dict]) -> None:
    print(f"\n{'docs':>9s} {'ingest docs/s':>13s} {'add+commit ms':>13s} {'1st search ms':>13s} "
          f"{'visible ms':>10s} {'cold q ms':>9s} {'p50 ms':>8s} {'p95 ms':>8s} {'disk MB':>8s} {'B/doc':>6s}")
    for r in rows:
        v, q = r["visibility"], r["queries"]
        disk = r["disk_bytes"]["total"]
        print(f"{r['size']:9,d} {r['ingest']['docs_per_s']:13,.0f} {v['add_ms']:13.1f} {v['first_search_ms']:13.1f} "
              f"{v['visible_ms']:10.1f} {q['cold_ms']:9.1f} {q['p50_ms']:8.1f} {q['p95_ms']:8.1f} "
              f"{disk / 1e6:8.1f} {disk / r['size']:6.0f}")
    print(f"\n{'docs':>9s} {'query kind':12s} {'n':>4s} {'p50 ms':>8s} {'p95 ms':>8s} {'max ms':>8s}")
    for r in rows:
        for kind, s in r["queries"]["by_kind"].items():
            print(f"{r['size']:9,d} {kind:12s} {s['count']:4d} {s['p50_ms']:8.1f} {s['p95_ms']:8.1f} "
                  f"{s['max_ms']:8.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000", help="comma-separated corpus sizes (default 10000,100000)")
    ap.add_argument("--queries", type=int, default=200, help="timed queries per size (default 200)")
    ap.add_argument("--batch", type=int, default=1000, help="documents per Index.add call (default 1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "search.json",
                    help="JSON report path (default benchmarks/results/search.json)")
    ap.add_argument("--tmpdir", help="where the temporary index files go (default: the system temp dir)")
    args = ap.parse_args()
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "sqlite": sqlite3.sqlite_version},
              "queries": args.queries, "rows": []}
    started = time.perf_counter()
    for size in sizes:
        print(f"size {size:,}: ingesting…", file=sys.stderr, flush=True)
        t = time.perf_counter()
        row = bench_size(size, args.queries, args.batch, args.seed, args.tmpdir)
        row["wall_s"] = time.perf_counter() - t
        report["rows"].append(row)
        report["wall_s"] = time.perf_counter() - started
        args.out.write_text(json.dumps(report, indent=1))
        print(f"size {size:,}: done in {row['wall_s']:.0f} s", file=sys.stderr, flush=True)
    print(f"embedder: {report['rows'][0]['embedder'] if report['rows'] else '?'}, cpus: {os.cpu_count()}")
    print_table(report["rows"])
    print(f"\ntotal {report['wall_s']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
