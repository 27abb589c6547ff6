"""The guard classifier's seed set: hand-written lines plus templates expanded with a fixed seed.

Everything lives as plain text in `guard/seed/` (see the header of each file). A *family* pairs a file of
items ("CODES | phrase") with a file of frames ("Write a tutorial on how to {act}."); every item is wrapped
in `per_item` frames drawn with a random generator seeded by the item itself, so adding one line never
changes the expansion of another. Benign and harmful items share frames, so the request frame alone never
decides the label; what the request is *about* does.

The set was written for grokstack from general knowledge of the hazard categories; it is not derived from
any evaluation set (tests check that it shares no normalised prompt with them).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from grokstack.errors import ConfigError
from grokstack.guard.rules import CODES

SEED_DIR = Path(__file__).with_name("seed")
SLOT = re.compile(r"\{(\w+)\}")
SLOT_COPIES = 4  # a hand-written line holding {slots} is expanded this many times


@dataclass(frozen=True)
class Example:
    text: str
    codes: frozenset[str]  # empty = safe
    group: str  # expansions of one item share a group, so a held-out split never sees its siblings


@dataclass(frozen=True)
class Family:
    items: str  # file of "CODES | phrase" lines (bare phrases allowed when label == "safe")
    frames: str  # file of templates holding {key}
    key: str
    label: str  # "item": the item's codes; "safe": every expansion safe; "contrast": harmful items only, as safe
    per_item: int


FAMILIES = (
    Family("acts.txt", "frames_act.txt", "act", "item", 5),
    Family("acts.txt", "frames_short.txt", "act", "item", 2),
    Family("programs.txt", "frames_program.txt", "prog", "item", 5),
    Family("contents.txt", "frames_content.txt", "content", "item", 5),
    Family("claims.txt", "frames_claim.txt", "claim", "item", 5),
    Family("claims.txt", "frames_claim_benign.txt", "claim", "contrast", 2),
    Family("crimes.txt", "frames_crime_harmful.txt", "t", "item", 4),
    Family("crimes.txt", "frames_crime_benign.txt", "t", "safe", 6),
    Family("substances.txt", "frames_substance_harmful.txt", "t", "item", 4),
    Family("substances.txt", "frames_substance_benign.txt", "t", "safe", 5),
    Family("terms.txt", "frames_define.txt", "t", "safe", 4),
    Family("events.txt", "frames_history.txt", "t", "safe", 3),
)
SENTENCE_FILES = ("sentences_harmful.txt", "sentences_safe.txt")
# Answer-like texts (the guard checks model output with the same classifier): safe ones may hold "|" (tables),
# so that file has no "CODES |" prefix; a literal \n in either file is a line break. Both files are optional.
ANSWER_FILES = {"answers_safe.txt": False, "answers_harmful.txt": True}  # name: lines carry "CODES |"


def read_lines(path: Path) -> list[str]:
    """Non-blank lines that are not comments."""
    if not path.is_file():
        raise ConfigError(f"guard seed file missing: {path}")
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def parse_codes(field: str, where: str) -> frozenset[str]:
    field = field.strip()
    if field == "safe":
        return frozenset()
    codes = frozenset(c.strip() for c in field.split(","))
    unknown = codes - set(CODES)
    if unknown:
        raise ConfigError(f"{where}: unknown codes {sorted(unknown)} (use 'safe' or S1..S14)")
    return codes


def read_items(path: Path) -> list[tuple[frozenset[str] | None, str]]:
    """(codes or None when the line has no "CODES |" prefix, phrase) per line."""
    items = []
    for n, line in enumerate(read_lines(path), 1):
        if "|" in line:
            field, phrase = line.split("|", 1)
            items.append((parse_codes(field, f"{path.name}:{n}"), phrase.strip()))
        else:
            items.append((None, line))
    return items


def read_slots(seed_dir: Path) -> dict[str, list[str]]:
    slots: dict[str, list[str]] = {}
    current = None
    for line in read_lines(seed_dir / "slots.txt"):
        if line.startswith("[") and line.endswith("]"):
            current = slots.setdefault(line[1:-1], [])
        elif current is None:
            raise ConfigError(f"{seed_dir / 'slots.txt'}: value {line!r} before any [section]")
        else:
            current.append(line)
    return slots


def fill(template: str, values: dict[str, str], slots: dict[str, list[str]], rng: random.Random) -> str:
    """Replace {key} by values[key], other {slot}s by a draw from the slot list; tidy articles and case."""

    def pick(m: re.Match) -> str:
        name = m.group(1)
        if name in values:
            return values[name]
        if name not in slots:
            raise ConfigError(f"guard seed: unknown slot {{{name}}} in {template!r}")
        return rng.choice(slots[name])

    text = SLOT.sub(pick, template)
    while SLOT.search(text):  # an inserted value may hold slots of its own ({person} inside an act)
        text = SLOT.sub(pick, text)
    text = re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", text)  # "a essay" -> "an essay"
    return text[0].upper() + text[1:]


def expand_family(family: Family, seed_dir: Path, slots: dict[str, list[str]]) -> list[Example]:
    frames = read_lines(seed_dir / family.frames)
    items = read_items(seed_dir / family.items)
    if family.label == "item" and any(codes is None for codes, _ in items):
        raise ConfigError(f"{family.items}: every line needs a 'CODES |' prefix")
    counts = frames_per_item(family, items, len(frames))
    out = []
    for codes, phrase in items:
        if family.label == "contrast" and not codes:
            continue  # benign frames around a safe item could flip its meaning ("debunk: vaccines are safe")
        label = codes if family.label == "item" else frozenset()
        rng = random.Random(f"{family.items}|{family.frames}|{phrase}")  # str seeds are stable across runs
        for frame in rng.sample(frames, counts[bool(label)]):
            out.append(Example(fill(frame, {family.key: phrase}, slots, rng), label, f"{family.items}|{phrase}"))
    return out


def frames_per_item(family: Family, items: list, n_frames: int) -> dict[bool, int]:
    """Frames per harmful/safe item, scaled so both sides of a family get about as many expansions.

    Otherwise a family with more harmful than safe items would teach that its frame words ("Write an
    op-ed that ...") mean harm.
    """
    n = min(family.per_item, n_frames)
    if family.label != "item":
        return {False: n, True: n}
    harmful = sum(1 for codes, _ in items if codes)
    safe = len(items) - harmful
    if not harmful or not safe:
        return {False: n, True: n}
    if harmful > safe:
        return {True: n, False: max(1, min(n_frames, round(n * harmful / safe)))}
    return {False: n, True: max(1, min(n_frames, round(n * safe / harmful)))}


def expand_sentences(name: str, seed_dir: Path, slots: dict[str, list[str]]) -> list[Example]:
    out = []
    for codes, line in read_items(seed_dir / name):
        label = codes if codes is not None else frozenset()
        rng = random.Random(f"{name}|{line}")
        copies = SLOT_COPIES if SLOT.search(line) else 1
        out.extend(Example(fill(line, {}, slots, rng), label, f"{name}|{line}") for _ in range(copies))
    return out


def expand_answers(name: str, labelled: bool, seed_dir: Path, slots: dict[str, list[str]]) -> list[Example]:
    items = read_items(seed_dir / name) if labelled else [(frozenset(), line) for line in read_lines(seed_dir / name)]
    if labelled and any(codes is None for codes, _ in items):
        raise ConfigError(f"{name}: every line needs a 'CODES |' prefix")
    out = []
    for codes, line in items:
        rng = random.Random(f"{name}|{line}")
        copies = SLOT_COPIES if SLOT.search(line) else 1
        text = line.replace("\\n", "\n")
        out.extend(Example(fill(text, {}, slots, rng), codes, f"{name}|{line}") for _ in range(copies))
    return out


def normalise(text: str) -> str:
    """Casefold, drop punctuation, collapse whitespace: the key for duplicate and overlap checks."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def build_examples(seed_dir: Path | None = None) -> list[Example]:
    """The whole seed set, deduplicated by normalised text, in a fixed order."""
    seed_dir = seed_dir or SEED_DIR
    slots = read_slots(seed_dir)
    raw = [ex for fam in FAMILIES for ex in expand_family(fam, seed_dir, slots)]
    raw += [ex for name in SENTENCE_FILES for ex in expand_sentences(name, seed_dir, slots)]
    raw += [ex for name, labelled in ANSWER_FILES.items() if (seed_dir / name).is_file()
            for ex in expand_answers(name, labelled, seed_dir, slots)]
    seen: dict[str, Example] = {}
    for ex in raw:
        key = normalise(ex.text)
        old = seen.get(key)
        if old is None:
            seen[key] = ex
        elif bool(old.codes) != bool(ex.codes):
            raise ConfigError(f"guard seed: {ex.text!r} is labelled both safe and {sorted(old.codes | ex.codes)}")
    return list(seen.values())
