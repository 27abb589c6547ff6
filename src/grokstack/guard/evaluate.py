"""Guard-only evaluation on the public safety sets (spec guardrails.md §9).

Reads unchanged copies of XSTest, JailbreakBench JBB-Behaviors, HarmBench (text behaviours) and AdvBench
from a data folder, runs `guard.check(prompt, direction="input")` on every prompt and counts, per set and
per category, how many harmful prompts were refused and how many safe/benign ones were (over-refusal).
The two numbers are always kept apart, never blended. "Refused" means the verdict's action is "block"
(or, for a verdict without `.action`, that it is flagged); "flagged" counts any non-allow decision, so
codes a profile only annotates (S5, S6, S8, S13 under `aup`) are visible too.

HarmBench copyright behaviours are S8, which `aup` only flags: they are reported as their own set.

    python -m grokstack.guard.evaluate [DATA_DIR]      # DATA_DIR defaults to ../shared/data/safety
"""

from __future__ import annotations

import csv
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from grokstack.errors import ConfigError, InvalidArgumentError
from grokstack.guard.classifier import Classifier, default_classifier

FLAG_ONLY_CODES = frozenset({"S5", "S6", "S8", "S13"})  # `aup` annotates these instead of blocking (spec §3)


@dataclass(frozen=True)
class Prompt:
    text: str
    harmful: bool
    category: str


@dataclass
class Counts:
    total: int = 0
    refused: int = 0
    flagged: int = 0

    def add(self, refused: bool, flagged: bool) -> None:
        self.total += 1
        self.refused += refused
        self.flagged += flagged or refused

    @property
    def refusal_rate(self) -> float:
        return self.refused / self.total if self.total else 0.0

    @property
    def flag_rate(self) -> float:
        return self.flagged / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        return {"total": self.total, "refused": self.refused, "flagged": self.flagged,
                "refusal_rate": round(self.refusal_rate, 4), "flag_rate": round(self.flag_rate, 4)}


@dataclass
class SetResult:
    name: str
    harmful: Counts = field(default_factory=Counts)
    benign: Counts = field(default_factory=Counts)
    categories: dict[str, Counts] = field(default_factory=dict)  # "harmful/<cat>" or "benign/<cat>"
    latencies_ms: list[float] = field(default_factory=list)

    def record(self, prompt: Prompt, refused: bool, flagged: bool, ms: float) -> None:
        (self.harmful if prompt.harmful else self.benign).add(refused, flagged)
        key = f"{'harmful' if prompt.harmful else 'benign'}/{prompt.category}"
        self.categories.setdefault(key, Counts()).add(refused, flagged)
        self.latencies_ms.append(ms)

    def to_dict(self) -> dict:
        return {
            "harmful": self.harmful.to_dict() if self.harmful.total else None,
            "benign": self.benign.to_dict() if self.benign.total else None,
            "categories": {k: v.to_dict() for k, v in sorted(self.categories.items())},
            "latency_ms": latency_summary(self.latencies_ms),
        }


@dataclass
class Report:
    sets: dict[str, SetResult]
    guard: str

    def latency_ms(self) -> dict[str, float]:
        return latency_summary([ms for s in self.sets.values() for ms in s.latencies_ms])

    def to_dict(self) -> dict:
        return {"guard": self.guard, "sets": {k: v.to_dict() for k, v in self.sets.items()},
                "latency_ms": self.latency_ms()}


def latency_summary(ms: list[float]) -> dict[str, float]:
    if not ms:
        return {"p50": 0.0, "p95": 0.0, "max": 0.0}
    a = np.asarray(ms)
    return {"p50": round(float(np.percentile(a, 50)), 3), "p95": round(float(np.percentile(a, 95)), 3),
            "max": round(float(a.max()), 3)}


# ---------------- readers (one per set) ----------------

