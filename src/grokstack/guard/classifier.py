"""Stage 3 of the guard: a small TF-IDF + logistic-regression classifier over the Llama Guard codes S1..S14.

Features: word 1-2-grams and char 3-5-grams (FeatureUnion of two TfidfVectorizers). On them, one-vs-rest
logistic regressions: a gate (any code vs safe, over every seed example) and one per code (this code vs the
other codes, over the harmful examples). score[code] = P(unsafe) * P(code | unsafe) / max P(. | unsafe), so
the most likely code carries the gate's probability. Every column is Platt-calibrated on a held-out split
of the seed set, split by seed item (all frames around one item fall on the same side), so the held-out
scores measure generalisation to unseen topics rather than to new wording of a known one. The same held-out
scores set per-code thresholds (`Classifier.thresholds`). Nothing is fitted on evaluation sets.

Training takes seconds and is deterministic. `default_classifier()` caches the trained artefact under
`$GROKSTACK_DATA_DIR/guard/`, keyed by the SHA-256 of the expanded seed set and the scikit-learn version.
Inference gathers a few hundred weight rows: ~0.2 ms per short text.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sklearn
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import FeatureUnion

from grokstack.errors import ConfigError
from grokstack.guard.seed_data import CODES, SEED_DIR, Example, build_examples

ARTEFACT_VERSION = 1  # bump when the pickled layout changes
HOLD_OUT = 5  # one group in HOLD_OUT goes to the held-out split
C_REG = 4.0  # inverse L2 strength; seed texts are short, so a light penalty keeps rare topic words useful
MIN_THRESHOLD, MAX_THRESHOLD = 0.2, 0.9
WINDOW = 400  # characters per window when scoring long texts (seed prompts are far shorter)
SENTENCE_END = re.compile(r"(?<=[.!?:;])\s+|\n\s*\n")


@dataclass
class Classifier:
    vectorizer: FeatureUnion  # fitted; kept for its analyzers, vocabularies and IDF weights
    weights: np.ndarray  # [F, 1 + C] float32: column 0 the unsafe gate, then one column per trained code
    bias: np.ndarray  # [1 + C]
    platt: np.ndarray  # [1 + C, 2]: p = sigmoid(a * z + b) on the raw margin z
    codes: tuple[str, ...]  # trained codes, in column order after the gate
    thresholds: dict[str, float]  # per code, chosen on held-out seed scores
    seed_hash: str
    sklearn_version: str = sklearn.__version__
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # held-out figures per code
    _blocks: list | None = field(default=None, repr=False, compare=False)

    def scores(self, text: str) -> dict[str, float]:
        """Probability-like score per code S1..S14 (0.0 for codes the seed set has no examples of).

        score[c] = P(unsafe) * P(c | unsafe) / max_k P(k | unsafe): the top code carries the gate's
        probability, others in proportion. A long text is also scored window by window and each code
        keeps its maximum, so a request after a page of context is not diluted by the rest.
        """
        p = np.max([self.code_probs(part) for part in windows(text)], axis=0)  # [C]
        s = dict.fromkeys(CODES, 0.0)
        s.update({c: float(v) for c, v in zip(self.codes, p, strict=True)})
        return s

    def scores_many(self, texts: list[str]) -> list[dict[str, float]]:
        return [self.scores(t) for t in texts]

    def unsafe(self, text: str) -> float:
        """The gate alone: probability that the text belongs to any hazard code."""
        return float(max(self.probs(part)[0] for part in windows(text)))

    def flagged_codes(self, text: str) -> list[str]:
        """Codes whose score reaches this classifier's own seed-calibrated threshold."""
        s = self.scores(text)
        return [c for c in self.codes if s[c] >= self.thresholds[c]]

    def code_probs(self, text: str) -> np.ndarray:
        p = self.probs(text)  # [1 + C]
        return compose(p[0], p[1:])

    def probs(self, text: str) -> np.ndarray:
        z = self.margins(text)  # [1 + C]
        return 1.0 / (1.0 + np.exp(-(self.platt[:, 0] * z + self.platt[:, 1])))

    def margins(self, text: str) -> np.ndarray:
        """Raw logistic margins [1 + C] for one text.

        Same numbers as `vectorizer.transform([text]) @ weights + bias`, computed without sklearn's
        per-call validation (which costs milliseconds for a single short text): analyse, look up
        vocabulary ids, sublinear tf x idf, l2-normalise each block, gather weight rows.
        """
        z = self.bias.astype(np.float64)
        for analyze, vocab, idf, offset in self.blocks():
            counts: dict[int, int] = {}
            for gram in analyze(text):
                i = vocab.get(gram)
                if i is not None:
                    counts[i] = counts.get(i, 0) + 1
            if not counts:
                continue
            idx = np.fromiter(counts, dtype=np.int64, count=len(counts))  # [K]
            tf = np.fromiter(counts.values(), dtype=np.float64, count=len(counts))  # [K]
            val = (1.0 + np.log(tf)) * idf[idx]  # [K]
            val /= np.sqrt(np.dot(val, val))
            z = z + val @ self.weights[idx + offset]  # [K] @ [K, 1 + C] -> [1 + C]
        return z

    def blocks(self) -> list:
        """(analyzer, vocabulary, idf, column offset) per FeatureUnion part, built once per process."""
        if self._blocks is None:
            blocks, offset = [], 0
            for _, vec in self.vectorizer.transformer_list:
                blocks.append((vec.build_analyzer(), vec.vocabulary_, vec.idf_.astype(np.float64), offset))
                offset += len(vec.vocabulary_)
            self._blocks = blocks
        return self._blocks

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_blocks"] = None  # analyzers are closures: rebuilt after loading
        return state


