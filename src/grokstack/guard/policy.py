"""Guard profiles: which action each code gets per direction, at which threshold, and how output is streamed.

A profile is a TOML file (stdlib `tomllib`); the four built-in ones live in `guard/profiles/`:

    name = "aup"
    refusal = "Sorry, I can't help with that."   # content of a blocked reply
    default_threshold = 0.5
    output_floor = 0.2                          # optional, see below
    extends = "strict"                          # optional: start from another profile (name or path)

    [stream]
    mode = "buffered"                           # or "optimistic"
    check_every = 200                           # check after this many new characters (or a sentence end)
    window = 600                                # ... on the last this many characters

    [codes]
    S1 = { input = "block", retrieved = "flag", output = "block", threshold = 0.5 }
    S5 = "flag"                                 # same action in all three directions
    S11 = { input = "flag", retrieved = "flag", output = "block", high = "block" }

Actions: block > redact > flag > allow. `high` is the action when a high-severity rule fired (default: the
direction's action). `redact` is only meaningful for S7, `pii` and `secret`. Codes a file leaves out are
`allow` (S4 excepted); use `extends` to tighten or loosen a built-in profile instead of restating it.
S4 (child sexual exploitation) is `block` in every direction of every profile and cannot be changed.

`output_floor` (default 0: off): when the request itself scored below this on every hazard code, an output hit
that only the classifier or judge made (no rule at the threshold) is flagged rather than blocked or redacted.
The seed-trained classifier is fitted on requests and over-fires on answer text it has not seen (reference
docs, tables, logs); a benign request's answer should not be cut off on that alone. Rules still block.
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import ConfigError
from .rules import CODES, SIGNALS

log = logging.getLogger("grokstack.guard")

PROFILES = ("aup", "strict", "permissive", "off")
DEFAULT_PROFILE = "aup"
DIRECTIONS = ("input", "retrieved", "output")
ACTIONS = ("allow", "flag", "redact", "block")  # weakest first
ACTION_RANK = {action: rank for rank, action in enumerate(ACTIONS)}
STREAM_MODES = ("buffered", "optimistic")
REDACTABLE = ("S7", "pii", "secret")
ALWAYS_BLOCKED = "S4"
MAX_S4_THRESHOLD = 0.5  # a profile may make S4 stricter, never (much) laxer
MAX_EXTENDS = 4

_TOP_KEYS = {"name", "description", "refusal", "default_threshold", "output_floor", "extends", "stream", "codes"}
_CODE_KEYS = {*DIRECTIONS, "threshold", "high"}
DEFAULT_REFUSAL = "Sorry, I can't help with that."


@dataclass(frozen=True)
class CodePolicy:
    input: str
    retrieved: str
    output: str
    threshold: float
    high: str | None = None  # action when a high-severity rule fired; None: the direction's action


@dataclass(frozen=True)
class StreamSettings:
    mode: str = "buffered"
    check_every: int = 200
    window: int = 600


@dataclass(frozen=True)
class Profile:
    name: str
    codes: dict[str, CodePolicy]  # every code of CODES + SIGNALS
    stream: StreamSettings
    refusal: str = DEFAULT_REFUSAL
    description: str = ""
    source: str = ""  # file it was read from
    output_floor: float = 0.0  # see the module docstring

    def action(self, code: str, direction: str, high: bool = False) -> str:
        policy = self.codes[code]
        if code == ALWAYS_BLOCKED:
            return "block"
        if high and policy.high is not None:
            return policy.high
        return getattr(policy, direction)

    def threshold(self, code: str) -> float:
        return self.codes[code].threshold


def load_profile(name_or_path: str | Path) -> Profile:
    """A built-in profile by name (`PROFILES`) or a user TOML file by path; ConfigError when invalid."""
    if isinstance(name_or_path, str) and name_or_path in PROFILES:
        return _load_builtin(name_or_path)
    path = Path(name_or_path)
    if not path.is_file():
        raise ConfigError(
            f"unknown guard profile {str(name_or_path)!r}: use one of {', '.join(PROFILES)} or a path to a .toml file"
        )
    return _finish(_read(path, depth=0), str(path))


def _load_builtin(name: str) -> Profile:
    return _finish(_parse(_builtin_text(name), f"<built-in {name}>", Path(), depth=0), f"<built-in {name}>")


def _builtin_text(name: str) -> str:
    return (resources.files("grokstack.guard") / "profiles" / f"{name}.toml").read_text(encoding="utf-8")


def _read(path: Path, depth: int) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"guard profile {path}: cannot read it ({e})") from e
    raw = _parse(text, str(path), path.parent, depth)
    raw.setdefault("name", path.stem)
    return raw


def _parse(text: str, where: str, folder: Path, depth: int) -> dict:
    """Validated settings of one file merged over those of the profile it extends."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"guard profile {where}: not valid TOML ({e})") from e
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"guard profile {where}: unknown key(s) {sorted(unknown)} (use {sorted(_TOP_KEYS)})")
    base: dict = {"codes": {}, "stream": {}}
    if "extends" in data:
        base = _base(data["extends"], where, folder, depth)
    threshold = data.get("default_threshold", base.get("default_threshold", 0.5))
    _check_threshold(threshold, where, "default_threshold")
    floor = data.get("output_floor", base.get("output_floor", 0.0))
    _check_threshold(floor, where, "output_floor")
    codes = dict(base["codes"])
    for code, value in data.get("codes", {}).items():
        codes[code] = _code_policy(code, value, where, threshold)
    stream = {**base["stream"], **_stream(data.get("stream", {}), where)}
    out = {**base, **{k: v for k, v in data.items() if k in ("name", "description", "refusal")}}
    return {**out, "default_threshold": threshold, "output_floor": floor, "codes": codes, "stream": stream}