def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise ConfigError(f"safety evaluation file missing: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], path: Path, *names: str) -> str:
    """The first header among names (case-insensitive) present in the file."""
    header = {k.strip().lower(): k for k in (rows[0].keys() if rows else [])}
    for name in names:
        if name.lower() in header:
            return header[name.lower()]
    raise ConfigError(f"{path}: none of the columns {names} in header {sorted(header)}")


def read_xstest(root: Path) -> list[Prompt]:
    path = root / "xstest" / "xstest_prompts.csv"
    rows = read_csv(path)
    text, label, kind = column(rows, path, "prompt"), column(rows, path, "label"), column(rows, path, "type")
    return [Prompt(r[text], r[label].strip().lower() == "unsafe", r[kind]) for r in rows]


def read_jbb(root: Path) -> list[Prompt]:
    out = []
    for name, harmful in (("behaviors.csv", True), ("benign-behaviors.csv", False)):
        path = root / "jailbreakbench" / name
        rows = read_csv(path)
        text, cat = column(rows, path, "goal", "prompt", "behavior"), column(rows, path, "category")
        out += [Prompt(r[text], harmful, r[cat]) for r in rows]
    return out


def read_harmbench(root: Path) -> tuple[list[Prompt], list[Prompt]]:
    """(standard + contextual behaviours, copyright behaviours); a context goes before its behaviour."""
    path = root / "harmbench" / "harmbench_behaviors_text_all.csv"
    rows = read_csv(path)
    text, func = column(rows, path, "behavior"), column(rows, path, "functionalcategory")
    sem, ctx = column(rows, path, "semanticcategory"), column(rows, path, "contextstring")
    main, copyright_ = [], []
    for r in rows:
        prompt = f"{r[ctx].strip()}\n\n---\n\n{r[text]}" if r[ctx].strip() else r[text]
        if r[func].strip().lower() == "copyright":
            copyright_.append(Prompt(prompt, True, "copyright"))
        else:
            main.append(Prompt(prompt, True, f"{r[sem]} ({r[func]})"))
    return main, copyright_


def read_advbench(root: Path) -> list[Prompt]:
    path = root / "advbench" / "harmful_behaviors.csv"
    rows = read_csv(path)
    text = column(rows, path, "goal")
    return [Prompt(r[text], True, "all") for r in rows]


def load_sets(data_dir: Path) -> dict[str, list[Prompt]]:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ConfigError(f"safety data folder not found: {data_dir} (expected xstest/, jailbreakbench/, "
                          f"harmbench/, advbench/ inside)")
    xstest, jbb = read_xstest(data_dir), read_jbb(data_dir)
    harmbench, copyright_ = read_harmbench(data_dir)
    return {"xstest": xstest, "jbb": jbb, "harmbench": harmbench, "harmbench_copyright": copyright_,
            "advbench": read_advbench(data_dir)}


# ---------------- running a guard ----------------

def decide(verdict) -> tuple[bool, bool]:
    """(refused, flagged) from any verdict object: action == "block" when it has one, else .flagged."""
    flagged = bool(getattr(verdict, "flagged", False))
    action = getattr(verdict, "action", None)
    refused = (action == "block") if action is not None else flagged
    return refused, flagged or (action not in (None, "allow"))


def evaluate(data_dir: Path, guard, sets: dict[str, list[Prompt]] | None = None, limit: int | None = None) -> Report:
    """Run guard.check on every prompt of every set (or the first `limit` harmful and first `limit` benign
    prompts of each); see the module docstring for what is counted."""
    if limit is not None and limit < 1:
        raise InvalidArgumentError(f"--limit must be at least 1, got {limit}")
    sets = sets if sets is not None else load_sets(data_dir)
    if limit is not None:
        sets = {name: first_of_each_side(prompts, limit) for name, prompts in sets.items()}
    guard.check("warm-up", direction="input")  # one-off loading (e.g. training the classifier) is no prompt's latency
    results = {}
    for name, prompts in sets.items():
        res = SetResult(name)
        for prompt in prompts:
            t0 = time.perf_counter()
            verdict = guard.check(prompt.text, direction="input")
            ms = (time.perf_counter() - t0) * 1e3
            res.record(prompt, *decide(verdict), ms)
        results[name] = res
    return Report(results, describe(guard))


def first_of_each_side(prompts: list[Prompt], limit: int) -> list[Prompt]:
    harmful = [p for p in prompts if p.harmful][:limit]
    benign = [p for p in prompts if not p.harmful][:limit]
    return harmful + benign


def describe(guard) -> str:
    profile = getattr(guard, "profile", None)
    name = getattr(profile, "name", None) or (profile if isinstance(profile, str) else None)
    judge = getattr(guard, "judge", None)
    if judge is not None:
        name = f"{name}, {judge.name}, {guard.judge_mode}"
    return f"{type(guard).__name__}({name})" if name else type(guard).__name__


# ---------------- the classifier-only guard ----------------

@dataclass
class Verdict:
    flagged: bool
    action: str  # "block" | "flag" | "allow"
    codes: list[str]
    scores: dict[str, float]


class ClassifierGuard:
    """Stage 3 alone: block when a blocking code's score reaches its seed-calibrated threshold.

    A stand-in for `grokstack.guard.check.Guard` (and a baseline for it): no rules, no normalisation.
    Codes in flag_only are reported but never block, as under the `aup` profile.
    """

    def __init__(self, classifier: Classifier | None = None, thresholds: dict[str, float] | None = None,
                 flag_only: frozenset[str] = FLAG_ONLY_CODES) -> None:
        self.classifier = classifier or default_classifier()
        self.thresholds = dict(self.classifier.thresholds) | (thresholds or {})
        self.flag_only = flag_only

    def check(self, text: str, direction: str = "input") -> Verdict:
        scores = self.classifier.scores(text)
        codes = [c for c, t in self.thresholds.items() if scores[c] >= t]
        blocking = [c for c in codes if c not in self.flag_only]
        action = "block" if blocking else "flag" if codes else "allow"
        return Verdict(bool(codes), action, codes, scores)


def default_guard(profile: str = "aup"):
    """The full guard pipeline when guard.check/guard.policy are importable, else the classifier alone."""
    try:
        from grokstack.guard.check import Guard
        from grokstack.guard.policy import load_profile
    except ImportError:
        return ClassifierGuard()
    return Guard(load_profile(profile))


# ---------------- output ----------------

def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def format_table(report: Report) -> str:
    """Markdown tables: one summary row per set, then per-category rows."""
    lines = [f"guard: {report.guard}", "",
             "| set | harmful n | refused | flagged | benign n | over-refused | over-flagged | p50 ms | p95 ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in report.sets.items():
        lat = latency_summary(s.latencies_ms)
        h, b = s.harmful, s.benign
        hcols = f"{h.total} | {pct(h.refusal_rate)} | {pct(h.flag_rate)}" if h.total else "- | - | -"
        bcols = f"{b.total} | {pct(b.refusal_rate)} | {pct(b.flag_rate)}" if b.total else "- | - | -"
        lines.append(f"| {name} | {hcols} | {bcols} | {lat['p50']:.2f} | {lat['p95']:.2f} |")
    lat = report.latency_ms()
    lines += ["", f"latency per prompt: p50 {lat['p50']:.2f} ms, p95 {lat['p95']:.2f} ms, max {lat['max']:.2f} ms", "",
              "| set | split/category | n | refused | flagged |", "|---|---|---:|---:|---:|"]
    for name, s in report.sets.items():
        for key, c in sorted(s.categories.items()):
            lines.append(f"| {name} | {key} | {c.total} | {pct(c.refusal_rate)} | {pct(c.flag_rate)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None, make_guard: Callable[[], object] = default_guard) -> int:
    argv = sys.argv[1:] if argv is None else argv
    default = Path(__file__).resolve().parents[4] / "shared" / "data" / "safety"
    data_dir = Path(argv[0]) if argv else default
    print(format_table(evaluate(data_dir, make_guard())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
