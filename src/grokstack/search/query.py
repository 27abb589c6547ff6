"""Turning raw user text into search terms: tokens, stop-words, temporal cues and a safe FTS5 expression.

FTS5 has its own query language (`AND`, `NEAR(...)`, `col:`, `*`, `^`, quotes); raw user text fed to
`MATCH` can be a syntax error or change the query's meaning. `fts_query` therefore keeps only word
tokens, wraps each in double quotes (doubling any inner quote) and joins them with `OR`, so every
input yields a valid expression of plain phrases.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from .documents import clean_text

MAX_TERMS = 32  # long pasted text should not turn into a huge OR query


def _word_set(words: str) -> frozenset[str]:
    return frozenset(words.split())


STOP_WORDS = _word_set(
    """a about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have
    having he her here hers herself him himself his how i if in into is it its itself just me more most my
    myself no nor not of off on once only or other our ours ourselves out over own same she should so some
    such than that the their theirs them themselves then there these they this those through to too under
    until up very was we were what when where which while who whom why will with would you your yours
    yourself yourselves what's whats tell show give find search say said says anything something
    please thing things get got know let lets also s t"""
)

# Words that name the kind of result rather than its subject ("latest Mars news").
GENERIC_WORDS = _word_set("news headlines story stories article articles post posts tweet tweets")

# Words that ask for fresh results; they steer ranking, not matching.
TEMPORAL_WORDS = _word_set("latest today tonight now breaking recent recently newest current currently yesterday")
_TEMPORAL_PHRASES = re.compile(
    r"\b(this|past|last) (morning|afternoon|evening|week|weekend|month|hour|hours|few days)\b|\bright now\b"
)
_DATE = re.compile(r"\b\d{4}-\d{2}-\d{2}\b")
_YEAR = re.compile(r"\b(19|20)\d{2}\b")
_WORD = re.compile(r"\w+")


def tokenize(text: str) -> list[str]:
    """Case-folded word tokens of the cleaned text (stop-words kept)."""
    return _WORD.findall(clean_text(text).casefold())


def query_terms(text: str) -> list[str]:
    """Distinct content words of a query in order: no stop-words, temporal cues or generic words."""
    seen: dict[str, None] = {}
    for token in tokenize(text):
        if token in STOP_WORDS or token in TEMPORAL_WORDS or token in GENERIC_WORDS or not token.strip("_"):
            continue
        seen.setdefault(token, None)
    return list(seen)[:MAX_TERMS]


def fts_query(text: str) -> str:
    """A valid FTS5 expression matching any content word of `text`; '' when there is none."""
    return " OR ".join('"' + term.replace('"', '""') + '"' for term in query_terms(text))


def is_temporal(text: str, now: float | None = None) -> bool:
    """True when the query asks for fresh material: latest/today/breaking…, an ISO date, or a recent year."""
    lowered = clean_text(text).casefold()
    if any(token in TEMPORAL_WORDS for token in _WORD.findall(lowered)):
        return True
    if _TEMPORAL_PHRASES.search(lowered) or _DATE.search(lowered):
        return True
    if now is None:
        return False
    this_year = datetime.fromtimestamp(now, tz=UTC).year
    return any(int(m.group(0)) >= this_year - 1 for m in _YEAR.finditer(lowered))
