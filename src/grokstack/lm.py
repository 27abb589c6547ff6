"""`grokstack.load()` and `LM`: a loaded model with its tokenizer, ready to generate."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import ModelConfig
from .errors import InvalidArgumentError, TokenizerError
from .generate import Completion, Event, context_room
from .loading import Checkpoint, inspect_checkpoint, load_weights
from .loading.hub import resolve
from .model import Transformer
from .notices import Notice, notice_for
from .sampling import SamplingParams
from .tokenizer import Tokenizer, find_tokenizer_file, load_tokenizer

if TYPE_CHECKING:
    from .kv_cache import PagedKV
    from .runner import Runner

log = logging.getLogger("grokstack")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}

Prompt = str | list[int]


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name in DTYPES.values():
            return name
        name = str(name)
    if name not in DTYPES:
        raise InvalidArgumentError(f"unknown dtype {name!r}; use float32 or bfloat16 (fp16 is not supported)")
    return DTYPES[name]


class LM:
    def __init__(
        self, model: Transformer, tokenizer: Tokenizer | None, path: Path | None = None, license: str | None = None,
        runner_for: Callable[[PagedKV], Runner] | None = None,
    ) -> None:
        """`runner_for` builds the runner an engine uses over its KV cache (tensor parallelism passes one that
        sends every step to the other ranks first); by default the model runs here alone."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.path = path
        self.license = license
        self.notice: Notice = notice_for(model.cfg, path, license)
        self.runner_for = runner_for

    def with_runner(self, runner_for: Callable[[PagedKV], Runner]) -> LM:
        """This model and tokenizer, with engines running their steps through `runner_for`."""
        return LM(self.model, self.tokenizer, self.path, self.license, runner_for)

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] (fp32) for token ids [B, T] from position 0."""
        if tokens.dim() != 2 or tokens.dtype != torch.long:
            raise InvalidArgumentError("tokens must be a LongTensor [B, T]")
        return self.model(tokens.to(self.model.embed_tokens.weight.device))

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.need_tokenizer().encode(prompt)
        return list(prompt)

    def need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise TokenizerError(
                "this model has no tokenizer (no tokenizer.tok.json or tokenizer.model next to it, none in the "
                "GGUF); add one or pass token ids"
            )
        return self.tokenizer

    def generate(self, prompts: Prompt | list[Prompt], **sampling: Any) -> Completion | list[Completion]:
        """Complete one prompt (text or ids) or a list of them; sampling = SamplingParams fields."""
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
        batch = [self.encode(p) for p in ([prompts] if single else list(prompts))]
        params = [self._params(p, sampling) for p in batch]
        # prompt b samples with seed + b, so equal prompts in one batch differ
        params = [sp if sp.seed is None else sp.replace(seed=sp.seed + b) for b, sp in enumerate(params)]
        engine = self._engine(batch, params)
        out = [Completion("", [], "length", len(p)) for p in batch]
        errors: list[BaseException] = []

        def collect(c: Completion):
            def emit(ev) -> None:
                if isinstance(ev, BaseException):
                    errors.append(ev)
                    return
                if not ev.stop_token:
                    c.token_ids.append(ev.token_id)
                c.text += ev.text
                if ev.logprob is not None:
                    c.logprobs.append(ev.logprob)
                if ev.finish_reason:
                    c.finish_reason = ev.finish_reason
            return emit

        for p, sp, c in zip(batch, params, out, strict=True):
            engine.submit(p, sp, collect(c))
        engine.run()
        if errors:
            raise errors[0]
        return out[0] if single else out

    def stream(self, prompt: Prompt, **sampling: Any) -> Iterator[Event]:
        """Events for one prompt: token id, released text, logprob, and finish_reason at the end."""
        ids = self.encode(prompt)
        params = self._params(ids, sampling)
        return self._engine([ids], [params]).generate(ids, params)

    def _params(self, prompt: list[int], sampling: dict[str, Any]) -> SamplingParams:
        """The request's sampling, with max_tokens capped to the room the context leaves (a library caller
        asking for more simply gets what fits)."""
        sp = SamplingParams(**sampling)
        room = context_room(prompt, self.config.vocab_size, self.config.context_length)
        return sp.replace(max_tokens=min(sp.max_tokens, room)) if sp.max_tokens > room else sp

    def _engine(self, prompts: list[list[int]], params: list[SamplingParams]):
        """An engine on this thread with KV room for exactly these requests."""
        from .engine import BLOCK_SIZE, Engine

        tokens = sum(-(-(len(p) + sp.max_tokens) // BLOCK_SIZE) * BLOCK_SIZE
                     for p, sp in zip(prompts, params, strict=True))
        per_token = self.config.kv_bytes_per_token(torch.finfo(self.model.dtype).bits // 8)
        return Engine(self, max_batch=len(prompts), max_queue=len(prompts), prefill_chunk=512,
                      kv_memory=tokens * per_token)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return self.need_tokenizer().chat_ids(messages)

    def chat(self, messages: list[dict], stream: bool = False, **sampling: Any) -> Completion | Iterator[Event]:
        ids = self.chat_ids(messages)
        if stream:
            return self.stream(ids, **sampling)
        return self.generate(ids, **sampling)


def load(
    model: str | Path = "default",
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    config: str | Path | None = None,
    quantize: str | None = None,
    group_size: int = 128,
    **overrides: Any,
) -> LM:
    """Load a model: `default` (the bundled SmolLM2), a Hub id (`xai-org/grok-2`), a `.gguf` file, a
    Grok-2 safetensors folder (presharded or not) or a Grok-1 folder with ckpt-0/.

    `config` is a JSON file (official Grok-1 names or HF config.json); `quantize` ("int8", "int4" or "fp8",
    int4 in groups of `group_size`) quantizes the weights at load; `overrides` change config fields, e.g.
    the engine knobs (`gelu="tanh"`).
    """
    torch_dtype = parse_dtype(dtype)
    path = resolve(model)
    ckpt = inspect_checkpoint(path, Path(config) if config else None)
    if overrides:
        ckpt.config = ckpt.config.with_overrides(overrides)
    with _progress(ckpt) as bar:
        weights = load_weights(ckpt, torch_dtype, bar)
    if quantize:
        from .quant import quantize_model

        quantize_model(weights, quantize, group_size)
    weights = weights.to(device)
    tokenizer = _tokenizer_for(ckpt)
    if tokenizer is None:
        log.warning("no tokenizer found for %s; generation needs token ids", path)
    license = ckpt.gguf.metadata.get("general.license") if ckpt.gguf is not None else None
    return LM(weights, tokenizer, ckpt.path, str(license) if license else None)


def _tokenizer_for(ckpt: Checkpoint) -> Tokenizer | None:
    if ckpt.gguf is not None:
        from .loading.gguf_vocab import gguf_tokenizer

        return gguf_tokenizer(ckpt.gguf)
    tok_file = find_tokenizer_file(ckpt.path)
    return load_tokenizer(tok_file) if tok_file else None


class _progress:
    """A tqdm bar over checkpoint files on a terminal; silent otherwise."""

    def __init__(self, ckpt) -> None:
        self.ckpt = ckpt
        self.bar = None

    def __enter__(self):
        if not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        if self.ckpt.format == "gguf":
            total = len(self.ckpt.gguf.tensors)
        elif self.ckpt.format == "grok1-ckpt":
            total = 2 + 12 * self.ckpt.config.num_layers
        else:
            total = len(list(self.ckpt.path.glob("*.safetensors")))
        unit = "tensor" if self.ckpt.format == "gguf" else "file"
        self.bar = tqdm(total=total, desc="loading", unit=unit, leave=False)
        return self.bar.update

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
