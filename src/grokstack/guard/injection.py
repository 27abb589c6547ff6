"""Prompt-injection defences that need no model (guardrails.md §5).

- `injection_score`: ingest-side flagging of retrieved text (and the HTML it came from): instruction
  overrides, role/turn forging, special-token texts, exfiltration links, invisible characters, hidden HTML.
  A flag down-ranks or quarantines a document; it never deletes one.
- `filter_links` / `LinkFilter`: the output link filter. Links, bare URLs and images that point outside the
  allowed domains (cited sources + the user's own messages) lose their target; images are dropped. This
  closes the classic exfiltration path (`![x](https://evil.io/?d=<secret>)` fetched by the chat UI).
- `new_canary` / `canary_leaked`: a random token placed in the system prompt; seeing it in output is a leak.

Pattern checks run on the text as an inspector should see it: invisible characters stripped, then NFKC
(so fullwidth `＜｜separator｜＞` or `i\u200bgnore` do not dodge them).
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from urllib.parse import unquote, urlsplit

FLAG_THRESHOLD = 0.5
LINK_REMOVED = "[link removed]"

# Zero-width, bidi controls, word joiners, BOM, soft hyphen, Mongolian vowel separator, tag characters and
# private-use code points: none of them is visible, all of them can hide or split words.
_INVISIBLE = re.compile(
    "[\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff\ue000-\uf8ff"
    "\U000e0000-\U000e007f\U000f0000-\U000ffffd\U00100000-\U0010fffd]"
)
# The subset that ordinary text has no use for. Joiners (emoji, Persian), LRM/RLM (Arabic, Hebrew) and soft
# hyphens (German web text) are common in honest text, so they do not count towards density.
_SUSPICIOUS_INVISIBLE = re.compile(
    "[\u200b\u2060-\u2064\u202a-\u202e\u2066-\u2069\ue000-\uf8ff\U000f0000-\U000ffffd\U00100000-\U0010fffd]"
    "|(?<!^)\ufeff"
)
INVISIBLE_MIN = 4  # at least this many suspicious invisible characters ...
INVISIBLE_RATIO = 0.02  # ... making up at least this share of the text
_TAG_RUN = re.compile("[\U000e0000-\U000e007f]+")
_BLACK_FLAG = "\U0001f3f4"  # subdivision flags (England, Scotland) are this emoji + a short tag run

# (reason, weight, pattern). Weights combine as independent evidence: score = 1 - prod(1 - w).
_RULES: list[tuple[str, float, re.Pattern[str]]] = [
    ("ignore_instructions", 0.9, re.compile(
        r"\b(?:ignore|disregard|forget|override|bypass|skip)\b(?:\s+(?:all|any|the|your|my|of|these|those|every"
        r"|thing|everything))*\s+(?:previous|prior|above|earlier|preceding|former|original|initial|system"
        r"|developer)\s+(?:instructions?|prompts?|rules|directions|directives|guidelines|commands|context"
        r"|messages|orders)\b"
        r"|\b(?:ignore|disregard|forget)\s+(?:all\s+(?:of\s+)?(?:the\s+)?|everything\s+)(?:above|before|prior)\b",
        re.I)),
    ("you_are_now", 0.6, re.compile(
        r"\byou\s+are\s+now\s+(?:DAN\b|(?:in\s+)?[\w-]+\s+mode\b|no\s+longer\b|free\s+(?:from|of)\b"
        r"|unrestricted\b|jailbroken\b|(?:a|an|my|the)\s+(?:[\w-]+\s+){0,3}?(?:AI|assistant|model|chatbot|bot"
        r"|persona|character|agent)\b)"
        r"|\bfrom\s+now\s+on,?\s+you\s+(?:are|will|must|shall)\b",
        re.I)),
    ("you_are_now_weak", 0.25, re.compile(r"\byou\s+are\s+now\s+(?:a|an|the|my)\b", re.I)),
    ("new_instructions", 0.7, re.compile(
        r"\b(?:new|updated|revised|real|actual|secret|hidden)\s+(?:system\s+)?instructions?\s*:", re.I)),
    ("system_prompt", 0.35, re.compile(r"\bsystem\s+prompt\b", re.I)),
    ("prompt_extraction", 0.7, re.compile(
        r"\b(?:reveal|print|repeat|show|output|leak|disclose|tell\s+me)\s+(?:me\s+)?(?:your|the)\s+"
        r"(?:system\s+prompt|initial\s+prompt|hidden\s+instructions|original\s+instructions)\b", re.I)),
    # Grok-2's template uses plain `System:` / `Human:` / `Assistant:` prefixes at line starts.
    ("role_header", 0.6, re.compile(r"^[ \t>*_-]*(?:system|human|assistant)[ \t]*:", re.I | re.M)),
    ("chat_markup", 0.8, re.compile(
        r"^[ \t]*#{2,}[ \t]*(?:instruction|system|response)s?[ \t]*:?[ \t]*$"
        r"|<\|im_(?:start|end)\|>|\[/?INST\]|<</?SYS>>|<(?:start|end)_of_turn>", re.I | re.M)),
    ("special_token", 0.9, re.compile(r"<\|[a-z][a-z0-9_]{1,30}\|>|<(?:eos|bos|endoftext)>", re.I)),
    ("exfil_instruction", 0.7, re.compile(
        r"\b(?:append|add|include|encode|put|insert|embed)\b[^.\n]{0,60}\b(?:conversation|chat\s+history"
        r"|previous\s+messages|user'?s?\s+(?:data|messages?|question|email)|secrets?|passwords?|api\s+keys?"
        r"|system\s+prompt)\b[^.\n]{0,60}\b(?:url|link|image|query\s+string|parameters?)\b", re.I)),
]
_MD_URL = re.compile(r"!?\[[^\]\n]*\]\(\s*<?((?:https?:)?//[^\s)>]+)")
# Data placeholders in a link's path or query: {x}, [X], <x>, $VAR, %7B..., or SHOUTED data words.
_PLACEHOLDER = re.compile(
    r"\{[^}]*\}|\[[^\]]*\]|<[^>]*>|\$\{?[A-Za-z_]\w*|%7B|%5B|%3C"
    r"|\b(?:DATA|SECRETS?|PASSWORDS?|TOKENS?|API_?KEYS?|CONVERSATION|HISTORY|CHAT|MEMORY|SUMMARY|EMAILS?"
    r"|PROMPT|USER_?INPUT|CONTEXT|INFO)\b"
)
HIDDEN_MIN_WORDS = 4  # hidden HTML text shorter than this (a collapsed "Menu") is not evidence


@dataclass
class InjectionFlag:
    flagged: bool
    score: float
    reasons: list[str] = field(default_factory=list)


def strip_invisible(text: str) -> str:
    return _INVISIBLE.sub("", text)


def for_inspection(text: str) -> str:
    """The text a pattern should see: invisible characters removed (so they cannot split words), then NFKC."""
    return unicodedata.normalize("NFKC", strip_invisible(text))


def injection_score(text: str, html: str | None = None, *, threshold: float = FLAG_THRESHOLD) -> InjectionFlag:
    """How much `text` (and the HTML it was extracted from, if given) looks like a prompt-injection attempt.

    `reasons` names each kind of evidence once, in the order found; `flagged` is `score >= threshold`.
    """
    reasons: list[str] = []
    if _dense_invisible(text):
        reasons.append("invisible_chars")
    smuggled = _tag_smuggled(text)
    if smuggled:
        reasons.append("tag_smuggling")
    scanned = [text, smuggled]
    if html:
        hidden, extra = hidden_html_text(html)
        if len(re.findall(r"\w+", hidden)) >= HIDDEN_MIN_WORDS:
            reasons.append("hidden_html")
        if _dense_invisible(html):
            reasons.append("invisible_chars")
        scanned += [hidden, extra]
    inspected = "\n\n".join(for_inspection(t) for t in scanned if t)
    for reason, _, pattern in _RULES:
        if pattern.search(inspected):
            reasons.append(reason)
    if "you_are_now" in reasons and "you_are_now_weak" in reasons:
        reasons.remove("you_are_now_weak")
    if _exfil_link(inspected):
        reasons.append("exfil_link")
    reasons = list(dict.fromkeys(reasons))
    score = _combine(reasons)
    return InjectionFlag(score >= threshold, score, reasons)


_WEIGHTS = {reason: weight for reason, weight, _ in _RULES} | {
    "invisible_chars": 0.6, "tag_smuggling": 0.8, "hidden_html": 0.6, "exfil_link": 0.8,
}


def _combine(reasons: list[str]) -> float:
    keep = 1.0
    for reason in reasons:
        keep *= 1.0 - _WEIGHTS[reason]
    return round(1.0 - keep, 4)


def _dense_invisible(text: str) -> bool:
    if text.isascii():
        return False
    count = len(_SUSPICIOUS_INVISIBLE.findall(text)) + sum(len(run) for run in _foreign_tag_runs(text))
    return count >= INVISIBLE_MIN and count >= INVISIBLE_RATIO * max(len(text), 1)


def _foreign_tag_runs(text: str) -> list[str]:
    """Tag-character runs that are not part of a subdivision-flag emoji."""
    runs: list[str] = []
    if text.isascii():
        return runs
    for m in _TAG_RUN.finditer(text):
        is_flag = m.start() > 0 and text[m.start() - 1] == _BLACK_FLAG and len(m.group()) <= 8
        if not (is_flag and m.group().endswith("\U000e007f")):
            runs.append(m.group())
    return runs


def _tag_smuggled(text: str) -> str:
    """ASCII hidden in tag characters (U+E0020-U+E007E mirror printable ASCII): readable by a model's
    tokenizer, invisible to a person. Returns the decoded text, or '' when there is too little of it."""
    decoded = "".join(
        chr(ord(ch) - 0xE0000) for run in _foreign_tag_runs(text) for ch in run if 0xE0020 <= ord(ch) <= 0xE007E
    )
    return decoded if len(decoded) >= 4 else ""


def _exfil_link(text: str) -> bool:
    for m in _MD_URL.finditer(text):
        url = m.group(1)
        rest = url.split("//", 1)[1]
        tail = rest[len(rest.split("/", 1)[0].split("?", 1)[0]):]  # path + query, without the host
        if _PLACEHOLDER.search(tail) or _PLACEHOLDER.search(unquote(tail)):
            return True
    return False


# ---------------------------------------------------------------------------------------------- hidden HTML

_SKIP_TAGS = frozenset({"script", "style", "template"})
_VOID_TAGS = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source", "track", "wbr"}
)
_TEXT_ATTRS = ("alt", "title", "aria-label", "placeholder")
_NAMED_COLOURS = {
    "white": (255, 255, 255), "black": (0, 0, 0), "red": (255, 0, 0), "green": (0, 128, 0),
    "blue": (0, 0, 255), "yellow": (255, 255, 0), "gray": (128, 128, 128), "grey": (128, 128, 128),
    "silver": (192, 192, 192), "whitesmoke": (245, 245, 245), "snow": (255, 250, 250),
}
_CSS_RULE = re.compile(r"([^{}]+)\{([^{}]*)\}")
_SIMPLE_SELECTOR = re.compile(r"^([a-z][a-z0-9]*)?(?:([.#])([\w-]+))?$", re.I)
_LENGTH = re.compile(r"^(-?[\d.]+)\s*(px|pt|em|rem|%|vw|vh)?$")
PAGE_BACKGROUND = (255, 255, 255, 1.0)  # browsers' default; text of that colour with no background is hidden
PAGE_COLOUR = (0, 0, 0, 1.0)


def _parse_colour(value: str) -> tuple[int, int, int, float] | None:
    value = value.strip().lower()
    if value == "transparent":
        return (0, 0, 0, 0.0)
    if value in _NAMED_COLOURS:
        return (*_NAMED_COLOURS[value], 1.0)
    if value.startswith("#"):
        digits = value[1:]
        if len(digits) in (3, 4):
            digits = "".join(d * 2 for d in digits)
        if len(digits) in (6, 8) and all(c in "0123456789abcdef" for c in digits):
            alpha = int(digits[6:8], 16) / 255 if len(digits) == 8 else 1.0
            return (int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16), alpha)
        return None
    m = re.match(r"rgba?\(([^)]*)\)", value)
    if not m:
        return None
    parts = [p for p in re.split(r"[\s,/]+", m.group(1)) if p]
    if len(parts) not in (3, 4):
        return None
    try:
        rgb = [round(float(p[:-1]) * 2.55) if p.endswith("%") else round(float(p)) for p in parts[:3]]
        alpha = 1.0 if len(parts) == 3 else (float(parts[3][:-1]) / 100 if parts[3].endswith("%") else float(parts[3]))
    except ValueError:
        return None
    return (*rgb, alpha)


def _declarations(style: str) -> dict[str, str]:
    decls = {}
    for part in style.split(";"):
        name, sep, value = part.partition(":")
        if sep:
            decls[name.strip().lower()] = value.replace("!important", "").strip().lower()
    return decls


def _length(value: str) -> tuple[float, str] | None:
    m = _LENGTH.match(value.strip())
    if not m:
        return None
    try:
        return float(m.group(1)), m.group(2) or "px"
    except ValueError:
        return None


def _tiny_font(value: str) -> bool:
    size = _length(value)
    if size is None:
        return False
    number, unit = size
    limit = {"px": 1.0, "pt": 1.0, "em": 0.1, "rem": 0.1, "%": 10.0}.get(unit, 0.0)
    return number <= limit


def _hides(decls: dict[str, str]) -> bool:
    """Whether these declarations alone make an element's text invisible."""
    if decls.get("display") == "none" or decls.get("visibility") in ("hidden", "collapse"):
        return True
    if "font-size" in decls and _tiny_font(decls["font-size"]):
        return True
    opacity = decls.get("opacity")
    if opacity:
        try:
            value = float(opacity[:-1]) / 100 if opacity.endswith("%") else float(opacity)
        except ValueError:
            value = 1.0
        if value <= 0.1:
            return True
    for side in ("left", "top", "text-indent", "margin-left"):
        size = _length(decls.get(side, ""))
        if size and size[0] <= -500:  # pushed off screen
            return True
    if "rect(0" in decls.get("clip", "").replace(" ", "") and decls.get("position") == "absolute":
        return True
    zero_box = any(_length(decls.get(k, "")) == (0.0, "px") for k in ("width", "height", "max-height"))
    return zero_box and decls.get("overflow") == "hidden"


