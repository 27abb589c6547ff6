"""`grokstack` command line: inspect, generate, chat, serve, ingest, feeds, search, convert, plan, moderate,
guard-eval, make-tiny.

Every user error ends in one line on stderr and a non-zero exit, never a traceback
(set GROKSTACK_DEBUG=1 to see one for unexpected failures).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import traceback
from collections import Counter
from pathlib import Path

from .errors import GrokstackError, InvalidArgumentError
from .notices import banner, notice_for
from .plan import NO_FIT_EXIT, add_plan_args, cmd_plan

GIB = 1 << 30
MAX_MODERATE_CHARS = 1 << 20
VERDICT_NO = NO_FIT_EXIT  # exit code of a check that answered "no" (blocked, does not fit); 1-3 are errors


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=os.environ.get("GROKSTACK_MODEL", "default"),
        help="a .gguf file, a checkpoint folder, a Hub id (xai-org/grok-2, org/repo:file.gguf) or 'default', "
        "the bundled SmolLM2-135M-Instruct (env GROKSTACK_MODEL)",
    )
    p.add_argument("--config", help="config JSON (official Grok-1 names or HF config.json)")
    p.add_argument("--dtype", default=os.environ.get("GROKSTACK_DTYPE", "float32"), help="float32 or bfloat16")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field/knob")
    _add_quant_args(p)


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", choices=["int8", "int4", "fp8"], default=os.environ.get("GROKSTACK_QUANTIZE"),
                   help="weight-only quantization of every linear layer (env GROKSTACK_QUANTIZE)")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size: 32, 64, 128 or 256")


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=int(os.environ.get("GROKSTACK_TP", "1")),
                   help="tensor-parallel ranks: run as `torchrun --nproc-per-node N -m grokstack.cli ... --tp N`")
    p.add_argument("--ep", action="store_true", help="with --tp: whole experts per rank (expert parallelism)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 0.7 chat, 0 generate)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grokstack", description="Run xAI's open Grok-1 and Grok-2 weights.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="config, parameter counts and memory needs of a checkpoint")
    p.add_argument("path", help="a model (as for --model), or the preset name grok-1 / grok-2")
    p.add_argument("--config")

    p = sub.add_parser("generate", help="complete a prompt, streaming to stdout")
    _add_model_args(p)
    _add_parallel_args(p)
    _add_sampling_args(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("prompt")

    p = sub.add_parser("chat", help="interactive chat (/reset, /system TEXT, /exit)")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("--system", help="system prompt")

    p = sub.add_parser("serve", help="the xAI/OpenAI-compatible HTTP API with continuous batching")
    _add_model_args(p)
    _add_parallel_args(p)
    env = os.environ.get
    p.add_argument("--host", default=env("GROKSTACK_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("GROKSTACK_PORT", "8000")))
    p.add_argument("--served-model-name", help="the model id clients send (default: grok-1/grok-2 or the file name)")
    p.add_argument("--alias", action="append", default=[], help="another accepted model id (repeatable)")
    p.add_argument("--api-key", action="append", default=[k for k in [env("GROKSTACK_API_KEY")] if k],
                   help="accepted bearer key (repeatable; env GROKSTACK_API_KEY); none = open server")
    p.add_argument("--api-keys-file", default=env("GROKSTACK_API_KEYS"),
                   help="file of keys, one per line: KEY [name=N] [rpm=N] [tpm=N] [profile=P] [admin] "
                        "(env GROKSTACK_API_KEYS)")
    p.add_argument("--metrics-key", action="store_true",
                   help="/metrics needs an admin key ('admin' in the keys file); default: public")
    p.add_argument("--rpm", type=int, default=int(env("GROKSTACK_RPM", "0")), help="requests/min per key (0 = off)")
    p.add_argument("--tpm", type=int, default=int(env("GROKSTACK_TPM", "0")), help="tokens/min per key (0 = off)")
    p.add_argument("--max-batch", type=int, default=int(env("GROKSTACK_MAX_BATCH", "64")),
                   help="sequences decoded together")
    p.add_argument("--max-model-len", type=int, default=int(env("GROKSTACK_MAX_MODEL_LEN", "4096")),
                   help="prompt + completion tokens per sequence")
    p.add_argument("--max-queue", type=int, default=int(env("GROKSTACK_MAX_QUEUE", "64")),
                   help="requests that may wait; more get 503")
    p.add_argument("--kv-memory", type=float, default=float(env("GROKSTACK_KV_MEMORY", "0")),
                   help="KV cache budget in GiB (default: 16 full-length sequences, at most a quarter of the "
                        "free memory); sequences take blocks of it as they grow")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="do not reuse the KV blocks of earlier requests' identical prompt prefixes")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per prefill step")
    p.add_argument("--error-style", choices=["openai", "xai"], default=env("GROKSTACK_ERROR_STYLE", "openai"))
    p.add_argument("--state-dir", default=env("GROKSTACK_STATE_DIR", ".grokstack"),
                   help="where deferred completions are kept")
    p.add_argument("--grace", type=float, default=10.0, help="seconds running requests get at shutdown")
    _add_data_dir(p)
    p.add_argument("--search-results", action="store_true",
                   help="add the search_results list (title, url, date, snippet) to every searched answer")
    _add_guard_args(p)
    p.add_argument("--guard-block-style", choices=["refusal", "error"], default="refusal",
                   help="a blocked request gets a 200 refusal message (default) or a 400 content_filter error")
    p.add_argument("--audit-log", default=env("GROKSTACK_AUDIT_LOG"),
                   help="guard audit log (JSONL; default STATE_DIR/guard-audit.jsonl)")
    p.add_argument("--audit-content", action="store_true", help="keep raw text in the audit log (default: hashes)")

    p = sub.add_parser("moderate", help="check a text with the guard (the same checks as /v1/moderations)")
    _add_guard_args(p)
    p.add_argument("text", help="the text to check; - reads stdin")
    p.add_argument("--direction", choices=["input", "retrieved", "output"], default="input")
    p.add_argument("--json", action="store_true", help="print the whole verdict as JSON")

    p = sub.add_parser("guard-eval", help="refusal and over-refusal of the guard on public safety prompt sets")
    _add_guard_args(p)
    p.add_argument("--data", default=None, help="folder with xstest/, jailbreakbench/, harmbench/, advbench/ "
                   "(default: ../shared/data/safety next to the repository, or env GROKSTACK_SAFETY_DATA)")
    p.add_argument("--limit", type=int, default=None,
                   help="at most N prompts per set and side (a judge costs a model call per prompt)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("ingest", help="add live-search documents: a JSONL file, an RSS/Atom feed or X API v2")
    _add_data_dir(p)
    kinds = p.add_subparsers(dest="kind", required=True)
    q = kinds.add_parser("jsonl", help="a JSONL feed file (one document per line), resumable; --follow tails it")
    q.add_argument("path")
    q.add_argument("--follow", action="store_true", help="keep reading as the file grows (Ctrl-C stops)")
    q.add_argument("--interval", type=float, default=1.0, help="seconds between looks when following")
    q = kinds.add_parser("rss", help="poll an RSS/Atom feed (ETag / Last-Modified); --follow polls forever")
    q.add_argument("url")
    q.add_argument("--kind", dest="item_kind", choices=["news", "web", "rss"], default="news",
                   help="source type of its items")
    q.add_argument("--follow", action="store_true")
    q.add_argument("--interval", type=float, default=300.0, help="seconds between polls when following")
    q = kinds.add_parser("x", help="X API v2 (bearer token in X_BEARER_TOKEN): recent search or the filtered stream")
    q.add_argument("--query", help="recent-search query (since_id resumes from the last run)")
    q.add_argument("--stream", action="store_true", help="read the filtered stream (rules set on the X side)")
    q.add_argument("--base-url", default=os.environ.get("X_API_BASE_URL", "https://api.x.com"))
    q.add_argument("--follow", action="store_true", help="with --query: poll again every --interval seconds")
    q.add_argument("--interval", type=float, default=60.0)

    p = sub.add_parser("feeds", help="status of each ingested feed: last item, lag, errors")
    _add_data_dir(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("search", help="search the live-search index (what chat requests with search_parameters see)")
    _add_data_dir(p)
    p.add_argument("query")
    p.add_argument("--source", action="append", choices=["web", "news", "x", "rss"], help="source type (repeatable)")
    p.add_argument("--from-date", help="YYYY-MM-DD, inclusive (UTC)")
    p.add_argument("--to-date", help="YYYY-MM-DD, inclusive (UTC)")
    p.add_argument("--handle", action="append", default=[], help="only posts by this X handle (repeatable)")
    p.add_argument("--exclude-handle", action="append", default=[], help="no posts by this X handle (repeatable)")
    p.add_argument("--website", action="append", default=[], help="only this website (repeatable)")
    p.add_argument("--exclude-website", action="append", default=[], help="not this website (repeatable)")
    p.add_argument("--min-favorites", type=int, help="X posts with at least this many likes")
    p.add_argument("--min-views", type=int, help="X posts with at least this many views")
    p.add_argument("--feed", help="only items of this RSS/Atom feed URL")
    p.add_argument("--max-results", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print a JSON list")

    p = sub.add_parser("convert", help="write any checkpoint as a Grok-2-layout safetensors folder")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--config")
    p.add_argument("--dtype", default="bfloat16", help="dtype of the written tensors")
    p.add_argument("--preshard", type=int, default=0, metavar="TP", help="split experts into TP files like the release")
    _add_quant_args(p)
    p.add_argument("--force", action="store_true", help="write into a non-empty folder")

    p = sub.add_parser("plan", help="per-GPU memory plan (weights, KV cache, activations): does it fit?")
    add_plan_args(p)

    p = sub.add_parser("make-tiny", help="a tiny random checkpoint in the exact release layout")
    p.add_argument("--arch", required=True, choices=["grok-1", "grok-2"])
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="write into a non-empty folder")
    return parser


def _add_guard_args(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument("--guard", default=env("GROKSTACK_GUARD", "aup"), metavar="PROFILE",
                   help="guard profile: aup (default), strict, permissive, off, or a TOML file (env GROKSTACK_GUARD)")
    p.add_argument("--judge", default=env("GROKSTACK_JUDGE"), metavar="URL|MODEL",
                   help="optional LLM judge on user input: an OpenAI-compatible API URL (e.g. a Llama Guard "
                        "server's http://host:8000/v1) or a model for this process (env GROKSTACK_JUDGE)")
    p.add_argument("--judge-model", default=env("GROKSTACK_JUDGE_MODEL", ""), help="model name sent to a judge URL")
    p.add_argument("--judge-style", choices=["llama-guard", "prompt"], default="llama-guard",
                   help="llama-guard: send the conversation as is; prompt: wrap it in a judging prompt "
                        "(any chat model)")
    p.add_argument("--judge-mode", choices=["max", "decide"], default="max",
                   help="max: the judge can only add flags; decide: the judge replaces the classifier")


def _guard(args):
    """The Guard that moderate and guard-eval use: the profile, plus the judge when one is named."""
    from .guard.check import Guard
    from .guard.policy import load_profile

    return Guard(load_profile(args.guard), judge=_judge(args), judge_mode=args.judge_mode)


def _judge(args):
    if not args.judge:
        return None
    from .guard.judge import open_judge

    return open_judge(args.judge, args.judge_model, args.judge_style, os.environ.get("GROKSTACK_JUDGE_API_KEY"))


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "grokstack"


def _add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=os.environ.get("GROKSTACK_DATA_DIR") or str(default_data_dir()),
                   help="live-search data shared by serve, ingest and search (env GROKSTACK_DATA_DIR)")


def _open_index(args):
    from .search import Index

    folder = Path(args.data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return Index(folder / "index.sqlite")


def _overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidArgumentError(f"--set expects FIELD=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def _load(args):
    from .lm import load

    return load(args.model, dtype=args.dtype, config=args.config, quantize=args.quantize, group_size=args.group_size,
                **_overrides(args.set))


@contextlib.contextmanager
def _model_for(args):
    """The LM a command runs: loaded whole, or under torchrun with --tp N this rank's shard. Rank 0 gets the
    LM (its model leads: every forward step is replayed by the other ranks); the other ranks follow rank 0
    until it stops and then get None."""
    if args.tp < 1:
        raise InvalidArgumentError("--tp must be >= 1")
    if args.tp == 1 and not args.ep:
        yield _load(args)
        return
    from .parallel import follow, init_distributed, lead, load_lm, shutdown_distributed

    ctx = init_distributed(mode="ep" if args.ep else "tp", world=args.tp)
    try:
        lm = load_lm(args.model, ctx, dtype=args.dtype, config=args.config, **_overrides(args.set))
        if args.quantize:  # after sharding: each rank quantizes its own slices
            from .quant import quantize_model

            quantize_model(lm.model, args.quantize, args.group_size)
        if ctx.rank != 0:
            follow(lm.model, ctx)
            yield None
            return
        lm, leader = lead(lm, ctx)
        try:
            yield lm
        finally:
            leader.stop()
    finally:
        shutdown_distributed()


def _sampling(args, default_temperature: float) -> dict:
    return {
        "max_tokens": args.max_tokens,
        "temperature": default_temperature if args.temperature is None else args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop": args.stop,
    }


def _print_stream(events) -> str | None:
    finish = None
    for ev in events:
        if ev.text:
            sys.stdout.write(ev.text)
            sys.stdout.flush()
        finish = ev.finish_reason or finish
    sys.stdout.write("\n")
    return finish


# ------------------------------------------------------------------------------ commands
def cmd_inspect(args) -> int:
    from .config import grok1_preset, grok2_preset
    from .loading import inspect_checkpoint
    from .loading.hub import resolve

    presets = {"grok-1": grok1_preset, "grok-2": grok2_preset}
    path = None
    if args.path in presets and not Path(args.path).exists():
        cfg, fmt = presets[args.path](), "preset"
    else:
        ckpt = inspect_checkpoint(resolve(args.path), Path(args.config) if args.config else None)
        cfg, fmt, path = ckpt.config, ckpt.format, ckpt.path
        if ckpt.gguf is not None:
            kinds = Counter(t.tensor_type.name for t in ckpt.gguf.tensors.values())
            fmt = "gguf: " + ", ".join(f"{n} x{c}" for n, c in kinds.most_common())
    counts = cfg.parameter_counts()
    print(f"{args.path}: {cfg.arch} ({fmt})")
    ffn = f"experts {cfg.num_experts} (top {cfg.num_experts_per_tok}) x {cfg.moe_intermediate_size}"
    if cfg.has_dense_mlp:
        dense = f"dense {cfg.hidden_act} MLP {cfg.intermediate_size}"
        ffn = f"{ffn}, {dense}" if cfg.num_experts else dense
    print(
        f"  layers {cfg.num_layers}, hidden {cfg.hidden_size}, heads {cfg.num_heads} q / {cfg.num_kv_heads} kv "
        f"x {cfg.head_dim}, {ffn}; {cfg.norm_style} norms"
    )
    print(f"  vocab {cfg.vocab_size}, context {cfg.context_length}, rope theta {cfg.rope_theta} ({cfg.rope_type})")
    print(
        f"  caps: attention {cfg.attn_softcap or 'off'}, router {cfg.router_softcap or 'off'}, "
        f"final {cfg.final_softcap or 'off'}; attention temperature L={cfg.attn_temperature_len or 'off'}; "
        f"gelu {cfg.gelu}"
    )
    print(f"  parameters: total {counts['total'] / 1e9:.2f}B, active per token {counts['active'] / 1e9:.2f}B")
    notice = notice_for(cfg, path)
    print(f"  licence: {notice.license or 'not stated'}" + (f"; {notice.attribution}" if notice.attribution else ""))
    print("  weight bytes:")
    for name, nbytes in (("fp32", 4), ("bf16", 2), ("int8", 1), ("int4", 0.5)):
        print(f"    {name:5s} {counts['total'] * nbytes / GIB:10.2f} GiB")
    kv = cfg.kv_bytes_per_token(2)
    print(f"  KV cache (bf16): {kv / 1024:.0f} KiB/token, {kv * cfg.context_length / GIB:.2f} GiB at full context")
    print("  memory per GPU, bf16 weights + one full-context sequence (weights and KV split evenly):")
    for gpus in (1, 2, 4, 8):
        need = (counts["total"] * 2 + kv * cfg.context_length) / gpus
        print(f"    {gpus} GPU(s): {need / GIB:10.2f} GiB each")
    return 0


def cmd_generate(args) -> int:
    with _model_for(args) as lm:
        if lm is None:  # a follower rank: its work was rank 0's steps
            return 0
        if lm.notice.attribution:  # stderr, so piped output stays the model's text only
            print(banner(lm.notice), file=sys.stderr)
        ids = lm.chat_ids([{"role": "user", "content": args.prompt}]) if args.chat else lm.encode(args.prompt)
        _print_stream(lm.stream(ids, **_sampling(args, 0.0)))
    return 0


def cmd_chat(args) -> int:
    lm = _load(args)
    lm.need_tokenizer()
    system = args.system
    history: list[dict] = []
    sampling = _sampling(args, 0.7)
    print(f"grokstack chat with {lm.path.name} ({lm.config.arch}). /reset, /system TEXT, /exit; Ctrl-C stops a reply.")
    if lm.notice.lines:
        print(banner(lm.notice))
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = []
            print("(history cleared)")
            continue
        if line.startswith("/system"):
            system = line[len("/system") :].strip() or None
            history = []
            print(f"(system prompt {'set' if system else 'cleared'}; history cleared)")
            continue
        messages = ([{"role": "system", "content": system}] if system else []) + history
        messages.append({"role": "user", "content": line})
        reply = []
        try:
            for ev in lm.stream(lm.chat_ids(messages), **sampling):
                reply.append(ev.text)
                sys.stdout.write(ev.text)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        except GrokstackError as exc:  # e.g. the conversation outgrew the context: keep the session
            print(f"\nerror: {exc}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": "".join(reply)}]


def cmd_serve(args) -> int:
    for name in ("max_batch", "max_model_len", "port"):
        if getattr(args, name) < 1:
            raise InvalidArgumentError(f"--{name.replace('_', '-')} must be >= 1")
    with _model_for(args) as lm:
        if lm is not None:
            _serve(args, lm)
    return 0


def _serve(args, lm) -> None:
    from .engine import Engine
    from .server import Settings, model_id_for, serve
    from .server.moderation import GuardSettings, check_guard_profile

    lm.need_tokenizer()
    if args.kv_memory < 0:
        raise InvalidArgumentError("--kv-memory must be a positive number of GiB")
    engine = Engine(lm, max_batch=args.max_batch, max_model_len=args.max_model_len, max_queue=args.max_queue,
                    prefill_chunk=args.prefill_chunk, kv_memory=int(args.kv_memory * 2**30) or None,
                    prefix_cache=not args.no_prefix_cache)
    model_id = args.served_model_name or model_id_for(lm, args.model)
    aliases = [a for a in [*args.alias, "default" if args.model == "default" else None] if a and a != model_id]
    Path(args.data_dir).mkdir(parents=True, exist_ok=True)
    state_dir = Path(args.state_dir)
    guard = GuardSettings(profile=args.guard, block_style=args.guard_block_style,
                          audit_path=Path(args.audit_log) if args.audit_log else state_dir / "guard-audit.jsonl",
                          audit_content=args.audit_content, judge=_judge(args), judge_mode=args.judge_mode)
    check_guard_profile(args.guard, lm.config)
    settings = Settings(
        model_id=model_id, aliases=aliases, api_keys=args.api_key, keys_file=args.api_keys_file, rpm=args.rpm,
        tpm=args.tpm, error_style=args.error_style, state_dir=state_dir, data_dir=Path(args.data_dir),
        search_results=args.search_results, metrics_key=args.metrics_key, guard=guard,
    )
    serve(lm, engine, settings, args.host, args.port, args.grace)


def cmd_moderate(args) -> int:
    text = sys.stdin.buffer.read() if args.text == "-" else args.text
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidArgumentError(f"the input is not valid UTF-8 (byte {exc.start})") from None
    if not text.strip():
        raise InvalidArgumentError("nothing to check: the text is empty")
    if len(text) > MAX_MODERATE_CHARS:
        raise InvalidArgumentError(f"the text has {len(text)} characters; at most {MAX_MODERATE_CHARS} are checked")
    verdict = _guard(args).check(text, direction=args.direction)
    if args.json:
        print(json.dumps(verdict.to_dict(), indent=2))
    else:
        codes = ", ".join(f"{c} {verdict.scores.get(c, 0):.2f}" for c in verdict.codes) or "none"
        print(f"{'flagged' if verdict.flagged else 'not flagged'}: action {verdict.action}; codes {codes}")
    return VERDICT_NO if verdict.action == "block" else 0


def cmd_guard_eval(args) -> int:
    from .guard.evaluate import evaluate, format_table

    data = Path(args.data or os.environ.get("GROKSTACK_SAFETY_DATA") or _shared_safety_dir())
    report = evaluate(data, _guard(args), limit=args.limit)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_table(report))
    return 0


def _shared_safety_dir() -> Path:
    """../shared/data/safety beside the repository (a source checkout), else the current folder's."""
    here = Path(__file__).resolve().parents[3] / "shared" / "data" / "safety"
    return here if here.is_dir() else Path.cwd().parent / "shared" / "data" / "safety"


