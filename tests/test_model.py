"""model.py against the independent NumPy reference, the KV cache, and the engine knobs."""

import dataclasses

import numpy as np
import pytest
import torch

from grokstack.config import ModelConfig
from grokstack.loading.weights import iter_hf_tensors
from grokstack.runner import Stepper
from grokstack.tiny import random_model, tiny_config

from . import reference


def numpy_weights(model):
    return {name: t.detach().double().numpy() for name, t in iter_hf_tensors(model)}


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="module", params=["grok-1", "grok-2"])
def tiny(request):
    cfg = tiny_config(request.param)
    return random_model(cfg, seed=3)


def prompt(cfg, T, seed=0, allow_pad=False):
    g = torch.Generator().manual_seed(seed)
    low = 0 if allow_pad else 1
    return torch.randint(low, cfg.vocab_size, (T,), generator=g)


def test_fp32_matches_numpy_reference(tiny):
    cfg = tiny.cfg
    T = 24  # longer than the tiny attn_temperature_len (5)
    tokens = prompt(cfg, T)
    with torch.no_grad():
        got = tiny(tokens[None])[0].numpy()
    want, _ = reference.forward(reference.config_dict(cfg), numpy_weights(tiny), tokens.numpy(), return_hidden=True)
    assert rel_err(got, want) < 1e-5
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_per_layer_residual_streams_match(tiny):
    # A constant factor before a post-norm hides in the logits; the residual stream shows it.
    cfg = tiny.cfg
    tokens = prompt(cfg, 12, seed=5)
    captured = []
    hooks = [layer.register_forward_hook(lambda m, i, o: captured.append(o[0].detach())) for layer in tiny.layers]
    try:
        with torch.no_grad():
            tiny(tokens[None])
    finally:
        for h in hooks:
            h.remove()
    _, want = reference.forward(reference.config_dict(cfg), numpy_weights(tiny), tokens.numpy(), return_hidden=True)
    for got, ref in zip(captured, want, strict=True):
        assert rel_err(got.numpy(), ref) < 1e-5


def test_caps_bite_in_tiny_models(tiny):
    # The test configs are only meaningful if the softcaps are active.
    cfg = tiny.cfg
    tokens = prompt(cfg, 16, seed=1)
    scores = []

    def grab(module, inputs, output):
        scores.append(output.detach())

    hook = tiny.layers[0].block_sparse_moe.gate.register_forward_hook(grab)
    try:
        with torch.no_grad():
            tiny(tokens[None])
    finally:
        hook.remove()
    assert scores[0].abs().max() > 3.0  # router logits are large enough for a softcap to matter
    if cfg.final_softcap:
        with torch.no_grad():
            logits = tiny(tokens[None])
        assert logits.abs().max() > 0.3 * cfg.final_softcap


def test_pad_keys_masked_for_grok1_only(tiny):
    cfg = tiny.cfg
    tokens = prompt(cfg, 10, seed=2)
    tokens[3] = cfg.pad_token_id
    with torch.no_grad():
        got = tiny(tokens[None])[0].numpy()
    want = reference.forward(reference.config_dict(cfg), numpy_weights(tiny), tokens.numpy())
    assert rel_err(got, want) < 1e-5


def test_kv_cache_decode_equals_full_forward(tiny):
    cfg = tiny.cfg
    T = 20
    tokens = prompt(cfg, T, seed=4)[None]
    with torch.no_grad():
        full = tiny(tokens)
        cache = Stepper(tiny, 1, 32, block_size=4)  # blocks of 4: the chunks below cross block edges
        pre = 7  # prefill 7, then a chunk of 5 (prefill-with-prefix), then one by one
        ids = tokens[0].tolist()
        parts = cache.feed([ids[:pre]], "every") + cache.feed([ids[pre : pre + 5]], "every")
        for t in range(pre + 5, T):
            parts += cache.feed([ids[t : t + 1]], "every")
    stepped = torch.cat(parts, dim=0)[None]
    assert rel_err(stepped.numpy(), full.numpy()) < 1e-5


