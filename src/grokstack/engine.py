"""The engine: requests in, events out, one step at a time (scheduler -> runner -> output processing).

Every generation goes through here: the server runs the engine on its own thread (`start`), while
`LM.generate`/`LM.stream` drive it on the caller's thread (`run`, or `generate` without `start`). Each step
the `Scheduler` (pure Python) plans which sequences feed which tokens into which KV blocks, the `Runner`
executes that plan on the model and the paged cache, and this module turns the logits into tokens (one
`generate.Sequence` per choice: sampler, detokenizer, stop rules) and events.

Requests wait in a bounded queue; past it `submit` says the server is overloaded. A request that could
never fit the KV pool (prompt + max_tokens for each choice) is refused at submission. A cancelled request
(its client went away) leaves before the next step and its blocks are free again. Events reach callers
through a callback that runs on the engine's thread (it must only enqueue).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .blocks import BlockPool
from .errors import ContextLengthError, InvalidArgumentError, OverloadedError
from .generate import Constraint, Event, Sequence, TokenLogprob, context_room
from .kv_cache import PagedKV
from .runner import RowLogits, Runner
from .sampling import SamplingParams, top_logprobs
from .scheduler import Row, Scheduler

if TYPE_CHECKING:
    from .lm import LM

log = logging.getLogger("grokstack")

BLOCK_SIZE = 16  # tokens per KV block: small enough that sharing works mid-prompt, large enough to gather fast
DEFAULT_KV_SEQUENCES = 16  # the default KV budget holds this many full-length sequences (the old engine's slots)


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
    prompt_logprobs: int | None = None  # alternatives per prompt token; None = no prompt logprobs
    generate: bool = True  # False: score the prompt only (max_tokens 0)
    cancelled: bool = False
    submitted: float = 0.0
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache


@dataclass
class _Live:
    """A request inside the scheduler: its choices' samplers by sequence id."""

    request: Request
    seqs: set[int] = field(default_factory=set)  # its sequences in the scheduler (the prompt's, then the forks)
    choices: dict[int, tuple[int, Sequence]] = field(default_factory=dict)  # seq id -> (choice index, sampler)
    prompt_lps: list[TokenLogprob | None] = field(default_factory=lambda: [None])
    left: int = 0  # choices not finished


@dataclass
class EngineStats:
    waiting: int
    running: int  # requests
    batch: int  # live sequences
    kv_blocks_used: int
    kv_blocks_total: int
    block_size: int
    kv_bytes_per_token: int
    preemptions: int
    cached_tokens: int  # prompt tokens served from the prefix cache so far
    steps: int

    @property
    def kv_tokens_used(self) -> int:
        return self.kv_blocks_used * self.block_size

    @property
    def kv_bytes_used(self) -> int:
        return self.kv_tokens_used * self.kv_bytes_per_token

    @property
    def kv_bytes_total(self) -> int:
        return self.kv_blocks_total * self.block_size * self.kv_bytes_per_token