def _background(decls: dict[str, str]) -> tuple[int, int, int, float] | None:
    if "background-color" in decls:
        return _parse_colour(decls["background-color"])
    if "background" in decls:
        first = decls["background"].split()
        return _parse_colour(first[0]) if first else None
    return None


def _same_colour(fg: tuple, bg: tuple) -> bool:
    return fg[3] <= 0.1 or (bg[3] >= 0.9 and max(abs(a - b) for a, b in zip(fg[:3], bg[:3], strict=True)) <= 8)


class _HiddenTextParser(HTMLParser):
    """Collects text a browser would not show (hidden by inline style, `hidden`, simple <style> rules, or
    drawn in the background colour), and text only a machine reads (comments, alt/title attributes)."""

    def __init__(self, css: dict[tuple[str, str, str], dict[str, str]]) -> None:
        super().__init__(convert_charrefs=True)
        self.css = css
        # One frame per open element: (tag, hidden, colour, background).
        self.stack: list[tuple[str, bool, tuple, tuple]] = [("", False, PAGE_COLOUR, PAGE_BACKGROUND)]
        self.skip = 0
        self.hidden: list[str] = []
        self.extra: list[str] = []

    def _style_of(self, tag: str, attrs: dict[str, str]) -> dict[str, str]:
        decls: dict[str, str] = {}
        keys = [(tag, "", "")]
        keys += [(t, ".", c) for c in attrs.get("class", "").split() for t in ("", tag)]
        if attrs.get("id"):
            keys += [(t, "#", attrs["id"]) for t in ("", tag)]
        for key in keys:
            decls.update(self.css.get(key, {}))
        decls.update(_declarations(attrs.get("style", "")))  # inline style wins
        return decls

    def handle_starttag(self, tag: str, attr_list: list[tuple[str, str | None]]) -> None:
        attrs = {k.lower(): v or "" for k, v in attr_list}
        for name in _TEXT_ATTRS:
            if attrs.get(name):
                self.extra.append(attrs[name])
        if tag in _SKIP_TAGS:
            self.skip += 1
            return
        if tag in _VOID_TAGS:
            return
        _, hidden, colour, background = self.stack[-1]
        decls = self._style_of(tag, attrs)
        colour = _parse_colour(decls["color"]) if "color" in decls else colour
        background = _background(decls) or background
        colour = colour or self.stack[-1][2]
        hidden = hidden or "hidden" in attrs or _hides(decls) or _same_colour(colour, background)
        self.stack.append((tag, hidden, colour, background))

    def handle_startendtag(self, tag: str, attr_list: list[tuple[str, str | None]]) -> None:
        for name, value in attr_list:
            if name.lower() in _TEXT_ATTRS and value:
                self.extra.append(value)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS:
            self.skip = max(self.skip - 1, 0)
            return
        for i in range(len(self.stack) - 1, 0, -1):  # close the nearest open one (tolerates sloppy HTML)
            if self.stack[i][0] == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        if not self.skip and self.stack[-1][1] and data.strip():
            self.hidden.append(data.strip())

    def handle_comment(self, data: str) -> None:
        self.extra.append(data)