def cmd_ingest(args) -> int:
    """One pass over the source (or, with --follow, keep going); each pass prints its counts as JSON."""
    import time

    from .search.feeds import poll_feed
    from .search.ingest import ingest_jsonl
    from .search.xapi import poll_x_recent, stream_x

    if args.interval <= 0:
        raise InvalidArgumentError("--interval must be > 0")
    if args.kind == "jsonl" and not Path(args.path).is_file():
        raise InvalidArgumentError(f"no such file: {args.path}")
    if args.kind == "x" and not (args.query or args.stream):
        raise InvalidArgumentError("ingest x needs --query QUERY (recent search) or --stream")
    with _open_index(args) as index:
        if args.kind == "jsonl":  # follows by itself
            run_once, repeat = lambda: ingest_jsonl(index, args.path, follow=args.follow,
                                                    poll_interval=args.interval), False
        elif args.kind == "rss":
            run_once, repeat = lambda: poll_feed(index, args.url, kind=args.item_kind), args.follow
        elif args.stream:  # reconnects by itself
            run_once, repeat = lambda: stream_x(index, base_url=args.base_url), False
        else:
            run_once, repeat = lambda: poll_x_recent(index, args.query, base_url=args.base_url), args.follow
        while True:
            counts = run_once()
            print(json.dumps(counts.to_dict()), flush=True)
            if counts.error and not repeat:
                raise GrokstackError(f"{args.kind} ingest failed: {counts.error}")
            if not repeat:
                return 0
            time.sleep(args.interval)