def kv_blocks(kv_bytes: int, bytes_per_token: int, block_size: int = BLOCK_SIZE) -> int:
    """Blocks that `kv_bytes` of KV memory holds (plus the trash block)."""
    return max(1, kv_bytes // (bytes_per_token * block_size)) + 1


def default_kv_memory(max_model_len: int, bytes_per_token: int, device: torch.device) -> int:
    """DEFAULT_KV_SEQUENCES full-length sequences, but at most a quarter of the memory free on the device."""
    want = DEFAULT_KV_SEQUENCES * max_model_len * bytes_per_token
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):  # no sysconf: trust the sequence count
            return want
    return max(min(want, free // 4), max_model_len * bytes_per_token)


class Engine:
    def __init__(
        self,
        lm: LM,
        max_batch: int = 8,
        max_model_len: int | None = None,
        max_queue: int = 64,
        prefill_chunk: int = 256,
        kv_memory: int | None = None,
        block_size: int = BLOCK_SIZE,
        prefix_cache: bool = True,
    ) -> None:
        """`kv_memory` is the KV budget in bytes (default: `default_kv_memory`)."""
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1 or block_size < 1:
            raise InvalidArgumentError("max_batch, prefill_chunk and block_size must be >= 1, max_queue >= 0")
        self.lm = lm
        self.model = lm.model
        cfg = self.model.cfg
        self.max_model_len = min(max_model_len or cfg.context_length, cfg.context_length)
        self.max_batch = max_batch
        self.max_queue = max_queue
        elem = torch.finfo(self.model.dtype).bits // 8
        self.kv_bytes_per_token = cfg.kv_bytes_per_token(elem)
        device = self.model.embed_tokens.weight.device
        if kv_memory is None:
            kv_memory = default_kv_memory(self.max_model_len, self.kv_bytes_per_token, device)
        num_blocks = kv_blocks(kv_memory, self.kv_bytes_per_token, block_size)
        kv = PagedKV(cfg, num_blocks, block_size, self.model.dtype, device)
        self.runner = lm.runner_for(kv) if lm.runner_for is not None else Runner(self.model, kv)
        self.scheduler = Scheduler(BlockPool(num_blocks, block_size, prefix_cache), max_batch, prefill_chunk)
        tok = lm.tokenizer
        self.stop_ids = tok.stop_ids if tok else frozenset({cfg.eos_token_id})
        self._cv = threading.Condition()
        self._incoming: deque[Request] = deque()
        self._live: dict[int, _Live] = {}  # request id -> its state, once handed to the scheduler
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

    def room(self, prompt: list[int]) -> int:
        """Tokens this server may generate after `prompt` (checks the prompt's ids too)."""
        return context_room(prompt, self.model.cfg.vocab_size, self.max_model_len)

    def budget(self, prompt: list[int], params: SamplingParams) -> int:
        """The tokens one choice may generate: max_tokens, which must fit the server's context."""
        room = self.room(prompt)
        if params.max_tokens > room:
            raise ContextLengthError(
                f"this model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{len(prompt)} and {params.max_tokens} more were requested. Shorten the prompt or lower max_tokens"
            )
        return params.max_tokens

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
        if not self.scheduler.fits(len(prompt), max(budgets), len(params)):
            need = len(params) * (len(prompt) + max(budgets))
            raise ContextLengthError(
                f"the request needs {need} KV tokens (prompt + max_tokens for each choice); this server holds "
                f"{self.scheduler.pool.capacity * self.scheduler.pool.block_size} (--kv-memory)"
            )
        req = Request(
            list(prompt), params, emit, list(constraints or [None] * len(params)), budgets=budgets,
            prompt_logprobs=prompt_logprobs, generate=generate,
        )
        with self._cv:
            if not self._accepting:
                raise OverloadedError("the server is shutting down", retry_after=5)
            if self._waiting_count() >= self.max_queue:
                raise OverloadedError(f"the request queue is full ({self.max_queue} waiting); retry shortly")
            req.id = self._next_id
            self._next_id += 1
            req.submitted = time.monotonic()
            self._incoming.append(req)
            self._cv.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request (e.g. its client disconnected); its blocks are freed before the next step."""
        with self._cv:
            req.cancelled = True
            self._cv.notify()

    def stats(self) -> EngineStats:
        with self._cv:
            sched = self.scheduler
            return EngineStats(
                waiting=self._waiting_count(),
                running=len({s.group for s in sched.running}),
                batch=len(sched.running),
                kv_blocks_used=sched.pool.in_use,
                kv_blocks_total=sched.pool.capacity,
                block_size=sched.pool.block_size,
                kv_bytes_per_token=self.kv_bytes_per_token,
                preemptions=sched.preemptions,
                cached_tokens=sched.cached_tokens,
                steps=self._steps,
            )

    def shutdown(self, grace: float = 10.0) -> None:
        """Stop taking requests, let running ones finish for up to `grace` seconds, cancel the rest."""
        with self._cv:
            self._accepting = False
            self._cv.notify()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self._thread is not None:
            with self._cv:
                if not self._live and not self._incoming:
                    break
            time.sleep(0.02)
        with self._cv:
            for req in [x.request for x in self._live.values()] + list(self._incoming):
                self._fail(req, OverloadedError("the server shut down before this request finished", retry_after=5))
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def generate(self, prompt: list[int], params: SamplingParams | list[SamplingParams]) -> Iterator[Event]:
        """Submit and iterate over the request's events. On a started engine this waits for its thread;
        otherwise it runs the steps itself, on the caller's thread (how `LM.generate` uses the engine)."""
        got: queue.Queue = queue.Queue()
        req = self.submit(prompt, params, got.put)
        left = len(req.params)
        try:
            while left:
                if self._thread is None and got.empty():
                    if not self.step():  # cannot happen for a request `submit` accepted; never spin
                        raise RuntimeError("the engine went idle with a request unfinished")
                    continue
                ev = got.get()
                if isinstance(ev, BaseException):
                    raise ev
                if isinstance(ev, PromptLogprobs):
                    continue
                left -= ev.finish_reason is not None
                yield ev
        finally:
            if left:
                self.cancel(req)
                if self._thread is None:
                    with self._cv:
                        self._reap()

    def run(self) -> None:
        """Step until every submitted request is done (synchronous use, without `start`)."""
        while self.step():
            pass

    # ------------------------------------------------------------------ one step
    def step(self) -> bool:
        """Schedule, execute and process one step; False when there was nothing to do."""
        with self._cv:
            self._take_incoming()
            self._reap()
            plan = self.scheduler.schedule()
            score = {row.seq for row in plan.rows if self._scores(row)}
        if not plan.rows and not plan.copies:
            return False
        try:
            with torch.no_grad():
                outs = self.runner.execute(plan, score)
        except Exception as exc:  # a failing step must not take the server down with it
            log.exception("engine step failed; failing the running requests")
            with self._cv:
                for live in list(self._live.values()):
                    self._fail(live.request, exc)
                self._reap()
            return True
        with self._cv:
            self.scheduler.computed(plan)
            for row, out in zip(plan.rows, outs, strict=True):
                self._process(row, out)
            self._reap()
            self._steps += 1
        return True

    def _loop(self) -> None:
        while True:
            with self._cv:
                if self._stop:
                    return
                if not self._incoming and not self._live:
                    self._cv.wait(timeout=0.5)
                    continue
            if not self.step():
                with self._cv:  # only waiting requests that cannot be admitted yet: nothing to do until one ends
                    self._cv.wait(timeout=0.01)

    def _waiting_count(self) -> int:
        admitted = {s.group for s in self.scheduler.running}
        return len(self._incoming) + sum(1 for rid in self._live if rid not in admitted)

    def _take_incoming(self) -> None:
        while self._incoming:
            req = self._incoming.popleft()
            if req.cancelled:
                continue
            live = _Live(req, left=len(req.params))
            self._live[req.id] = live
            # scoring every prompt position needs every position computed: no prefix reuse for it
            seq = self.scheduler.add(req.id, req.prompt, len(req.params), use_cache=req.prompt_logprobs is None)
            live.seqs.add(seq.id)

    def _scores(self, row: Row) -> bool:
        live = self._live.get(self.scheduler.seqs[row.seq].group)
        return live is not None and live.request.prompt_logprobs is not None and row.start < len(live.request.prompt)

    def _reap(self) -> None:
        """Drop cancelled and finished requests, freeing their blocks."""
        for rid, live in list(self._live.items()):
            if live.request.cancelled or live.left == 0:
                for sid in live.seqs:
                    self.scheduler.finish(sid)
                del self._live[rid]

    # ------------------------------------------------------------------ outputs
    def _process(self, row: Row, out: RowLogits) -> None:
        seq = self.scheduler.seqs.get(row.seq)
        live = self._live.get(seq.group) if seq is not None else None
        if live is None or live.request.cancelled:
            return
        req = live.request
        if out.every is not None:
            self._score_prompt(live, row, out.every)
        if not row.sample:
            return
        if row.prompt_end:
            req.cached_tokens = seq.cached
            if req.prompt_logprobs is not None:
                req.emit(PromptLogprobs(live.prompt_lps))
            if not req.generate:
                for j in range(len(req.params)):
                    self._emit(req, Event(j, -1, "", None, "length", stop_token=True))  # -1: no token
                live.left = 0
                return
            forks = self.scheduler.fork(row.seq)
            live.seqs.update(forks)
            for j, sid in enumerate(forks):
                sp = req.params[j]
                seed = None if sp.seed is None else sp.seed + j
                try:
                    sampler = Sequence(req.prompt, sp, req.budgets[j], self.lm.tokenizer, self.model.cfg.vocab_size,
                                       self.stop_ids, seed, req.constraints[j])
                except Exception as exc:  # noqa: BLE001 - reported to its request; the others run on
                    self._fail(req, exc)
                    return
                live.choices[sid] = (j, sampler)
            for sid in list(live.choices):
                self._sample(live, sid, out.last)
            return
        self._sample(live, row.seq, out.last)

    def _score_prompt(self, live: _Live, row: Row, logits: torch.Tensor) -> None:
        """Position p's logits score prompt token p + 1; positions already scored (before a preemption) are skipped."""
        prompt, k = live.request.prompt, live.request.prompt_logprobs
        for i, pos in enumerate(range(row.start, row.start + len(row.tokens))):
            if pos + 1 == len(live.prompt_lps) and pos + 1 < len(prompt):
                chosen, alts = top_logprobs(logits[i], prompt[pos + 1], k)
                live.prompt_lps.append(TokenLogprob(prompt[pos + 1], chosen, alts))

    def _sample(self, live: _Live, sid: int, logits: torch.Tensor) -> None:
        """Pick one choice's next token; a failure there (its own parameters) ends only its request."""
        index, sampler = live.choices[sid]
        try:
            ev = sampler.step(logits, index)
        except Exception as exc:  # noqa: BLE001
            self._fail(live.request, exc)
            return
        if sampler.done:
            live.left -= 1
            self.scheduler.finish(sid)
        else:
            self.scheduler.append(sid, ev.token_id)
        self._emit(live.request, ev)

    def _fail(self, req: Request, exc: BaseException) -> None:
        log.warning("request %d failed: %s", req.id, exc)
        req.cancelled = True
        try:
            req.emit(exc)
        except Exception:  # noqa: BLE001 - nobody left to tell
            log.exception("event consumer failed")

    def _emit(self, req: Request, ev: Event) -> None:
        try:
            req.emit(ev)
        except Exception:  # a broken consumer cancels its own request, nobody else's
            log.exception("event consumer failed; cancelling request %d", req.id)
            req.cancelled = True
