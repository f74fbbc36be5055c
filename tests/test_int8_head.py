"""`quantization.head: int8`: the embedding and LM head as int8 rows, on tiny real models with
bitsandbytes on the CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import variant
from test_fast_decode import backend_for, reply

from playground.backends.transformers_backend import TransformersBackend
from playground.config import GenerationParams
from playground.errors import ConfigError

# bitsandbytes is imported inside the tests: it imports Triton, and Triton imported before
# test_triton_layers switches on its interpreter leaves that file's kernels half interpreted.


def _config(folder, head: str, method: str = "nf4"):
    return variant(
        id=f"int8-head-{head}",
        backend="transformers",
        source={"path": str(folder)},
        dtype="fp32",
        quantization={"method": method, "compute_dtype": "fp32", "head": head},
    )


def _loaded(config):
    """The loaded backend and its load info (what the UI shows)."""
    backend = TransformersBackend(config.model_copy(update={"fast_decode": "off"}))
    return backend, backend.load()


@pytest.mark.parametrize("folder", ["qwen2_folder", "llama_folder"], ids=["tied", "untied"])
def test_an_int8_head_reads_as_bitsandbytes_dequantizes_and_holds_a_quarter_of_fp32(folder, request):
    """The tied Qwen2's one table serves embedding and head; the untied Llama gets one each.
    Rows read back as bitsandbytes' int8 dequantization of the original weights, the logits are
    those of the dequantized head, the weights shrink by the table's fp32 bytes less its int8
    bytes and scales, and the load line says what was done."""
    import bitsandbytes.functional as bnb_functional

    from playground.backends.int8_head import Int8Embedding, Int8Head

    folder = request.getfixturevalue(folder)
    (kept, kept_info), (int8, int8_info) = _loaded(_config(folder, "keep")), _loaded(_config(folder, "int8"))
    original_embedding = kept.model.get_input_embeddings().weight
    original_head = kept.model.get_output_embeddings().weight
    tied = original_head is original_embedding
    embedding, head = int8.model.get_input_embeddings(), int8.model.get_output_embeddings()
    assert isinstance(embedding, Int8Embedding) and isinstance(head, Int8Head)
    assert (head.table is embedding.table) == tied
    rows, absmax, _ = bnb_functional.int8_vectorwise_quant(original_embedding.detach())
    expected = bnb_functional.int8_vectorwise_dequant(rows, absmax)
    ids = torch.arange(original_embedding.shape[0])
    assert torch.equal(embedding(ids), expected)
    hidden = torch.randn(3, original_head.shape[1])
    rows, absmax, _ = bnb_functional.int8_vectorwise_quant(original_head.detach())
    torch.testing.assert_close(head(hidden), hidden @ bnb_functional.int8_vectorwise_dequant(rows, absmax).T)
    vocab, width = original_embedding.shape
    tables = 1 if tied else 2
    saved = tables * (vocab * width * 4 - vocab * width - vocab * 4)
    assert kept_info.weights_bytes - int8_info.weights_bytes == saved
    what = "tied embedding/head" if tied else "embedding and head"
    assert any(note.startswith(f"{what} in int8 (a scale a row") for note in int8_info.notes), int8_info.notes


def test_an_int8_head_decodes_the_same_tokens_on_the_fast_path_as_generate(qwen2_folder):
    """The static-cache path (the Triton layers' on a GPU) runs the int8 head in its step as
    `generate` does: the same greedy tokens in fp32."""
    config = _config(qwen2_folder, "int8")
    plain, fast = backend_for(config, "off"), backend_for(config, "on")
    params = GenerationParams(max_new_tokens=24, temperature=0.0)
    texts, _ = reply(fast, params, mode="completion", text="Hello world")
    assert len(texts) == 24
    assert (texts, "length") == reply(plain, params, mode="completion", text="Hello world")


def test_the_int8_head_needs_a_quantization_method():
    with pytest.raises(ConfigError, match="quantization.head applies with a quantization method"):
        variant(id="bad", backend="transformers", source={"path": "/x"}, quantization={"head": "int8"})
    with pytest.raises(ConfigError, match="head"):
        variant(id="bad", backend="transformers", source={"path": "/x"}, quantization={"method": "nf4", "head": "nf4"})


def test_the_int8_head_compiles_whole_as_the_fast_step_compiles_it():
    """torch.compile (as the GPU step is compiled) takes the head in one graph, its vocabulary in
    two slices here, and gives the eager head's logits."""
    from playground.backends.int8_head import HEAD_ROWS_A_SLICE, Int8Head, Int8Rows

    generator = torch.Generator().manual_seed(0)
    head = Int8Head(Int8Rows(torch.randn(HEAD_ROWS_A_SLICE + 300, 32, generator=generator)))
    hidden = torch.randn(1, 32, generator=generator)
    compiled = torch.compile(head, fullgraph=True)
    torch.testing.assert_close(compiled(hidden), head(hidden))
    assert head(hidden).shape == (1, HEAD_ROWS_A_SLICE + 300)


@pytest.mark.parametrize("folder", ["qwen2_folder", "llama_folder"], ids=["tied", "untied"])
def test_a_quantized_variant_s_estimate_counts_what_bitsandbytes_leaves_unquantized(folder, request):
    """The memory estimate before a load against what the load then holds: bitsandbytes
    quantizes the Linear layers but not the embedding, an untied head or the norms. With those
    counted at the method's bytes a weight too, an estimate here came to 0.29 of the load's."""
    from playground.memory import estimate

    folder = request.getfixturevalue(folder)
    for method in ("nf4", "int8"):
        for head in ("keep", "int8"):
            config = _config(folder, head, method)
            expected = estimate(config)
            backend, info = _loaded(config)
            backend.unload()
            assert "size unknown" not in expected.basis
            ratio = expected.weights_bytes / info.weights_bytes
            assert 0.98 <= ratio <= 1.1, (method, head, expected.weights_bytes, info.weights_bytes)
