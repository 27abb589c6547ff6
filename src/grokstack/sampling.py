"""Sampling parameters, logits processors and the sampler itself (one row at a time)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from .errors import InvalidArgumentError

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF-style, over prompt and output; 1 = off
    presence_penalty: float = 0.0  # OpenAI-style, over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None  # None = the tokenizer's stop ids
    ignore_eos: bool = False
    logprobs: int | None = None  # None = off; n = chosen token plus n alternatives
    logit_bias: dict[int, float] | None = None  # OpenAI: added to the logits of these token ids

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise InvalidArgumentError(msg)

        need(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens must be an integer >= 1")
        need(_finite(self.temperature) and 0 <= self.temperature <= 100, "temperature must be in [0, 100]")
        need(_finite(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1]")
        need(isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0")
        need(_finite(self.min_p) and 0 <= self.min_p < 1, "min_p must be in [0, 1)")
        need(_finite(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty must be > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            need(_finite(value) and -2 <= value <= 2, f"{name} must be in [-2, 2]")
        need(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        need(
            self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS),
            f"logprobs must be an integer in [0, {MAX_LOGPROBS}]",
        )
        need(
            all(isinstance(t, int) and t >= 0 and _finite(b) and -100 <= b <= 100
                for t, b in (self.logit_bias or {}).items()),
            "logit_bias maps token ids (integers >= 0) to values in [-100, 100]",
        )

    def replace(self, **changes) -> SamplingParams:
        return dataclasses.replace(self, **changes)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def penalize(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """logits [V]; seen [V] bool (prompt + output); counts [V] output token counts."""
    if params.repetition_penalty != 1.0:
        scaled = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, scaled, logits)
    if params.presence_penalty or params.frequency_penalty:
        logits = logits - params.presence_penalty * (counts > 0) - params.frequency_penalty * counts
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
        if int(ids.max()) >= logits.shape[-1]:
            raise InvalidArgumentError(f"logit_bias token id {int(ids.max())} is outside the vocabulary")
        logits = logits.clone()
        logits[ids] += torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype)
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick one token id from fp32 logits [V] after temperature, top-k, top-p and min-p."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if not torch.isfinite(logits.max()):  # a tiny temperature (or penalty) overflowed: the limit is greedy
        return int(torch.argmax(logits))
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of strictly better tokens
        drop = before >= params.top_p
        probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0.0))
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def top_logprobs(logits: torch.Tensor, chosen: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    """Log-probability of the chosen token and the n most likely tokens, from the model's raw logits."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logp, n) if n else None
    alts = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else []
    return float(logp[chosen]), alts
