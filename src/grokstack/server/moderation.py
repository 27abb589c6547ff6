"""The guard in the API: input checks, retrieved-document screening, streaming output moderation, the link
filter, `/v1/moderations` results and the audit trail (guardrails.md §4-§8).

One `Guards` per server holds a `Guard` per profile and the audit log; one `RequestGuard` per chat request
applies the profile of the request's API key and records every block and flag it makes.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..guard.audit import AuditLog
from ..guard.check import GUARD_VERSION, Guard, Verdict, message_text, pii_values
from ..guard.injection import LinkFilter, domains_in
from ..guard.judge import Judge
from ..guard.policy import load_profile
from ..guard.rules import CODES
from ..guard.stream import StreamGuard
from ..search.index import Hit
from .auth import Key

log = logging.getLogger("grokstack.server")


# OpenAI's moderation categories and the Llama Guard codes that feed each (guardrails.md §2, max over codes).
OPENAI_CATEGORIES = {
    "harassment": ["S10"],
    "harassment/threatening": ["S1"],
    "hate": ["S10"],
    "hate/threatening": ["S1"],
    "illicit": ["S2"],
    "illicit/violent": ["S1", "S9"],
    "self-harm": ["S11"],
    "self-harm/intent": ["S11"],
    "self-harm/instructions": ["S11"],
    "sexual": ["S3", "S12"],
    "sexual/minors": ["S4"],
    "violence": ["S1"],
    "violence/graphic": [],
}


def moderation_result(verdict: Verdict, threshold: float = 0.5) -> dict:
    """One `results[]` entry of /v1/moderations: OpenAI's 13 categories plus `llama_guard_codes`."""
    scores = {name: max((verdict.scores.get(c, 0.0) for c in codes), default=0.0)
              for name, codes in OPENAI_CATEGORIES.items()}
    flagged_codes = {c for c in verdict.codes if c in CODES}  # not the pii/secret/profanity signals
    categories = {name: any(c in flagged_codes for c in codes) or scores[name] >= threshold
                  for name, codes in OPENAI_CATEGORIES.items()}
    return {
        "flagged": verdict.flagged,
        "categories": categories,
        "category_scores": {k: round(float(v), 6) for k, v in scores.items()},
        "category_applied_input_types": {name: ["text"] for name in OPENAI_CATEGORIES},
        "llama_guard_codes": sorted(flagged_codes),
        "action": verdict.action,
    }


@dataclass
class GuardSettings:
    profile: str = "aup"  # the server's profile; API keys may name their own
    block_style: str = "refusal"  # "refusal": 200 with a refusal message; "error": 400 code content_filter
    audit_path: Path | None = None
    audit_content: bool = False  # store raw text in the audit log (off: hashes only)
    judge: Judge | None = None  # optional LLM judge on user input (guard/judge.py)
    judge_mode: str = "max"


def check_guard_profile(profile: str, cfg) -> None:
    """Grok-2's licence allows commercial use only under xAI's Acceptable Use Policy: say so when a server
    for its weights starts with the guard relaxed (allowed for research and non-commercial use)."""
    if cfg.arch == "grok-2" and profile in ("off", "permissive"):
        log.warning(
            "guard profile %r for Grok-2 weights: commercial use of Grok 2 requires compliance with xAI's "
            "Acceptable Use Policy (the default profile 'aup' enforces it); use %r for research only", profile, profile
        )


class Guards:
    """The server's guards, one per profile in use, and its audit log."""

    def __init__(self, settings: GuardSettings) -> None:
        self.settings = settings
        self._guards: dict[str, Guard] = {}
        self.classifier = None  # one classifier for every profile, loaded (or trained) at start-up
        self.classifier = self.for_profile(settings.profile).classifier  # a bad profile fails here, not later
        self.audit = AuditLog(settings.audit_path, content=settings.audit_content, guard_version=GUARD_VERSION) \
            if settings.audit_path else None

    def for_profile(self, name: str | None) -> Guard:
        name = name or self.settings.profile
        if name not in self._guards:
            self._guards[name] = Guard(load_profile(name), classifier=self.classifier, judge=self.settings.judge,
                                       judge_mode=self.settings.judge_mode)
        return self._guards[name]

    def for_key(self, key: Key | None) -> Guard:
        return self.for_profile(key.profile if key is not None else None)

    def request(self, key: Key | None, request_id: str) -> RequestGuard:
        return RequestGuard(self, self.for_key(key), key, request_id or uuid.uuid4().hex)

    def record(self, verdict: Verdict, direction: str, text: str, key: Key | None, request_id: str,
               profile: str, **extra) -> None:
        if self.audit is None or verdict.action not in ("block", "redact", "flag"):
            return
        try:
            self.audit.record_result(verdict, direction=direction, text=text, request_id=request_id,
                                     key=key.secret if key is not None and key.secret else None,
                                     profile=profile, extra=extra or None)
        except OSError:  # a full disk must not take the API down; the decision itself still applies
            log.exception("could not write the guard audit log")

    def close(self) -> None:
        if self.audit is not None:
            self.audit.close()