def _css_rules(html: str) -> dict[tuple[str, str, str], dict[str, str]]:
    """Declarations of simple selectors (`tag`, `.class`, `#id`, `tag.class`) in <style> blocks."""
    rules: dict[tuple[str, str, str], dict[str, str]] = {}
    for block in re.findall(r"<style\b[^>]*>(.*?)</style>", html, re.I | re.S):
        block = re.sub(r"/\*.*?\*/", "", block, flags=re.S)
        for selectors, body in _CSS_RULE.findall(block):
            decls = _declarations(body)
            for selector in selectors.split(","):
                m = _SIMPLE_SELECTOR.match(selector.strip())
                if m and (m.group(1) or m.group(2)):
                    key = ((m.group(1) or "").lower(), m.group(2) or "", m.group(3) or "")
                    rules.setdefault(key, {}).update(decls)
    return rules


def hidden_html_text(html: str) -> tuple[str, str]:
    """(text a browser would hide, text only machines read: comments and alt/title attributes)."""
    parser = _HiddenTextParser(_css_rules(html))
    parser.feed(html)
    parser.close()
    return "\n".join(parser.hidden), "\n".join(parser.extra)


# ---------------------------------------------------------------------------------------------- link filter

_LABEL = r"\[((?:[^\[\]\n\\]|\\.|\n(?![ \t]*\n)|\[[^\[\]]*\])*)\]"
_DEST = r"(<[^<>\n]*>|(?:[^\s()<>\\]|\\.|\((?:[^\s()\\]|\\.)*\))*)"
_TITLE = r"""(?:\s+(?:"[^"\n]*"|'[^'\n]*'|\([^()\n]*\)))?"""
_FETCHING_TAGS = "img|a|iframe|source|video|audio|embed|object|link|form|image|script|frame|input|track"
_LINKS = re.compile(
    rf"(?P<image>!{_LABEL}\(\s*{_DEST}{_TITLE}\s*\))"
    rf"|(?P<link>{_LABEL}\(\s*{_DEST}{_TITLE}\s*\))"
    r"|(?P<auto><(?P<autodest>[a-z][a-z0-9+.-]{1,31}:[^\s<>]*)>)"
    rf"|(?P<tag><(?:{_FETCHING_TAGS})\b[^>]*>)"
    r"|(?P<bare>(?:https?://|(?<![\w.@-])www\.(?=\w))[^\s<>\"'`]*)",
    re.I,
)
_URL_ATTR = re.compile(
    r"""\b(href|src|srcset|action|formaction|data|poster|background|xlink:href)\s*=\s*("[^"]*"|'[^']*'|[^\s>]+)"""
    r"""|url\(\s*['"]?([^'")\s]+)""",
    re.I,
)
_BARE_TRAILING = ".,:;!?*_~'\""
_DOMAIN_WORD = re.compile(r"(?<![\w.-])((?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,24})(?![\w-])", re.I)


