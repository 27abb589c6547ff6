"""Constrained decoding that makes a model's output one valid JSON object.

This backs OpenAI's ``response_format: {"type": "json_object"}``: `JsonObjectConstraint` is a byte-level
pushdown automaton for RFC 8259 JSON whose top-level value must be an object. The sampler asks it whether
a drawn token may come next (`allows`) and then tells it which token was chosen (`advance`); it reports
`complete` once the top-level object is closed, and generation stops there.

Why it checks drawn tokens instead of masking the vocabulary: a mask means running every one of the
~100k-200k token byte strings through the automaton at every step, which in pure Python costs far more
than a decode step. `Sequence._choose` instead draws from the model's distribution, asks only about the
drawn token and redraws without it when it is refused. That samples exactly the distribution restricted
to allowed tokens, and since a model asked for JSON mostly proposes tokens that fit, a step usually checks
one or two tokens.

Token boundaries need not match JSON lexemes: a token may end inside a number, an escape or a UTF-8
character, so the automaton reads bytes and keeps such partial lexemes in its state.
"""

from __future__ import annotations

from collections.abc import Callable

from .errors import InvalidArgumentError
from .generate import Constraint

WHITESPACE = frozenset(b" \t\n\r")
DIGITS = frozenset(b"0123456789")
HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
SIMPLE_ESCAPES = frozenset(b'"\\/bfnrt')
EXPONENT_MARKS = frozenset(b"eE")
SIGNS = frozenset(b"+-")
LITERAL_TAILS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}

OPEN_OBJECT, CLOSE_OBJECT = ord("{"), ord("}")
OPEN_ARRAY, CLOSE_ARRAY = ord("["), ord("]")
QUOTE, BACKSLASH, COLON, COMMA = ord('"'), ord("\\"), ord(":"), ord(",")
MINUS, ZERO, POINT = ord("-"), ord("0"), ord(".")
OPENER_OF = {CLOSE_OBJECT: OPEN_OBJECT, CLOSE_ARRAY: OPEN_ARRAY}

# Scanner modes: what the next byte may be.
START = "start"  # before the top-level object
OBJECT_FIRST = "object_first"  # just after "{": a key or "}"
KEY = "key"  # after "," in an object: a key
COLON_NEXT = "colon"  # after a key
VALUE = "value"  # after ":" or after "," in an array
ARRAY_FIRST = "array_first"  # just after "[": a value or "]"
AFTER_VALUE = "after_value"  # "," or the closing bracket
STRING = "string"
ESCAPE = "escape"  # after a backslash
UNICODE_ESCAPE = "unicode_escape"  # inside \uXXXX
UTF8_TAIL = "utf8_tail"  # inside a multi-byte UTF-8 character
LITERAL = "literal"  # inside true / false / null
NUMBER_MINUS = "number_minus"
NUMBER_ZERO = "number_zero"  # a leading 0 admits no more integer digits
NUMBER_INTEGER = "number_integer"
NUMBER_POINT = "number_point"
NUMBER_FRACTION = "number_fraction"
NUMBER_EXPONENT_MARK = "number_exponent_mark"
NUMBER_EXPONENT_SIGN = "number_exponent_sign"
NUMBER_EXPONENT = "number_exponent"
DONE = "done"

# Modes between tokens, where whitespace is insignificant (and so counted against the run limit).
STRUCTURAL = frozenset({START, OBJECT_FIRST, KEY, COLON_NEXT, VALUE, ARRAY_FIRST, AFTER_VALUE})


def utf8_lead(byte: int) -> tuple[int, int, int] | None:
    """For a UTF-8 lead byte: (continuation bytes to follow, lowest and highest allowed next byte).

    The narrowed second-byte ranges (RFC 3629 table) exclude overlong forms, UTF-16 surrogates and code
    points above U+10FFFF, so every accepted string decodes with Python's strict UTF-8 codec.
    """
    if 0xC2 <= byte <= 0xDF:
        return 1, 0x80, 0xBF
    if byte == 0xE0:
        return 2, 0xA0, 0xBF
    if byte == 0xED:
        return 2, 0x80, 0x9F
    if 0xE1 <= byte <= 0xEF:
        return 2, 0x80, 0xBF
    if byte == 0xF0:
        return 3, 0x90, 0xBF
    if 0xF1 <= byte <= 0xF3:
        return 3, 0x80, 0xBF
    if byte == 0xF4:
        return 3, 0x80, 0x8F
    return None


