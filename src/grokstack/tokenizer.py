"""Tokenizers behind one interface, the Grok-2 chat template, and streaming detokenisation.

Grok-2: `tokenizer.tok.json` turned into a `tiktoken.Encoding` (spec §7.2). Grok-1: the
SentencePiece `tokenizer.model` (spec §7.1). Neither adds a BOS. GGUF vocabularies (the bundled
default model, community Grok quants): `BPETokenizer`, built by `loading.gguf_vocab`.
"""

from __future__ import annotations

import codecs
import json
import re
from pathlib import Path

from . import chat_template
from .errors import TokenizerError

# Grok-2's "V1" split regex (needs the `regex` module's \p classes; tiktoken's engine has them).
V1_PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_NAMED_SPECIAL = re.compile(r"<\|(pad|separator|eos|control\d+|reserved_\d+)\|>")
SEPARATOR = "<|separator|>"
EOS = "<|eos|>"
# Grok-2's chat format as a Jinja template, for clients that render prompts themselves (lm-eval reads it
# from /tokenizer_info); `Grok2Tokenizer.chat_ids` builds the same ids without rendering text.
GROK2_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ 'System: ' + m['content'] | trim + '<|separator|>\n\n' }}"
    "{% elif m['role'] == 'user' %}{{ 'Human: ' + m['content'] | trim + '<|separator|>\n\n' }}"
    "{% else %}{{ 'Assistant: ' + m['content'] + '<|separator|>\n\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


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
    template = GROK2_CHAT_TEMPLATE

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
        """Text of the ids, special tokens included; ids the vocabulary lacks (a padded embedding) add nothing."""
        out = b"".join(self._piece(i) for i in ids)
        return out.decode("utf-8", errors="replace")

    def _piece(self, token_id: int) -> bytes:
        try:
            return self.enc.decode_single_token_bytes(token_id)
        except KeyError:
            return b""

    def token_bytes(self, token_id: int) -> bytes:
        return b"" if token_id in self._special_id_set else self._piece(token_id)

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

    def __init__(self, source: Path | bytes, name: str | None = None) -> None:
        """`source`: a `tokenizer.model` file, or a serialized ModelProto (built from a GGUF)."""
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        name = name or str(source)
        try:
            if isinstance(source, bytes):
                self.sp.load_from_serialized_proto(source)
            elif not Path(source).is_file():
                raise TokenizerError(f"tokenizer file not found: {source}")
            else:
                self.sp.load(str(source))
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(f"{name} is not a SentencePiece model ({exc})") from None
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
        return self.sp.decode([i for i in ids if 0 <= i < self.vocab_size])

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


class BPETokenizer(Tokenizer):
    """A vocabulary run by the `tokenizers` library, chatting through the model's own Jinja template.

    `token_bytes` gives each id's bytes (built by whoever knows the vocabulary's byte mapping);
    `specials` are control tokens: matched in template text, plain text inside message contents.
    """

    def __init__(
        self,
        backend,
        *,
        token_bytes: list[bytes],
        specials: dict[str, int],
        eos_id: int,
        stop_ids: set[int],
        bos_id: int | None = None,
        add_bos: bool = False,
        template: str | None = None,
        name: str = "gguf",
    ) -> None:
        self.backend = backend
        self.plain = backend.__class__.from_str(backend.to_str())
        self.plain.encode_special_tokens = True  # special texts stay text
        self._bytes = token_bytes
        self.special_ids = dict(specials)
        self._special_text = {i: text for text, i in specials.items()}
        self.vocab_size = len(token_bytes)
        self.eos_id = eos_id
        self.stop_ids = frozenset(stop_ids)
        self.bos_id = bos_id
        self.add_bos = add_bos and bos_id is not None
        self.template = template
        self.name = name
        pattern = "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))
        self._special_re = re.compile(f"({pattern})") if specials else None

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        ids = (self.backend if allow_special else self.plain).encode(text, add_special_tokens=False).ids
        return self._with_bos(ids)

    def _with_bos(self, ids: list[int]) -> list[int]:
        if self.add_bos and (not ids or ids[0] != self.bos_id):
            return [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        out = b"".join(self._special_text[i].encode() if i in self._special_text else self.token_bytes(i)
                       for i in ids)
        return out.decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self._special_text or not 0 <= token_id < len(self._bytes):
            return b""
        return self._bytes[token_id]

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The model's template; specials in the template become ids, contents are encoded as text."""
        _check_roles(messages)
        if not self.template:
            raise TokenizerError(f"{self.name} has no chat template (tokenizer.chat_template); use plain generate")
        tokens = {
            "bos_token": self._text_of(self.bos_id),
            "eos_token": self._text_of(self.eos_id),
        }
        segments = chat_template.render_segments(self.template, messages, add_generation_prompt, **tokens)
        ids: list[int] = []
        text = ""  # plain text between specials, joined so it splits exactly like the rendered string
        for seg, is_content in segments:
            pieces = [seg] if is_content or self._special_re is None else self._special_re.split(seg)
            for k, piece in enumerate(pieces):
                if k % 2 == 0:
                    text += piece
                    continue
                ids += self.plain.encode(text, add_special_tokens=False).ids
                ids.append(self.special_ids[piece])
                text = ""
        ids += self.plain.encode(text, add_special_tokens=False).ids
        return self._with_bos(ids)

    def _text_of(self, token_id: int | None) -> str:
        if token_id is None:
            return ""
        if token_id in self._special_text:
            return self._special_text[token_id]
        return self.token_bytes(token_id).decode("utf-8", errors="replace")


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