def windows(text: str, size: int = WINDOW) -> list[str]:
    """The text itself and, when it is longer than 1.5 windows, every sentence and every pair of adjacent
    sentences (each cut to `size` characters): a one-line request is scored on its own, with a little context.
    """
    if len(text) <= size * 3 // 2:
        return [text]
    units = []
    for sentence in SENTENCE_END.split(text):
        sentence = sentence.strip()
        units += [sentence[i:i + size] for i in range(0, len(sentence), size)] if sentence else []
    pairs = [f"{a} {b}" for a, b in zip(units, units[1:], strict=False)]
    return [text, *units, *pairs]


def seed_examples(seed_dir: Path | None = None) -> list[tuple[str, set[str]]]:
    """The seed set as (text, codes) pairs; an empty set means safe."""
    return [(ex.text, set(ex.codes)) for ex in build_examples(seed_dir)]


def hash_examples(examples: list[Example]) -> str:
    rows = [[ex.text, sorted(ex.codes), ex.group] for ex in examples]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()


def seed_hash(seed_dir: Path | None = None) -> str:
    """SHA-256 of the expanded seed set (texts, labels, groups): changes with the data or the generator."""
    return hash_examples(build_examples(seed_dir))


def make_vectorizer() -> FeatureUnion:
    words = TfidfVectorizer(analyzer="word", ngram_range=(1, 2), lowercase=True, sublinear_tf=True,
                            token_pattern=r"(?u)\b\w+\b", min_df=1, dtype=np.float32)
    chars = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), lowercase=True, sublinear_tf=True,
                            min_df=2, max_features=150_000, dtype=np.float32)
    return FeatureUnion([("words", words), ("chars", chars)])


def fit_logreg(x, y: np.ndarray) -> LogisticRegression:
    # Dual liblinear: with fewer rows than columns it converges in a fraction of the primal's time.
    model = LogisticRegression(C=C_REG, class_weight="balanced", solver="liblinear", dual=True, tol=1e-3,
                               max_iter=1000, random_state=0)
    return model.fit(x, y)


