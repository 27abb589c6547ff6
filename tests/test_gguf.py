"""GGUF loading: llama.cpp layouts for llama and Grok, dequantization, tokenizers from metadata, bad files."""

import logging

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, quants

import grokstack
from grokstack.config import ModelConfig
from grokstack.errors import CheckpointError, TokenizerError
from grokstack.loading import inspect_checkpoint
from grokstack.loading.gguf import open_gguf
from grokstack.tiny import make_tiny, random_model
from grokstack.tokenizer import SentencePieceTokenizer

from .gguf_files import _finish, bytes_to_unicode, gguf_name, start_gguf, write_grok_gguf, write_llama_gguf

TEXTS = [
    "Hello world! How are you?",
    "The year 2024 had 366 days.\r\nNew line.",
    "  leading spaces, tabs\tand émojis 🙂 — ünïcödé",
    "<|separator|> is plain text here",
]


def tiny_llama_config(**kw) -> ModelConfig:
    base = dict(
        arch="llama", vocab_size=300, hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=2, head_dim=8,
        moe_intermediate_size=0, num_experts=0, num_experts_per_tok=0, intermediate_size=96, attn_softcap=0.0,
        norm_style="pre", hidden_act="silu", tie_word_embeddings=True, rope_theta=50000.0, rms_norm_eps=1e-5,
        max_position_embeddings=128,
    )
    return ModelConfig(**(base | kw))


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


def test_llama_gguf_undoes_qk_permutation(tmp_path):
    model = random_model(tiny_llama_config(), seed=3)
    path = write_llama_gguf(tmp_path / "l.gguf", model)
    lm = grokstack.load(path)
    assert lm.config.arch == "llama" and lm.config.tie_word_embeddings and lm.config.rope_theta == 50000.0
    ids = list(range(5, 40))
    a, b = logits(model, ids), logits(lm.model, ids)
    assert torch.allclose(a, b, rtol=0, atol=1e-5 * a.abs().max().item())
    # the file really holds permuted rows, so a loader that skipped the un-permutation would fail above
    stored = np.asarray(open_gguf(path).tensors["blk.0.attn_q.weight"].data)
    assert not np.array_equal(stored, model.layers[0].self_attn.q_proj.weight.detach().numpy())


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.BF16])
def test_quantized_weights_dequantize_at_load(tmp_path, qtype):
    model = random_model(tiny_llama_config(hidden_size=64, head_dim=8, num_heads=8, intermediate_size=128), seed=1)
    path = write_llama_gguf(tmp_path / "q.gguf", model, qtype=qtype)
    loaded = grokstack.load(path).model
    w = model.layers[1].mlp.down_proj.weight.detach().numpy()
    expect = quants.dequantize(quants.quantize(w, qtype), qtype).reshape(w.shape)
    assert np.array_equal(loaded.layers[1].mlp.down_proj.weight.detach().numpy(), expect)
    err = np.abs(expect - w).max() / np.abs(w).max()
    assert 0 <= err < {Q.Q8_0: 0.02, Q.BF16: 0.01}.get(qtype, 0.2)


