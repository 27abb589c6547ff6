"""The serving engine: a request queue and a scheduler running many sequences as one batch.

Continuous batching: sequences join and leave the running batch between decode steps. Each choice of a
request lives in a slot (a row) of one KV cache, and a decode step runs the slots up to the highest live
one. Long prompts are prefilled a chunk at a time, one chunk between decode steps, so running streams keep
flowing. KV memory is reserved at admission (prompt + max_tokens for every choice) against a token budget;
requests wait in a bounded queue, and past it `submit` says the server is overloaded. A cancelled request
(its client went away) leaves before the next step, and its slots and KV memory are free again.

One thread owns the model and the cache; callers hand in requests and get events back through a callback
that runs on that thread (it must only enqueue).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .errors import ContextLengthError, InvalidArgumentError, OverloadedError
from .generate import Constraint, Event, Sequence, TokenLogprob, check_prompts
from .kv_cache import KVCache
from .lm import LM
from .sampling import SamplingParams, top_logprobs

log = logging.getLogger("grokstack")



@dataclass
class PromptLogprobs:
    """Log-probabilities of the prompt's own tokens (the first has none): what `echo` + `logprobs` report."""

    entries: list[TokenLogprob | None]


Emit = Callable[[Event | PromptLogprobs | BaseException], None]


@dataclass
class Request:
    """A prompt with one SamplingParams per choice (n); events go to `emit` as they happen."""

    prompt: list[int]
    params: list[SamplingParams]
    emit: Emit
    constraints: list[Constraint | None] = field(default_factory=list)
    id: int = 0
    budgets: list[int] = field(default_factory=list)
    reserved: int = 0  # KV tokens held for this request
    prompt_logprobs: int | None = None  # alternatives per prompt token; None = no prompt logprobs
    generate: bool = True  # False: score the prompt only (max_tokens 0)
    cancelled: bool = False
    submitted: float = 0.0


@dataclass
class _Choice:
    request: Request
    index: int
    slot: int
    seq: Sequence
    pos: int = 0  # tokens of this choice in its cache row
    next_token: int = 0


@dataclass
class _Running:
    request: Request
    choices: list[_Choice]
    prefilled: int = 0  # prompt tokens already in the cache (first choice's slot)
    prompt_lps: list[TokenLogprob | None] = field(default_factory=lambda: [None])

    @property
    def in_prefill(self) -> bool:
        return self.prefilled < len(self.request.prompt)


@dataclass
class EngineStats:
    waiting: int
    running: int  # requests
    batch: int  # live sequences
    kv_tokens_used: int
    kv_tokens_reserved: int
    kv_tokens_limit: int
    kv_bytes_per_token: int
    steps: int

    @property
    def kv_bytes_used(self) -> int:
        return self.kv_tokens_used * self.kv_bytes_per_token


