"""Prefill + decode for one batch of prompts on a KV cache, as a stream of per-row events.

Rows are right-padded for prefill and then each decodes at its own absolute positions, so prompts
of different lengths give exactly what they give alone. Stop strings are held back while they
may still be forming, so partial stop text never reaches the stream.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .errors import ContextLengthError, InvalidArgumentError
from .kv_cache import KVCache
from .model import Transformer
from .sampling import SamplingParams, penalize, sample, top_logprobs
from .tokenizer import Tokenizer

PREFILL_CHUNK = 512  # tokens per prefill step: bounds activation memory for long prompts
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

    Shared by `stream_batch` and the serving engine, so both decode exactly alike.
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


def check_prompts(
    model: Transformer, prompts: list[list[int]], params: list[SamplingParams], context: int | None = None
) -> list[int]:
    """Each prompt's token budget: max_tokens, capped by the room left in the context."""
    ctx = context or model.cfg.context_length
    budgets = []
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        if not p:
            raise InvalidArgumentError(f"prompt {i} is empty")
        if any(not 0 <= t < model.cfg.vocab_size for t in p):
            raise InvalidArgumentError(f"prompt {i} has token ids outside 0..{model.cfg.vocab_size - 1}")
        if len(p) >= ctx:
            raise ContextLengthError(
                f"prompt {i} has {len(p)} tokens; the model's context is {ctx} tokens, leaving no room to generate"
            )
        budgets.append(min(sp.max_tokens, ctx - len(p)))
    return budgets


@torch.no_grad()
def prefill(model: Transformer, prompts: list[list[int]], cache: KVCache) -> torch.Tensor:
    """Run all prompts through the cache in chunks; return logits at each row's last token [B, V]."""
    B, T = len(prompts), max(len(p) for p in prompts)
    device = cache.k.device
    tokens = torch.full((B, T), model.cfg.pad_token_id, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(p, device=device)
    last = torch.tensor([len(p) - 1 for p in prompts], device=device)
    h_last = torch.zeros(B, model.cfg.hidden_size, dtype=model.dtype, device=device)
    for t0 in range(0, T, PREFILL_CHUNK):
        t1 = min(T, t0 + PREFILL_CHUNK)
        pos = torch.arange(t0, t1, device=device).expand(B, -1)
        h = model.hidden(tokens[:, t0:t1], pos, cache)  # [B, t, D]
        inside = (last >= t0) & (last < t1)
        if inside.any():
            idx = (last - t0).clamp(0, t1 - t0 - 1)
            h_last = torch.where(inside[:, None], h[torch.arange(B), idx], h_last)
    return model.logits(h_last)


@torch.no_grad()
def stream_batch(
    model: Transformer,
    tokenizer: Tokenizer | None,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams],
) -> Iterator[Event]:
    """Generate for every prompt at once; yields one Event per row per step until all finish."""
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    budgets = check_prompts(model, prompts, params)
    B = len(prompts)
    device = model.embed_tokens.weight.device
    cache = KVCache(model.cfg, B, max(len(p) + n for p, n in zip(prompts, budgets, strict=True)), model.dtype, device)
    stops = tokenizer.stop_ids if tokenizer else frozenset({model.cfg.eos_token_id})
    seqs = [
        Sequence(p, sp, n, tokenizer, model.cfg.vocab_size, stops, None if sp.seed is None else sp.seed + b)
        for b, (p, sp, n) in enumerate(zip(prompts, params, budgets, strict=True))
    ]
    logits = prefill(model, prompts, cache).float().cpu()
    positions = torch.tensor([len(p) for p in prompts])
    while True:
        next_ids = torch.full((B, 1), model.cfg.pad_token_id, dtype=torch.long)
        for b, seq in enumerate(seqs):
            if seq.done:
                continue
            ev = seq.step(logits[b], b)
            if not seq.done:
                next_ids[b, 0] = ev.token_id
            yield ev
        if all(seq.done for seq in seqs):
            return
        logits = model(next_ids.to(device), positions[:, None].to(device), cache)[:, -1].float().cpu()
        positions += 1
        positions.clamp_(max=cache.max_len - 1)  # only finished rows reach the end; they write nowhere useful


def generate_batch(
    model: Transformer,
    tokenizer: Tokenizer | None,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams],
) -> list[Completion]:
    out = [Completion("", [], "length", len(p)) for p in prompts]
    for ev in stream_batch(model, tokenizer, prompts, params):
        c = out[ev.index]
        if not ev.stop_token:
            c.token_ids.append(ev.token_id)
        c.text += ev.text
        if ev.logprob is not None:
            c.logprobs.append(ev.logprob)
        if ev.finish_reason:
            c.finish_reason = ev.finish_reason
    return out