def fit_platt(z: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Sigmoid calibration of held-out margins: a 1-feature logistic regression, lightly regularised."""
    model = LogisticRegression(C=100.0, solver="lbfgs", max_iter=500).fit(z.reshape(-1, 1), y)
    return float(model.coef_[0, 0]), float(model.intercept_[0])


def choose_threshold(p: np.ndarray, y: np.ndarray, safe: np.ndarray) -> float:
    """Threshold maximising F1 of this code against *safe* examples only.

    Examples of other harmful codes are left out: calling a weapons request "violent crime" still blocks it,
    so it should not pull the threshold up.
    """
    keep = y | safe
    p, y = p[keep], y[keep]
    best_t, best_f1 = 0.5, -1.0
    for t in np.linspace(MIN_THRESHOLD, MAX_THRESHOLD, 71):
        pred = p >= t
        tp = int(np.sum(pred & y))
        f1 = 2 * tp / max(1, int(pred.sum()) + int(y.sum()))
        if f1 > best_f1 + 1e-9:
            best_t, best_f1 = float(t), f1
    return round(best_t, 3)


def held_out_mask(groups: list[str]) -> np.ndarray:
    """About 1 in HOLD_OUT groups, chosen by a hash of the group name (stable across runs and edits)."""
    return np.array([hashlib.sha256(g.encode()).digest()[0] % HOLD_OUT == 0 for g in groups])


def compose(gate, cond: np.ndarray) -> np.ndarray:
    """Per-code scores [..., C] from P(unsafe) [...] and P(code | unsafe) [..., C]."""
    cond = np.asarray(cond)
    top = np.maximum(cond.max(axis=-1, keepdims=True), 1e-6)  # [..., 1]
    return np.expand_dims(gate, -1) * cond / top


def train_classifier(examples: list[Example] | None = None, seed_dir: Path | None = None) -> Classifier:
    """Train on the seed set; deterministic (hash-chosen split, liblinear with a fixed random_state).

    Two kinds of one-vs-rest logistic regressions share the features: a gate (any code vs safe, trained
    on every example) and one per code (this code vs other codes, trained on the harmful examples only).
    The gate sees all the data, so the safe/unsafe boundary is learned once from thousands of examples
    instead of fourteen times from a few hundred each.

    1. fit on the groups outside the held-out split, score the held-out groups (unseen topics);
    2. Platt-calibrate every column on those held-out margins; pick per-code thresholds on the
       composed held-out scores;
    3. refit every column on the whole set; calibration and thresholds carry over.
    """
    examples = examples if examples is not None else build_examples(seed_dir)
    texts = [ex.text for ex in examples]
    codes = tuple(c for c in CODES if any(c in ex.codes for ex in examples))
    if not codes:
        raise ConfigError("guard seed set has no harmful examples: nothing to train")
    labels = np.array([[c in ex.codes for c in codes] for ex in examples])  # [N, C] bool
    safe = np.array([not ex.codes for ex in examples])  # [N]
    test = held_out_mask([ex.group for ex in examples])  # [N]
    if not (safe[test].any() and (~safe[test]).any()):
        test = np.zeros_like(test)  # a set too small to split: no held-out calibration

    vectorizer = make_vectorizer()
    x = vectorizer.fit_transform(texts)  # [N, F]; IDF uses no labels, so fitting it on all rows leaks nothing
    for _, vec in vectorizer.transformer_list:
        vec.stop_words_ = None  # the pruned-feature set is only for introspection and bloats the artefact

    # column 0: the gate over all rows; columns 1..C: each code over the harmful rows only
    targets = [(~safe, np.ones_like(safe))] + [(labels[:, j], ~safe) for j in range(len(codes))]
    weights = np.zeros((x.shape[1], len(targets)), dtype=np.float32)
    bias = np.zeros(len(targets), dtype=np.float32)
    platt = np.tile(np.array([1.0, 0.0], dtype=np.float32), (len(targets), 1))
    held_p = np.zeros((int(test.sum()), len(targets)))  # [N_test, 1 + C] calibrated held-out probabilities
    for j, (y, rows) in enumerate(targets):
        fit_rows, eval_rows = rows & ~test, rows & test
        if test.any() and 0 < y[fit_rows].sum() < fit_rows.sum():
            model = fit_logreg(x[fit_rows], y[fit_rows])
            if 0 < y[eval_rows].sum() < eval_rows.sum():
                platt[j] = fit_platt(model.decision_function(x[eval_rows]), y[eval_rows])
            z = model.decision_function(x[test])
            held_p[:, j] = 1.0 / (1.0 + np.exp(-(platt[j, 0] * z + platt[j, 1])))
        if 0 < y[rows].sum() < rows.sum():
            model = fit_logreg(x[rows], y[rows])
            weights[:, j], bias[j] = model.coef_[0], model.intercept_[0]
        else:  # a code present in every harmful row (tiny seed sets): always on once the gate opens
            bias[j] = 10.0 if y[rows].all() else -10.0

    thresholds, metrics = {}, {}
    held_scores = compose(held_p[:, 0], held_p[:, 1:]) if test.any() else None  # [N_test, C]
    for j, code in enumerate(codes):
        y_test = labels[test, j]
        if held_scores is not None and y_test.any():
            thresholds[code] = choose_threshold(held_scores[:, j], y_test, safe[test])
            metrics[code] = held_out_metrics(held_scores[:, j] >= thresholds[code], y_test, safe[test])
        else:
            thresholds[code] = 0.5
    return Classifier(vectorizer, weights, bias, platt, codes, thresholds, hash_examples(examples), metrics=metrics)


def held_out_metrics(pred: np.ndarray, y: np.ndarray, safe: np.ndarray) -> dict[str, float]:
    return {
        "recall": float(np.mean(pred[y])) if y.any() else 0.0,
        "false_positive_rate_on_safe": float(np.mean(pred[safe])) if safe.any() else 0.0,
        "positives": int(y.sum()),
    }


# ---------------- artefact cache ----------------

def data_dir() -> Path:
    return Path(os.environ.get("GROKSTACK_DATA_DIR") or Path.home() / ".local" / "share" / "grokstack")


def artefact_path(seed_digest: str, root: Path | None = None) -> Path:
    root = root or data_dir()
    name = f"classifier-v{ARTEFACT_VERSION}-{seed_digest[:16]}-sklearn{sklearn.__version__}.pkl"
    return root / "guard" / name


def save_classifier(clf: Classifier, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump({"version": ARTEFACT_VERSION, "classifier": clf}, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_classifier(path: Path) -> Classifier | None:
    """The artefact at path, or None when it is missing, unreadable or from another layout/sklearn."""
    try:
        with open(path, "rb") as f:
            blob = pickle.load(f)  # our own cache file, written by save_classifier
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError, TypeError):
        return None
    if not isinstance(blob, dict) or blob.get("version") != ARTEFACT_VERSION:
        return None
    clf = blob.get("classifier")
    if not isinstance(clf, Classifier) or clf.sklearn_version != sklearn.__version__:
        return None
    return clf


def default_classifier(root: Path | None = None, seed_dir: Path | None = None) -> Classifier:
    """The cached classifier for the current seed set, trained and stored first when missing or stale.

    Processes that race to train write the same bytes to the same name; the rename keeps the file whole.
    """
    examples = build_examples(seed_dir or SEED_DIR)
    digest = hash_examples(examples)
    path = artefact_path(digest, root)
    clf = load_classifier(path)
    if clf is not None and clf.seed_hash == digest:
        return clf
    clf = train_classifier(examples)
    with contextlib.suppress(OSError):  # a read-only data dir costs a retrain next time, never a failure
        save_classifier(clf, path)
    return clf
