"""The from-scratch GPT converts to a transformers Llama that computes what the original did."""

from __future__ import annotations

import pytest
import torch
from conftest import variant
from factories import GPT_DIMS, make_gpt_state_dict, reference_gpt_logits

from playground.backends.scratch_gpt import build_llama, infer_shape, read_state_dict
from playground.backends.tiktoken_codec import TiktokenCodec
from playground.config import ScratchGptOptions, TokenizerSpec
from playground.errors import LoadError

OPTIONS = ScratchGptOptions(rope_theta=500_000.0)


def test_every_size_is_read_from_the_tensors(gpt_files):
    shape = infer_shape(read_state_dict(gpt_files["pt"]), ScratchGptOptions(head_dim=999))
    # head_dim comes from freqs_cis when present, overriding the config's value.
    assert (shape.vocab_size, shape.n_embd, shape.n_layer) == (300, 64, 2)
    assert (shape.n_head, shape.n_kv_head, shape.head_dim) == (4, 2, 16)
    assert (shape.ffn_hidden, shape.block_size) == (96, 512)


def test_without_freqs_the_head_size_comes_from_the_config(gpt_files):
    state = read_state_dict(gpt_files["safetensors"])
    assert "freqs_cis" not in state
    assert infer_shape(state, ScratchGptOptions(head_dim=16)).n_head == 4
    with pytest.raises(LoadError, match="head_dim"):
        infer_shape(state, ScratchGptOptions(head_dim=24))


@pytest.mark.parametrize("kind", ["pt", "safetensors"])
def test_converted_model_matches_the_reference_forward(gpt_files, gpt_state, kind):
    state = read_state_dict(gpt_files[kind])
    shape = infer_shape(state, ScratchGptOptions(head_dim=16))
    model = build_llama(state, shape, OPTIONS, torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 200, 17, 42, 3, 250, 7, 8, 9, 10]])
    expected = reference_gpt_logits(gpt_state, ids, GPT_DIMS, theta=500_000.0)
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_wrong_theta_gives_different_logits(gpt_state, gpt_files):
    """The check above can fail: with the older default theta the outputs differ."""
    state = read_state_dict(gpt_files["pt"])
    model = build_llama(state, infer_shape(state, OPTIONS), ScratchGptOptions(rope_theta=10_000.0), torch.float32)
    ids = torch.tensor([[1, 5, 9, 200, 17, 42, 3, 250, 7, 8, 9, 10]])
    expected = reference_gpt_logits(gpt_state, ids, GPT_DIMS, theta=500_000.0)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, expected, atol=1e-3)


def test_a_foreign_state_dict_is_refused_by_name(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(LoadError, match="token_embedding_table.weight"):
        infer_shape(read_state_dict(path), OPTIONS)


def test_garbage_file_is_refused(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(LoadError, match="not a readable state_dict"):
        read_state_dict(path)


def test_tiktoken_file_round_trips(tiktoken_file):
    codec = TiktokenCodec(TokenizerSpec(file=str(tiktoken_file)), vocab_size=300)
    text = "The quick brown fox, the capital of France!"
    ids = codec.encode(text, add_special_tokens=False)
    assert len(ids) < len(text.encode())  # merges were applied
    assert codec.decode(ids) == text
    assert codec.eos_ids == {296}


def test_tokenizer_larger_than_the_model_is_refused(tiktoken_file):
    with pytest.raises(LoadError, match="296|297"):
        TiktokenCodec(TokenizerSpec(file=str(tiktoken_file)), vocab_size=200)


def test_scratch_variant_config_defaults():
    config = variant(id="g", backend="scratch_gpt", source={"path": "/x.pt"}, tokenizer={"tiktoken": "gpt2"})
    assert config.scratch_gpt.rope_theta == 500_000.0
    assert make_gpt_state_dict()["freqs_cis"].shape == (512, 8)
