"""The command line: real subprocesses, clear errors and exit codes, never a traceback."""

import json
import os
import subprocess
import sys

import pytest

from grokstack.tiny import make_tiny


def run(*args, input=None, **env_vars):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **env_vars}
    env.pop("GROKSTACK_MODEL", None)
    return subprocess.run(
        [sys.executable, "-m", "grokstack.cli", *args],
        capture_output=True, text=True, input=input, env=env, timeout=300,
    )


@pytest.fixture(scope="module")
def tiny2(tmp_path_factory):
    return make_tiny("grok-2", tmp_path_factory.mktemp("cli2"))


def test_make_tiny_then_generate(tmp_path):
    out = tmp_path / "tiny"
    r = run("make-tiny", "--arch", "grok-2", str(out))
    assert r.returncode == 0, r.stderr
    r = run("generate", "--model", str(out), "--max-tokens", "8", "--temperature", "0", "Hello")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    again = run("make-tiny", "--arch", "grok-2", str(out))
    assert again.returncode == 2 and "--force" in again.stderr


def test_inspect_presets_and_folder(tiny2):
    r = run("inspect", "grok-2")
    assert r.returncode == 0 and "total 269.52B" in r.stdout and "active per token 114.90B" in r.stdout
    r = run("inspect", "grok-1")
    assert "total 315.68B" in r.stdout and "active per token 83.76B" in r.stdout
    r = run("inspect", str(tiny2))
    assert r.returncode == 0 and "grok-2 (safetensors)" in r.stdout


def test_convert_presharded(tiny2, tmp_path):
    out = tmp_path / "conv"
    r = run("convert", str(tiny2), str(out), "--preshard", "2", "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    assert (out / "pytorch_model-00006-TP-001.safetensors").exists()
    assert (out / "tokenizer.tok.json").exists()
    assert json.loads((out / "config.json").read_text())["grokstack"]["arch"] == "grok-2"
    a = run("generate", "--model", str(tiny2), "--max-tokens", "6", "--temperature", "0", "Hi")
    b = run("generate", "--model", str(out), "--max-tokens", "6", "--temperature", "0", "Hi")
    assert a.stdout == b.stdout


def test_chat_session(tiny2):
    r = run("chat", "--model", str(tiny2), "--max-tokens", "4", "--seed", "1",
            input="hello\n/system be brief\nagain\n/reset\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "system prompt set" in r.stdout and "history cleared" in r.stdout


def test_knob_override_and_bad_knob(tiny2):
    r = run("generate", "--model", str(tiny2), "--set", "gelu=tanh", "--max-tokens", "3", "x")
    assert r.returncode == 0, r.stderr
    r = run("generate", "--model", str(tiny2), "--set", "gelu=cubic", "x")
    assert r.returncode == 1 and "gelu must be one of" in r.stderr
    r = run("generate", "--model", str(tiny2), "--set", "nonsense=1", "x")
    assert r.returncode == 1 and "unknown config field" in r.stderr


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["generate", "--model", "/does/not/exist", "x"], 1, "no such file"),
        (["generate", "--model", "no-such-org/no-such-model", "x"], 1, "not in the local Hugging Face cache"),
        (["generate", "--model", "DIR", "--dtype", "float16", "x"], 2, "unknown dtype"),
        (["generate", "--model", "DIR", "--max-tokens", "0", "x"], 2, "max_tokens"),
        (["generate", "--model", "DIR", "word " * 400], 1, "context"),
        (["generate", "--model", "EMPTY", "x"], 1, "not a checkpoint"),
        (["serve", "--max-batch", "0"], 2, "--max-batch must be >= 1"),
        (["serve", "--model", "DIR", "--api-keys-file", "/no/such/keys"], 1, "cannot read the API keys file"),
    ],
)
def test_bad_input_clear_errors(tiny2, tmp_path, args, code, message):
    args = [a.replace("EMPTY", str(tmp_path)).replace("DIR", str(tiny2)) for a in args]
    r = run(*args)
    assert r.returncode == code, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_shard_and_truncated_file(tiny2, tmp_path):
    import shutil

    ckpt = tmp_path / "c"
    shutil.copytree(tiny2, ckpt)
    (ckpt / "pytorch_model-00008-TP-005.safetensors").unlink()
    r = run("generate", "--model", str(ckpt), "x")
    assert r.returncode == 1 and "missing TP shard(s) [5]" in r.stderr and "Traceback" not in r.stderr
    shutil.copy(tiny2 / "pytorch_model-00008-TP-005.safetensors", ckpt)
    f = ckpt / "pytorch_model-00003-TP-common.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    r = run("generate", "--model", str(ckpt), "x")
    assert r.returncode == 1 and "00003-TP-common" in r.stderr and "Traceback" not in r.stderr