class JsonScanner:
    """The automaton's state: a stack of open containers plus the mode of the lexeme being read.

    `feed` mutates it, so callers that only want to look ahead feed a `clone`, which copies just the
    stack (at most max_depth entries) and a few scalars.
    """

    def __init__(self, max_depth: int, max_whitespace_run: int) -> None:
        self.max_depth = max_depth
        self.max_whitespace_run = max_whitespace_run
        self.mode = START
        self.stack: list[int] = []  # OPEN_OBJECT / OPEN_ARRAY, outermost first
        self.pending = 0  # hex digits or UTF-8 continuation bytes still to come
        self.low, self.high = 0x80, 0xBF  # range for the next UTF-8 continuation byte
        self.literal = b""  # rest of the true / false / null being read
        self.in_key = False  # the open string is an object key, so a colon follows it
        self.spaces = 0  # length of the current whitespace run outside strings

    @property
    def complete(self) -> bool:
        return self.mode == DONE

    def clone(self) -> JsonScanner:
        other = JsonScanner.__new__(JsonScanner)
        other.__dict__.update(self.__dict__)
        other.stack = list(self.stack)
        return other

    def feed(self, data: bytes) -> bool:
        """Read bytes; False (leaving the state unusable) as soon as one cannot continue valid JSON."""
        return all(self.step(byte) for byte in data)

    def step(self, byte: int) -> bool:
        if byte in WHITESPACE and self.mode in STRUCTURAL:
            self.spaces += 1
            return self.spaces <= self.max_whitespace_run
        self.spaces = 0
        return HANDLERS[self.mode](self, byte)

    # Structure.

    def read_start(self, byte: int) -> bool:
        return byte == OPEN_OBJECT and self.open(byte)

    def read_object_first(self, byte: int) -> bool:
        if byte == CLOSE_OBJECT:
            return self.close(byte)
        return byte == QUOTE and self.begin_string(key=True)

    def read_key(self, byte: int) -> bool:
        return byte == QUOTE and self.begin_string(key=True)

    def read_colon(self, byte: int) -> bool:
        if byte != COLON:
            return False
        self.mode = VALUE
        return True

    def read_array_first(self, byte: int) -> bool:
        if byte == CLOSE_ARRAY:
            return self.close(byte)
        return self.begin_value(byte)

    def read_after_value(self, byte: int) -> bool:
        if byte == COMMA:
            self.mode = KEY if self.stack[-1] == OPEN_OBJECT else VALUE
            return True
        return byte in OPENER_OF and self.close(byte)

    def read_done(self, byte: int) -> bool:
        return False

    def begin_value(self, byte: int) -> bool:
        if byte in (OPEN_OBJECT, OPEN_ARRAY):
            return self.open(byte)
        if byte == QUOTE:
            return self.begin_string(key=False)
        if byte == MINUS:
            self.mode = NUMBER_MINUS
        elif byte == ZERO:
            self.mode = NUMBER_ZERO
        elif byte in DIGITS:
            self.mode = NUMBER_INTEGER
        elif byte in LITERAL_TAILS:
            self.literal = LITERAL_TAILS[byte]
            self.mode = LITERAL
        else:
            return False
        return True

    def open(self, byte: int) -> bool:
        if len(self.stack) >= self.max_depth:
            return False
        self.stack.append(byte)
        self.mode = OBJECT_FIRST if byte == OPEN_OBJECT else ARRAY_FIRST
        return True

    def close(self, byte: int) -> bool:
        if not self.stack or self.stack[-1] != OPENER_OF[byte]:
            return False
        self.stack.pop()
        self.mode = AFTER_VALUE if self.stack else DONE
        return True

    # Strings.

    def begin_string(self, key: bool) -> bool:
        self.in_key = key
        self.mode = STRING
        return True

    def read_string(self, byte: int) -> bool:
        if byte == QUOTE:
            self.mode = COLON_NEXT if self.in_key else AFTER_VALUE
        elif byte == BACKSLASH:
            self.mode = ESCAPE
        elif byte < 0x20:
            return False  # RFC 8259 requires control characters to be escaped
        elif byte >= 0x80:
            lead = utf8_lead(byte)
            if lead is None:
                return False
            self.pending, self.low, self.high = lead
            self.mode = UTF8_TAIL
        return True

    def read_escape(self, byte: int) -> bool:
        if byte == ord("u"):
            self.pending = 4
            self.mode = UNICODE_ESCAPE
            return True
        if byte in SIMPLE_ESCAPES:
            self.mode = STRING
            return True
        return False

    def read_unicode_escape(self, byte: int) -> bool:
        # Any four hex digits: RFC 8259's grammar admits lone surrogate escapes, and json.loads accepts them.
        if byte not in HEX_DIGITS:
            return False
        self.pending -= 1
        if not self.pending:
            self.mode = STRING
        return True

    def read_utf8_tail(self, byte: int) -> bool:
        if not self.low <= byte <= self.high:
            return False
        self.pending -= 1
        self.low, self.high = 0x80, 0xBF  # only the second byte has a narrowed range
        if not self.pending:
            self.mode = STRING
        return True

    # Literals and numbers.

    def read_literal(self, byte: int) -> bool:
        if byte != self.literal[0]:
            return False
        self.literal = self.literal[1:]
        if not self.literal:
            self.mode = AFTER_VALUE
        return True

    def read_number_minus(self, byte: int) -> bool:
        if byte == ZERO:
            self.mode = NUMBER_ZERO
        elif byte in DIGITS:
            self.mode = NUMBER_INTEGER
        else:
            return False
        return True

    def read_number_zero(self, byte: int) -> bool:
        return self.continue_after_integer(byte)

    def read_number_integer(self, byte: int) -> bool:
        return byte in DIGITS or self.continue_after_integer(byte)

    def continue_after_integer(self, byte: int) -> bool:
        if byte == POINT:
            self.mode = NUMBER_POINT
            return True
        if byte in EXPONENT_MARKS:
            self.mode = NUMBER_EXPONENT_MARK
            return True
        return self.end_number(byte)

    def read_number_point(self, byte: int) -> bool:
        if byte not in DIGITS:
            return False
        self.mode = NUMBER_FRACTION
        return True

    def read_number_fraction(self, byte: int) -> bool:
        if byte in DIGITS:
            return True
        if byte in EXPONENT_MARKS:
            self.mode = NUMBER_EXPONENT_MARK
            return True
        return self.end_number(byte)

    def read_number_exponent_mark(self, byte: int) -> bool:
        if byte in SIGNS:
            self.mode = NUMBER_EXPONENT_SIGN
        elif byte in DIGITS:
            self.mode = NUMBER_EXPONENT
        else:
            return False
        return True

    def read_number_exponent_sign(self, byte: int) -> bool:
        if byte not in DIGITS:
            return False
        self.mode = NUMBER_EXPONENT
        return True

    def read_number_exponent(self, byte: int) -> bool:
        return byte in DIGITS or self.end_number(byte)

    def end_number(self, byte: int) -> bool:
        # A number has no terminator of its own: the byte after it is the next structural byte. Numbers
        # only occur inside a container (the top level is an object), so something always follows.
        self.mode = AFTER_VALUE
        return self.step(byte)


