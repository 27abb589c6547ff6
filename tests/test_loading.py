"""Loaders: presharded Grok-2 layout, HF folders, Grok-1 ckpt-0 written by make-tiny, and bad input."""

import io
import pickletools
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import grokstack
from grokstack.errors import CheckpointError
from grokstack.loading.grok1_ckpt import leaf_order, read_leaf, scan_payloads, write_leaf
from grokstack.loading.safetensors_folder import save_safetensors_folder
from grokstack.tiny import make_tiny, random_model, tiny_config

from . import reference
from .test_model import numpy_weights, rel_err


@pytest.fixture(scope="module")
def tiny2(tmp_path_factory):
    return make_tiny("grok-2", tmp_path_factory.mktemp("grok2"))


@pytest.fixture(scope="module")
def tiny1(tmp_path_factory):
    return make_tiny("grok-1", tmp_path_factory.mktemp("grok1"))


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_presharded_release_layout(tiny2):
    names = sorted(p.name for p in tiny2.glob("*.safetensors"))
    assert len(names) == 39  # 15 common + 3 x 8 TP files, as the release
    assert sum(n.endswith("-TP-common.safetensors") for n in names) == 15
    assert "pytorch_model-00006-TP-007.safetensors" in names


def test_presharded_load_rejoins_experts(tiny2):
    lm = grokstack.load(tiny2)
    want = random_model(tiny_config("grok-2"), seed=0, dtype=torch.bfloat16)
    for (name, got), (_, ref) in zip(lm.model.named_parameters(), want.named_parameters(), strict=True):
        assert torch.equal(got.float(), ref.to(torch.bfloat16).float()), name  # the release is bf16


def test_presharded_load_matches_reference(tiny2):
    lm = grokstack.load(tiny2)
    tokens = torch.randint(1, 500, (1, 20), generator=torch.Generator().manual_seed(0))
    got = lm(tokens)[0].numpy()
    want = reference.forward(reference.config_dict(lm.config), numpy_weights(lm.model), tokens[0].numpy())
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("victim", ["pytorch_model-00007-TP-003.safetensors", "pytorch_model-00006-TP-007.safetensors"])
def test_missing_shard_file_fails_loudly(tiny2, tmp_path, victim):
    ckpt = _copy(tiny2, tmp_path)
    (ckpt / victim).unlink()
    with pytest.raises(CheckpointError, match="TP shard") as err:
        grokstack.load(ckpt)
    assert "w2" in str(err.value) or "w1" in str(err.value) or "missing" in str(err.value)


def test_missing_common_file_names_tensor(tiny2, tmp_path):
    ckpt = _copy(tiny2, tmp_path)
    (ckpt / "pytorch_model-00011-TP-common.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"q_proj"):
        grokstack.load(ckpt)


def test_duplicate_tensor_fails(tiny2, tmp_path):
    ckpt = _copy(tiny2, tmp_path)
    shutil.copy(ckpt / "pytorch_model-00002-TP-common.safetensors", ckpt / "pytorch_model-00099-TP-common.safetensors")
    with pytest.raises(CheckpointError, match="appears twice"):
        grokstack.load(ckpt)


def test_misshaped_shard_fails_naming_file_and_tensor(tiny2, tmp_path):
    ckpt = _copy(tiny2, tmp_path)
    name = "model.layers.1.block_sparse_moe.experts.3.w1.weight"
    f = ckpt / "pytorch_model-00006-TP-002.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(f)
    tensors[name] = torch.zeros(5, 64, dtype=torch.bfloat16)
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match=r"00006-TP-002.*experts\.3\.w1"):
        grokstack.load(ckpt)


def test_truncated_safetensors_fails(tiny2, tmp_path):
    ckpt = _copy(tiny2, tmp_path)
    f = ckpt / "pytorch_model-00000-TP-common.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="00000-TP-common"):
        grokstack.load(ckpt)


def test_convert_roundtrip_hf_and_presharded(tiny1, tmp_path):
    # Grok-1 ckpt-0 -> Grok-2-layout safetensors (fp32, unsharded and presharded) -> same logits.
    lm = grokstack.load(tiny1)
    tokens = torch.randint(1, 500, (1, 12), generator=torch.Generator().manual_seed(1))
    ref = lm(tokens)
    for preshard in (0, 4):
        out = tmp_path / f"conv{preshard}"
        save_safetensors_folder(lm.model, out, torch.float32, preshard=preshard)
        shutil.copy(tiny1 / "tokenizer.model", out)
        back = grokstack.load(out)
        assert back.config.arch == "grok-1" and back.config.tie_word_embeddings and back.config.gelu == "tanh"
        assert torch.equal(back(tokens), ref)


def test_grok1_tiny_matches_reference(tiny1):
    lm = grokstack.load(tiny1)
    assert lm.config.num_layers >= 11  # string-sorted leaf order is exercised
    tokens = torch.randint(1, 500, (1, 16), generator=torch.Generator().manual_seed(2))
    got = lm(tokens)[0].numpy()
    want = reference.forward(reference.config_dict(lm.config), numpy_weights(lm.model), tokens[0].numpy())
    assert rel_err(got, want) < 1e-5


def test_grok1_leaf_pickles_are_valid_and_use_official_globals(tiny1, tmp_path):
    cfg = grokstack.load(tiny1).config
    for index in (0, 3, 4):
        data = (tiny1 / "ckpt-0" / f"tensor{index:05d}_000").read_bytes()
        pickletools.dis(data, out=io.StringIO())  # checks the opcode stream is well formed
    ops = [op for op in pickletools.genops((tiny1 / "ckpt-0" / "tensor00003_000").read_bytes())]
    names = {f"{a[1]}.{b[1]}" for a, b, c in zip(ops, ops[1:], ops[2:], strict=False)
             if a[0].name == b[0].name == "SHORT_BINUNICODE" and c[0].name == "STACK_GLOBAL"}
    # the globals the official checkpoint's quantized leaves name (golden/grok1/case-a/config.json)
    assert names == {"__main__.QuantizedWeight8bit", "ml_dtypes.bfloat16", "numpy.core.multiarray._reconstruct",
                     "numpy.dtype", "numpy.ndarray"}
    # the 8-row-block scales survive a write/read round trip
    leaf = next(leaf for leaf in leaf_order(cfg.num_layers) if leaf.role == "w2")
    q = np.arange(8 * 88 * 64, dtype=np.int64).reshape(8, 88, 64).astype(np.int8)
    s = torch.rand(8, 8, 64).to(torch.bfloat16)
    write_leaf(tmp_path / "leaf", (q, s))
    w, scales = read_leaf(tmp_path / "leaf", leaf, (8, 88, 64))
    assert np.array_equal(w.numpy(), q) and torch.equal(scales, s)


def test_grok1_truncated_or_missing_leaf(tiny1, tmp_path):
    ckpt = _copy(tiny1, tmp_path)
    f = ckpt / "ckpt-0" / "tensor00030_000"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="tensor00030_000"):
        grokstack.load(ckpt)
    f.unlink()
    with pytest.raises(CheckpointError, match="missing checkpoint file .*tensor00030_000"):
        grokstack.load(ckpt)


def test_scan_never_executes_pickles(tmp_path):
    evil = tmp_path / "tensor00000_000"
    evil.write_bytes(b"\x80\x04cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR.")
    scan_payloads(evil)
    assert not (tmp_path / "pwned").exists()


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        grokstack.load(tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        grokstack.load(tmp_path / "absent")
