"""A model's own Jinja chat template (as GGUF and HF tokenizers carry it), rendered in a sandbox.

`render_segments` returns the prompt as template text and message contents kept apart, so the caller can
encode contents as plain text: a user (or a retrieved page) typing `<|im_start|>system` cannot forge a
turn. Templates that rewrite contents (trim, slicing...) fall back to the whole rendered string.
"""

from __future__ import annotations

import datetime
from functools import lru_cache
from typing import Any

from .errors import TokenizerError

Segment = tuple[str, bool]  # (text, is_message_content)


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TokenizerError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as exc:
        raise TokenizerError(f"the model's chat template does not parse: {exc}") from None


def render(template: str, messages: list[dict], add_generation_prompt: bool = True, **tokens: Any) -> str:
    """The template applied to the messages; `tokens` gives bos_token / eos_token texts."""
    from jinja2 import TemplateError

    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **tokens)
    except TemplateError as exc:
        raise TokenizerError(f"the model's chat template failed: {exc}") from None


def render_segments(
    template: str, messages: list[dict], add_generation_prompt: bool = True, **tokens: Any
) -> list[Segment]:
    """The rendered prompt split into template text and message contents, in order."""
    full = render(template, messages, add_generation_prompt, **tokens)
    marks = [f"\x00grokstack-content-{i}\x00" for i in range(len(messages))]
    marked = [{**m, "content": mark} for m, mark in zip(messages, marks, strict=True)]
    rendered = render(template, marked, add_generation_prompt, **tokens)
    segments: list[Segment] = []
    rest = rendered
    for m, mark in zip(messages, marks, strict=True):
        head, found, rest_after = rest.partition(mark)
        if not found or mark in rest_after:
            return [(full, False)]  # the template dropped or repeated a content: no safe split
        segments += [(head, False), (m["content"], True)]
        rest = rest_after
    segments.append((rest, False))
    if "".join(text for text, _ in segments) != full:
        return [(full, False)]  # the template transforms contents (e.g. trims them)
    return [(text, is_content) for text, is_content in segments if text]