def _base(extends: object, where: str, folder: Path, depth: int) -> dict:
    if not isinstance(extends, str):
        raise ConfigError(f"guard profile {where}: 'extends' must be a profile name or path, got {extends!r}")
    if depth >= MAX_EXTENDS:
        raise ConfigError(f"guard profile {where}: 'extends' nests deeper than {MAX_EXTENDS} (a cycle?)")
    if extends in PROFILES:
        base = _parse(_builtin_text(extends), f"<built-in {extends}>", Path(), depth + 1)
    else:
        path = folder / extends
        if not path.is_file():
            raise ConfigError(f"guard profile {where}: 'extends' names {extends!r}, which is neither "
                              f"{', '.join(PROFILES)} nor an existing file")
        base = _read(path, depth + 1)
    base.pop("name", None)
    return base


def _code_policy(code: str, value: object, where: str, default_threshold: float) -> CodePolicy:
    if code not in CODES and code not in SIGNALS:
        raise ConfigError(f"guard profile {where}: unknown code {code!r} (known: S1..S14, {', '.join(SIGNALS)})")
    if isinstance(value, str):
        value = dict.fromkeys(DIRECTIONS, value)
    if not isinstance(value, dict):
        raise ConfigError(f"guard profile {where}: {code} must be an action or a table, got {value!r}")
    unknown = set(value) - _CODE_KEYS
    if unknown:
        raise ConfigError(f"guard profile {where}: {code}: unknown key(s) {sorted(unknown)} (use {sorted(_CODE_KEYS)})")
    actions = {d: value.get(d, "allow") for d in DIRECTIONS}
    high = value.get("high")
    for key, action in [*actions.items(), ("high", high)]:
        if action is None:
            continue
        if action not in ACTIONS:
            raise ConfigError(f"guard profile {where}: {code}.{key}: unknown action {action!r} "
                              f"(use {', '.join(reversed(ACTIONS))})")
        if action == "redact" and code not in REDACTABLE:
            raise ConfigError(f"guard profile {where}: {code}.{key}: 'redact' only applies to {', '.join(REDACTABLE)}")
        if code == ALWAYS_BLOCKED and action != "block":
            raise ConfigError(f"guard profile {where}: {code}.{key} = {action!r}: S4 (child sexual exploitation) "
                              "is blocked in every profile and cannot be changed")
    threshold = value.get("threshold", default_threshold)
    _check_threshold(threshold, where, f"{code}.threshold")
    if code == ALWAYS_BLOCKED and threshold > MAX_S4_THRESHOLD:
        raise ConfigError(f"guard profile {where}: S4.threshold may not exceed {MAX_S4_THRESHOLD}, got {threshold}")
    return CodePolicy(**actions, threshold=float(threshold), high=high)


def _check_threshold(value: object, where: str, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"guard profile {where}: {key} must be a number in [0, 1], got {value!r}")


def _stream(value: object, where: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"guard profile {where}: [stream] must be a table")
    unknown = set(value) - {"mode", "check_every", "window"}
    if unknown:
        raise ConfigError(f"guard profile {where}: [stream]: unknown key(s) {sorted(unknown)}")
    if "mode" in value and value["mode"] not in STREAM_MODES:
        raise ConfigError(f"guard profile {where}: stream.mode must be one of {', '.join(STREAM_MODES)}, "
                          f"got {value['mode']!r}")
    for key in ("check_every", "window"):
        if key in value and (isinstance(value[key], bool) or not isinstance(value[key], int) or value[key] < 1):
            raise ConfigError(f"guard profile {where}: stream.{key} must be a positive integer, got {value[key]!r}")
    return dict(value)


def _finish(raw: dict, source: str) -> Profile:
    threshold = min(raw["default_threshold"], MAX_S4_THRESHOLD)
    codes = {code: raw["codes"].get(code) or CodePolicy("allow", "allow", "allow", raw["default_threshold"])
             for code in (*CODES, *SIGNALS)}
    if ALWAYS_BLOCKED not in raw["codes"]:
        codes[ALWAYS_BLOCKED] = CodePolicy("block", "block", "block", threshold)
    stream = StreamSettings(**raw["stream"])
    if stream.window < 2 * stream.check_every:
        raise ConfigError(f"guard profile {source}: stream.window ({stream.window}) must be at least twice "
                          f"stream.check_every ({stream.check_every}) so consecutive windows overlap")
    profile = Profile(raw.get("name", "custom"), codes, stream, raw.get("refusal", DEFAULT_REFUSAL),
                      raw.get("description", ""), source, raw.get("output_floor", 0.0))
    if all(getattr(codes[c], d) == "allow" for c in CODES if c != ALWAYS_BLOCKED for d in DIRECTIONS):
        log.warning(
            "GUARD PROFILE %r ALLOWS EVERY HAZARD EXCEPT S4: content moderation is effectively OFF. "
            "Commercial use of Grok-2 requires compliance with the xAI Acceptable Use Policy.", profile.name
        )
    return profile
