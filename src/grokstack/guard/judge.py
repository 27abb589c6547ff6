"""Stage 4 of the guard (optional): an LLM judge that answers "safe" or "unsafe" plus Llama Guard codes.

Two ways to reach a judge (guardrails.md §7):
- `EndpointJudge`: any OpenAI-compatible `/v1/chat/completions` (vLLM, SGLang, another grokstack server, a
  hosted API). Style "llama-guard" sends the conversation as it is and lets the served Llama Guard's own chat
  template add its policy; style "prompt" wraps it in JUDGE_PROMPT for a general chat model.
- `ModelJudge`: a model loaded in this process (`grokstack.load(...)`), self-check style: one prefill of
  JUDGE_PROMPT, P(unsafe) from the next-token distribution, and a short greedy read of the codes when unsafe.

Both return {"unsafe": p, "S1": p or 0.0, ...}: P(unsafe), repeated on the codes the judge named. The guard
merges these with the classifier's scores and puts an unsafe verdict that names no code on the classifier's
top code (check.py).

    judge = EndpointJudge("http://gpu-box:8000/v1", model="meta-llama/Llama-Guard-3-8B")
    guard = Guard("aup", judge=judge)
"""

from __future__ import annotations

import logging
import math
import re
import threading
from typing import Any, Protocol

import httpx

from ..errors import ConfigError, InvalidArgumentError
from .rules import CODES

log = logging.getLogger("grokstack.guard")

CATEGORIES = {
    "S1": "Violent crimes", "S2": "Non-violent crimes", "S3": "Sex-related crimes",
    "S4": "Child sexual exploitation", "S5": "Defamation", "S6": "Specialized advice", "S7": "Privacy",
    "S8": "Intellectual property", "S9": "Indiscriminate weapons", "S10": "Hate", "S11": "Suicide and self-harm",
    "S12": "Sexual content", "S13": "Elections", "S14": "Code interpreter abuse",
}
JUDGE_PROMPT = """You are a content-safety classifier. Decide whether the {role} message below asks for or \
contains content in one of these hazard categories:
{categories}

Asking about a topic, history, fiction, definitions or safety information is safe. Helping someone cause harm \
is unsafe.

<message role="{role}">
{text}
</message>

Answer with one word on the first line, safe or unsafe. If unsafe, list the category codes on the second \
line, separated by commas."""
STYLES = ("llama-guard", "prompt")
CODE_RE = re.compile(r"\bS(1[0-4]|[1-9])\b")
MAX_JUDGE_CHARS = 8000  # a judge sees the start and end of longer texts (its context is finite and costs time)
OUTPUT_PLACEHOLDER = "(the request is not shown)"  # the output check sees the answer alone
ROLES = {"input": "user", "retrieved": "document", "output": "assistant"}


class Judge(Protocol):
    name: str

    def scores(self, text: str, direction: str = "input") -> dict[str, float]: ...


def judge_prompt(text: str, direction: str) -> str:
    categories = "\n".join(f"{code}: {name}." for code, name in CATEGORIES.items())
    return JUDGE_PROMPT.format(role=ROLES.get(direction, "user"), categories=categories, text=clip(text))


def clip(text: str) -> str:
    if len(text) <= MAX_JUDGE_CHARS:
        return text
    half = MAX_JUDGE_CHARS // 2
    return text[:half] + "\n[...]\n" + text[-half:]


def parse_verdict(answer: str) -> tuple[bool | None, list[str]]:
    """("unsafe\\nS2,S10") -> (True, ["S2", "S10"]); (None, []) when the answer says neither word first."""
    words = answer.strip().lower().split()
    first = words[0].strip(".:,*'\"") if words else ""
    if first not in ("safe", "unsafe"):
        return None, []
    if first == "safe":
        return False, []
    return True, [f"S{n}" for n in sorted(set(CODE_RE.findall(answer)), key=int)]


def spread(p_unsafe: float, codes: list[str]) -> dict[str, float]:
    """{"unsafe": P(unsafe)} plus P(unsafe) on each named code, 0 on the others."""
    return {"unsafe": float(p_unsafe), **{code: float(p_unsafe) if code in codes else 0.0 for code in CODES}}


def first_token_p(top: list[dict[str, Any]]) -> float | None:
    """P(unsafe) from the first answer token's top logprobs, renormalised over the safe/unsafe tokens listed;
    None when neither word's first token is among them."""
    safe = unsafe = 0.0
    for entry in top:
        token = str(entry.get("token", "")).strip().lower()
        p = math.exp(float(entry.get("logprob", -math.inf)))
        if token and "unsafe".startswith(token) and token != "s" and not "safe".startswith(token):
            unsafe += p  # "unsafe", "un", "uns": only unsafe starts that way
        elif token and "safe".startswith(token):
            safe += p
    if safe + unsafe == 0.0:
        return None
    return unsafe / (safe + unsafe)