def cmd_feeds(args) -> int:
    from datetime import UTC, datetime

    from .search.ingest import feed_status

    folder = Path(args.data_dir)
    rows = feed_status(folder / "index.sqlite") if (folder / "index.sqlite").is_file() else []
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
        return 0
    if not rows:
        print(f"no feeds ingested yet in {folder}")
    for r in rows:
        last = r.get("last_item")
        when = datetime.fromtimestamp(last, tz=UTC).strftime("%Y-%m-%d %H:%MZ") if last else "never"
        lag = f"{r['lag'] / 60:.0f} min" if r.get("lag") is not None else "-"
        err = f"  error: {r['last_error']}" if r.get("last_error") else ""
        print(f"{r['kind']:6s} {r['feed']}  last item {when}, lag {lag}, {r.get('added', 0)} added{err}")
    return 0


def cmd_search(args) -> int:
    from datetime import UTC, datetime

    from .search import Filters

    if args.max_results < 1:
        raise InvalidArgumentError("--max-results must be >= 1")
    filters = Filters(
        from_date=args.from_date, to_date=args.to_date, sources=args.source, included_x_handles=args.handle,
        excluded_x_handles=args.exclude_handle, allowed_websites=args.website,
        excluded_websites=args.exclude_website, min_favorites=args.min_favorites, min_views=args.min_views,
        feed_url=args.feed,
    )
    with _open_index(args) as index:
        hits = index.search(args.query, filters, limit=args.max_results)
    rows = []
    for h in hits:
        d = h.document
        when = datetime.fromtimestamp(d.published_at, tz=UTC).isoformat().replace("+00:00", "Z")
        rows.append({"id": d.id, "url": d.url, "title": d.title or d.text[:80], "published_at": when,
                     "source": d.source, "author": d.author, "score": round(h.score, 6)})
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=1))
        return 0
    if not rows:
        print("no results")
    for n, r in enumerate(rows, 1):
        who = f"@{r['author']}" if r["source"] == "x" and r["author"] else r["source"]
        print(f"{n:3d}. {r['published_at'][:16]}  {r['score']:.4f}  [{who}] {r['title']}")
        if r["url"]:
            print(f"       {r['url']}")
    return 0


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InvalidArgumentError(f"{out} is not empty; pass --force to write into it")


