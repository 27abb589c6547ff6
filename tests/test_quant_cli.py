"""`--quantize` at load and `convert --quantize`: the saved checkpoint loads back as stored (same tokens as
quantizing at load), refuses a second, different quantization, and bad combinations are clear errors."""

import json

import pytest

from grokstack.tiny import make_tiny

from .test_cli import run

PROMPT = "Human: Tell me about Grok.<|separator|>\n\nAssistant:"


@pytest.fixture(scope="module")
def tiny2(tmp_path_factory):
    return make_tiny("grok-2", tmp_path_factory.mktemp("q2"))


@pytest.mark.parametrize("mode", ["int8", "int4", "fp8"])
def test_convert_quantized_loads_back_like_quantizing_at_load(tiny2, tmp_path, mode):
    out = tmp_path / mode
    r = run("convert", str(tiny2), str(out), "--quantize", mode, "--group-size", "32")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["quantization"]["mode"] == mode
    gen = ["--max-tokens", "10", "--temperature", "0", PROMPT]
    saved = run("generate", "--model", str(out), *gen)
    at_load = run("generate", "--model", str(tiny2), "--quantize", mode, "--group-size", "32", *gen)
    assert saved.returncode == 0 and at_load.returncode == 0, saved.stderr + at_load.stderr
    assert saved.stdout == at_load.stdout and saved.stdout.strip()


def test_quantize_errors_are_clear(tiny2, tmp_path):
    out = tmp_path / "q"
    assert run("convert", str(tiny2), str(out), "--quantize", "int8").returncode == 0
    r = run("generate", "--model", str(out), "--quantize", "int4", "--max-tokens", "2", "hi")
    assert r.returncode == 2 and "already quantized" in r.stderr
    r = run("convert", str(tiny2), str(tmp_path / "x"), "--quantize", "int4", "--preshard", "2")
    assert r.returncode == 2 and "--preshard" in r.stderr
    r = run("generate", "--model", str(tiny2), "--quantize", "int4", "--group-size", "100", "--max-tokens", "2", "hi")
    assert r.returncode == 2 and "group" in r.stderr and "Traceback" not in r.stderr
    r = run("generate", "--model", str(tiny2), "--quantize", "int3", "hi")
    assert r.returncode == 2 and "int3" in r.stderr
