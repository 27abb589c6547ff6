"""What decoding one sequence means, whatever runs the model: its sampler, its text and its stop rules.

`Sequence.step(logits)` picks the next token and says what text it releases; stop strings are held back
while they may still be forming, so partial stop text never reaches the stream. The engine (`engine.py`)
runs every sequence, for the server and for `LM.generate` alike.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from .errors import ContextLengthError, InvalidArgumentError
from .sampling import SamplingParams, penalize, sample, top_logprobs
from .tokenizer import Tokenizer

REJECTIONS_BEFORE_MASK = 16  # constrained sampling: draws to try before checking every token


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Event:
    """One decoding step of one row: the token, the text it released, and the end if reached."""

    index: int
    token_id: int
    text: str
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None  # "stop" | "length"
    stop_token: bool = False  # token_id is the stop token that ended the row (not part of the text)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)


class Sequence:
    """One sequence being generated: its sampler state (seeded generator, penalties), its text state
    (detokenizer, stop-string hold-back) and its stop rules. `step(logits)` picks the next token.

    """

    def __init__(
        self,
        prompt: list[int],
        params: SamplingParams,
        budget: int,
        tokenizer: Tokenizer | None,
        vocab_size: int,
        stop_ids: frozenset[int],
        seed: int | None,
        constraint: Constraint | None = None,
    ) -> None:
        self.params = params
        self.prompt_len = len(prompt)
        self.budget = budget
        self.decoder = tokenizer.stream_decoder() if tokenizer else None
        self.stop_ids = frozenset(params.stop_token_ids) if params.stop_token_ids is not None else stop_ids
        self.generator = torch.Generator(device="cpu").manual_seed(
            seed % (1 << 64) if seed is not None else random.getrandbits(63)  # any int seeds; torch takes 64 bits
        )
        self.seen = torch.zeros(vocab_size, dtype=torch.bool)
        self.seen[prompt] = True
        self.counts = torch.zeros(vocab_size, dtype=torch.float32)
        self.constraint = constraint
        self.text = ""
        self.emitted = 0
        self.generated = 0
        self.last_token: int | None = None
        self.done = False

    def step(self, logits: torch.Tensor, index: int = 0) -> Event:
        """Sample the next token from fp32 logits [V]; the event says what text it released and if it ended."""
        sp = self.params
        tok = self._choose(logits)
        lp = None
        if sp.logprobs is not None:
            chosen, alts = top_logprobs(logits, tok, sp.logprobs)
            lp = TokenLogprob(tok, chosen, alts)
        self.generated += 1
        self.last_token = tok
        self.seen[tok] = True
        self.counts[tok] += 1
        if self.constraint is not None:
            self.constraint.advance(tok)
        if tok in self.stop_ids and not sp.ignore_eos:
            self.done = True  # a stop token is not part of the output text
            return Event(index, tok, self.finish_text(), lp, "stop", stop_token=True)
        text, stopped = self.add_text(self.decoder.push(tok)) if self.decoder else ("", False)
        if stopped or (self.constraint is not None and self.constraint.complete):
            self.done = True
            return Event(index, tok, text + ("" if stopped else self.finish_text()), lp, "stop")
        if self.generated >= self.budget:
            self.done = True
            return Event(index, tok, text + self.finish_text(), lp, "length")
        return Event(index, tok, text, lp)

    def _choose(self, raw: torch.Tensor) -> int:
        logits = penalize(raw, self.params, self.seen, self.counts)
        if self.constraint is None:
            return sample(logits, self.params, self.generator)
        # Constrained: draw from the distribution restricted to allowed tokens by rejection, which
        # samples exactly the renormalised distribution and checks only the tokens it draws. When the
        # model keeps proposing forbidden tokens, check the whole vocabulary once instead.
        logits = logits.clone()
        for _ in range(REJECTIONS_BEFORE_MASK):
            tok = sample(logits, self.params, self.generator)
            if self.constraint.allows(tok, tok in self.stop_ids):
                return tok
            logits[tok] = float("-inf")
        allowed = torch.tensor([self.constraint.allows(t, t in self.stop_ids) for t in range(logits.shape[-1])])
        if not allowed.any():
            raise InvalidArgumentError("the output constraint allows no token of this vocabulary")
        return sample(logits.masked_fill(~allowed, float("-inf")), self.params, self.generator)

    def add_text(self, delta: str) -> tuple[str, bool]:
        """Append decoded text; return what may be released now and whether a stop string ended it."""
        self.text += delta
        stops = self.params.stop
        hits = [i for s in stops if (i := self.text.find(s, max(0, self.emitted - len(s) + 1))) >= 0]
        if hits:  # cut at the earliest stop string
            self.text = self.text[: min(hits)]
            return self._release(len(self.text)), True
        hold = 0
        for s in stops:  # the longest text suffix that may still grow into a stop string
            for n in range(min(len(s) - 1, len(self.text) - self.emitted), 0, -1):
                if self.text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return self._release(len(self.text) - hold), False

    def _release(self, upto: int) -> str:
        out = self.text[self.emitted : upto]
        self.emitted = max(self.emitted, upto)
        return out

    def finish_text(self) -> str:
        """Release everything left at the end: the detokenizer's tail and any held-back text."""
        out = ""
        if self.decoder:
            tail = self.decoder.flush()
            if tail:
                out, stopped = self.add_text(tail)
                if stopped:
                    return out
        return out + self._release(len(self.text))


class Constraint:
    """What an output constraint (e.g. JSON) tells the sampler, token by token."""

    complete: bool  # the output is whole: generation stops here

    def allows(self, token_id: int, is_stop: bool) -> bool:
        raise NotImplementedError

    def advance(self, token_id: int) -> None:
        raise NotImplementedError


def context_room(prompt: list[int], vocab_size: int, context: int) -> int:
    """Tokens that may follow `prompt` in a context of `context` tokens; a prompt that is empty, has ids
    outside the vocabulary or leaves no room is refused here, the one place these are checked."""
    if not prompt:
        raise InvalidArgumentError("the prompt is empty")
    if any(not 0 <= t < vocab_size for t in prompt):
        raise InvalidArgumentError(f"the prompt has token ids outside 0..{vocab_size - 1}")
    if len(prompt) >= context:
        raise ContextLengthError(
            f"the prompt has {len(prompt)} tokens; the context holds {context}, leaving no room to generate"
        )
    return context - len(prompt)
