"""Stage 1 of the guard: turn text into views that rules and the classifier can inspect.

`normalize(text)` returns the main view (`.text`) plus extra views (`.decoded`) that undo common evasions.
Both are for inspection only: user text goes to the model unchanged.

Main view: invisible characters removed (zero-width, bidi controls, tag characters, private use), NFKC,
combining marks stacked on Latin letters dropped ("k̶i̶l̶l̶"), typographic quotes/dashes folded, homoglyphs
folded inside words that are Latin or made only of lookalikes ("ѕаrіn" -> "sarin", but "привет" stays),
horizontal whitespace collapsed. Digits are never touched here, so "3 apples" stays "3 apples".

Extra views, added only when they differ from the main view:
- deobfuscated: leetspeak inside words ("k1ll" -> "kill") and spaced-out letters ("s a r i n" -> "sarin");
- text smuggled in Unicode tag characters (U+E0020..U+E007E mirror ASCII);
- base64 / hex / %-encoded spans of >= 16 characters that decode to mostly printable text (two levels deep);
- rot13 of the text when that turns at least three non-words into common English words.
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
from dataclasses import dataclass, field
from urllib.parse import unquote

MAX_DECODED = 8  # extra views per text: each costs one more rules + classifier pass
MIN_ENCODED = 16  # shorter base64/hex runs are mostly ordinary words, ids and hashes

_INVISIBLE = re.compile(
    "[\u00ad\u034f\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff"
    "\ue000-\uf8ff\U000e0000-\U000e007f\U000f0000-\U000ffffd\U00100000-\U0010fffd]"
)
_TAGS = re.compile("[\U000e0020-\U000e007e]+")
_ZALGO = re.compile("(?<=[A-Za-z])[\u0300-\u036f\u0489\u20d0-\u20ff]+")
_SPACES = re.compile(r"[^\S\n]+")

# Typographic punctuation: safe to fold everywhere.
_PUNCT = str.maketrans({"‘": "'", "’": "'", "‚": "'", "‛": "'", "′": "'", "“": '"', "”": '"', "„": '"',
                        "‟": '"', "″": '"', "‐": "-", "‑": "-", "‒": "-", "–": "-", "—": "-", "―": "-", "−": "-"})

# Letters that render like Latin ones (Cyrillic, Greek, Armenian, small capitals). NFKC leaves all of these.
_LOOKALIKES = (
    "аaвbеeёeкkмmнhоoрpсcтtуyхxѕsіiїiјjԁdԛqԝwһhӏlɡgսuցg"
    "АAВBЕEКKМMНHОOРPСCТTХXУYІIЈJЅSԜW"
    "αaοoρpνvτtιiκkυuχxεeΑAΒBΕEΖZΗHΙIΚKΜMΝNΟOΡPΤTΥYΧX"
    "ıiᴀaʙbᴄcᴅdᴇeꜰfɢgʜhɪiᴊjᴋkʟlᴍmɴnᴏoᴘpʀrꜱsᴛtᴜuᴠvᴡwʏyᴢz"
)
_FOLD = str.maketrans(_LOOKALIKES[0::2], _LOOKALIKES[1::2])
_FOLDABLE = frozenset(_LOOKALIKES[0::2])
_WORD = re.compile(r"\w+")

_LEET = str.maketrans("013457", "oieast")
# A digit between letters ("k1ll", "s4r1n"); trailing digits ("python3", "mp3") are names, not disguise.
_LEET_WORD = re.compile(r"\w*[A-Za-z][013457]+[A-Za-z]\w*")
_LEET_HINT = re.compile(r"[A-Za-z][013457]+[A-Za-z]")  # cheaper to search for than _LEET_WORD
_SPACED = re.compile(r"\b(?:[A-Za-z][ .\-_*]){3,}[A-Za-z]\b")

_LONG = re.compile(rf"\S{{{MIN_ENCODED}}}")  # cheap gate: without such a run there is no base64 or hex run
_BASE64 = re.compile(rf"(?<![\w+/=-])[A-Za-z0-9+/_-]{{{MIN_ENCODED},}}={{0,2}}")
_HEX = re.compile(r"(?<![\w])(?:0x)?((?:[0-9a-fA-F]{2}){8,})(?![\w])|((?:\\x[0-9a-fA-F]{2}){8,})"
                  r"|((?:[0-9a-fA-F]{2}[ :]){7,}[0-9a-fA-F]{2})")
_HEX_HINT = re.compile(r"[0-9a-fA-F]{16}|\\x[0-9a-fA-F]{2}|(?:[0-9a-fA-F]{2}[ :]){3}[0-9a-fA-F]{2}")
_PERCENT = re.compile(r"(?:%[0-9a-fA-F]{2}){6,}")

# Common English words (incl. the verbs and nouns of harmful requests) that make a rot13 view worth checking.
_ENGLISH_WORDS = """a an the and or but if of to in on at for with from by as is are was were be been do does did
    have has had i you he she it we they me my your his her our their this that what how why when where who which can
    could would should will shall may might must not no yes all some any make made build get give tell show
    help need want like know write explain step steps way best easy home without someone people person kill
    murder bomb weapon gun poison drug drugs steal hack money child children kid kids sex nude suicide die
    myself yourself instructions recipe synthesize create find address phone number please now here there
    then them him us so just also very into out up down about over after before again more most other
    such only own same than too one two three first new good time day"""
_ENGLISH = frozenset(_ENGLISH_WORDS.split())
_ROT13 = str.maketrans("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
                       "nopqrstuvwxyzabcdefghijklmNOPQRSTUVWXYZABCDEFGHIJKLM")


@dataclass
class Normalized:
    text: str  # main inspection view
    decoded: list[str] = field(default_factory=list)  # extra views (deobfuscated, smuggled, decoded spans)
    invisible: int = 0  # invisible / private-use characters removed (a prompt-injection signal too)

    @property
    def views(self) -> list[str]:
        return [self.text, *self.decoded]


def normalize(text: str) -> Normalized:
    """Main inspection view of `text` plus the decoded views worth inspecting as well."""
    if text.isascii():  # the common case: nothing invisible, smuggled or foldable
        smuggled, stripped = [], text
    else:
        smuggled = ["".join(chr(ord(c) - 0xE0000) for c in run) for run in _TAGS.findall(text)]
        stripped = _INVISIBLE.sub("", text)
    main = clean(stripped, strip_invisible=False)
    views = [deobfuscate(main), *(clean(s) for s in smuggled), *decode_spans(main), rot13_view(main)]
    decoded: list[str] = []
    for view in views:
        if view and view != main and view not in decoded and len(decoded) < MAX_DECODED:
            decoded.append(view)
    return Normalized(main, decoded, len(text) - len(stripped))


def clean(text: str, strip_invisible: bool = True) -> str:
    """Invisible characters off, NFKC, zalgo marks off, punctuation and homoglyphs folded, spaces collapsed."""
    if not text.isascii():
        text = _INVISIBLE.sub("", text) if strip_invisible else text
        text = unicodedata.normalize("NFKC", text)
        text = _ZALGO.sub("", text).translate(_PUNCT)
        text = _WORD.sub(_fold_word, text)
    return _SPACES.sub(" ", text)


def _fold_word(m: re.Match) -> str:
    word = m.group()
    if word.isascii():
        return word
    # Fold when the word already mixes in Latin letters, or consists of lookalikes only.
    if any("a" <= c.lower() <= "z" for c in word) or all(c in _FOLDABLE or not c.isalpha() for c in word):
        return word.translate(_FOLD)
    return word


def deobfuscate(text: str) -> str:
    """Leetspeak digits between letters folded ("k1ll" -> "kill") and spaced-out letters joined ("s a r i n")."""
    text = _SPACED.sub(lambda m: re.sub(r"[ .\-_*]", "", m.group()), text)
    return _LEET_WORD.sub(_unleet, text) if _LEET_HINT.search(text) else text


def _unleet(m: re.Match) -> str:
    word = m.group()
    # Long runs are ids, hashes or base64 and mostly-digit ones are numbers ("sha256"), not disguised words.
    letters = sum(c.isalpha() for c in word)
    return word.translate(_LEET) if len(word) <= 24 and letters > len(word) - letters else word


def decode_spans(text: str, depth: int = 2) -> list[str]:
    """Readable decodings of base64, hex and %-encoded spans, recursing into the results `depth` levels."""
    out: list[str] = []
    hexes = _HEX.finditer(text) if _HEX_HINT.search(text) else ()
    for m in hexes:
        raw = m.group(1) or (m.group(2) or "").replace("\\x", "") or re.sub("[ :]", "", m.group(3) or "")
        _keep_readable(out, _try(binascii.unhexlify, raw))
    for m in _BASE64.finditer(text) if _LONG.search(text) else ():
        span = m.group()
        if re.fullmatch(r"(?:0x)?[0-9a-fA-F]+", span):
            continue  # hex-looking runs were tried above
        span = span.rstrip("=")
        padded = span + "=" * (-len(span) % 4)
        decoder = base64.urlsafe_b64decode if re.search(r"[-_]", span) else base64.b64decode
        _keep_readable(out, _try(decoder, padded))
    for m in _PERCENT.finditer(text) if "%" in text else ():
        _keep_readable(out, unquote(m.group()).encode("utf-8", "replace"))
    if depth > 1:
        out += [inner for s in list(out) for inner in decode_spans(s, depth - 1)]
    return [clean(s) for s in out[:MAX_DECODED]]


def _try(decoder, data: str) -> bytes | None:
    try:
        return decoder(data)
    except (ValueError, binascii.Error):
        return None


def _keep_readable(out: list[str], data: bytes | None) -> None:
    """Append the UTF-8 text of `data` when it is mostly printable letters and spaces."""
    if not data or len(out) >= MAX_DECODED:
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    printable = sum(c.isprintable() or c in "\n\t" for c in text)
    wordy = sum(c.isalpha() or c == " " for c in text)
    if printable >= 0.95 * len(text) and wordy >= 0.6 * len(text):
        out.append(text)


def rot13_view(text: str) -> str:
    """rot13 of `text` when that reveals >= 3 distinct common words that were not words before; '' otherwise."""
    unknown = set(_WORD.findall(text.lower())) - _ENGLISH
    revealed = set(" ".join(unknown).translate(_ROT13).split()) & _ENGLISH
    return text.translate(_ROT13) if len(revealed) >= 3 else ""