class RequestGuard:
    """The guard of one chat request: what it checked, what it blocked, which link domains its output may use."""

    def __init__(self, guards: Guards, guard: Guard, key: Key | None, request_id: str) -> None:
        self.guards, self.guard, self.key, self.request_id = guards, guard, key, request_id
        self.profile = guard.profile.name
        self.refusal = guard.profile.refusal
        self.user_text = ""
        self.allowed_domains: set[str] = set()
        self.input_verdict: Verdict | None = None

    def _record(self, verdict: Verdict, direction: str, text: str, **extra) -> None:
        self.guards.record(verdict, direction, text, self.key, self.request_id, self.profile, **extra)

    def check_input(self, messages: list[dict]) -> Verdict | None:
        """The blocking verdict on the conversation's user/system text, or None when it may go on."""
        self.user_text = "\n".join(message_text(m["content"]) for m in messages if m["role"] in ("user", "system"))
        self.allowed_domains = domains_in(self.user_text)
        verdict = self.guard.check_messages(messages)
        self.input_verdict = verdict
        self._record(verdict, "input", self.user_text)
        return verdict if verdict.action == "block" else None

    def screen_hits(self, hits: list[Hit]) -> list[Hit]:
        """Retrieved documents that may enter the prompt: a blocked one is quarantined (kept in the index,
        left out of this prompt, logged); injection-flagged ones were down-ranked at retrieval and are logged."""
        kept = []
        for hit in hits:
            doc = hit.document
            verdict = self.guard.check(f"{doc.title}\n{doc.text}", direction="retrieved")
            if doc.injection_flag:
                self._record(verdict, "retrieved", doc.text, document=doc.id, injection_flag=True)
            elif verdict.action != "allow":
                self._record(verdict, "retrieved", doc.text, document=doc.id)
            if verdict.action != "block":
                kept.append(hit)
        self.allowed_domains |= domains_in([h.document.url for h in kept])
        return kept

    def output(self) -> OutputScreen:
        return OutputScreen(self)

    def finish_output(self, text: str) -> tuple[str, Verdict | None]:
        """A whole (non-streamed) answer: the released text and the blocking verdict, if any."""
        screen = self.output()
        released, verdict = screen.feed(text)
        if verdict is None:
            rest, verdict = screen.finish()
            released += rest
        return released, verdict


class OutputScreen:
    """One choice's output on its way to the client: moderated in windows (StreamGuard, which also redacts PII
    the user did not give when the profile says so), then links to domains outside the sources and the user's
    own messages reduced to text. `feed`/`finish` return the text that may be sent and a blocking verdict."""

    def __init__(self, rg: RequestGuard) -> None:
        self.rg = rg
        self.stream = StreamGuard(rg.guard, keep=pii_values(rg.user_text), request=rg.input_verdict)
        self.links = LinkFilter(rg.allowed_domains)
        self.blocked: Verdict | None = None

    def feed(self, delta: str) -> tuple[str, Verdict | None]:
        if self.blocked is not None:
            return "", self.blocked
        released, verdict = self.stream.feed(delta)
        return self._settle(released, verdict)

    def finish(self) -> tuple[str, Verdict | None]:
        if self.blocked is not None:
            return "", self.blocked
        released, verdict = self.stream.finish()
        out, verdict = self._settle(released, verdict)
        if verdict is None:
            out += self.links.finish()
            if self.links.removed:
                note = Verdict(flagged=True, action="flag", codes=[], scores={}, stage="links", direction="output")
                self.rg._record(note, "output", self.stream.text, removed_links=self.links.removed)
        return out, verdict

    def _settle(self, released: str, verdict: Verdict | None) -> tuple[str, Verdict | None]:
        out = self.links.feed(released) if released else ""
        if verdict is not None and verdict.action == "block":
            self.blocked = verdict
            self.rg._record(verdict, "output", self.stream.text)
            return out, verdict
        return out, None