def test_default_model_is_the_default(tmp_path):
    r = run("generate", "--chat", "--max-tokens", "20", "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    r = run("inspect", "default")
    assert r.returncode == 0 and "llama (gguf: Q4_1" in r.stdout


def test_hub_ids_resolve_from_the_cache_offline(tmp_path):
    from grokstack.tiny import random_model

    from .gguf_files import write_llama_gguf
    from .test_gguf import tiny_llama_config

    cache = tmp_path / "hub"
    r = run("inspect", "some-org/tiny-llama", HF_HUB_CACHE=str(cache))
    assert r.returncode == 1 and "not in the local Hugging Face cache" in r.stderr and "hf download" in r.stderr
    repo = cache / "models--some-org--tiny-llama"
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    write_llama_gguf(snap / "tiny.Q8_0.gguf", random_model(tiny_llama_config(), seed=0))
    for ref in ("some-org/tiny-llama", "some-org/tiny-llama:tiny.Q8_0.gguf"):
        r = run("inspect", ref, HF_HUB_CACHE=str(cache))
        assert r.returncode == 0, r.stderr
        assert "llama (gguf: F32" in r.stdout
    r = run("inspect", "some-org/tiny-llama:other.gguf", HF_HUB_CACHE=str(cache))
    assert r.returncode == 1 and "file other.gguf" in r.stderr


def test_search_command(tmp_path):
    from grokstack.search import Index, make_document

    with Index(tmp_path / "index.sqlite") as index:
        index.add([make_document({"id": f"d{i}", "source": "news", "url": f"https://n.example/{i}",
                                  "title": f"Zorblax story {i}", "text": f"Zorblax rocket update number {i}",
                                  "published_at": f"2026-11-{10 + i:02d}T12:00:00Z"}) for i in range(5)])
    r = run("search", "zorblax rocket", "--data-dir", str(tmp_path), "--json", "--from-date", "2026-11-12")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert {row["id"] for row in rows} == {"d2", "d3", "d4"}  # the date filter is exact
    assert set(rows[0]) >= {"id", "url", "title", "published_at", "source", "score"}
    r = run("search", "zorblax", "--data-dir", str(tmp_path), "--from-date", "2026-13-01")
    assert r.returncode == 2 and "from_date" in r.stderr and "Traceback" not in r.stderr


def test_ingest_jsonl_then_feeds_and_search(tmp_path):
    feed = tmp_path / "feed.jsonl"
    lines = [json.dumps({"id": f"p{i}", "source": "x", "url": f"https://x.com/a/status/{i}", "author": "astro",
                         "text": f"Quasar sighting report {i}", "published_at": f"2026-11-2{i}T08:00:00Z"})
             for i in range(3)]
    feed.write_text("\n".join(lines) + "\nnot json\n")
    data = tmp_path / "data"
    r = run("ingest", "--data-dir", str(data), "jsonl", str(feed))
    assert r.returncode == 0, r.stderr
    counts = json.loads(r.stdout.strip().splitlines()[-1])
    assert counts["added"] == 3 and counts["bad"] == 1
    again = json.loads(run("ingest", "--data-dir", str(data), "jsonl", str(feed)).stdout.strip().splitlines()[-1])
    assert again["added"] == 0  # resumed from its checkpoint
    r = run("feeds", "--data-dir", str(data), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)[0]["added"] == 3
    r = run("search", "quasar", "--data-dir", str(data), "--json", "--handle", "astro")
    assert {row["id"] for row in json.loads(r.stdout)} == {"x:p0", "x:p1", "x:p2"}
    r = run("ingest", "--data-dir", str(data), "x")
    assert r.returncode == 2 and "--query" in r.stderr
