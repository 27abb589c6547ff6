"""The tokenizer a GGUF carries in its metadata.

`gpt2` vocabularies (byte-level BPE: the bundled SmolLM2, Grok-2 GGUFs) run on the `tokenizers`
library with the pre-tokenizer regexes llama.cpp uses for the file's `tokenizer.ggml.pre`. `llama`
vocabularies (SentencePiece: Grok-1 GGUFs) are rebuilt into a SentencePiece model, so the real
SentencePiece code encodes them.
"""

from __future__ import annotations

import struct
from functools import lru_cache

from ..errors import TokenizerError
from ..tokenizer import V1_PAT, BPETokenizer, SentencePieceTokenizer, Tokenizer
from .gguf import GGUFFile

# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

GPT2_PAT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> (split regexes applied in order, as in llama.cpp's llama-vocab.cpp)
PRE_TOKENIZERS = {
    "default": [GPT2_PAT],
    "gpt2": [GPT2_PAT],
    "gpt-2": [GPT2_PAT],
    "smollm": [r"\p{N}", GPT2_PAT],
    "starcoder": [r"\p{N}", GPT2_PAT],
    "refact": [r"\p{N}", GPT2_PAT],
    "llama-bpe": [LLAMA3_PAT],
    "llama3": [LLAMA3_PAT],
    "smaug-bpe": [LLAMA3_PAT],
    "qwen2": [QWEN2_PAT],
    "grok-2": [V1_PAT],
}


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what byte-level vocabularies store)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def gguf_tokenizer(gf: GGUFFile) -> Tokenizer | None:
    """The file's tokenizer, or None when it carries none (generation then needs token ids)."""
    kind = gf.field("tokenizer.ggml.model")
    if kind is None:
        return None
    if kind == "gpt2":
        return _bpe_tokenizer(gf)
    if kind == "llama":
        return _sentencepiece_tokenizer(gf)
    raise TokenizerError(f"{gf.path}: tokenizer model {kind!r} is not supported (gpt2 BPE and llama SentencePiece)")


def _stop_ids(gf: GGUFFile, eos: int) -> set[int]:
    stops = {eos}
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        if gf.field(key) is not None:
            stops.add(int(gf.field(key)))
    return stops


def _bpe_tokenizer(gf: GGUFFile) -> BPETokenizer:
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers

    tokens: list[str] = gf.field("tokenizer.ggml.tokens") or []
    types: list[int] = gf.field("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in gf.field("tokenizer.ggml.merges") or []]
    pre = str(gf.field("tokenizer.ggml.pre") or "default")
    if not tokens or len(types) != len(tokens):
        raise TokenizerError(f"{gf.path}: tokenizer.ggml.tokens / token_type are missing or differ in length")
    if pre not in PRE_TOKENIZERS:
        raise TokenizerError(
            f"{gf.path}: pre-tokenizer {pre!r} is not supported; known: {', '.join(sorted(PRE_TOKENIZERS))}"
        )
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    backend = Tokenizer(models.BPE(vocab, merges, ignore_merges=pre in ("llama-bpe", "llama3", "smaug-bpe")))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in PRE_TOKENIZERS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    specials = {tokens[i]: i for i, t in enumerate(types) if t == CONTROL}
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    user = [tokens[i] for i, t in enumerate(types) if t == USER_DEFINED]
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

    to_byte = {c: b for b, c in byte_to_unicode().items()}

    def raw(i: int) -> bytes:
        if types[i] in (CONTROL, UNUSED):
            return b""
        if types[i] == USER_DEFINED:
            return tokens[i].encode("utf-8")
        return bytes(to_byte[c] for c in tokens[i] if c in to_byte)

    eos = int(gf.field("tokenizer.ggml.eos_token_id", 0))
    bos = gf.field("tokenizer.ggml.bos_token_id")
    return BPETokenizer(
        backend,
        token_bytes=[raw(i) for i in range(len(tokens))],
        specials=specials,
        eos_id=eos,
        stop_ids=_stop_ids(gf, eos),
        bos_id=None if bos is None else int(bos),
        add_bos=bool(gf.field("tokenizer.ggml.add_bos_token", False)),
        template=gf.field("tokenizer.chat_template"),
        name=gf.path.name,
    )


# ----------------------------------------------------------------------------- SentencePiece
def _sentencepiece_tokenizer(gf: GGUFFile) -> SentencePieceTokenizer:
    tokens: list[str] = gf.field("tokenizer.ggml.tokens") or []
    scores: list[float] = gf.field("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types: list[int] = gf.field("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if not tokens or not len(tokens) == len(scores) == len(types):
        raise TokenizerError(f"{gf.path}: tokenizer.ggml.tokens / scores / token_type are missing or differ")
    proto = sentencepiece_model_proto(
        tokens, scores, types,
        add_dummy_prefix=bool(gf.field("tokenizer.ggml.add_space_prefix", True)),
        ids={k: gf.field(f"tokenizer.ggml.{k}_token_id") for k in ("unknown", "bos", "eos", "padding")},
    )
    return SentencePieceTokenizer(proto, name=gf.path.name)


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1  # negative ids are written as 64-bit two's complement, as protobuf does
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value: int | float | bytes | str) -> bytes:
    """One protobuf field: varint (int/bool), fixed32 (float) or length-delimited (bytes/str)."""
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, (bytes, str)):
        data = value.encode("utf-8") if isinstance(value, str) else value
        return _varint(number << 3 | 2) + _varint(len(data)) + data
    return _varint(number << 3) + _varint(int(value))


def sentencepiece_model_proto(
    tokens: list[str], scores: list[float], types: list[int], add_dummy_prefix: bool, ids: dict
) -> bytes:
    """A serialized `sentencepiece.ModelProto` (BPE, identity normaliser) for a GGUF vocabulary.

    Field numbers follow sentencepiece_model.proto: pieces=1 {piece=1, score=2, type=3},
    trainer_spec=2 {model_type=3, vocab_size=4, byte_fallback=35, unk/bos/eos/pad_id=40..43},
    normalizer_spec=3 {name=1, add_dummy_prefix=3, remove_extra_whitespaces=4, escape_whitespaces=5}.
    """
    out = bytearray()
    for tok, score, kind in zip(tokens, scores, types, strict=True):
        kind = kind if kind in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE) else NORMAL
        out += _field(1, _field(1, tok) + _field(2, float(score)) + _field(3, kind))

    def tid(key: str) -> int:
        return -1 if ids.get(key) is None else int(ids[key])

    trainer = _field(3, 2) + _field(4, len(tokens)) + _field(35, BYTE in types)
    trainer += _field(40, tid("unknown")) + _field(41, tid("bos")) + _field(42, tid("eos")) + _field(43, tid("padding"))
    normalizer = _field(1, "identity") + _field(3, add_dummy_prefix) + _field(4, False) + _field(5, True)
    out += _field(2, trainer) + _field(3, normalizer)
    return bytes(out)