def cmd_convert(args) -> int:
    from .lm import load, parse_dtype
    from .loading.safetensors_folder import save_safetensors_folder
    from .quant import quant_spec, save_quantized
    from .tokenizer import find_tokenizer_file

    out = Path(args.out)
    dtype = parse_dtype(args.dtype)
    if args.preshard < 0:
        raise InvalidArgumentError("--preshard must be >= 0")
    if args.preshard and args.quantize:
        raise InvalidArgumentError("--preshard and --quantize do not combine: quantized checkpoints are written "
                                   "whole and sharded at load (serve --tp)")
    _prepare_out(out, args.force)
    lm = load(args.src, dtype=dtype, config=args.config, quantize=args.quantize, group_size=args.group_size)
    if quant_spec(lm.model) is not None:  # stored as codes + scales; loads back without re-quantizing
        files = save_quantized(lm.model, out)
    else:
        files = save_safetensors_folder(lm.model, out, dtype, preshard=args.preshard)
    tok = find_tokenizer_file(Path(args.src))
    if tok:
        shutil.copyfile(tok, out / tok.name)
    for lic in lm.notice.files:  # the licence travels with converted (and quantized) weights
        shutil.copyfile(lic, out / lic.name)
    print(f"wrote {len(files)} safetensors files, config.json{' and ' + tok.name if tok else ''} to {out}")
    if lm.path.suffix == ".gguf":
        print("note: a GGUF's tokenizer and chat template live in its metadata and are not written out")
    return 0


def cmd_make_tiny(args) -> int:
    from .tiny import make_tiny

    out = Path(args.out)
    _prepare_out(out, args.force)
    make_tiny(args.arch, out, args.seed)
    print(f"wrote a tiny {args.arch} checkpoint to {out}")
    return 0


COMMANDS = {
    "inspect": cmd_inspect,
    "generate": cmd_generate,
    "chat": cmd_chat,
    "serve": cmd_serve,
    "search": cmd_search,
    "ingest": cmd_ingest,
    "feeds": cmd_feeds,
    "convert": cmd_convert,
    "make-tiny": cmd_make_tiny,
    "moderate": cmd_moderate,
    "plan": cmd_plan,
    "guard-eval": cmd_guard_eval,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return COMMANDS[args.command](args)
    except GrokstackError as exc:
        print(f"grokstack: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("grokstack: error: out of memory; try --dtype bfloat16 or a machine with more RAM", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug, not bad input: say so plainly
        if os.environ.get("GROKSTACK_DEBUG"):
            traceback.print_exc()
        msg = f"grokstack: internal error: {type(exc).__name__}: {exc} (GROKSTACK_DEBUG=1 shows details)"
        print(msg, file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
