"""The Grok-1 path against logits made by xAI's own JAX code (../shared/golden/grok1/case-a)."""

import numpy as np
import pytest
import torch

from grokstack.config import load_config_file, read_json
from grokstack.loading.grok1_ckpt import leaf_order, load_grok1
from grokstack.runner import Stepper

from .conftest import SHARED

CASE = SHARED / "golden" / "grok1" / "case-a"
pytestmark = pytest.mark.skipif(not CASE.is_dir(), reason="../shared/golden is absent")


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(CASE / "golden.npz"))


@pytest.fixture(scope="module")
def cfg():
    return load_config_file(CASE / "config.json")


@pytest.fixture(scope="module")
def model_f32(cfg):
    return load_grok1(CASE, cfg, torch.float32)


def test_leaf_order_matches_official_flatten_order(cfg):
    listed = _listed_files()
    assert len(listed) == 2 + 12 * cfg.num_layers
    ours = [leaf.path for leaf in leaf_order(cfg.num_layers)]
    assert ours == [entry["path"].removeprefix("params/") for entry in sorted(listed, key=lambda e: e["index"])]
    assert ours.index("transformer/decoder_layer_10/moe/linear/w") == 26


def _listed_files():
    def walk(node):
        if isinstance(node, dict):
            if "index" in node and "path" in node:
                yield node
            for v in node.values():
                yield from walk(v)
        elif isinstance(node, list):
            for v in node:
                yield from walk(v)

    return list(walk(read_json(CASE / "config.json")))


def _forward_with_captures(model, tokens):
    hidden, router = [], []
    hooks = [layer.register_forward_hook(lambda m, i, o: hidden.append(o.detach())) for layer in model.layers]
    hooks += [
        layer.block_sparse_moe.gate.register_forward_hook(lambda m, i, o: router.append(o.detach()))
        for layer in model.layers
    ]
    try:
        with torch.no_grad():
            logits = model(tokens)
    finally:
        for h in hooks:
            h.remove()
    return logits, hidden, router


def test_fp32_logits_match_official(model_f32, golden):
    tokens = torch.from_numpy(golden["tokens"]).long()
    logits, hidden, router = _forward_with_captures(model_f32, tokens)
    want = golden["logits_f32"]
    valid = golden["input_mask"]
    scale = np.abs(want[valid]).max()
    assert np.abs(logits.numpy() - want).max() <= 1e-4 * scale  # pad positions included
    assert (logits.numpy().argmax(-1)[valid] == want.argmax(-1)[valid]).all()
    for i, h in enumerate(hidden):
        ref = golden["hidden_layers_f32"][i]
        assert np.abs(h.numpy() - ref).max() <= 1e-4 * np.abs(ref).max(), f"layer {i}"
    for i, r in enumerate(router):
        got = np.sort(torch.topk(r.view(2, 24, -1), 2).indices.numpy(), axis=-1)
        ref = np.sort(golden["expert_idx_f32"][i], axis=-1)
        assert (got[valid] == ref[valid]).all(), f"layer {i} experts"


def test_fp32_greedy_with_kv_cache_matches_official(model_f32, golden):
    tokens, lengths = golden["tokens"], golden["lengths"]
    scale = np.abs(golden["logits_f32"][golden["input_mask"]]).max()
    for row in range(2):
        prompt = tokens[row, : lengths[row]].tolist()
        cache = Stepper(model_f32, 1, 64, block_size=8)
        out, steps = [], []
        with torch.no_grad():
            (logits,) = cache.feed([prompt])
            for _ in range(8):
                steps.append(logits.numpy())
                nxt = int(logits.argmax(-1))
                out.append(nxt)
                (logits,) = cache.feed([[nxt]])
        assert out == golden["greedy_fullfwd_f32"][row].tolist()
        assert np.abs(np.stack(steps) - golden["greedy_fullfwd_f32_step_logits"][row]).max() <= 1e-4 * scale


def test_bf16_with_reference_routing_matches_official(cfg, golden):
    model = load_grok1(CASE, cfg, torch.bfloat16)
    forced = torch.from_numpy(golden["expert_idx_bf16"]).long()  # [L, 2, 24, 2]
    for i, layer in enumerate(model.layers):
        layer.block_sparse_moe.forced_experts = forced[i].reshape(-1, 2)
    with torch.no_grad():
        got = model(torch.from_numpy(golden["tokens"]).long()).numpy()
    want, valid = golden["logits_bf16"], golden["input_mask"]
    scale = np.abs(golden["logits_f32"][valid]).max()
    diff = np.abs(got - want)[valid]
    assert diff.max() <= 0.1 * scale
    assert diff.mean() <= 1.5e-2 * scale
    robust = golden["bf16_argmax_robust_mask"]
    assert (got.argmax(-1)[robust] == want.argmax(-1)[robust]).all()