class Engine:
    def __init__(
        self,
        lm: LM,
        max_batch: int = 8,
        max_model_len: int | None = None,
        max_queue: int = 64,
        prefill_chunk: int = 256,
        kv_tokens: int | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise InvalidArgumentError("max_batch and prefill_chunk must be >= 1, max_queue >= 0")
        self.lm = lm
        self.model = lm.model
        cfg = self.model.cfg
        self.max_model_len = min(max_model_len or cfg.context_length, cfg.context_length)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.kv_tokens_limit = kv_tokens or max_batch * self.max_model_len
        self.device = self.model.embed_tokens.weight.device
        elem = torch.finfo(self.model.dtype).bits // 8
        self.kv_bytes_per_token = cfg.kv_bytes_per_token(elem)
        # torch.zeros does not touch pages until written: memory grows with what slots use.
        self.cache = KVCache(cfg, max_batch, self.max_model_len, self.model.dtype, self.device)
        tok = lm.tokenizer
        self.stop_ids = tok.stop_ids if tok else frozenset({cfg.eos_token_id})
        self._cv = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._running: list[_Running] = []
        self._free = list(range(max_batch))
        self._reserved = 0
        self._next_id = 1
        self._steps = 0
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ public
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="grokstack-engine", daemon=True)
            self._thread.start()
        return self

    def budget(self, prompt: list[int], params: SamplingParams) -> int:
        """The tokens one choice may generate: max_tokens, which must fit the server's context."""
        room = self.max_model_len - len(prompt)
        if params.max_tokens > room:
            raise ContextLengthError(
                f"this model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{len(prompt)} and {params.max_tokens} more were requested. Shorten the prompt or lower max_tokens"
            )
        return check_prompts(self.model, [prompt], [params], self.max_model_len)[0]

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams | list[SamplingParams],
        emit: Emit,
        constraints: list[Constraint | None] | None = None,
        prompt_logprobs: int | None = None,
        generate: bool = True,
    ) -> Request:
        """Queue a request (n choices = n params); raise at once if it can never run or the queue is full.

        `prompt_logprobs` asks for a PromptLogprobs event before the first token; `generate=False` only
        scores the prompt (each choice then ends at once with finish_reason "length" and no token)."""
        params = [params] if isinstance(params, SamplingParams) else list(params)
        if not params:
            raise InvalidArgumentError("a request needs at least one choice")
        if len(params) > self.max_batch:
            raise InvalidArgumentError(f"n={len(params)} is more than this server runs at once ({self.max_batch})")
        budgets = [self.budget(prompt, sp) for sp in params]
        req = Request(
            list(prompt), params, emit, list(constraints or [None] * len(params)), budgets=budgets,
            prompt_logprobs=prompt_logprobs, generate=generate,
        )
        req.reserved = sum(len(prompt) + b for b in budgets)
        if req.reserved > self.kv_tokens_limit:
            raise ContextLengthError(
                f"the request needs {req.reserved} KV tokens (prompt + max_tokens for each choice); "
                f"this server holds {self.kv_tokens_limit}"
            )
        with self._cv:
            if not self._accepting:
                raise OverloadedError("the server is shutting down", retry_after=5)
            if len(self._waiting) >= self.max_queue:
                raise OverloadedError(f"the request queue is full ({self.max_queue} waiting); retry shortly")
            req.id = self._next_id
            self._next_id += 1
            req.submitted = time.monotonic()
            self._waiting.append(req)
            self._cv.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request (e.g. its client disconnected); its slots are freed before the next step."""
        with self._cv:
            req.cancelled = True
            self._cv.notify()

    def stats(self) -> EngineStats:
        with self._cv:
            used = sum(c.pos for r in self._running for c in r.choices if not c.seq.done)
            used += sum(r.prefilled for r in self._running if r.in_prefill)
            return EngineStats(
                waiting=len(self._waiting),
                running=len(self._running),
                batch=sum(1 for r in self._running for c in r.choices if not c.seq.done),
                kv_tokens_used=used,
                kv_tokens_reserved=self._reserved,
                kv_tokens_limit=self.kv_tokens_limit,
                kv_bytes_per_token=self.kv_bytes_per_token,
                steps=self._steps,
            )

    def shutdown(self, grace: float = 10.0) -> None:
        """Stop taking requests, let running ones finish for up to `grace` seconds, cancel the rest."""
        with self._cv:
            self._accepting = False
            self._cv.notify()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with self._cv:
                if not self._running and not self._waiting:
                    break
            time.sleep(0.02)
        with self._cv:
            for req in [r.request for r in self._running] + list(self._waiting):
                self._fail(req, OverloadedError("the server shut down before this request finished", retry_after=5))
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def generate(self, prompt: list[int], params: SamplingParams | list[SamplingParams]) -> Iterator[Event]:
        """Submit and iterate over the request's events (a blocking helper for scripts and tests)."""
        events: queue.Queue = queue.Queue()
        req = self.submit(prompt, params, events.put)
        left = len(req.params)
        try:
            while left:
                ev = events.get()
                if isinstance(ev, BaseException):
                    raise ev
                if isinstance(ev, PromptLogprobs):
                    continue
                left -= ev.finish_reason is not None
                yield ev
        finally:
            if left:
                self.cancel(req)

    # ------------------------------------------------------------------ scheduler
    def _loop(self) -> None:
        while True:
            with self._cv:
                if self._stop:
                    return
                self._reap()
                self._admit()
                if not self._running:
                    self._cv.wait(timeout=0.5)
                    continue
            try:
                with torch.no_grad():
                    self._prefill_chunk()
                    self._decode_step()
                self._steps += 1
                with self._cv:  # free finished requests now, not after the next wait
                    self._reap()
            except Exception as exc:  # a failing step must not take the server down with it
                log.exception("engine step failed; failing the running requests")
                with self._cv:
                    for run in self._running:
                        run.request.emit(exc)
                        run.request.cancelled = True
                    self._reap()

    def _reap(self) -> None:
        """Drop cancelled and finished requests, freeing their slots and KV reservation."""
        self._waiting = deque(r for r in self._waiting if not r.cancelled)
        keep = []
        for run in self._running:
            if run.request.cancelled or all(c.seq.done for c in run.choices):
                self._free.extend(c.slot for c in run.choices)
                self._reserved -= run.request.reserved
            else:
                keep.append(run)
        self._running = keep
        self._free.sort()

    def _admit(self) -> None:
        while self._waiting and self._accepting:
            req = self._waiting[0]
            n = len(req.params)
            if len(self._free) < n or self._reserved + req.reserved > self.kv_tokens_limit:
                return  # first come, first served: later requests wait behind it
            self._waiting.popleft()
            slots, self._free = self._free[:n], self._free[n:]
            self._reserved += req.reserved
            choices = []
            for j, (sp, budget, slot) in enumerate(zip(req.params, req.budgets, slots, strict=True)):
                seed = None if sp.seed is None else sp.seed + j
                try:
                    seq = Sequence(
                        req.prompt, sp, budget, self.lm.tokenizer, self.model.cfg.vocab_size, self.stop_ids, seed,
                        req.constraints[j],
                    )
                except Exception as exc:  # noqa: BLE001 - reported to its request; the others run on
                    self._fail(req, exc)
                    seq = None
                choices.append(_Choice(req, j, slot, seq))
            if req.cancelled:
                self._free.extend(slots)
                self._free.sort()
                self._reserved -= req.reserved
                continue
            self._running.append(_Running(req, choices))

    def _prefill_chunk(self) -> None:
        """One prefill step: the next chunk of the oldest prompts still in prefill, several prompts in one
        batch while they fit `prefill_chunk` padded tokens. A prompt that ends here gets its first tokens."""
        batch: list[_Running] = []
        width = 0
        for run in self._running:
            if not run.in_prefill or run.request.cancelled:
                continue
            t = min(len(run.request.prompt) - run.prefilled, self.prefill_chunk)
            if batch and (len(batch) + 1) * max(width, t) > self.prefill_chunk:
                break
            batch.append(run)
            width = max(width, t)
        if not batch:
            return
        pad = self.model.cfg.pad_token_id
        tokens = torch.full((len(batch), width), pad, dtype=torch.long)
        positions = torch.zeros((len(batch), width), dtype=torch.long)
        spans = []
        for b, run in enumerate(batch):
            t0 = run.prefilled
            t1 = min(len(run.request.prompt), t0 + width)
            tokens[b, : t1 - t0] = torch.tensor(run.request.prompt[t0:t1])
            # pads run on past the chunk: those positions are rewritten before anything reads them
            positions[b] = torch.arange(t0, t0 + width).clamp(max=self.max_model_len - 1)
            spans.append((t0, t1))
        self.cache.window(torch.tensor([run.choices[0].slot for run in batch]))
        h = self.model.hidden(tokens.to(self.device), positions.to(self.device), self.cache)  # [B, width, D]
        for b, (run, (t0, t1)) in enumerate(zip(batch, spans, strict=True)):
            run.prefilled = t1
            self._after_prefill_chunk(run, h[b, : t1 - t0], t0)

    def _after_prefill_chunk(self, run: _Running, h: torch.Tensor, t0: int) -> None:
        """Prompt logprobs of a chunk's positions [t, D]; at the prompt's end, the first token of each choice."""
        prompt, first = run.request.prompt, run.choices[0]
        k = run.request.prompt_logprobs
        if k is not None:  # position i predicts prompt token i + 1
            chunk_logits = self.model.logits(h).float().cpu()  # [t, V]
            for i, pos in enumerate(range(t0, min(run.prefilled, len(prompt) - 1))):
                chosen, alts = top_logprobs(chunk_logits[i], prompt[pos + 1], k)
                run.prompt_lps.append(TokenLogprob(prompt[pos + 1], chosen, alts))
        if run.in_prefill:
            return
        if k is not None:
            run.request.emit(PromptLogprobs(run.prompt_lps))
        if not run.request.generate:
            for c in run.choices:
                c.seq.done = True
                self._emit(c, Event(c.index, -1, "", None, "length", stop_token=True))  # -1: no token
            return
        logits = self.model.logits(h[-1]).float().cpu()  # [V]
        for c in run.choices:
            if c is not first:  # the other choices share the prompt's keys and values
                self.cache.copy_row(first.slot, c.slot, len(prompt))
            c.pos = len(prompt)
            self._step(c, logits)

    def _decode_step(self) -> None:
        """One token for every sequence past its prefill."""
        live = [c for r in self._running if not r.in_prefill and not r.request.cancelled for c in r.choices
                if not c.seq.done]
        if not live:
            return
        hi = max(c.slot for c in live) + 1
        tokens = torch.full((hi, 1), self.model.cfg.pad_token_id, dtype=torch.long)
        positions = torch.zeros((hi, 1), dtype=torch.long)
        for r in self._running:  # rows that only idle write where nobody reads before it is overwritten
            if r.in_prefill and r.choices[0].slot < hi:
                positions[r.choices[0].slot, 0] = r.prefilled
        for c in live:
            tokens[c.slot, 0] = c.next_token
            positions[c.slot, 0] = c.pos
        self.cache.window(slice(0, hi), read_len=max(c.pos for c in live) + 1)
        logits = self.model(tokens.to(self.device), positions.to(self.device), self.cache)[:, -1].float().cpu()
        for c in live:
            c.pos += 1
            if not c.request.cancelled:
                self._step(c, logits[c.slot])

    def _step(self, c: _Choice, logits: torch.Tensor) -> None:
        """Sample one choice's next token; a failure there (its own parameters) ends only its request."""
        try:
            ev = c.seq.step(logits, c.index)
        except Exception as exc:  # noqa: BLE001
            self._fail(c.request, exc)
            c.seq.done = True
            return
        self._emit(c, ev)

    def _fail(self, req: Request, exc: BaseException) -> None:
        log.warning("request %d failed: %s", req.id, exc)
        req.cancelled = True
        try:
            req.emit(exc)
        except Exception:  # noqa: BLE001 - nobody left to tell
            log.exception("event consumer failed")

    def _emit(self, c: _Choice, ev: Event) -> None:
        c.next_token = ev.token_id
        try:
            c.request.emit(ev)
        except Exception:  # a broken consumer cancels its own request, nobody else's
            log.exception("event consumer failed; cancelling request %d", c.request.id)
            c.request.cancelled = True
