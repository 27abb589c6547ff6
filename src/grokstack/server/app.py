"""The HTTP API: OpenAI/xAI-compatible routes over one `Engine` (api.md).

Handlers validate (pydantic schemas, then model/limits), turn a request into prompt ids and sampling
parameters, and hand it to the engine; `Job` carries the engine's events back into the event loop.
Streaming responses are SSE; a client that goes away cancels its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import html
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from .. import __version__
from ..engine import Engine, PromptLogprobs
from ..errors import (
    ConfigError,
    ContentFilterError,
    GrokstackError,
    InvalidArgumentError,
    NotFoundError,
    OverloadedError,
)
from ..generate import Event, TokenLogprob
from ..lm import LM
from ..sampling import SamplingParams
from ..search import live
from ..search.index import Hit, Index
from . import errors
from .auth import Key, Keys
from .deferred import DeferredStore
from .metrics import Metrics
from .moderation import Guards, GuardSettings, RequestGuard, Verdict, moderation_result
from .schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    Message,
    ModerationRequest,
    TokenizeRequest,
    TokenizeTextRequest,
)

log = logging.getLogger("grokstack.server")
KEEPALIVE_SECONDS = 15.0


@dataclass
class Settings:
    model_id: str
    aliases: list[str] = field(default_factory=list)
    api_keys: list[str] = field(default_factory=list)
    keys_file: str | None = None
    rpm: int = 0
    tpm: int = 0
    error_style: str = "openai"
    max_body_bytes: int = 8 << 20
    state_dir: Path = Path(".grokstack")
    data_dir: Path | None = None  # live-search index (shared with `grokstack ingest` / `search`)
    search_results: bool = False  # add the Perplexity-like `search_results` list to every searched answer
    metrics_key: bool = False  # /metrics needs an admin key (else it is public, for scrapers on a private network)
    guard: GuardSettings = field(default_factory=GuardSettings)


# ----------------------------------------------------------------------------- engine <-> event loop
@dataclass
class ChoiceResult:
    text: str = ""
    tokens: list[TokenLogprob | int] = field(default_factory=list)  # ids, or logprobs when asked for
    finish_reason: str | None = None
    generated: int = 0


@dataclass
class ChatPlan:
    """A chat request ready for the engine: prompt ids, one SamplingParams per choice, output constraints,
    and the live-search hits put into the prompt (None when no search ran)."""

    prompt: list[int]
    params: list[SamplingParams]
    constraints: list | None
    hits: list[Hit] | None
    guard: RequestGuard
    refusal: Verdict | None = None  # the input guard blocked the request: answer with a refusal, generate nothing


class Job:
    """One engine request seen from the event loop: events arrive on an asyncio queue."""

    def __init__(self, app_state, prompt: list[int], params: list[SamplingParams], constraints=None,
                 prompt_logprobs: int | None = None, generate: bool = True, key: Key | None = None) -> None:
        self.state = app_state
        self.key = key  # its tokens/min bucket gets back what the request reserved but did not use
        self.unused = sum(sp.max_tokens for sp in params) if generate else 0
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.prompt = prompt
        self.n = len(params)
        self.started = time.monotonic()
        self.last_token: dict[int, float] = {}
        self.finished = 0
        self.req = app_state.engine.submit(prompt, params, self._emit, constraints, prompt_logprobs, generate)

    def cancel(self) -> None:
        """Withdraw the request if it is still running (its client or its batch gave up)."""
        if self.finished < self.n:
            self.state.engine.cancel(self.req)
        if self.key is not None:
            self.key.tokens.give(max(0, self.unused))
            self.key = None

    def _emit(self, ev) -> None:  # engine thread: only stamp and enqueue
        with contextlib.suppress(RuntimeError):  # the loop is gone (server stopped): nobody to tell
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (time.monotonic(), ev))

    async def events(self, request: Request | None = None) -> AsyncIterator[Event | PromptLogprobs | None]:
        """Engine events until every choice finished; None now and then while waiting (for keep-alives)."""
        metrics = self.state.metrics
        quiet_since = time.monotonic()
        try:
            while self.finished < self.n:
                try:
                    stamp, ev = await asyncio.wait_for(self.queue.get(), timeout=1.0)
                except TimeoutError:
                    if request is not None and await request.is_disconnected():
                        return
                    if time.monotonic() - quiet_since >= KEEPALIVE_SECONDS:
                        quiet_since = time.monotonic()
                        yield None
                    continue
                quiet_since = stamp
                if isinstance(ev, BaseException):
                    raise ev
                if isinstance(ev, Event):
                    if ev.token_id >= 0:
                        prev = self.last_token.get(ev.index)
                        if prev is None and ev.index == 0:
                            metrics.ttft.observe(stamp - self.started)
                        elif prev is not None:
                            metrics.itl.observe(stamp - prev)
                        self.last_token[ev.index] = stamp
                        self.unused -= 1
                        metrics.completion_tokens.inc()
                    self.finished += ev.finish_reason is not None
                yield ev
        finally:
            self.cancel()

    async def collect(
        self, request: Request | None, logprobs: bool
    ) -> tuple[list[ChoiceResult], PromptLogprobs | None]:
        results = [ChoiceResult() for _ in range(self.n)]
        prompt_lps = None
        async for ev in self.events(request):
            if isinstance(ev, PromptLogprobs):
                prompt_lps = ev
            elif isinstance(ev, Event):
                r = results[ev.index]
                r.text += ev.text
                if ev.token_id >= 0:
                    r.generated += 1
                    r.tokens.append(ev.logprob if logprobs and ev.logprob else ev.token_id)
                r.finish_reason = ev.finish_reason or r.finish_reason
        if self.finished < self.n:
            raise asyncio.CancelledError("client disconnected")
        return results, prompt_lps


# ----------------------------------------------------------------------------- helpers
def _now() -> int:
    return int(time.time())


def _sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def _message_text(m: Message) -> str:
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    parts = []
    for p in m.content:
        if p.type != "text":
            raise InvalidArgumentError(f"content parts of type {p.type!r} are not supported (text-only models)")
        parts.append(p.text or "")
    return "".join(parts)


class Api:
    """Route logic with the shared state (engine, tokenizer, keys, store, metrics)."""

    def __init__(self, lm: LM, engine: Engine, settings: Settings) -> None:
        self.lm = lm
        self.tok = lm.need_tokenizer()
        self.engine = engine
        self.settings = settings
        self.keys = Keys(settings.api_keys, settings.keys_file, settings.rpm, settings.tpm)
        if settings.metrics_key and not self.keys.has_admin:
            raise ConfigError("--metrics-key needs an admin key: mark one with 'admin' in the API keys file")
        self.metrics = Metrics()
        self.store = DeferredStore(Path(settings.state_dir) / "deferred.sqlite")
        self.index = Index(Path(settings.data_dir) / "index.sqlite") if settings.data_dir else None
        self.guards = Guards(settings.guard)
        self.created = _now()
        cfg = lm.config
        knobs = json.dumps(cfg.to_hf_config(), sort_keys=True)
        digest = hashlib.sha256(f"{__version__}|{settings.model_id}|{lm.model.dtype}|{knobs}".encode()).hexdigest()
        self.fingerprint = "fp_" + digest[:10]
        self.tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ checks
    def authorize(self, request: Request) -> Key:
        return self.keys.check(request.headers.get("authorization"))

    def check_model(self, model: str) -> None:
        if model != self.settings.model_id and model not in self.settings.aliases:
            raise NotFoundError(f"the model '{model}' does not exist; this server serves '{self.settings.model_id}'")

    def charge(self, key: Key, tokens: int) -> None:
        key.requests.take(1, "requests")
        try:
            key.tokens.take(tokens, "tokens")
        except GrokstackError:
            key.requests.give(1)
            raise

    def limit_headers(self, key: Key) -> dict[str, str]:
        return key.requests.headers("requests") | key.tokens.headers("tokens")

    # ------------------------------------------------------------------ request -> engine
    def sampling(self, body, prompt: list[int], max_tokens: int | None) -> list[SamplingParams]:
        stops, stop_ids = [], set()
        for s in body.stop or []:  # a stop string that is a special token's text stops on that token
            if s in self.tok.special_ids:
                stop_ids.add(self.tok.special_ids[s])
            else:
                stops.append(s)
        room = self.engine.room(prompt)  # also refuses an empty prompt or ids outside the vocabulary
        bias = {int(k): v for k, v in (body.logit_bias or {}).items()}
        if bias and max(bias) >= self.lm.config.vocab_size:
            raise InvalidArgumentError(f"logit_bias token id {max(bias)} is outside 0..{self.lm.config.vocab_size - 1}")
        base = dict(
            max_tokens=max_tokens if max_tokens is not None else max(room, 1),
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k,
            min_p=body.min_p,
            repetition_penalty=body.repetition_penalty,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            seed=body.seed,
            stop=stops,
            stop_token_ids=sorted(self.tok.stop_ids | stop_ids) if stop_ids else None,
            logit_bias=bias or None,
            ignore_eos=body.ignore_eos,
        )
        return [SamplingParams(**base) for _ in range(body.n)]

    def chat_messages(self, body: ChatCompletionRequest) -> list[dict]:
        if body.tools and body.tool_choice != "none":
            raise InvalidArgumentError("tools are not supported by this server yet; send the request without tools")
        messages = []
        for m in body.messages:
            if m.role in ("tool", "function"):
                raise InvalidArgumentError(f"messages with role '{m.role}' need tool support, which this server lacks")
            role = "system" if m.role == "developer" else m.role
            messages.append({"role": role, "content": _message_text(m)})
        return messages

    def search_for(
        self, body: ChatCompletionRequest, messages: list[dict], guard: RequestGuard
    ) -> tuple[list[dict], list[Hit] | None]:
        """Live search (xAI `search_parameters`, or OpenAI's `web_search_options` as mode auto): the messages
        with a sources block before the last user turn, and the hits injected (None when no search ran)."""
        params = body.search_parameters
        if params is None and body.web_search_options is not None:
            size = body.web_search_options.get("search_context_size", "medium")
            if size not in live.SEARCH_CONTEXT_SIZES:
                raise InvalidArgumentError("web_search_options.search_context_size must be low, medium or high")
            params = {"mode": "auto", "max_search_results": live.SEARCH_CONTEXT_SIZES[size]}
        plan = live.plan_search(params, self.index)
        question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        if not live.decide(plan, question):
            return messages, None
        if self.index is None:
            return messages, []  # no data directory: searched, found nothing
        hits = guard.screen_hits(live.retrieve(self.index, plan, question))
        budget = int(self.engine.max_model_len * live.CONTEXT_SHARE)
        hits, text = live.fit_sources(hits, live.new_marker(),
                                      lambda t: len(self.tok.encode(t, allow_special=False)), budget)
        return (live.with_sources(messages, text) if hits else messages), hits

    def constraints(self, body: ChatCompletionRequest) -> list | None:
        fmt = body.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_schema":
            raise InvalidArgumentError("response_format json_schema is not supported yet; use json_object")
        if body.stop:
            raise InvalidArgumentError("stop strings could cut a json_object response mid-object; leave stop out")
        from ..json_constraint import JsonObjectConstraint

        return [JsonObjectConstraint(self.tok.token_bytes) for _ in range(body.n)]

    # ------------------------------------------------------------------ token text
    def token_text(self, token_id: int) -> tuple[str, list[int]]:
        """A token's text and bytes; bytes that are not UTF-8 on their own get a lossless `bytes:` form."""
        raw = self.tok.token_bytes(token_id)
        if not raw:
            text = self.tok.decode([token_id])
            return text, list(text.encode())
        try:
            return raw.decode("utf-8"), list(raw)
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)

    def chat_logprobs(self, lps: list[TokenLogprob], top: int) -> dict:
        content = []
        for lp in lps:
            text, raw = self.token_text(lp.token_id)
            alts = []
            for tid, value in lp.top[:top]:
                t, b = self.token_text(tid)
                alts.append({"token": t, "logprob": value, "bytes": b})
            content.append({"token": text, "logprob": lp.logprob, "bytes": raw, "top_logprobs": alts})
        return {"content": content, "refusal": None}

    def usage(self, prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict:
        """`cached`: prompt tokens whose keys and values came from the engine's prefix cache."""
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"text_tokens": prompt_tokens, "audio_tokens": 0, "image_tokens": 0,
                                      "cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
            "num_sources_used": 0,
        }

    # ------------------------------------------------------------------ chat
    def prepare_chat(self, body: ChatCompletionRequest, key: Key | None = None, request_id: str = "") -> ChatPlan:
        guard = self.guards.request(key, request_id)
        messages = self.chat_messages(body)
        refusal = guard.check_input(messages)
        if refusal is not None and self.settings.guard.block_style == "error":
            raise ContentFilterError(f"{guard.refusal} (blocked by the content guard: {', '.join(refusal.codes)})",
                                     refusal.codes)
        hits = None
        if refusal is None:
            messages, hits = self.search_for(body, messages, guard)
        prompt = self.tok.chat_ids(messages)
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = self.sampling(body, prompt, max_tokens)
        if body.logprobs:
            params = [p.replace(logprobs=body.top_logprobs or 0) for p in params]
        return ChatPlan(prompt, params, self.constraints(body), hits, guard, refusal)

    def refusal_result(self, body: ChatCompletionRequest, plan: ChatPlan) -> dict:
        """The answer to a blocked request: HTTP 200, a refusal in every choice, nothing generated."""
        refusal = plan.guard.refusal
        message = {"role": "assistant", "content": refusal, "refusal": refusal}
        choices = [{"index": i, "message": message, "logprobs": None, "finish_reason": "content_filter"}
                   for i in range(body.n)]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": _now(),
            "model": body.model, "choices": choices, "system_fingerprint": self.fingerprint,
            "usage": self.usage(len(plan.prompt), 0),
        }

    def search_fields(self, body: ChatCompletionRequest, plan: ChatPlan, answers: list[str]) -> dict:
        """`citations` (and the opt-in `search_results`) for a response whose search ran."""
        if plan.hits is None:
            return {}
        out = {}
        params = body.search_parameters or {}
        if params.get("return_citations", True):
            out["citations"] = live.citations(plan.hits, answers)
        if (body.grokstack_options or {}).get("search_results") or self.settings.search_results:
            out["search_results"] = live.search_results(plan.hits)
        return out

    async def chat_result(
        self, body: ChatCompletionRequest, plan: ChatPlan, request, key: Key | None = None
    ) -> dict:
        if plan.refusal is not None:
            return self.refusal_result(body, plan)
        prompt, params = plan.prompt, plan.params
        job = Job(self, prompt, params, plan.constraints, key=key)
        self.metrics.prompt_tokens.inc(len(prompt))
        results, _ = await job.collect(request, body.logprobs)
        choices = []
        for i, r in enumerate(results):
            lps = [t for t in r.tokens if isinstance(t, TokenLogprob) and t.token_id not in self._stop_set(params[i])]
            text, blocked = plan.guard.finish_output(r.text)
            refusal = None
            if blocked is not None:  # checked whole before returning: nothing of a blocked answer goes out
                text = refusal = plan.guard.refusal
                r.finish_reason = "content_filter"
            choices.append({
                "index": i,
                "message": {"role": "assistant", "content": text, "refusal": refusal},
                "logprobs": self.chat_logprobs(lps, body.top_logprobs or 0) if body.logprobs else None,
                "finish_reason": r.finish_reason,
            })
        usage = self.usage(len(prompt), sum(r.generated for r in results), job.req.cached_tokens)
        usage["num_sources_used"] = len(plan.hits or [])
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": _now(),
            "model": body.model, "choices": choices, "system_fingerprint": self.fingerprint, "usage": usage,
            **self.search_fields(body, plan, [r.text for r in results]),
        }

    def _stop_set(self, sp: SamplingParams) -> set[int]:
        return set(sp.stop_token_ids) if sp.stop_token_ids is not None else set(self.tok.stop_ids)

    async def chat_stream(
        self, body: ChatCompletionRequest, plan: ChatPlan, request, key: Key | None = None
    ) -> AsyncIterator[bytes]:
        prompt, params = plan.prompt, plan.params
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", _now()
        usage_on = bool(body.stream_options and body.stream_options.include_usage)
        if plan.refusal is not None:  # one content chunk and the finish chunk per choice, nothing generated
            async for item in self.refusal_stream(body, plan, cid, created, usage_on):
                yield item
            return
        job = Job(self, prompt, params, plan.constraints, key=key)
        self.metrics.prompt_tokens.inc(len(prompt))

        def chunk(choices: list, usage: Any = None, extra: dict | None = None) -> bytes:
            out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                   "system_fingerprint": self.fingerprint, "choices": choices}
            if usage_on:
                out["usage"] = usage
            return _sse(out | (extra or {}))

        generated = [0] * len(params)
        texts = [""] * len(params)
        screens = [plan.guard.output() for _ in params]
        done = [False] * len(params)
        try:
            for i in range(len(params)):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            async for ev in job.events(request):
                if ev is None:
                    yield b": keep-alive\n\n"
                    continue
                if not isinstance(ev, Event) or done[ev.index]:
                    continue
                i = ev.index
                if ev.token_id >= 0:
                    generated[i] += 1
                lp = None
                if body.logprobs and ev.logprob is not None and not ev.stop_token:
                    lp = self.chat_logprobs([ev.logprob], body.top_logprobs or 0)
                # the output guard releases text once its window passed (buffered) or at once (optimistic)
                released, blocked = screens[i].feed(ev.text)
                if ev.finish_reason and blocked is None:
                    rest, blocked = screens[i].finish()
                    released += rest
                texts[i] += released
                if released or lp:
                    yield chunk([{"index": i, "delta": {"content": released}, "logprobs": lp,
                                  "finish_reason": None}])
                finish = "content_filter" if blocked is not None else ev.finish_reason
                if finish:
                    done[i] = True
                    if blocked is not None:
                        refusal = plan.guard.refusal
                        yield chunk([{"index": i, "delta": {"content": refusal, "refusal": refusal},
                                      "logprobs": None, "finish_reason": None}])
                    # citations are known only now; they ride on the last chunk before [DONE] (api.md §5)
                    last = all(done) and not usage_on
                    yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": finish}],
                                extra=self.search_fields(body, plan, texts) if last else None)
                    if all(done):
                        break  # leaving the loop cancels what is still generating (a blocked choice)
            if usage_on:
                usage = self.usage(len(prompt), sum(generated), job.req.cached_tokens)
                usage["num_sources_used"] = len(plan.hits or [])
                yield chunk([], usage, extra=self.search_fields(body, plan, texts))
            yield _sse("[DONE]")
        except GrokstackError as exc:  # mid-stream: one error event, then close (api.md §2)
            kind = errors.KINDS.get(exc.http_status, errors.KINDS[500])
            yield _sse({"error": {"message": str(exc), "type": kind[0], "code": kind[1]}})
        except Exception as exc:  # noqa: BLE001 - a stream cannot change its status any more
            log.exception("stream failed")
            yield _sse({"error": {"message": f"internal error: {type(exc).__name__}", "type": "server_error",
                                  "code": "internal_error"}})

    async def refusal_stream(self, body, plan: ChatPlan, cid: str, created: int, usage_on: bool):
        for i in range(body.n):
            refusal = plan.guard.refusal
            for delta, finish in (({"role": "assistant", "content": refusal, "refusal": refusal}, None),
                                  ({}, "content_filter")):
                out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                       "system_fingerprint": self.fingerprint,
                       "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}]}
                yield _sse(out | ({"usage": None} if usage_on else {}))
        if usage_on:
            yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                        "system_fingerprint": self.fingerprint, "choices": [],
                        "usage": self.usage(len(plan.prompt), 0)})
        yield _sse("[DONE]")

    # ------------------------------------------------------------------ completions
    def completion_prompts(self, body: CompletionRequest) -> list[list[int]]:
        p = body.prompt
        if isinstance(p, str):
            prompts = [self.tok.encode(p)]
        elif isinstance(p[0], str):
            prompts = [self.tok.encode(s) for s in p]
        elif isinstance(p[0], int):
            prompts = [list(p)]
        else:
            prompts = [list(x) for x in p]
        for i, ids in enumerate(prompts):
            if not ids:
                raise InvalidArgumentError(f"prompt {i} encodes to no tokens")
        return prompts

    def check_completion(self, body: CompletionRequest) -> None:
        if body.suffix:
            raise InvalidArgumentError("suffix is not supported")
        if body.best_of is not None and body.best_of != body.n:
            raise InvalidArgumentError("best_of other than n is not supported")
        if body.max_tokens == 0 and not body.echo:
            raise InvalidArgumentError("max_tokens 0 is only allowed with echo (scoring a prompt)")
        if body.max_tokens == 0 and body.stream:
            raise InvalidArgumentError("max_tokens 0 cannot stream")

    def completion_logprobs(self, entries: list[TokenLogprob | None], first_ids: list[int], k: int,
                            offset: int) -> dict:
        """OpenAI's legacy logprobs: token strings, their logprobs, top-k dicts and character offsets.
        `first_ids` are the tokens whose entries are None (the first prompt token)."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tid in first_ids:
            self._add_logprob(out, tid, None, k, offset)
            offset += len(out["tokens"][-1])
        for e in entries:
            if e is None:
                continue
            self._add_logprob(out, e.token_id, e, k, offset)
            offset += len(out["tokens"][-1])
        return out

    def _add_logprob(self, out: dict, token_id: int, e: TokenLogprob | None, k: int, offset: int) -> None:
        text = self.token_text(token_id)[0]
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        if e is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            return
        top = {self.token_text(t)[0]: v for t, v in e.top[:k]}
        top.setdefault(text, e.logprob)  # the sampled token is always listed (OpenAI)
        out["token_logprobs"].append(e.logprob)
        out["top_logprobs"].append(top)

    async def completion_result(
        self, body: CompletionRequest, prompts: list[list[int]], request: Request, key: Key | None = None
    ) -> dict:
        want_lps = body.logprobs is not None
        jobs = self.submit_prompts(body, prompts, key, max(body.max_tokens, 1),
                                   body.logprobs if body.echo and want_lps else None, body.max_tokens > 0)
        try:
            gathered = await asyncio.gather(*(job.collect(request, want_lps) for job in jobs))
        finally:
            for job in jobs:
                job.cancel()
        choices, completion_tokens = [], 0
        for pi, (ids, (results, prompt_lps)) in enumerate(zip(prompts, gathered, strict=True)):
            prompt_text = self.tok.decode(ids) if body.echo else ""
            for j, r in enumerate(results):
                completion_tokens += r.generated
                lps = None
                if want_lps:
                    gen = [t for t in r.tokens if isinstance(t, TokenLogprob)]
                    if body.echo:
                        entries = (prompt_lps.entries[1:] if prompt_lps else []) + gen
                        lps = self.completion_logprobs(entries, ids[:1], body.logprobs, 0)
                    else:
                        lps = self.completion_logprobs(gen, [], body.logprobs, len(prompt_text))
                choices.append({"index": pi * body.n + j, "text": prompt_text + r.text, "logprobs": lps,
                                "finish_reason": r.finish_reason})
        prompt_tokens = sum(len(p) for p in prompts)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": _now(), "model": body.model,
            "choices": choices,
            "usage": self.usage(prompt_tokens, completion_tokens, sum(job.req.cached_tokens for job in jobs)),
            "system_fingerprint": self.fingerprint,
        }

    async def completion_stream(
        self, body: CompletionRequest, prompts: list[list[int]], request: Request, key: Key | None = None
    ):
        cid, created = f"cmpl-{uuid.uuid4().hex}", _now()
        usage_on = bool(body.stream_options and body.stream_options.include_usage)
        want_lps = body.logprobs is not None
        queue: asyncio.Queue = asyncio.Queue()

        def chunk(choices: list, usage: Any = None) -> bytes:
            out = {"id": cid, "object": "text_completion", "created": created, "model": body.model,
                   "system_fingerprint": self.fingerprint, "choices": choices}
            if usage_on:
                out["usage"] = usage
            return _sse(out)

        async def pump(pi: int, job: Job) -> None:
            try:
                async for ev in job.events(request):
                    await queue.put((pi, ev))
            except BaseException as exc:  # noqa: BLE001 - handed to the stream below
                await queue.put((pi, exc))
            await queue.put((pi, StopAsyncIteration()))

        jobs = self.submit_prompts(body, prompts, key, body.max_tokens)
        tasks = [asyncio.create_task(pump(pi, job)) for pi, job in enumerate(jobs)]
        generated, left = 0, len(jobs)
        try:
            if body.echo:
                for pi, ids in enumerate(prompts):
                    for j in range(body.n):
                        yield chunk([{"index": pi * body.n + j, "text": self.tok.decode(ids), "logprobs": None,
                                      "finish_reason": None}])
            while left:
                pi, ev = await queue.get()
                if isinstance(ev, StopAsyncIteration):
                    left -= 1
                    continue
                if isinstance(ev, BaseException):
                    raise ev
                if ev is None:
                    yield b": keep-alive\n\n"
                    continue
                if not isinstance(ev, Event):
                    continue
                generated += ev.token_id >= 0
                lps = None
                if want_lps and ev.logprob is not None:
                    lps = self.completion_logprobs([ev.logprob], [], body.logprobs, 0)
                if ev.text or lps or ev.finish_reason:
                    yield chunk([{"index": pi * body.n + ev.index, "text": ev.text, "logprobs": lps,
                                  "finish_reason": ev.finish_reason}])
            if usage_on:
                yield chunk([], self.usage(sum(len(p) for p in prompts), generated,
                                           sum(job.req.cached_tokens for job in jobs)))
            yield _sse("[DONE]")
        except GrokstackError as exc:
            kind = errors.KINDS.get(exc.http_status, errors.KINDS[500])
            yield _sse({"error": {"message": str(exc), "type": kind[0], "code": kind[1]}})
        except Exception as exc:  # noqa: BLE001 - a stream cannot change its status any more
            log.exception("stream failed")
            yield _sse({"error": {"message": f"internal error: {type(exc).__name__}", "type": "server_error",
                                  "code": "internal_error"}})
        finally:
            for t in tasks:
                t.cancel()
            for job in jobs:
                job.cancel()

    def submit_prompts(self, body: CompletionRequest, prompts: list[list[int]], key: Key | None, max_tokens: int,
                       prompt_logprobs: int | None = None, generate: bool = True) -> list[Job]:
        """One engine request per prompt; if any is refused, the ones already queued are withdrawn."""
        jobs: list[Job] = []
        try:
            for ids in prompts:
                params = self.sampling(body, ids, max_tokens)
                if body.logprobs is not None:
                    params = [sp.replace(logprobs=body.logprobs) for sp in params]
                jobs.append(Job(self, ids, params, prompt_logprobs=prompt_logprobs, generate=generate, key=key))
                self.metrics.prompt_tokens.inc(len(ids))
        except BaseException:
            for job in jobs:
                job.cancel()
            raise
        return jobs

    # ------------------------------------------------------------------ deferred
    def spawn_deferred(self, job_id: str, body: ChatCompletionRequest, key: Key) -> None:
        async def run() -> None:
            try:
                plan = await asyncio.to_thread(self.prepare_chat, body, key)
                while True:
                    try:
                        result = await self.chat_result(body, plan, None, key)
                        break
                    except OverloadedError:  # the queue is full: a deferred job can wait its turn
                        await asyncio.sleep(1.0)
                self.store.finish(job_id, 200, result)
            except GrokstackError as exc:
                self.store.finish(job_id, exc.http_status, self.error_body(exc.http_status, str(exc)))
            except Exception as exc:  # noqa: BLE001 - stored as the job's answer, never left pending
                log.exception("deferred job %s failed", job_id)
                self.store.finish(job_id, 500, self.error_body(500, f"internal error: {type(exc).__name__}"))

        task = asyncio.create_task(run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def error_body(self, status: int, message: str) -> dict:
        return json.loads(errors.error_response(status, message, self.settings.error_style).body)

    # ------------------------------------------------------------------ listings
    def model_card(self) -> dict:
        card = {"id": self.settings.model_id, "object": "model", "created": self.created, "owned_by": "xai"}
        card.update({k: v for k, v in self.lm.notice.to_dict().items() if v})
        return card

    def language_model(self) -> dict:
        return {
            "id": self.settings.model_id, "fingerprint": self.fingerprint, "created": self.created,
            "object": "model", "owned_by": "xai", "version": __version__, "input_modalities": ["text"],
            "output_modalities": ["text"], "prompt_text_token_price": 0, "cached_prompt_text_token_price": 0,
            "prompt_image_token_price": 0, "completion_text_token_price": 0, "search_price": 0,
            "aliases": list(self.settings.aliases),
        }


# ----------------------------------------------------------------------------- app
class Edge:
    """The outermost ASGI layer: every response gets an x-request-id and is counted; bodies are read here
    (at most `limit` bytes, else 413) and JSON is assumed whatever the content type (curl -d sends a form
    type); an exception that escapes the app becomes a 500 envelope instead of a dropped connection."""

    def __init__(self, app, limit: int, style: str, metrics: Metrics) -> None:
        self.app, self.limit, self.style, self.metrics = app, limit, style, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1") or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid  # request.state.request_id for the audit log
        status = 500
        started = False

        async def send_with_id(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        try:
            body = await self._read_body(scope, receive)
            if body is None:
                await errors.error_response(413, f"the request body is larger than {self.limit} bytes",
                                            self.style)(scope, receive, send_with_id)
                return
            await self.app(self._as_json(scope), self._replay(body, receive), send_with_id)
        except Exception:
            log.exception("internal error on %s", scope.get("path"))
            if not started:
                await errors.error_response(500, "internal error", self.style)(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            self.metrics.requests.labels(getattr(route, "path", "unmatched"), str(status)).inc()

    async def _read_body(self, scope, receive) -> bytes | None:
        """The whole body, or None past the limit (declared or actual)."""
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        return b"".join(chunks)

    @staticmethod
    def _replay(body: bytes, receive):
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect like a real receive

        return replay

    @staticmethod
    def _as_json(scope):
        if scope.get("method") != "POST":
            return scope
        headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
        return {**scope, "headers": [*headers, (b"content-type", b"application/json")]}


def create_app(lm: LM, engine: Engine, settings: Settings) -> FastAPI:
    api = Api(lm, engine, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        for job_id, body, owner in api.store.pending():  # jobs a previous run accepted but did not finish
            api.spawn_deferred(job_id, ChatCompletionRequest.model_validate(body), api.keys.by_owner(owner))
        yield
        await asyncio.to_thread(engine.shutdown, 0.0)
        for task in list(api.tasks):
            task.cancel()
        api.store.close()
        api.guards.close()
        if api.index is not None:
            api.index.close()

    # no /docs or /redoc: their pages load scripts from a CDN, which an offline server cannot reach
    app = FastAPI(title="grokstack", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.api = api
    app.state.error_style = settings.error_style
    errors.install(app)

    app.add_middleware(Edge, limit=settings.max_body_bytes, style=settings.error_style, metrics=api.metrics)

    async def caller(request: Request) -> Key:
        """The request's key, checked before its body is validated: no key, no schema hints (401 before 422)."""
        return api.authorize(request)

    keyed = Depends(caller)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request, key: Key = keyed):
        api.check_model(body.model)
        if body.deferred and body.stream:
            raise InvalidArgumentError("a deferred completion cannot stream")
        # off the event loop: the input guard runs an encoder pass and perhaps a judge's HTTP call
        plan = await asyncio.to_thread(api.prepare_chat, body, key, request.state.request_id)
        api.charge(key, len(plan.prompt) + sum(sp.max_tokens for sp in plan.params))
        headers = api.limit_headers(key)
        if plan.refusal is not None:
            headers["x-grokstack-guard"] = f"action=block; codes={','.join(plan.refusal.codes)}"
        if body.deferred:
            job_id = api.store.add(body.model_dump(mode="json"), key.owner)
            api.spawn_deferred(job_id, body, key)
            return JSONResponse({"request_id": job_id}, headers=headers)
        if body.stream:
            return await _sse_response(api.chat_stream(body, plan, request, key), headers)
        return JSONResponse(await api.chat_result(body, plan, request, key), headers=headers)

    @app.post("/v1/moderations")
    async def moderations(body: ModerationRequest, key: Key = keyed):
        guard = api.guards.for_key(key)
        texts = [body.input] if isinstance(body.input, str) else body.input
        verdicts = await asyncio.to_thread(lambda: [guard.check(t, direction="input") for t in texts])
        return {"id": f"modr-{uuid.uuid4().hex}", "model": body.model or "grokstack-guard",
                "results": [moderation_result(v) for v in verdicts]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, key: Key = keyed):
        api.check_model(body.model)
        api.check_completion(body)
        prompts = api.completion_prompts(body)
        api.charge(key, sum(len(p) + body.n * body.max_tokens for p in prompts))
        headers = api.limit_headers(key)
        if body.stream:
            return await _sse_response(api.completion_stream(body, prompts, request, key), headers)
        return JSONResponse(await api.completion_result(body, prompts, request, key), headers=headers)

    @app.get("/v1/chat/deferred-completion/{request_id}")
    async def deferred_completion(request_id: str, key: Key = keyed):
        state, status, result = api.store.take(request_id, key)
        if state == "unknown":  # also another owner's job: the same answer, so ids cannot be probed
            raise NotFoundError(f"no deferred completion {request_id!r} (unknown, already retrieved, or expired)")
        if state == "pending":
            return Response(status_code=202)
        return JSONResponse(result, status_code=status)

    @app.get("/v1/models")
    async def models(key: Key = keyed):
        return {"object": "list", "data": [api.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, key: Key = keyed):
        api.check_model(model_id)
        return api.model_card()

    @app.get("/v1/language-models")
    async def language_models(key: Key = keyed):
        return {"models": [api.language_model()]}

    @app.get("/v1/language-models/{model_id:path}")
    async def language_model(model_id: str, key: Key = keyed):
        api.check_model(model_id)
        return api.language_model()

    @app.post("/v1/tokenize-text")
    async def tokenize_text(body: TokenizeTextRequest, key: Key = keyed):
        if body.model is not None:
            api.check_model(body.model)
        ids = api.tok.encode(body.text, allow_special=False)
        out = []
        for tid in ids:
            text, raw = api.token_text(tid)
            out.append({"token_id": tid, "string_token": text, "token_bytes": raw})
        return {"token_ids": out}

    @app.get("/tokenizer_info")
    async def tokenizer_info(key: Key = keyed):
        tok = api.tok
        eos = tok.decode([tok.eos_id])
        bos_id = getattr(tok, "bos_id", None)
        return {"eos_token": eos, "eos_token_id": tok.eos_id,
                "bos_token": tok.decode([bos_id]) if bos_id is not None else None,
                "pad_token": eos, "chat_template": getattr(tok, "template", None), "vocab_size": tok.vocab_size}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, key: Key = keyed):
        return {"tokens": api.tok.encode(body.prompt)}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, key: Key = keyed):
        if body.tokens and max(body.tokens) >= api.lm.config.vocab_size:
            raise InvalidArgumentError("token ids outside the vocabulary")
        return {"prompt": api.tok.decode(body.tokens)}

    @app.get("/health")
    async def health():
        s = engine.stats()
        return {"status": "ok", "model": settings.model_id, "running": s.running, "waiting": s.waiting}

    @app.get("/metrics")
    async def metrics(request: Request):
        if settings.metrics_key:
            api.keys.check_admin(request.headers.get("authorization"))
        return Response(api.metrics.render(engine, api.store), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def root():
        return HTMLResponse(root_page(settings.model_id, api.lm.notice))

    return app


def root_page(model_id: str, notice) -> str:
    """A plain page saying what is served, under which licence, and where the API is."""
    lines = "".join(f"<p>{html.escape(line)}</p>" for line in notice.lines)
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>grokstack</title></head><body>"
        f"<h1>grokstack serving {html.escape(model_id)}</h1>{lines}"
        "<p>API: <code>/v1/chat/completions</code>, <code>/v1/completions</code>, <code>/v1/models</code>, "
        "<code>/v1/moderations</code>; health at <code>/health</code>.</p>"
        f"<footer>grokstack {__version__}</footer></body></html>"
    )


async def _sse_response(gen: AsyncIterator[bytes], headers: dict[str, str]) -> StreamingResponse:
    """Run the stream up to its first chunk before answering, so that a refused submission (queue full,
    context too long) is a proper HTTP status rather than a broken stream."""
    first = await anext(gen)

    async def chunks() -> AsyncIterator[bytes]:
        yield first
        async for item in gen:
            yield item

    return StreamingResponse(chunks(), media_type="text/event-stream", headers=headers | {"cache-control": "no-cache"})