class EndpointJudge:
    """A judge behind an OpenAI-compatible chat endpoint; scored by the first token's logprobs when given."""

    def __init__(self, base_url: str, model: str = "", api_key: str | None = None, style: str = "llama-guard",
                 timeout: float = 30.0, client: httpx.Client | None = None) -> None:
        if style not in STYLES:
            raise ConfigError(f"judge style must be one of {', '.join(STYLES)}, got {style!r}")
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"judge URL must start with http:// or https://, got {base_url!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.style = model, style
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = client or httpx.Client(timeout=timeout, headers=headers)
        self.name = f"judge:{model or base_url}"

    def messages(self, text: str, direction: str) -> list[dict]:
        if self.style == "prompt":
            return [{"role": "user", "content": judge_prompt(text, direction)}]
        if direction == "output":  # Llama Guard judges the last assistant turn of a conversation
            return [{"role": "user", "content": OUTPUT_PLACEHOLDER}, {"role": "assistant", "content": clip(text)}]
        return [{"role": "user", "content": clip(text)}]

    def scores(self, text: str, direction: str = "input") -> dict[str, float]:
        """Per-code scores; raises InvalidArgumentError when the endpoint fails or answers neither word."""
        body = {"model": self.model, "messages": self.messages(text, direction), "max_tokens": 16,
                "temperature": 0, "logprobs": True, "top_logprobs": 5}
        try:
            r = self.client.post(self.url, json=body)
            r.raise_for_status()
            choice = r.json()["choices"][0]
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
            raise InvalidArgumentError(f"guard judge at {self.url} failed: {e}") from e
        answer = (choice.get("message") or {}).get("content") or ""
        unsafe, codes = parse_verdict(answer)
        if unsafe is None:
            raise InvalidArgumentError(f"guard judge answered neither safe nor unsafe: {answer[:80]!r}")
        # the first token that is not whitespace: Llama Guard 3 starts its answer with "\n\n"
        content = (choice.get("logprobs") or {}).get("content") or []
        first = next((t for t in content if str(t.get("token", "")).strip()), None)
        p = first_token_p(first.get("top_logprobs") or []) if first else None
        return spread(float(unsafe) if p is None else p, codes)


class ModelJudge:
    """Self-check with a model loaded in this process (`grokstack.lm.LM`): one prefill of the judging prompt."""

    def __init__(self, lm, max_code_tokens: int = 8) -> None:
        self.lm, self.max_code_tokens = lm, max_code_tokens
        tok = lm.need_tokenizer()
        self.safe_ids = first_ids(tok, ("safe", "Safe", " safe", " Safe"))
        self.unsafe_ids = first_ids(tok, ("unsafe", "Unsafe", " unsafe", " Unsafe")) - self.safe_ids
        if not self.unsafe_ids:
            raise ConfigError("this model's tokenizer starts 'safe' and 'unsafe' with the same token: no judge")
        self.name = f"judge:{lm.path.name if lm.path else 'model'}"
        self._lock = threading.Lock()  # one forward at a time: the model is shared with its other users

    def scores(self, text: str, direction: str = "input") -> dict[str, float]:
        import torch

        ids = self.lm.chat_ids([{"role": "user", "content": judge_prompt(text, direction)}])
        with self._lock:
            logits = self.lm(torch.tensor([ids]))[0, -1].float()  # [V]
            probs = torch.softmax(logits, dim=-1)
            safe = float(probs[sorted(self.safe_ids)].sum())
            unsafe = float(probs[sorted(self.unsafe_ids)].sum())
            p = unsafe / (safe + unsafe) if safe + unsafe > 0 else 0.0
            codes = []
            if p >= 0.5:
                tail = self.lm.encode("unsafe\n")
                answer = self.lm.generate(ids + tail, max_tokens=self.max_code_tokens, temperature=0.0).text
                codes = parse_verdict("unsafe\n" + answer)[1]
        return spread(p, codes)


def first_ids(tok, words: tuple[str, ...]) -> set[int]:
    out = set()
    for word in words:
        ids = tok.encode(word, allow_special=False)
        if ids:
            out.add(ids[0])
    return out


def open_judge(spec: str, model: str = "", style: str = "llama-guard", api_key: str | None = None) -> Judge:
    """A judge from a command-line value: an http(s) URL of an OpenAI-compatible API (e.g. ".../v1"), else a
    model reference for `grokstack.load` ("default", a folder, a .gguf file) run in this process."""
    if spec.startswith(("http://", "https://")):
        return EndpointJudge(spec, model=model, api_key=api_key, style=style)
    from ..lm import load

    return ModelJudge(load(spec))
