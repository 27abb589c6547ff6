"""Licence obligations: Grok-2 weights show "Powered by xAI" and their licence everywhere a user meets the
model; Grok-1 shows Apache-2.0; the two notices never mix; `convert` carries the LICENSE file along."""

from __future__ import annotations

import shutil

import pytest
from fastapi.testclient import TestClient

import grokstack
from grokstack.engine import Engine
from grokstack.server.app import Settings, create_app
from grokstack.tiny import make_tiny

from .test_cli import run

LICENSE_TEXT = "xAI Community License Agreement\n(test copy of the file shipped with the weights)\n"


@pytest.fixture(scope="module")
def grok2(tmp_path_factory):
    path = make_tiny("grok-2", tmp_path_factory.mktemp("g2"))
    (path / "LICENSE").write_text(LICENSE_TEXT)
    return path


@pytest.fixture(scope="module")
def grok1(tmp_path_factory):
    return make_tiny("grok-1", tmp_path_factory.mktemp("g1"))


def test_grok2_and_grok1_notices_are_kept_apart(grok2, grok1):
    n2 = grokstack.load(grok2).notice
    assert n2.license == "xAI Community License Agreement" and n2.attribution == "Powered by xAI"
    assert any("Powered by xAI" in line for line in n2.lines)
    assert any("train" in line and "Acceptable Use Policy" in line for line in n2.lines)
    assert [f.name for f in n2.files] == ["LICENSE"]
    n1 = grokstack.load(grok1).notice
    assert n1.license == "Apache-2.0" and n1.attribution is None
    assert not any("xAI Community" in line or "Powered by" in line for line in n1.lines)


def test_default_model_licence_comes_from_the_gguf():
    notice = grokstack.load("default").notice
    assert notice.license and "apache" in notice.license.lower() and notice.attribution is None


def test_server_models_card_and_root_page(grok2, grok1, tmp_path):
    for path, attributed in ((grok2, True), (grok1, False)):
        lm = grokstack.load(path)
        engine = Engine(lm, max_batch=1, max_model_len=64)
        app = create_app(lm, engine, Settings(model_id=lm.config.arch, state_dir=tmp_path / lm.config.arch))
        with TestClient(app) as client:
            card = client.get("/v1/models").json()["data"][0]
            page = client.get("/").text
        if attributed:
            assert card["attribution"] == "Powered by xAI"
            assert card["license"] == "xAI Community License Agreement"
            assert "Powered by xAI" in page and "xAI Community License Agreement" in page
        else:
            assert "attribution" not in card and card["license"] == "Apache-2.0"
            assert "Powered by xAI" not in page and "Apache-2.0" in page


def test_cli_banner_inspect_and_convert_carry_the_licence(grok2, tmp_path):
    r = run("generate", "--model", str(grok2), "--max-tokens", "2", "hello")
    assert r.returncode == 0 and "Powered by xAI" in r.stderr and "Powered by xAI" not in r.stdout
    r = run("inspect", str(grok2))
    assert "licence: xAI Community License Agreement; Powered by xAI" in r.stdout
    out = tmp_path / "converted"
    r = run("convert", str(grok2), str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "LICENSE").read_text() == LICENSE_TEXT
    # a folder without its LICENSE still gets the notice, pointing at the file the release ships
    bare = tmp_path / "bare"
    shutil.copytree(grok2, bare)
    (bare / "LICENSE").unlink()
    r = run("chat", "--model", str(bare), "--max-tokens", "2", input="/exit\n")
    assert r.returncode == 0 and "Powered by xAI" in r.stdout and "LICENSE shipped with the weights" in r.stdout