def _kquant_bytes(qtype: Q, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random K-quant blocks whose fp16 scale fields hold sane values."""
    block, size = quants.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(seed).integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    half = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    scale_at = {Q.Q2_K: [size - 4, size - 2], Q.Q3_K: [size - 2], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [size - 2]}
    for off in scale_at[qtype]:
        raw[..., off : off + 2] = half
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_k_quants_load(tmp_path, qtype):
    cfg = tiny_llama_config(hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64, intermediate_size=256)
    model = random_model(cfg, seed=2)
    w = start_gguf(tmp_path / "k.gguf", "llama", cfg, cfg.intermediate_size)
    raw = _kquant_bytes(qtype, 256, 256, seed=5)
    for name, t in model.named_parameters():
        if name == "layers.0.mlp.up_proj.weight":
            w.add_tensor(gguf_name(name), raw, raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), t.detach().numpy().astype(np.float32))
    loaded = grokstack.load(_finish(w, tmp_path / "k.gguf")).model
    got = loaded.layers[0].mlp.up_proj.weight.detach().numpy()
    assert np.array_equal(got, quants.dequantize(raw, qtype).reshape(256, 256))
    assert np.isfinite(got).all() and got.std() > 0


@pytest.fixture(scope="module")
def tiny2(tmp_path_factory):
    return make_tiny("grok-2", tmp_path_factory.mktemp("g2"), seed=4)


def test_grok2_gguf_matches_safetensors(tiny2, tmp_path, caplog):
    ref = grokstack.load(tiny2)
    path = write_grok_gguf(tmp_path / "grok2.gguf", ref.model, tiny2 / "tokenizer.tok.json")
    with caplog.at_level(logging.WARNING, logger="grokstack"):
        lm = grokstack.load(path)
    assert "YaRN" in caplog.text and "rope_original_as=yarn" in caplog.text
    a, b = ref.config, lm.config
    for field in ("arch", "num_experts", "moe_intermediate_size", "intermediate_size", "residual_moe",
                  "embedding_multiplier", "output_multiplier", "attn_softcap", "router_softcap", "final_softcap",
                  "attn_temperature_len", "rope_theta", "rope_type", "scaling_factor", "beta_fast", "gelu",
                  "tie_word_embeddings", "router_renormalize", "rope_original_as"):
        assert getattr(a, field) == pytest.approx(getattr(b, field)), field
    assert b.qk_scale == pytest.approx(a.qk_scale, rel=1e-6)
    ids = ref.tokenizer.encode("Human: tell me a story about the sea and the stars")
    ids = (ids * 3)[:24]  # longer than the attention temperature length
    x, y = logits(ref.model, ids), logits(lm.model, ids)
    assert torch.allclose(x, y, rtol=0, atol=2e-5 * x.abs().max().item())
    # the GGUF's vocabulary (gpt2 BPE + grok-2 pre-tokenizer) encodes exactly like tokenizer.tok.json
    for text in TEXTS:
        assert lm.tokenizer.encode(text) == ref.tokenizer.encode(text), text
        assert lm.tokenizer.decode(lm.tokenizer.encode(text)) == text
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|separator|> there"}]
    assert lm.tokenizer.chat_ids(msgs) == ref.tokenizer.chat_ids(msgs)
    assert lm.tokenizer.stop_ids >= {ref.tokenizer.eos_id}


def test_grok2_gguf_yarn_on_request(tiny2, tmp_path):
    ref = grokstack.load(tiny2, rope_original_as="yarn")
    path = write_grok_gguf(tmp_path / "grok2.gguf", ref.model, None)
    lm = grokstack.load(path, rope_original_as="yarn")
    ids = list(range(3, 60))
    x, y = logits(ref.model, ids), logits(lm.model, ids)
    assert torch.allclose(x, y, rtol=0, atol=2e-5 * x.abs().max().item())
    plain = logits(grokstack.load(path).model, ids)
    assert not torch.allclose(plain, y, rtol=0, atol=1e-3 * y.abs().max().item())


def test_grok2_gguf_quantized_experts(tiny2, tmp_path):
    ref = grokstack.load(tiny2)
    path = write_grok_gguf(tmp_path / "q.gguf", ref.model, None, qtype=Q.Q8_0)
    lm = grokstack.load(path)
    w1 = ref.model.layers[2].block_sparse_moe.experts.w1.detach().numpy()  # [E, F, D]
    got = lm.model.layers[2].block_sparse_moe.experts.w1.detach().numpy()
    for e in range(w1.shape[0]):  # expert by expert, as stored
        assert np.array_equal(got[e], quants.dequantize(quants.quantize(w1[e], Q.Q8_0), Q.Q8_0))


def test_split_gguf_loads_from_any_part_or_its_folder(tiny2, tmp_path):
    ref = grokstack.load(tiny2)
    folder = tmp_path / "split"
    folder.mkdir()
    write_grok_gguf(folder / "grok2.gguf", ref.model, None, split=10)
    parts = sorted(folder.glob("*.gguf"))
    assert len(parts) > 2 and parts[0].name == f"grok2-00001-of-{len(parts):05d}.gguf"
    ids = list(range(3, 30))
    expect = logits(ref.model, ids)
    for where in (folder, parts[1]):
        assert torch.allclose(logits(grokstack.load(where).model, ids), expect, rtol=0, atol=1e-4)
    parts[-1].unlink()
    with pytest.raises(CheckpointError, match=f"missing part.*{parts[-1].name}"):
        grokstack.load(parts[0])


def test_grok1_gguf_matches_ckpt_and_sentencepiece(tmp_path):
    folder = make_tiny("grok-1", tmp_path / "g1")
    ref = grokstack.load(folder)
    path = write_grok_gguf(tmp_path / "grok1.gguf", ref.model, folder / "tokenizer.model")
    lm = grokstack.load(path)
    assert lm.config.arch == "grok-1" and lm.config.gelu == "tanh" and lm.config.router_softcap == 0
    assert lm.config.mask_pad_keys and lm.config.tie_word_embeddings
    ids = [1, 0, 5, 9, 33, 47, 2, 0, 80, 12, 100, 7, 7, 200]  # includes pad ids, which Grok-1 masks
    x, y = logits(ref.model, ids), logits(lm.model, ids)
    assert torch.allclose(x, y, rtol=0, atol=2e-5 * x.abs().max().item())
    assert isinstance(lm.tokenizer, SentencePieceTokenizer)
    for text in TEXTS + ["numbers 12345 and   runs\n\n\nof\t\twhitespace"]:
        assert lm.tokenizer.encode(text) == ref.tokenizer.encode(text), text


def test_folder_with_one_gguf_and_config_conflicts(tmp_path):
    model = random_model(tiny_llama_config(), seed=0)
    write_llama_gguf(tmp_path / "only.gguf", model)
    assert inspect_checkpoint(tmp_path).format == "gguf"
    write_llama_gguf(tmp_path / "second.gguf", model)
    with pytest.raises(CheckpointError, match="several GGUF files"):
        inspect_checkpoint(tmp_path)


# ----------------------------------------------------------------------------- bad files
def test_not_a_gguf_and_truncated(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_text("definitely not gguf")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        open_gguf(bad)
    good = write_llama_gguf(tmp_path / "good.gguf", random_model(tiny_llama_config(), seed=0))
    data = good.read_bytes()
    for cut in (24, 200, len(data) // 2, len(data) - 10):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated|damaged"):
            grokstack.load(tmp_path / "cut.gguf")


def test_unsupported_quant_and_architecture(tmp_path):
    model = random_model(tiny_llama_config(hidden_size=64, num_heads=8), seed=0)
    w = start_gguf(tmp_path / "iq.gguf", "llama", model.cfg, model.cfg.intermediate_size)
    for name, t in model.named_parameters():
        a = t.detach().numpy().astype(np.float32)
        if name == "layers.0.mlp.up_proj.weight":  # [96, 64]: IQ4_NL blocks of 32 values, 18 bytes each
            w.add_tensor(gguf_name(name), np.zeros((96, 36), np.uint8), raw_dtype=Q.IQ4_NL)
        else:
            w.add_tensor(gguf_name(name), a)
    path = _finish(w, tmp_path / "iq.gguf")
    with pytest.raises(CheckpointError, match="quant type IQ4_NL"):
        grokstack.load(path)

    w = GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((10, 4), np.float32))
    with pytest.raises(CheckpointError, match="architecture 'mamba' is not supported"):
        grokstack.load(_finish(w, tmp_path / "mamba.gguf"))


@pytest.mark.parametrize("case, message", [("extra", "mystery"), ("missing", "1 weights missing")])
def test_missing_and_extra_tensors(tmp_path, case, message):
    model = random_model(tiny_llama_config(), seed=0)
    w = start_gguf(tmp_path / "m.gguf", "llama", model.cfg, model.cfg.intermediate_size)
    for name, t in model.named_parameters():
        if case == "extra" or name != "layers.1.mlp.down_proj.weight":
            w.add_tensor(gguf_name(name), t.detach().numpy().astype(np.float32))
    if case == "extra":
        w.add_tensor("blk.0.mystery.weight", np.zeros(4, np.float32))
    with pytest.raises(CheckpointError, match=message):
        grokstack.load(_finish(w, tmp_path / "m.gguf"))


def test_gguf_without_tokenizer_or_template(tmp_path):
    lm = grokstack.load(write_llama_gguf(tmp_path / "n.gguf", random_model(tiny_llama_config(), seed=0)))
    with pytest.raises(TokenizerError, match="no tokenizer"):
        lm.encode("hi")
    cfg = tiny_llama_config(vocab_size=260)
    tokens = [bytes_to_unicode()[b] for b in range(256)] + ["Ġt", "he", "Ġthe", "<|end|>"]
    tok = {"tokens": tokens, "types": [1] * 259 + [3], "merges": ["Ġ t", "h e", "Ġt he"], "eos": 259}
    lm = grokstack.load(write_llama_gguf(tmp_path / "t.gguf", random_model(cfg, seed=0), tokenizer=tok))
    assert lm.encode(" the") == [258] and lm.tokenizer.decode([258, 259]) == " the<|end|>"
    with pytest.raises(TokenizerError, match="no chat template"):
        lm.chat_ids([{"role": "user", "content": "hi"}])
    tok["pre"] = "made-up"
    path = write_llama_gguf(tmp_path / "u.gguf", random_model(cfg, seed=0), tokenizer=tok)
    with pytest.raises(TokenizerError, match="pre-tokenizer 'made-up' is not supported"):
        grokstack.load(path)



def test_llama_gguf_converts_to_safetensors(tmp_path):
    from grokstack.loading.safetensors_folder import save_safetensors_folder

    lm = grokstack.load(write_llama_gguf(tmp_path / "l.gguf", random_model(tiny_llama_config(), seed=7)))
    save_safetensors_folder(lm.model, tmp_path / "st", torch.float32, preshard=0)
    back = grokstack.load(tmp_path / "st")
    assert back.config.arch == "llama" and back.config.intermediate_size == 96 and back.config.num_experts == 0
    ids = list(range(2, 30))
    assert torch.equal(logits(lm.model, ids), logits(back.model, ids))
