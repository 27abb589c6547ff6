"""Moderating model output while it streams (guardrails.md §6).

After every `check_every` new characters (or a sentence end once MIN_SENTENCE_CHECK have arrived) the guard
checks a window of the last `window` characters (more when a single delta was longer), so a phrase split
across deltas is seen whole. Two modes:

- `buffered`: text is released only once a window containing it has passed, minus the last HOLD_BACK
  characters and cut at whitespace, so a phrase that straddles a check is never half-released; PII / secret
  spans are redacted on release when the profile redacts them in output. Costs about one window of latency.
- `optimistic`: every delta is released at once; a hit stops the stream (text already sent stays sent).

    sg = StreamGuard(guard, keep=pii_values(user_text))
    for delta in engine_stream:
        text, blocked = sg.feed(delta)
        send(text)
        if blocked: cancel the request, finish with finish_reason "content_filter"
    text, blocked = sg.finish()   # final check of the whole text, releases the rest
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..errors import InvalidArgumentError
from .check import Guard, Verdict
from .policy import STREAM_MODES
from .rules import find_pii

HOLD_BACK = 120  # > the longest phrase a rule needs to see whole
MIN_SENTENCE_CHECK = 40  # a sentence end triggers a check only after this many new characters
PII_MARGIN = 100  # how far back a PII span straddling the release point can start
_SENTENCE_END = re.compile(r"[.!?\n]")


class StreamGuard:
    """Output moderation of one streamed reply; `mode` defaults to the profile's stream mode."""

    def __init__(self, guard: Guard, keep: Iterable[str] | None = None, mode: str | None = None,
                 request: Verdict | None = None) -> None:
        settings = guard.profile.stream
        self.mode = mode or settings.mode
        if self.mode not in STREAM_MODES:
            raise InvalidArgumentError(f"stream guard mode must be one of {', '.join(STREAM_MODES)}, got {mode!r}")
        self.guard = guard
        self.check_every, self.window = settings.check_every, settings.window
        self.keep = set(keep or ())
        self.request = request  # the input verdict, for the profile's output_floor (check.py)
        redacting = [k for k in ("pii", "secret") if guard.profile.action(k, "output") == "redact"]
        self.redact_kinds = tuple(redacting) if self.mode == "buffered" else ()
        self.text = ""  # everything fed so far
        self.released = 0  # characters of self.text handed out
        self.checked = 0  # len(self.text) at the last check
        self.verdict: Verdict | None = None  # latest verdict (the whole-text one after finish)
        self.blocked: Verdict | None = None
        self.finished = False

    def feed(self, delta: str) -> tuple[str, Verdict | None]:
        """Add a delta; returns (text to send now, the blocking verdict or None)."""
        if self.blocked is not None:
            return "", self.blocked
        if self.finished:
            raise RuntimeError("StreamGuard.feed() called after finish()")
        self.text += delta
        if self._due(delta) and self._check().action == "block":
            return "", self.blocked
        if self.mode == "optimistic":
            return self._release(len(self.text)), None
        return (self._release(self._safe_end()), None) if self.checked == len(self.text) else ("", None)

    def finish(self) -> tuple[str, Verdict | None]:
        """Check the complete text; returns (the rest of the text, or '' when blocked, the blocking verdict)."""
        if self.blocked is not None or self.finished:
            return "", self.blocked
        self.finished = True
        self.verdict = self.guard.check(self.text, "output", keep=self.keep, request=self.request)
        if self.verdict.action == "block":
            self.blocked = self.verdict
            return "", self.blocked
        return self._release(len(self.text)), None

    def _due(self, delta: str) -> bool:
        new = len(self.text) - self.checked
        return new >= self.check_every or (new >= MIN_SENTENCE_CHECK and _SENTENCE_END.search(delta) is not None)

    def _check(self) -> Verdict:
        # The window reaches back over everything unchecked, plus an overlap with the last checked part.
        start = max(0, min(len(self.text) - self.window, self.checked - HOLD_BACK))
        self.checked = len(self.text)
        self.verdict = self.guard.check(self.text[start:], "output", keep=self.keep, request=self.request)
        if self.verdict.action == "block":
            self.blocked = self.verdict
        return self.verdict

    def _safe_end(self) -> int:
        """Where buffered release may stop: HOLD_BACK before the checked end, at whitespace, outside PII."""
        end = len(self.text) - HOLD_BACK
        if end <= self.released:
            return self.released
        end = max(self.text.rfind(" ", self.released, end), self.text.rfind("\n", self.released, end)) + 1
        if end <= self.released:
            return self.released
        if self.redact_kinds:
            base = max(self.released, end - PII_MARGIN)
            for hit in sorted(find_pii(self.text[base:], self.redact_kinds), key=lambda h: -h.span[0]):
                start, stop = hit.span[0] + base, hit.span[1] + base
                if start < end < stop:
                    end = max(self.released, start)
        return end

    def _release(self, end: int) -> str:
        chunk = self.text[self.released:end]
        self.released = max(self.released, end)
        if self.redact_kinds and chunk:
            chunk = self.guard.redact(chunk, keep=self.keep, kinds=self.redact_kinds)
        return chunk