def _clean_host(host: str) -> str | None:
    """Lower-case ASCII (punycode) host with no trailing dot; None when it is not a usable host name."""
    host = unicodedata.normalize("NFKC", unquote(host))
    host = host.replace("\u3002", ".").replace("\uff61", ".").lower().rstrip(".")
    if not host or len(host) > 253 or _INVISIBLE.search(host) or any(c.isspace() for c in host):
        return None
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if not re.fullmatch(r"[a-z0-9.:_\[\]-]+", host):
        return None
    return host


def host_of(url: str) -> str | None:
    """The host a browser would contact for `url`; None unless it is an http(s) URL with a host.

    Browsers treat `\\` as `/` and ignore tabs/newlines in URLs, so this does too; the host comes after the
    last `@`, so `https://example.com@evil.io/` is evil.io.
    """
    url = re.sub(r"[\t\n\r]", "", url.strip()).replace("\\", "/")
    if url[:4].lower() == "www.":
        url = "http://" + url
    try:
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https"):
            return None
        host = parts.hostname
    except ValueError:
        return None
    return _clean_host(host) if host else None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _norm_domain(domain: str) -> str | None:
    domain = domain.strip()
    host = host_of(domain) if "://" in domain else _clean_host(domain.split("/", 1)[0].rsplit("@", 1)[-1])
    if host and ":" in host and not _is_ip(host):
        host = host.split(":", 1)[0]  # a port
    return host.removeprefix("www.") if host else None


