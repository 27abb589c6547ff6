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


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Event:
    """One decoding step of one row: the token, the text it released, and the end if reached."""

    index: int
    token_id: int | None
    text: str
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None  # "stop" | "length"


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)


class _Row:
    """Per-row text state: detokenizer, stop-string hold-back, finish."""

    def __init__(self, tokenizer: Tokenizer | None, params: SamplingParams, prompt_len: int, budget: int) -> None:
        self.decoder = tokenizer.stream_decoder() if tokenizer else None
        self.params = params
        self.prompt_len = prompt_len
        self.budget = budget
        self.text = ""
        self.emitted = 0
        self.generated = 0
        self.done = False

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


def _check_prompts(model: Transformer, prompts: list[list[int]], params: list[SamplingParams]) -> list[int]:
    ctx = model.cfg.context_length
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
    budgets = _check_prompts(model, prompts, params)
    B = len(prompts)
    device = model.embed_tokens.weight.device
    cache = KVCache(model.cfg, B, max(len(p) + n for p, n in zip(prompts, budgets, strict=True)), model.dtype, device)
    rows = [_Row(tokenizer, sp, len(p), n) for p, sp, n in zip(prompts, params, budgets, strict=True)]
    gens = []
    for b, sp in enumerate(params):
        seed = sp.seed + b if sp.seed is not None else random.getrandbits(63)
        gens.append(torch.Generator(device="cpu").manual_seed(seed))
    V = model.cfg.vocab_size
    seen = torch.zeros(B, V, dtype=torch.bool)
    counts = torch.zeros(B, V, dtype=torch.float32)
    for b, p in enumerate(prompts):
        seen[b, p] = True
    default_stops = tokenizer.stop_ids if tokenizer else frozenset({model.cfg.eos_token_id})

    logits = prefill(model, prompts, cache).float().cpu()
    positions = torch.tensor([len(p) for p in prompts])
    while True:
        next_ids = torch.full((B, 1), model.cfg.pad_token_id, dtype=torch.long)
        for b, row in enumerate(rows):
            if row.done:
                continue
            sp = row.params
            raw = logits[b]
            tok = sample(penalize(raw, sp, seen[b], counts[b]), sp, gens[b])
            lp = None
            if sp.logprobs is not None:
                chosen, alts = top_logprobs(raw, tok, sp.logprobs)
                lp = TokenLogprob(tok, chosen, alts)
            row.generated += 1
            seen[b, tok] = True
            counts[b, tok] += 1
            stops = sp.stop_token_ids if sp.stop_token_ids is not None else default_stops
            if tok in stops and not sp.ignore_eos:
                row.done = True  # a stop token is not part of the output
                yield Event(b, None, row.finish_text(), None, "stop")
                continue
            text, stopped = row.add_text(row.decoder.push(tok)) if row.decoder else ("", False)
            if stopped:
                row.done = True
                yield Event(b, tok, text, lp, "stop")
                continue
            if row.generated >= row.budget:
                row.done = True
                yield Event(b, tok, text + row.finish_text(), lp, "length")
                continue
            next_ids[b, 0] = tok
            yield Event(b, tok, text, lp)
        if all(r.done for r in rows):
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
        if ev.token_id is not None:
            c.token_ids.append(ev.token_id)
        c.text += ev.text
        if ev.logprob is not None:
            c.logprobs.append(ev.logprob)
        if ev.finish_reason:
            c.finish_reason = ev.finish_reason
    return out
