"""Tokenizers behind one interface, the Grok-2 chat template, and streaming detokenisation.

Grok-2: `tokenizer.tok.json` turned into a `tiktoken.Encoding` (spec §7.2). Grok-1: the
SentencePiece `tokenizer.model` (spec §7.1). Neither adds a BOS.
"""

from __future__ import annotations

import codecs
import json
import re
from pathlib import Path

from .errors import TokenizerError

# Grok-2's "V1" split regex (needs the `regex` module's \p classes; tiktoken's engine has them).
V1_PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_NAMED_SPECIAL = re.compile(r"<\|(pad|separator|eos|control\d+|reserved_\d+)\|>")
SEPARATOR = "<|separator|>"
EOS = "<|eos|>"


class Tokenizer:
    """encode / decode / token_bytes / special ids; subclasses fill in the codec."""

    eos_id: int
    stop_ids: frozenset[int]
    special_ids: dict[str, int]
    vocab_size: int

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token adds to streamed text (special and control tokens add none)."""
        raise NotImplementedError

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        raise NotImplementedError

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Token ids in, text out, holding back bytes of an unfinished UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


def _check_roles(messages: list[dict]) -> None:
    if not isinstance(messages, list) or not messages:
        raise TokenizerError("messages must be a non-empty list of {role, content} objects")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise TokenizerError(f"each message needs role system, user or assistant; got {m!r}")
        if not isinstance(m.get("content"), str):
            raise TokenizerError(f"message content must be a string; got {m.get('content')!r}")


class Grok2Tokenizer(Tokenizer):
    """`tokenizer.tok.json` via tiktoken; special texts in prompts map to their ids as in SGLang."""

    ROLE_PREFIX = {"system": "System: ", "user": "Human: ", "assistant": "Assistant: "}

    def __init__(self, path: Path, chat_specials_in_content: bool = False) -> None:
        import tiktoken

        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            regular = {bytes(t["bytes"]): int(t["token"]) for t in data["regular_tokens"]}
            special = {bytes(t["bytes"]).decode("utf-8"): int(t["token"]) for t in data["special_tokens"]}
        except FileNotFoundError:
            raise TokenizerError(f"tokenizer file not found: {path}") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TokenizerError(f"{path} is not a Grok-2 tokenizer.tok.json ({exc})") from None
        if data.get("word_split", "V1") != "V1":
            raise TokenizerError(f"{path}: unsupported word_split {data.get('word_split')!r} (only V1)")
        # default_allowed_special is ignored, as SGLang overwrites it with None.
        try:
            self.enc = tiktoken.Encoding(
                name=Path(path).stem, pat_str=data.get("pat_str") or V1_PAT, mergeable_ranks=regular,
                special_tokens=special,
            )
        except ValueError as exc:
            raise TokenizerError(f"{path}: tiktoken rejected the vocabulary ({exc})") from None
        self.special_ids = special
        self.allowed_special = {s for s in special if _NAMED_SPECIAL.fullmatch(s)}
        self.vocab_size = int(data.get("vocab_size") or self.enc.n_vocab)
        if EOS not in special or SEPARATOR not in special:
            raise TokenizerError(f"{path}: {EOS} and {SEPARATOR} must be special tokens")
        self.eos_id = special[EOS]
        self.separator_id = special[SEPARATOR]
        self.stop_ids = frozenset({self.eos_id, self.separator_id})
        self._special_id_set = set(special.values())
        self.chat_specials_in_content = chat_specials_in_content

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        allowed = self.allowed_special if allow_special else set()
        return self.enc.encode(text, allowed_special=allowed, disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode_bytes(list(ids)).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self._special_id_set:
            return b""
        try:
            return self.enc.decode_single_token_bytes(token_id)
        except KeyError:
            return b""

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Grok-2's template; contents are plain text so they cannot forge turns (spec §8)."""
        _check_roles(messages)
        segments: list[str | int] = []  # text runs and special ids, in order
        for m in messages:
            content = m["content"] if m["role"] == "assistant" else m["content"].strip()
            segments += [self.ROLE_PREFIX[m["role"]] + content, self.separator_id, "\n\n"]
        if add_generation_prompt:
            segments.append("Assistant:")
        ids: list[int] = []
        text = ""
        for seg in segments:  # join neighbouring text so it splits exactly like the rendered string
            if isinstance(seg, str):
                text += seg
                continue
            ids += self.encode(text, allow_special=self.chat_specials_in_content)
            ids.append(seg)
            text = ""
        return ids + self.encode(text, allow_special=self.chat_specials_in_content)


class SentencePieceTokenizer(Tokenizer):
    """Grok-1's `tokenizer.model`; a base model, so chat is the raw text of the messages."""

    def __init__(self, path: Path) -> None:
        import sentencepiece as spm

        if not Path(path).is_file():
            raise TokenizerError(f"tokenizer file not found: {path}")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(str(path))
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(f"{path} is not a SentencePiece model ({exc})") from None
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else 2
        self.stop_ids = frozenset({self.eos_id})
        self.special_ids = {
            self.sp.id_to_piece(i): i
            for i in range(self.vocab_size)
            if self.sp.is_control(i) or self.sp.id_to_piece(i).startswith("<|")
        }

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def token_bytes(self, token_id: int) -> bytes:
        sp = self.sp
        if not 0 <= token_id < self.vocab_size or sp.is_control(token_id):
            return b""
        piece = sp.id_to_piece(token_id)
        if sp.is_byte(token_id):
            return bytes([int(piece[3:5], 16)])
        if sp.is_unknown(token_id):
            return " \u2047 ".encode()
        return piece.replace("\u2581", " ").encode("utf-8")

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        _check_roles(messages)
        return self.encode("\n\n".join(m["content"] for m in messages))


def find_tokenizer_file(folder: Path) -> Path | None:
    for cand in (folder, folder.parent):
        for name in ("tokenizer.tok.json", "tokenizer.model"):
            if (cand / name).is_file():
                return cand / name
    return None


def load_tokenizer(path: Path) -> Tokenizer:
    if path.name.endswith(".tok.json"):
        return Grok2Tokenizer(path)
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    raise TokenizerError(f"unknown tokenizer file {path} (expected tokenizer.tok.json or tokenizer.model)")