def _norm_allowed(domains: Iterable[str]) -> frozenset[str]:
    if isinstance(domains, str):
        domains = [domains]
    return frozenset(d for d in map(_norm_domain, domains) if d)


def domain_allowed(host: str | None, allowed: frozenset[str]) -> bool:
    """Exact match, or a subdomain of an allowed name that has a dot (never of a bare TLD or an IP)."""
    if not host:
        return False
    for domain in allowed:
        if host == domain:
            return True
        if "." in domain and not _is_ip(domain) and host.endswith("." + domain):
            return True
    return False


def domains_in(texts: Iterable[str]) -> set[str]:
    """Domains named in user messages or cited source URLs: hosts of URLs plus bare names like `bbc.co.uk`."""
    if isinstance(texts, str):
        texts = [texts]
    found: set[str] = set()
    for text in texts:
        for m in re.finditer(r"(?:https?:|www\.)[^\s<>\"'`()\[\]]*", text, re.I):
            host = host_of(m.group())
            if host:
                found.add(host.removeprefix("www."))
        for m in _DOMAIN_WORD.finditer(text):
            host = _norm_domain(m.group(1))
            if host:
                found.add(host)
    return found


def _trim_bare(url: str) -> str:
    """GFM autolink end: trailing punctuation and unbalanced closing brackets are not part of the URL."""
    while url:
        last = url[-1]
        if last in _BARE_TRAILING or (last == ")" and url.count(")") > url.count("(")) or (
            last == "]" and url.count("]") > url.count("[")
        ):
            url = url[:-1]
        else:
            break
    return url


