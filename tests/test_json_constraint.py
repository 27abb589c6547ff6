"""JsonObjectConstraint: the JSON grammar byte by byte, random objects split at random points, a
differential check against json.loads, and sampling through generate.Sequence."""

from __future__ import annotations

import json
import random

import pytest
import torch

from grokstack.errors import InvalidArgumentError
from grokstack.generate import Sequence
from grokstack.json_constraint import JsonObjectConstraint
from grokstack.sampling import SamplingParams


class Vocab:
    """A fake vocabulary that hands out an id for any byte string it is asked about; id 0 adds no bytes."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = [b""]
        self.ids: dict[bytes, int] = {b"": 0}

    def id(self, piece: bytes) -> int:
        if piece not in self.ids:
            self.ids[piece] = len(self.pieces)
            self.pieces.append(piece)
        return self.ids[piece]

    def token_bytes(self, token_id: int) -> bytes:
        return self.pieces[token_id]


EMPTY = 0


def make(vocab: Vocab, **kwargs) -> JsonObjectConstraint:
    return JsonObjectConstraint(vocab.token_bytes, **kwargs)


def feed(pieces: list[bytes], **kwargs) -> tuple[JsonObjectConstraint, int | None]:
    """Offer the pieces in order; return the constraint and the index of the first one refused (or None)."""
    vocab = Vocab()
    constraint = make(vocab, **kwargs)
    for i, piece in enumerate(pieces):
        tid = vocab.id(piece)
        if not constraint.allows(tid, False):
            return constraint, i
        constraint.advance(tid)
    return constraint, None


def bytewise(text: bytes) -> list[bytes]:
    return [bytes([b]) for b in text]


def accepts(text: bytes, **kwargs) -> bool:
    constraint, refused = feed([text], **kwargs)
    return refused is None and constraint.complete


SAMPLE = '{"a": [1, -2.5e3, true, null, "x\\u00e9", "é€😀"], "b": {"c": false, "d": 0.5E-7}}'.encode()

ODD_SPLITS = [
    b'{"',
    b'a": [',
    b"1, -",
    b"2.",
    b"5e",
    b"3, tr",
    b"ue, nul",
    b'l, "x\\',  # a \u escape split after its backslash ...
    b"u00",  # ... and in the middle of its hex digits
    b'e9", "',
    b"\xc3",  # é split between its two bytes
    b"\xa9\xe2\x82",  # € split after two of its three bytes
    b"\xac\xf0\x9f",  # 😀 split after two of its four bytes
    b"\x98",
    b'\x80"], "b": {"c": f',
    b'alse, "d": 0',
    b".5E",
    b"-7",
    b"}",
    b"}",
]


# --- the grammar, token by token


def test_odd_splits_are_accepted_and_complete_only_at_the_end():
    assert b"".join(ODD_SPLITS) == SAMPLE
    vocab = Vocab()
    constraint = make(vocab)
    for i, piece in enumerate(ODD_SPLITS):
        assert not constraint.complete
        assert constraint.allows(vocab.id(piece), False), (i, piece)
        constraint.advance(vocab.id(piece))
    assert constraint.complete
    assert json.loads(SAMPLE)["a"][4] == "xé"


@pytest.mark.parametrize("split", ["whole", "bytewise"])
def test_sample_is_accepted_whole_and_byte_by_byte(split):
    constraint, refused = feed([SAMPLE] if split == "whole" else bytewise(SAMPLE))
    assert refused is None and constraint.complete


@pytest.mark.parametrize(
    "text",
    [
        b"{}",
        b" \t\r\n{}",
        b'{"": ""}',
        b'{"a": {}, "b": [], "c": [[]], "d": [{}]}',
        b'{"n": [0, -0, 10, -10, 0.0, 1.25, 1e5, 1E+5, 1e-5, -0.5e+10, 123456789012345678901234567890]}',
        b'{"s": "\\"\\\\\\/\\b\\f\\n\\r\\t\\u0000\\uD83D\\uDE00\\uabcd"}',
        b'{"s": "\x7f \xc2\x80 \xdf\xbf \xe0\xa0\x80 \xef\xbf\xbf \xf0\x90\x80\x80 \xf4\x8f\xbf\xbf"}',
        b'{"a" : 1 , "b" :\n[ true ,false,null ] }',
        b'{"a":1,"a":2}',
    ],
)
def test_valid_objects_are_accepted(text):
    assert accepts(text)
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize(
    ("text", "at"),
    [
        (b"[1]", 0),  # the top-level value must be an object
        (b"1", 0),
        (b'"s"', 0),
        (b"true", 0),
        (b"\xef\xbb\xbf{}", 0),  # no byte order mark
        (b'{"a": 1,}', 8),  # trailing comma
        (b'{"a": [1,]}', 9),
        (b'{"a": [,]}', 7),
        (b"{,}", 1),
        (b'{"a": 01}', 7),  # leading zero
        (b'{"a": -01}', 8),
        (b'{"a": 1.}', 8),  # fraction without digits
        (b'{"a": .5}', 6),
        (b'{"a": +1}', 6),
        (b'{"a": -}', 7),
        (b'{"a": 1e}', 8),
        (b'{"a": 1e+}', 9),
        (b'{"a": 1.5.2}', 9),
        (b'{"a": 1ee2}', 8),
        (b'{"a": tru e}', 9),  # a literal cannot be split by whitespace
        (b'{"a": True}', 6),
        (b'{"a": NaN}', 6),
        (b'{"a": nul}', 9),
        (b'{"a": "x\x01"}', 8),  # unescaped control character
        (b'{"a": "x\n"}', 8),
        (b'{"a\x1f": 1}', 3),
        (b'{"a": "\\x"}', 8),  # invalid escape
        (b'{"a": "\\U0041"}', 8),
        (b'{"a": "\\u12g4"}', 11),
        (b'{"a": "\xff"}', 7),  # never valid in UTF-8
        (b'{"a": "\x80"}', 7),  # a continuation byte without a lead
        (b'{"a": "\xc0\x80"}', 7),  # overlong lead
        (b'{"a": "\xc3("}', 8),  # lead without its continuation
        (b'{"a": "\xe0\x80\x80"}', 8),  # overlong three-byte form
        (b'{"a": "\xed\xa0\x80"}', 8),  # a UTF-16 surrogate
        (b'{"a": "\xf4\x90\x80\x80"}', 8),  # above U+10FFFF
        (b'{"a": "\xf5\x80\x80\x80"}', 7),
        (b'{"a": \xc3\xa9}', 6),  # non-ASCII outside strings
        (b'{"a":\x00}', 5),
        (b"{a: 1}", 1),  # unquoted key
        (b"{1: 2}", 1),
        (b'{"a" 1}', 5),  # missing colon
        (b'{"a": 1 "b": 2}', 8),  # missing comma
        (b'{"a": [1}', 8),  # mismatched brackets
        (b'{"a": 1]}', 7),
        (b"{}}", 2),  # nothing after the object
        (b"{} ", 2),
        (b"{}{}", 2),
    ],
)
def test_invalid_json_is_refused_at_the_first_bad_byte(text, at):
    _, refused = feed(bytewise(text))
    assert refused == at
    assert not accepts(text)


def test_depth_limit():
    assert accepts(b'{"a": [{}]}', max_depth=3)
    _, refused = feed(bytewise(b'{"a": [{"b": []}]}'), max_depth=3)
    assert refused == 13
    assert accepts(b'{"a":' + b"[" * 63 + b"]" * 63 + b"}")  # 64 levels: the default limit
    _, refused = feed([b'{"a":' + b"[" * 63, b"["])
    assert refused == 1


def test_whitespace_run_limit():
    assert accepts(b'    {    "a"    :    1    }', max_whitespace_run=4)
    assert accepts(b'{"a": \n\t\r[ \n \n]}', max_whitespace_run=4)
    assert accepts(b'{"a": "                "}', max_whitespace_run=4)  # whitespace inside strings is content
    for text in (b"     {}", b"{     }", b'{"a":     1}', b'{"a": 1     }', b'{"a": [1     ]}'):
        _, refused = feed(bytewise(text), max_whitespace_run=4)
        assert refused == text.index(b"     ") + 4, text
    _, refused = feed([b"{", b" " * 17])
    assert refused == 1


def test_empty_tokens_are_refused_unless_they_stop():
    vocab = Vocab()
    constraint = make(vocab)
    assert not constraint.allows(EMPTY, False)
    constraint.advance(vocab.id(b'{"a": '))
    assert not constraint.allows(EMPTY, False)
    constraint.advance(vocab.id(b'"x'))
    assert not constraint.allows(EMPTY, False)


def test_stop_is_allowed_only_once_complete():
    vocab = Vocab()
    constraint = make(vocab)
    brace = vocab.id(b"}")
    assert not constraint.allows(EMPTY, True)
    constraint.advance(vocab.id(b"{"))
    assert not constraint.allows(EMPTY, True)
    assert not constraint.allows(brace, True)  # a stop adds no output, whatever its bytes
    assert constraint.allows(brace, False)
    constraint.advance(brace)
    assert constraint.complete
    assert constraint.allows(EMPTY, True)
    assert constraint.allows(brace, True)
    for piece in (b"}", b" ", b"\n", b"{}", b","):
        assert not constraint.allows(vocab.id(piece), False)
    assert not constraint.allows(EMPTY, False)
    constraint.advance(EMPTY)  # the stop token itself
    assert constraint.complete


def test_advance_with_a_refused_token_raises_and_keeps_the_state():
    vocab = Vocab()
    constraint = make(vocab)
    constraint.advance(vocab.id(b'{"a": 1'))
    with pytest.raises(ValueError):
        constraint.advance(vocab.id(b"2, ]"))
    constraint.advance(vocab.id(b"2}"))
    assert constraint.complete


@pytest.mark.parametrize(("kwargs"), [{"max_depth": 0}, {"max_whitespace_run": -1}, {"max_depth": 1.5}])
def test_bad_limits_are_refused(kwargs):
    with pytest.raises(InvalidArgumentError):
        JsonObjectConstraint(Vocab().token_bytes, **kwargs)


# --- random objects


CHARS = (
    [chr(c) for c in range(0x20, 0x7F)]
    + [chr(c) for c in range(0x20)]
    + list(
        '"\\/\x7f\u0080\u00e9\u00ff\u0100\u07ff\u0800\u2028\u20ac\u4e2d\ud7ff\ue000\uffff\U00010000\U0001f600\U0010ffff'
    )
)


def random_string(rng: random.Random) -> str:
    return "".join(rng.choice(CHARS) for _ in range(rng.randint(0, 8)))


def random_number(rng: random.Random) -> int | float:
    kind = rng.randrange(5)
    if kind == 0:
        return rng.randint(-20, 20)
    if kind == 1:
        return rng.randint(-(10**30), 10**30)
    if kind == 2:
        return rng.choice([0.0, -0.0, 0.5, -1.25, 1e-7, 1e21, 5e-324, 1.7976931348623157e308])
    return rng.uniform(-1, 1) * 10 ** rng.randint(-30, 30)


def random_value(rng: random.Random, depth: int) -> object:
    kind = rng.randrange(8 if depth < 5 else 6)
    if kind == 0:
        return random_string(rng)
    if kind == 1:
        return random_number(rng)
    if kind == 2:
        return rng.choice([True, False, None])
    if kind in (3, 4, 5):
        return random_number(rng) if kind == 3 else random_string(rng)
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return random_object(rng, depth + 1)


def random_object(rng: random.Random, depth: int = 0) -> dict:
    return {random_string(rng): random_value(rng, depth) for _ in range(rng.randint(0, 4))}


def random_text(rng: random.Random) -> bytes:
    separators = rng.choice([None, (",", ":"), (", ", ": "), (" ,\n", " :\t")])
    text = json.dumps(
        random_object(rng),
        ensure_ascii=rng.random() < 0.5,
        indent=rng.choice([None, None, 0, 1, 2, "\t"]),
        separators=separators,
        sort_keys=rng.random() < 0.5,
    )
    return (rng.choice(["", " ", "\n\t "]) + text).encode()


def random_split(rng: random.Random, data: bytes) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), rng.randint(0, min(len(data) - 1, 40))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def test_random_objects_split_anywhere_are_accepted():
    rng = random.Random(1234)
    for _ in range(300):
        text = random_text(rng)
        assert isinstance(json.loads(text), dict)
        pieces = random_split(rng, text)
        constraint, refused = feed(pieces)
        assert refused is None, (text, pieces[refused])
        assert constraint.complete, text


def test_allows_leaves_the_state_alone():
    rng = random.Random(99)
    for _ in range(100):
        text = random_text(rng)
        vocab = Vocab()
        constraint = make(vocab)
        for piece in random_split(rng, text):
            # Each refused probe reads some valid bytes before the bad one, so a leak would show.
            for bad in (piece + b"\xff", piece + b"\x00", piece[:1] + b"\x01\x02", b"\xff"):
                assert not constraint.allows(vocab.id(bad), False)
            assert not constraint.allows(EMPTY, True)
            assert constraint.allows(vocab.id(piece), False)
            constraint.advance(vocab.id(piece))
        assert constraint.complete


MUTATION_BYTES = b'{}[],:"\\ \n0123456789.-+eEtrufalsn/bx\x00\x1f\xc3\xa9\xe2\x82\xac\xff'


def mutate(rng: random.Random, data: bytes) -> bytes:
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(data) + 1)
        new = bytes([rng.choice(MUTATION_BYTES)])
        data = rng.choice([data[:i] + new + data[i:], data[:i] + new + data[i + 1 :], data[:i] + data[i + 1 :]])
    return data


def json_loads_accepts(data: bytes) -> bool:
    """The reference: a strict UTF-8 JSON text holding an object, with nothing after it."""
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(value, dict) and not data[-1:].isspace()


def test_agrees_with_json_loads_on_mutated_objects():
    rng = random.Random(7)
    agreed_valid = 0
    for _ in range(3000):
        text = json.dumps(random_object(rng), ensure_ascii=rng.random() < 0.5).encode()
        data = mutate(rng, text)
        pieces = random_split(rng, data) if data else [data]
        constraint, refused = feed(pieces)
        ours = refused is None and constraint.complete
        assert ours == json_loads_accepts(data), data
        agreed_valid += ours
    assert agreed_valid > 200  # the mutations leave enough valid texts for the check to mean something


# --- sampling through generate.Sequence


def sampling_vocab() -> tuple[list[bytes], int]:
    """Every single byte, some JSON-shaped chunks and UTF-8 fragments, then a stop token adding no bytes."""
    chunks = [b'{"', b'": ', b'", "', b"true", b"false", b"null", b"}", b"]}", b"}}", b", ", b"12", b"-3.5"]
    chunks += [b"e+4", b"\\u00e9", "é".encode(), "€".encode()[:2], "😀".encode()[1:], b"\n  ", b'"},']
    pieces = [bytes([b]) for b in range(256)] + chunks + [b""]
    return pieces, len(pieces) - 1


def sample_output(seed: int, pieces: list[bytes], stop: int) -> tuple[bytes, str]:
    vocab_size = len(pieces)
    constraint = JsonObjectConstraint(pieces.__getitem__)
    params = SamplingParams(max_tokens=400, temperature=1.0, seed=seed)
    seq = Sequence([0], params, 400, None, vocab_size, frozenset({stop}), seed, constraint=constraint)
    generator = torch.Generator().manual_seed(seed)
    bias = torch.zeros(vocab_size)
    # Quotes and closers likely enough that strings end and nesting unwinds well within the budget, and
    # value-shaped chunks likely enough that the objects hold numbers, literals and nested containers.
    weights = {b'"': 5.0, b"]": 4.0, b"}": 3.0, b'": ': 3.0, b"[": 2.0, b'{"': 2.0, b", ": 2.0, b"]}": 2.0}
    weights |= {b"}}": 2.0, b'"},': 2.0, b"true": 2.0, b"null": 2.0, b"12": 2.0, b"-3.5": 2.0, b"e+4": 2.0}
    for piece, weight in weights.items():
        bias[pieces.index(piece)] = weight
    chosen: list[int] = []
    while not seq.done:
        event = seq.step(torch.randn(vocab_size, generator=generator) * 2 + bias)
        if not event.stop_token:
            chosen.append(event.token_id)
        finish = event.finish_reason
    return b"".join(pieces[t] for t in chosen), finish


def test_sequence_samples_only_valid_objects():
    pieces, stop = sampling_vocab()
    stopped = filled = 0
    for seed in range(30):
        output, finish = sample_output(seed, pieces, stop)
        if finish == "stop":
            stopped += 1
            value = json.loads(output.decode("utf-8"))
            assert isinstance(value, dict), output
            filled += bool(value)
        else:
            assert finish == "length"
            _, refused = feed([output])
            assert refused is None  # cut short, but still a prefix of an object
    assert stopped >= 25
    assert filled >= 20  # mostly real objects, not just "{}"
