"""QAT and GGUF export: the schedule and fake quantization, then real jobs on a tiny model and the
export of the embedded model, loaded back in llama.cpp."""

from __future__ import annotations

import json

import torch
from conftest import run_job

from playground import qat


def test_schedules_follow_the_card():
    assert qat.bits_at("linear", 0.05) is None  # FP32 warm-up, the first 10%
    assert qat.bits_at("linear", 0.1) is None and qat.bits_at("linear", 0.5) == 18
    assert qat.bits_at("linear", 0.89) == 4 and qat.bits_at("linear", 0.95) == 4  # INT4 tail
    assert [qat.bits_at("step", p) for p in (0.05, 0.2, 0.4, 0.7, 0.95)] == [None, 16, 8, 4, 4]
    assert qat.bits_at("constant", 0.0, 3) == 3 and qat.bits_at("none", 0.5) is None


def test_fake_quantization_rounds_per_group_and_passes_gradients_straight():
    torch.manual_seed(0)
    weight = torch.randn(8, 64, requires_grad=True)
    quantized = qat.fake_quantize(weight, bits=4, group_size=32)
    groups = quantized.detach().reshape(8, 2, 32)
    assert all(len(torch.unique(g)) <= 16 for g in groups.reshape(16, 32))
    step = (weight.detach().reshape(8, 2, 32).amax(-1) - weight.detach().reshape(8, 2, 32).amin(-1)) / 15
    assert ((groups - weight.detach().reshape(8, 2, 32)).abs() <= step[..., None] / 2 + 1e-6).all()
    quantized.sum().backward()
    assert torch.equal(weight.grad, torch.ones_like(weight))  # straight through


def test_attach_and_detach_keep_the_latent_weights():
    layer = torch.nn.Sequential(torch.nn.Linear(64, 8))
    latent = layer[0].weight.detach().clone()
    width = qat.BitWidth(bits=2)
    assert qat.attach(layer, width, 32, ("0",)) == ["0"]
    assert not torch.allclose(layer[0].weight, latent)  # the forward sees 2-bit weights
    width.bits = None
    assert torch.equal(layer[0].weight, latent)
    qat.detach(layer)
    assert torch.equal(layer[0].weight, latent) and not hasattr(layer[0], "parametrizations")


def test_qat_export_and_compare_on_a_tiny_model(jobs, llama_folder, tmp_path):
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from playground.engine import Engine
    from playground.workers import Finished

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Hello world! This is a tiny corpus for a tiny tokenizer.\n\n" * 60)
    options = {"model": str(llama_folder), "corpus": str(corpus), "steps": 8, "seq_len": 32, "name": "tiny-qat"}
    trained = run_job(jobs, "qat", options | {"schedule": "step", "learning_rate": 1e-3})
    bits = [e["bits"] for _, _, e in jobs.store.events(trained.id) if "bits" in e]
    assert bits == [32, 16, 16, 8, 8, 8, 4, 4] and trained.result["fake_quantized_layers"] == 14
    exported = run_job(jobs, "export-gguf", {"model": "tiny-qat", "types": ["Q8_0", "Q4_0"]}).result
    assert [f["type"] for f in exported["files"]] == ["Q8_0", "Q4_0"]
    assert exported["files"][1]["bytes"] < exported["files"][0]["bytes"]
    q8 = exported["files"][0]
    # The exported tokenizer gives the ids of the source tokenizer.
    text = "Hello world! This is a tiny corpus, with <|im_start|> and numbers 12345."
    source_ids = AutoTokenizer.from_pretrained(llama_folder)(text, add_special_tokens=False)["input_ids"]
    gguf_ids = Llama(model_path=q8["path"], vocab_only=True, verbose=False).tokenize(
        text.encode(), add_bos=False, special=True
    )
    assert gguf_ids == source_ids
    # The exported file is a variant: it loads in llama.cpp and generates.
    engine = Engine()
    try:
        made = engine.catalogue.get(q8["variant_id"])
        assert made.backend == "llamacpp" and made.finetune.base == "tiny-qat"
        engine.load(made.id)
        request = engine.request(made.id, prompt="Hello", mode="completion", max_new_tokens=6, temperature=0)
        finished = [e for e in engine.generate(made.id, request) if isinstance(e, Finished)][0]
        assert finished.metrics.completion_tokens >= 1
    finally:
        engine.shutdown()
    compare = {"model": str(llama_folder), "qat": "tiny-qat", "types": ["Q8_0"], "corpus": str(corpus), "window": 64}
    rows = run_job(jobs, "qat-compare", compare | {"stride": 32}).result["rows"]
    assert [(r["role"], r["type"]) for r in rows] == [
        ("base", "F16"),
        ("base", "Q8_0"),
        ("qat", "F16"),
        ("qat", "Q8_0"),
    ]
    assert all(r["perplexity"] > 1 and r["bytes"] > 0 for r in rows)
    assert rows[0]["increase_over_f16"] == 0.0 and abs(rows[1]["increase_over_f16"]) < 0.05  # Q8_0 costs little
    json.dumps(rows)  # the command line prints it as JSON


def test_the_embedded_model_exports_with_its_own_tokenizer_and_chat_template(jobs):
    from gguf import GGUFReader
    from llama_cpp import Llama

    from playground.catalogue import Catalogue
    from playground.jobs.export import source_gguf

    result = run_job(jobs, "export-gguf", {"model": "smollm2-135m-transformers", "types": ["Q8_0"]}).result
    catalogue = Catalogue.from_settings()
    original = source_gguf(catalogue, catalogue.get("smollm2-135m-transformers"))
    assert result["tokenizer_from"] == str(original)
    exported = result["files"][0]["path"]
    fields = GGUFReader(exported).fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert (
        fields["tokenizer.chat_template"].contents()
        == GGUFReader(str(original)).fields["tokenizer.chat_template"].contents()
    )
    text = "def f(x):\n    return x ** 2  # squares, naïvely <|im_end|>"
    a = Llama(model_path=str(original), vocab_only=True, verbose=False).tokenize(text.encode(), special=True)
    b = Llama(model_path=exported, vocab_only=True, verbose=False).tokenize(text.encode(), special=True)
    assert a == b