def _dest(raw: str) -> str:
    return raw[1:-1] if raw.startswith("<") and raw.endswith(">") else raw


def _tag_urls(tag: str) -> list[str]:
    """Every URL an HTML tag would load or link to (all candidates of a srcset, CSS url(...) too)."""
    urls = []
    for name, value, css_url in _URL_ATTR.findall(tag):
        if css_url:
            urls.append(css_url)
            continue
        value = value.strip("'\"").strip()
        if name.lower() == "srcset":
            urls += [part.split()[0] for part in value.split(",") if part.split()]
        else:
            urls.append(value)
    return urls


def _filter(text: str, allowed: frozenset[str], removed: list[str]) -> str:
    def keep(url: str) -> bool:
        if domain_allowed(host_of(url), allowed):
            return True
        removed.append(url)
        return False

    def replace(m: re.Match[str]) -> str:
        if m.group("image") is not None:
            return m.group() if keep(_dest(m.group(3) or "")) else ""
        if m.group("link") is not None:
            label = m.group(5)
            inner = _filter(label, allowed, removed)  # a label can hold an image or a bare URL
            if keep(_dest(m.group(6) or "")):
                return "[" + inner + m.group()[1 + len(label):]
            return inner
        if m.group("auto") is not None:
            return m.group() if keep(m.group("autodest")) else LINK_REMOVED
        if m.group("tag") is not None:
            verdicts = [keep(url) for url in _tag_urls(m.group())]
            return m.group() if all(verdicts) else ""
        url = _trim_bare(m.group("bare"))
        if not url or keep(url):
            return m.group()
        return LINK_REMOVED + m.group("bare")[len(url):]

    return _LINKS.sub(replace, text)


