"""The tiny test model: deterministic, keyed by its parameters, servable (tokenizer + chat template)."""

import hashlib

import pytest

from ampd_plugin.tiny_model import PRESETS, TinyModelSpec, build_tiny_model


def test_spec_key_and_kv_bytes():
    assert TinyModelSpec().key() == TinyModelSpec().key()
    assert TinyModelSpec(seed=1).key() != TinyModelSpec(seed=2).key()
    assert PRESETS["tiny"].kv_bytes_per_token() == 2 * 2 * 2 * 32 * 2  # K+V, layers, KV heads, head dim, bf16
    assert PRESETS["bench"].kv_bytes_per_token() == 4096
    with pytest.raises(ValueError, match="preset"):
        build_tiny_model("huge")


def test_build_is_deterministic_and_has_a_chat_template(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    spec = TinyModelSpec(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                         vocab_size=600, max_position_embeddings=256)
    a = build_tiny_model(spec, tmp_path / "a")
    b = build_tiny_model(spec, tmp_path / "b")
    assert build_tiny_model(spec, tmp_path / "a") == a  # cached
    digest = lambda p: hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()
    assert digest(a) == digest(b)
    cfg = AutoConfig.from_pretrained(a)
    assert cfg.num_key_value_heads == 1 and cfg.initializer_range == 0.3
    tok = AutoTokenizer.from_pretrained(a)
    text = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|assistant|>\n") and len(tok) <= 600