def test_batch_rows_of_different_lengths_use_own_positions(tiny):
    cfg = tiny.cfg
    a, b = prompt(cfg, 9, seed=7), prompt(cfg, 14, seed=8)
    with torch.no_grad():
        cache = Stepper(tiny, 2, 20, block_size=4)
        out = cache.feed([a.tolist(), b.tolist()], "every")  # one step: rows of 9 and 14 tokens
        step = cache.feed([[5], [6]], "every")
        ref_a = tiny(torch.cat([a, torch.tensor([5])])[None])
        ref_b = tiny(torch.cat([b, torch.tensor([6])])[None])
    assert rel_err(out[0], ref_a[0, :9]) < 1e-5
    assert rel_err(step[0][0], ref_a[0, -1]) < 1e-5
    assert rel_err(step[1][0], ref_b[0, -1]) < 1e-5


def test_temperature_changes_only_positions_past_L():
    cfg = tiny_config("grok-2")
    model = random_model(cfg, seed=1)
    tokens = prompt(cfg, 16, seed=9)[None]
    with torch.no_grad():
        on = model(tokens)
        model.cfg = off_cfg = dataclasses.replace(cfg, attn_temperature_style="none")
        for m in model.modules():
            if hasattr(m, "cfg"):
                m.cfg = off_cfg
        off = model(tokens)
    L = cfg.attn_temperature_len
    assert torch.allclose(on[0, : L + 1], off[0, : L + 1], atol=1e-6)  # p <= L: factor exactly 1
    assert (on[0, L + 1 :] - off[0, L + 1 :]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "knob",
    [
        {"gelu": "tanh"},
        {"router_renormalize": True},
        {"router_softcap": 0.0},
        {"attn_temperature_style": "log2_before_cap"},
        {"attn_temperature_style": "inv_linear"},
        {"attn_temperature_pos_offset": 1},
        {"rope_original_as": "yarn"},
        {"attn_out_multiplier_on_o": True},
    ],
)
def test_each_knob_changes_grok2_logits(knob):
    cfg = tiny_config("grok-2")
    base = random_model(cfg, seed=2)
    tokens = prompt(cfg, 16, seed=10)[None]
    with torch.no_grad():
        ref = base(tokens)
        alt_cfg = cfg.with_overrides(knob)
        alt = random_model(alt_cfg, seed=2)
        out = alt(tokens)
    assert (out - ref).abs().max() > 1e-4


def test_bf16_path_tracks_fp32():
    cfg = tiny_config("grok-2")
    f32 = random_model(cfg, seed=4)
    b16 = random_model(cfg, seed=4, dtype=torch.bfloat16)
    assert b16.layers[0].pre_attn_norm.weight.dtype == torch.float32
    assert b16.layers[0].block_sparse_moe.gate.weight.dtype == torch.float32
    tokens = prompt(cfg, 12, seed=11)[None]
    with torch.no_grad():
        a, b = f32(tokens), b16(tokens)
    assert b.dtype == torch.float32
    assert rel_err(b, a) < 0.15  # bf16 catches gross errors only (routing may flip)


def test_llama_family_switches_match_reference():
    # The bundled default model is a Llama: pre-norm only, SiLU gated dense MLP, no caps, tied embeddings.
    cfg = ModelConfig(
        arch="llama", vocab_size=300, hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=2, head_dim=8,
        moe_intermediate_size=0, num_experts=0, num_experts_per_tok=0, intermediate_size=80,
        attn_softcap=0.0, rope_theta=100000, tie_word_embeddings=True, norm_style="pre", hidden_act="silu",
    )
    model = random_model(cfg, seed=5)
    assert model.layers[0].post_attn_norm is None and model.layers[0].block_sparse_moe is None
    tokens = prompt(cfg, 14, seed=12)
    with torch.no_grad():
        got = model(tokens[None])[0].numpy()
    want = reference.forward(reference.config_dict(cfg), numpy_weights(model), tokens.numpy())
    assert rel_err(got, want) < 1e-5
