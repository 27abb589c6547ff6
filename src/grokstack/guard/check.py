"""The guard: normalise, run the rules and the classifier on every view, and decide per the profile.

Decision (guardrails.md §4): a high-severity rule hit flags its code on its own; otherwise a code's score is
max(rule scores, classifier score) over the main view and every decoded view, and the code is flagged when
the score reaches the profile's threshold. The verdict's action is the strongest action (block > redact >
flag > allow) over the flagged codes; `flagged` is true when that action is not `allow`.

Bounded cost: texts longer than MAX_SCAN_CHARS are checked on their first and last MAX_SCAN_CHARS / 2
characters only, so an 8 MB body cannot stall the server (the middle of such a text goes unchecked).

    guard = Guard("aup")
    verdict = guard.check(user_text)                     # direction "input"
    if verdict.action == "block": ...
    out = guard.check(reply, "output", keep=pii_values(user_text))
    if out.action == "redact": reply = guard.redact(reply, keep=pii_values(user_text))
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import ConfigError, GrokstackError, InvalidArgumentError
from .normalize import normalize
from .policy import ACTION_RANK, DEFAULT_PROFILE, DIRECTIONS, Profile, load_profile
from .rules import CODES, SIGNALS, Hit, canonical, find_hits, find_pii, neutralize

if TYPE_CHECKING:  # the judge module pulls in httpx; a Guard without a judge never needs it
    from .judge import Judge

log = logging.getLogger("grokstack.guard")

GUARD_VERSION = "guard-0.1.0"  # bump when rules, normalisation or the decision change
MAX_SCAN_CHARS = 64 * 1024
MAX_CONTEXT_CHARS = 16 * 1024  # system + user turns checked together by check_messages
REDACTED = "[redacted]"
JUDGE_MODES = ("max", "decide")


class Scorer(Protocol):
    def scores(self, text: str) -> dict[str, float]: ...  # {"S1": p, ..., "S14": p}


@dataclass
class Verdict:
    flagged: bool  # the guard acted: action is not "allow"
    action: str  # allow | flag | redact | block
    codes: list[str]  # codes at or over their threshold (or with a high rule hit), even when allowed
    scores: dict[str, float]  # every code S1..S14 plus the signals pii, secret, profanity
    hits: list[Hit] = field(default_factory=list)  # rule hits, plus one "classifier" hit per code over threshold
    spans: list[tuple[int, int]] = field(default_factory=list)  # rule-hit spans of flagged codes in the main view
    stage: str = "none"  # what decided: rules | classifier | judge | none
    guard_version: str = GUARD_VERSION
    profile: str = ""
    direction: str = "input"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["scores"] = {code: round(score, 4) for code, score in self.scores.items()}
        out["spans"] = [list(span) for span in self.spans]
        out["hits"] = [{**asdict(hit), "score": round(hit.score, 4), "span": list(hit.span)} for hit in self.hits]
        return out


class Guard:
    """Checks text against a profile with the rules, the seed-trained classifier and an optional LLM judge.

    `classifier`: any object with `.scores(text) -> {"S1": p, ...}`; None loads
    `grokstack.guard.classifier.default_classifier()` on first use (rules only if that module is missing).
    `use_classifier=False` runs the rules alone.
    `judge` (guard/judge.py) scores the main view in `judge_directions`. `judge_mode` "max" takes, per code,
    the larger of classifier and judge (guardrails.md §4: a judge can only add flags); "decide" lets the judge
    replace the classifier, so a strong judge also clears the classifier's false alarms (rules still apply).
    A judge that fails (endpoint down, unreadable answer) is logged and skipped for that text.
    """

    def __init__(self, profile: Profile | str | Path = DEFAULT_PROFILE, classifier: Scorer | None = None,
                 use_classifier: bool = True, judge: Judge | None = None, judge_mode: str = "max",
                 judge_directions: tuple[str, ...] = ("input",)) -> None:
        if judge_mode not in JUDGE_MODES:
            raise ConfigError(f"judge mode must be one of {', '.join(JUDGE_MODES)}, got {judge_mode!r}")
        self.profile = profile if isinstance(profile, Profile) else load_profile(profile)
        self._classifier = classifier
        self._load_default = classifier is None and use_classifier
        self._lock = threading.Lock()
        self.judge, self.judge_mode, self.judge_directions = judge, judge_mode, judge_directions

    @property
    def classifier(self) -> Scorer | None:
        if self._load_default:
            with self._lock:
                if self._load_default:
                    self._classifier = load_default_classifier()
                    self._load_default = False
        return self._classifier

    @property
    def version(self) -> str:
        """GUARD_VERSION plus the classifier's identity (its seed-set hash), which changes its decisions too."""
        clf = self.classifier
        if clf is None:
            return GUARD_VERSION + "+rules"
        tag = getattr(clf, "seed_hash", None) or getattr(clf, "version", None)
        return f"{GUARD_VERSION}+{str(tag)[:12]}" if tag else GUARD_VERSION

    def check(self, text: str, direction: str = "input", keep: Iterable[str] | None = None,
              request: Verdict | None = None) -> Verdict:
        """Verdict for `text` in `direction`; PII whose value is in `keep` (e.g. given by the user) is ignored.

        `request`: for output, the verdict on the request it answers; below the profile's output_floor on every
        code, model-only output hits are flagged, not blocked (policy.py)."""
        if direction not in DIRECTIONS:
            raise InvalidArgumentError(f"guard direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
        if not text or not text.strip():
            return self._decide({}, [], {}, direction, request)
        views = normalize(clip(text)).views
        kept = {canonical(value) for value in keep or ()}
        hits = [hit for i, view in enumerate(views) for hit in find_hits(view, detectors=i == 0, view=i)]
        hits = [h for h in hits if h.code not in ("pii", "secret") or canonical(_value(views, h)) not in kept]
        model = self._model_scores(views, semantic="always" if direction == "input" else "confirm")
        if self.judge is not None and direction in self.judge_directions and not any(
                h.severity == "high" for h in hits):  # a high rule hit decides alone: no need to ask
            model = self._with_judge(model, views[0], direction)
        return self._decide(model, hits, {i: len(v) for i, v in enumerate(views)}, direction, request)

    def check_messages(self, messages: Sequence[Any]) -> Verdict:
        """Input verdict for a chat: the last user turn, and all system + user text together (its last
        MAX_CONTEXT_CHARS), so a request split over turns is seen; the stronger verdict wins."""
        turns = [(_field(m, "role"), message_text(_field(m, "content"))) for m in messages]
        last_user = next((text for role, text in reversed(turns) if role == "user"), "")
        verdict = self.check(last_user, "input")
        context = [text for role, text in turns if role in ("system", "user") and text.strip()]
        if len(context) > 1:
            joined = self.check("\n".join(context)[-MAX_CONTEXT_CHARS:], "input")
            if _strength(joined) > _strength(verdict):
                verdict = joined
        return verdict

    def redact(self, text: str, keep: Iterable[str] | None = None, kinds: tuple[str, ...] = ("pii", "secret")) -> str:
        """`text` with every PII / secret span whose value is not in `keep` replaced by REDACTED."""
        kept = {canonical(value) for value in keep or ()}
        out, end = [], 0
        for hit in sorted(find_pii(text, kinds), key=lambda h: (h.span[0], -h.span[1])):
            start, stop = hit.span
            if start < end or canonical(text[start:stop]) in kept:
                continue  # overlaps a span already replaced (a card number that also looks like a phone)
            out += [text[end:start], REDACTED]
            end = stop
        return "".join(out) + text[end:]

    def _model_scores(self, views: list[str], semantic: str = "always") -> dict[str, tuple[float, int, str]]:
        """Per code: (max classifier probability over the views, index of the view that gave it, "classifier").

        The classifier's sentence encoder runs on every user input ("always"). Output windows (checked every
        ~200 characters) and retrieved documents (several per request) get it only to confirm a window that
        TF-IDF finds suspicious ("confirm"): an encoder pass costs tens of milliseconds, TF-IDF about one."""
        clf = self.classifier
        if clf is None:
            return {}
        texts = [neutralize(view) for view in views]
        many = getattr(clf, "scores_many", None)
        rows = many(texts, semantic=semantic) if many is not None else [clf.scores(t) for t in texts]
        best: dict[str, tuple[float, int, str]] = {}
        for i, row in enumerate(rows):
            for code, p in row.items():
                if code in CODES and p > best.get(code, (-1.0, 0, ""))[0]:
                    best[code] = (float(p), i, "classifier")
        return best

    def _with_judge(self, model: dict[str, tuple[float, int, str]], text: str,
                    direction: str) -> dict[str, tuple[float, int, str]]:
        """The classifier's scores merged with the judge's, per judge_mode; unchanged when the judge fails."""
        try:
            judged = self.judge.scores(text, direction)
        except GrokstackError as e:
            log.warning("guard judge skipped: %s", e)
            return model
        named = {code: p for code in CODES if (p := judged.get(code, 0.0)) > 0}
        if not named and judged.get("unsafe", 0.0) > 0:  # unsafe, no code named: the classifier's top code
            top = max(model, key=lambda c: model[c][0], default="S2")
            named = {top: judged["unsafe"]}
        if self.judge_mode == "decide":
            return {code: (p, 0, "judge") for code, p in named.items()}
        out = dict(model)
        for code, p in named.items():
            if p > out.get(code, (0.0, 0, ""))[0]:
                out[code] = (p, 0, "judge")
        return out

    def _decide(self, model: dict[str, tuple[float, int, str]], hits: list[Hit], lengths: dict[int, int],
                direction: str, request: Verdict | None = None) -> Verdict:
        scores = dict.fromkeys((*CODES, *SIGNALS), 0.0)
        relaxed = direction == "output" and request is not None and \
            max((request.scores.get(c, 0.0) for c in CODES), default=0.0) < self.profile.output_floor
        rule_best = dict.fromkeys(scores, 0.0)
        for hit in hits:
            rule_best[hit.code] = max(rule_best[hit.code], hit.score)
        high = {hit.code for hit in hits if hit.severity == "high"}
        codes, action, deciding = [], "allow", None
        for code in scores:
            p, view, source = model.get(code, (0.0, 0, ""))
            scores[code] = max(rule_best[code], p)
            if code not in high and not (scores[code] > 0 and scores[code] >= self.profile.threshold(code)):
                continue
            codes.append(code)
            if p >= self.profile.threshold(code) and p > 0:
                hits.append(Hit(code, p, source, "model", (0, lengths.get(view, 0)), view))
            code_action = self.profile.action(code, direction, high=code in high)
            if relaxed and code not in high and rule_best[code] < self.profile.threshold(code):
                code_action = min(code_action, "flag", key=ACTION_RANK.__getitem__)  # model-only, benign request
            key = (ACTION_RANK[code_action], code in high, scores[code])
            if deciding is None or key > deciding[0]:
                deciding, action = (key, code), code_action
        stage = "none"
        if deciding is not None:
            code = deciding[1]
            stage = "rules" if code in high or rule_best[code] >= model.get(code, (0.0,))[0] else model[code][2]
        spans = sorted({h.span for h in hits if h.view == 0 and h.code in codes and h.severity != "model"})
        return Verdict(action != "allow", action, codes, scores, hits, spans, stage, self.version, self.profile.name,
                       direction)


def load_default_classifier() -> Scorer | None:
    """The project's seed-trained classifier, or None (rules only) when its module is not importable."""
    try:
        from .classifier import default_classifier
    except ImportError as e:
        log.warning("guard classifier unavailable (%s): running rules only", e)
        return None
    return default_classifier()


def pii_values(text: str) -> set[str]:
    """Canonical values of the PII and secrets in `text`: pass them as `keep` for the output check."""
    return {canonical(text[h.span[0]:h.span[1]]) for h in find_pii(text)}


def clip(text: str) -> str:
    """`text`, or its first and last MAX_SCAN_CHARS / 2 characters when it is longer."""
    if len(text) <= MAX_SCAN_CHARS:
        return text
    half = MAX_SCAN_CHARS // 2
    return text[:half] + "\n" + text[-half:]


def message_text(content: Any) -> str:
    """Text of an OpenAI-style message content: a string, or a list of parts ({"type": "text", "text": ...})."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list | tuple) else [content]
    texts = [part if isinstance(part, str) else _field(part, "text") for part in parts]
    return "\n".join(t for t in texts if isinstance(t, str))


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def _value(views: list[str], hit: Hit) -> str:
    return views[hit.view][hit.span[0]:hit.span[1]]


def _strength(verdict: Verdict) -> tuple[int, float]:
    return ACTION_RANK[verdict.action], max(verdict.scores.values(), default=0.0)
