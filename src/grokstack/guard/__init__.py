"""Guardrails for grokstack: normalisation, rules, the seed-trained classifier, profiles and streaming checks.

See `../shared/spec/guardrails.md`. Typical use::

    guard = Guard("aup")                       # or Guard(load_profile("my-profile.toml"))
    verdict = guard.check_messages(messages)   # input check of a chat request
    if verdict.action == "block": ...
    stream = StreamGuard(guard, keep=pii_values(last_user_text))

The classifier (`guard.classifier`), the optional LLM judge (`guard.judge`), injection defences
(`guard.injection`) and the audit log (`guard.audit`) are imported from their own modules so that importing
this package stays cheap.
"""

from .check import GUARD_VERSION, MAX_SCAN_CHARS, Guard, Scorer, Verdict, clip, message_text, pii_values
from .normalize import Normalized  # the function `normalize` would shadow its module here: import it from .normalize
from .policy import (
    ACTIONS,
    DEFAULT_PROFILE,
    DIRECTIONS,
    PROFILES,
    CodePolicy,
    Profile,
    StreamSettings,
    load_profile,
)
from .rules import CODES, SIGNALS, Hit, find_hits, iban_ok, luhn_ok
from .stream import StreamGuard

__all__ = [
    "ACTIONS",
    "CODES",
    "DEFAULT_PROFILE",
    "DIRECTIONS",
    "GUARD_VERSION",
    "MAX_SCAN_CHARS",
    "PROFILES",
    "SIGNALS",
    "CodePolicy",
    "Guard",
    "Hit",
    "Normalized",
    "Profile",
    "Scorer",
    "StreamGuard",
    "StreamSettings",
    "Verdict",
    "clip",
    "find_hits",
    "iban_ok",
    "load_profile",
    "luhn_ok",
    "message_text",
    "pii_values",
]