def filter_links(text: str, allowed_domains: Iterable[str]) -> tuple[str, list[str]]:
    """Reduce links outside `allowed_domains` to plain text; returns (text, removed URLs).

    `[t](url)` → `t`; `![a](url)` and `<img src=url>` → dropped; bare URLs and `<url>` → `[link removed]`.
    Subdomains of an allowed domain pass; only http(s) URLs with a host can pass at all (no javascript:,
    data:, mailto: or relative targets).
    """
    removed: list[str] = []
    return _filter(text, _norm_allowed(allowed_domains), removed), removed


# ---------------------------------------------------------------------------------------------- streaming

_URL_START = re.compile(r"https?:|www\.", re.I)
_TAG_NAMES = frozenset(_FETCHING_TAGS.split("|"))
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_WORD = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*")
_NO_SPACE = re.compile(r"[^\s<>]*")
_AUTHORITY = re.compile(r"[^/?#]*[/?#]")
MAX_HOLD = 2048  # characters held back at most while a link might still be forming
SCHEME_TAIL = 8  # a partial "https://" fits in this many characters


def _close_bracket(buf: str, i: int) -> int:
    """Index of the `]` that closes the `[` at i (nesting counted, escapes skipped); -1 when not yet seen."""
    depth, j = 0, i
    while j < len(buf):
        ch = buf[j]
        if ch == "\\":
            j += 2
            continue
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth == 0:
                return j
        j += 1
    return -1


def _close_paren(buf: str, i: int) -> int:
    """Index of the `)` that ends the link destination opened at i; -1 when not yet seen."""
    depth, j, quote = 0, i, ""
    while j < len(buf):
        ch = buf[j]
        if ch == "\\":
            j += 2
            continue
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'" and depth == 1:
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return j
        j += 1
    return -1


def _bracket_end(buf: str, i: int) -> int:
    """End of the markdown link or image whose label opens at i: -1 while it may still grow, i + 1 when
    this `[` can no longer start one."""
    if i > 0 and buf[i - 1] == "\\":
        return i + 1
    j = _close_bracket(buf, i)
    if j == -1:
        return i + 1 if _BLANK_LINE.search(buf, i) else -1
    if j + 1 == len(buf):
        return -1
    if buf[j + 1] != "(":
        return i + 1
    k = _close_paren(buf, j + 1)
    if k == -1:
        return i + 1 if _BLANK_LINE.search(buf, j + 1) else -1
    return k + 1


def _angle_end(buf: str, i: int) -> int:
    """End of the autolink or fetching HTML tag opening at i: -1 while it may still grow, i + 1 when this
    `<` starts neither."""
    m = _WORD.match(buf, i + 1)
    end = m.end() if m else i + 1
    if end == len(buf):
        return -1
    word, after = (m.group().lower() if m else ""), buf[end]
    if word in _TAG_NAMES and (after.isspace() or after in "/>"):
        close = buf.find(">", end)
        return close + 1 if close != -1 else -1
    if word and after == ":":
        rest = _NO_SPACE.match(buf, end).end()
        if rest == len(buf):
            return -1
        return rest + 1 if buf[rest] == ">" else i + 1
    return i + 1