HANDLERS: dict[str, Callable[[JsonScanner, int], bool]] = {
    START: JsonScanner.read_start,
    OBJECT_FIRST: JsonScanner.read_object_first,
    KEY: JsonScanner.read_key,
    COLON_NEXT: JsonScanner.read_colon,
    VALUE: JsonScanner.begin_value,
    ARRAY_FIRST: JsonScanner.read_array_first,
    AFTER_VALUE: JsonScanner.read_after_value,
    STRING: JsonScanner.read_string,
    ESCAPE: JsonScanner.read_escape,
    UNICODE_ESCAPE: JsonScanner.read_unicode_escape,
    UTF8_TAIL: JsonScanner.read_utf8_tail,
    LITERAL: JsonScanner.read_literal,
    NUMBER_MINUS: JsonScanner.read_number_minus,
    NUMBER_ZERO: JsonScanner.read_number_zero,
    NUMBER_INTEGER: JsonScanner.read_number_integer,
    NUMBER_POINT: JsonScanner.read_number_point,
    NUMBER_FRACTION: JsonScanner.read_number_fraction,
    NUMBER_EXPONENT_MARK: JsonScanner.read_number_exponent_mark,
    NUMBER_EXPONENT_SIGN: JsonScanner.read_number_exponent_sign,
    NUMBER_EXPONENT: JsonScanner.read_number_exponent,
    DONE: JsonScanner.read_done,
}


class JsonObjectConstraint(Constraint):
    """Lets through only tokens that keep the output a prefix of one JSON object (RFC 8259).

    `token_bytes(id)` gives the bytes a token adds to the output (b"" for special and control tokens),
    e.g. `Tokenizer.token_bytes`. Leading whitespace is allowed; nothing may follow the closing brace
    except a stop token. Runs of whitespace between tokens are capped at `max_whitespace_run` bytes and
    nesting at `max_depth` containers, so a model cannot fill its budget with blanks or brackets.
    """

    def __init__(self, token_bytes: Callable[[int], bytes], max_depth: int = 64, max_whitespace_run: int = 16) -> None:
        if not isinstance(max_depth, int) or max_depth < 1:
            raise InvalidArgumentError("max_depth must be an integer >= 1")
        if not isinstance(max_whitespace_run, int) or max_whitespace_run < 0:
            raise InvalidArgumentError("max_whitespace_run must be an integer >= 0")
        self.token_bytes = token_bytes
        self.scanner = JsonScanner(max_depth, max_whitespace_run)
        self.complete = False

    def allows(self, token_id: int, is_stop: bool) -> bool:
        """Whether the token may come next; the committed state is left as it was."""
        if is_stop:
            return self.complete  # a stop adds no output, so its bytes (if any) do not matter
        if self.complete:
            return False
        data = self.token_bytes(token_id)
        # An empty token would let the model stall without ever producing the object.
        return bool(data) and self.scanner.clone().feed(data)

    def advance(self, token_id: int) -> None:
        """Commit the chosen token. Stop and control tokens add no bytes and change nothing."""
        data = self.token_bytes(token_id)
        if not data or self.complete:
            return  # the sampler only picks stops once complete, and they add nothing to the output
        scanner = self.scanner.clone()
        if not scanner.feed(data):
            # Only a caller bug gets here (the sampler advances with allowed tokens), hence not a user error.
            raise ValueError(f"token {token_id} ({data!r}) cannot continue the JSON object")
        self.scanner = scanner
        self.complete = scanner.complete