def _spans(buf: str) -> list[tuple[int, int]]:
    """(start, end) of every link-like construct in buf; end is -1 for one that is not complete yet."""
    spans = []
    for i, ch in enumerate(buf):
        end = _bracket_end(buf, i) if ch == "[" else _angle_end(buf, i) if ch == "<" else i + 1
        if end == -1 or end > i + 1:
            spans.append((i, end))
    return spans


def _token_start(buf: str, i: int) -> int:
    """Back up to the start of the whitespace-free run holding i, so no URL is ever cut in two."""
    while i > 0 and not buf[i - 1].isspace():
        i -= 1
    return i


def _safe_cut(buf: str) -> int:
    """The longest prefix that no link, image, tag or URL crosses, however the text goes on."""
    cut = len(buf) if not buf or buf[-1].isspace() else _token_start(buf, len(buf))
    spans = _spans(buf)
    moved = True
    while moved:
        moved = False
        for start, end in spans:
            if start < cut and (end == -1 or end > cut):
                cut, moved = _token_start(buf, start), True
    return cut


class LinkFilter:
    """`filter_links` for a stream of deltas.

    Text is released only up to a point no link can cross: before the final word (a bare URL may still be
    growing) and before any markdown link, image, autolink or tag that is incomplete or spans that point.
    What is held is at most about `max_hold` characters; past that, an open `[` or `<` is escaped so it can
    no longer start a link, and an endless word is released in pieces that never split a URL's host.
    """

    def __init__(self, allowed_domains: Iterable[str], *, max_hold: int = MAX_HOLD) -> None:
        self.allowed = _norm_allowed(allowed_domains)
        self.max_hold = max_hold
        self.removed: list[str] = []
        self._pending = ""

    def feed(self, delta: str) -> str:
        """Filtered text that is safe to send now (possibly ''); the rest is held for later deltas."""
        buf = self._pending + delta
        out = []
        while True:
            cut = _safe_cut(buf)
            if cut > 0 or len(buf) <= self.max_hold:
                break
            buf, released = self._force(buf)  # nothing is safe and too much is held
            out.append(released)
        out.append(_filter(buf[:cut], self.allowed, self.removed))
        self._pending = buf[cut:]
        return "".join(out)

    def finish(self) -> str:
        """The filtered remainder at the end of the stream."""
        text, self._pending = self._pending, ""
        return _filter(text, self.allowed, self.removed)

    def _force(self, buf: str) -> tuple[str, str]:
        """Make progress on a held buffer that starts with something open or an endless word."""
        opened = [start for start, end in _spans(buf) if end == -1]
        if opened:
            i = opened[0]
            escape = "\\[" if buf[i] == "[" else "&lt;"  # now plain text; it cannot start a link later
            return buf[:i] + escape + buf[i + 1:], ""
        starts = [m.start() for m in _URL_START.finditer(buf)]
        if starts and starts[-1] > 0:
            cut = starts[-1]  # keep the last URL whole: its host must not be split
        elif starts:
            authority = _AUTHORITY.match(buf, buf.find(":") + 3 if "://" in buf else 4)
            # With its host complete, the rest of a URL is path; an authority this long is no host at all.
            cut = authority.end() if authority else len(buf)
        else:
            cut = len(buf) - SCHEME_TAIL
        return buf[cut:], _filter(buf[:cut], self.allowed, self.removed)


# ---------------------------------------------------------------------------------------------- canary

_DATAMARK = re.compile(r"ˆ[0-9a-f]{4}")  # search/live.py's per-request whitespace marker


def new_canary() -> str:
    """A token no honest text contains: `gs-canary-` + 16 random hex digits (64 bits)."""
    return f"gs-canary-{secrets.token_hex(8)}"


def _skeleton(text: str) -> str:
    return "".join(ch for ch in for_inspection(text).casefold() if ch.isalnum())


def canary_leaked(text: str, canary: str) -> bool:
    """Whether `canary` (or its random part) appears in `text`, even case-changed or split by whitespace,
    punctuation, invisible characters or datamarks."""
    text = _DATAMARK.sub(" ", text)
    whole = _skeleton(canary)
    secret = _skeleton(canary.rsplit("-", 1)[-1])
    body = _skeleton(text)
    return bool(whole) and (whole in body or (len(secret) >= 8 and secret in body))
