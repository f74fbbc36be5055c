"""Token-level divergence on tiny real models: the same F32 GGUF in llama.cpp and dequantized
into transformers (the embedded pair in miniature), checked against logits computed here."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import direct_llama, variant
from test_cli import cli

from playground.divergence import compare_prompts, diff
from playground.errors import GenerationError

PROMPT = "Tell me about the sea."


@pytest.fixture
def pair(engine, tiny_gguf, tmp_path, monkeypatch):
    """The tiny GGUF in llama.cpp (the reference) and in transformers, both loaded."""
    monkeypatch.setenv("PLAYGROUND_CACHE_DIR", str(tmp_path / "cache"))
    for config in (
        variant(id="tiny-llamacpp", backend="llamacpp", source={"path": str(tiny_gguf)}, context_length=256),
        variant(id="tiny-hf", backend="transformers", source={"path": str(tiny_gguf)}, dtype="fp32",
                context_length=256),
    ):
        engine.catalogue.add(config)
        engine.load(config.id, check_memory=False)
    return engine


def direct_logprobs_hf(folder, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1).numpy()


def direct_logprobs_llamacpp(path, ids: list[int]) -> np.ndarray:
    llm = direct_llama(path, n_ctx=256, logits_all=True)
    try:
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)], dtype=np.float64)
    finally:
        llm.close()
    return logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)


def test_kl_and_agreement_match_a_direct_computation_in_both_backends(pair, tiny_gguf):
    request = pair.request("tiny-llamacpp", prompt=PROMPT, max_new_tokens=12, temperature=0.9, seed=5)
    result = diff(pair, "tiny-llamacpp", ["tiny-hf"], request, top_k=3)
    outcome = result.variants[0]
    assert outcome.refusal is None and result.answer_tokens == len(outcome.rows) > 0
    assert outcome.prompt_tokens_equal is True and outcome.prompt.first_difference is None
    # The same ids, scored here by each library itself.
    prompt_ids = pair.prompt_ids("tiny-llamacpp", request)
    answer_ids = [row.token_id for row in outcome.rows]
    ids = prompt_ids + answer_ids
    ref = direct_logprobs_llamacpp(tiny_gguf, ids)[len(prompt_ids) - 1 : -1]
    var = direct_logprobs_hf(tiny_gguf.parent / "tiny-hf", ids)[len(prompt_ids) - 1 : -1]
    kl = (np.exp(ref) * (ref - var)).sum(axis=1)
    assert [row.kl for row in outcome.rows] == pytest.approx(kl.tolist(), abs=2e-5)
    assert outcome.mean_kl == pytest.approx(kl.mean(), abs=2e-5)
    agrees = ref.argmax(1) == var.argmax(1)
    assert outcome.top1_agreement == pytest.approx(agrees.mean())
    assert outcome.first_divergence == (None if agrees.all() else int(np.argmin(agrees)))
    assert [row.reference_logprob for row in outcome.rows] == pytest.approx(
        ref[np.arange(len(answer_ids)), answer_ids].tolist(), abs=1e-4
    )
    assert [row.variant_logprob for row in outcome.rows] == pytest.approx(
        var[np.arange(len(answer_ids)), answer_ids].tolist(), abs=1e-4
    )
    # The same F32 weights: the two libraries nearly agree, token by token.
    assert outcome.mean_kl < 1e-3 and "full vocabulary" in outcome.kl_over
    assert all(len(row.reference_top) == 3 for row in outcome.rows)


def test_the_transformers_side_as_reference_and_a_prompt_built_differently(pair, tiny_gguf):
    pair.catalogue.add(
        variant(id="tiny-hf-raw", backend="transformers", source={"path": str(tiny_gguf)}, dtype="fp32",
                context_length=256, prompt_format="raw")
    )
    pair.load("tiny-hf-raw", check_memory=False)
    request = pair.request("tiny-hf", prompt=PROMPT, max_new_tokens=8, temperature=0)
    result = diff(pair, "tiny-hf", ["tiny-llamacpp", "tiny-hf-raw"], request)
    same, raw = result.variants
    assert same.prompt_tokens_equal and same.top1_agreement == pytest.approx(1.0)  # greedy: its own top-1s
    # A raw prompt has no chat template: the ids differ from the first token on, and the rows
    # say which tokens each backend put there.
    assert raw.prompt_tokens_equal is False and raw.prompt.first_difference is not None
    assert raw.prompt.reference_around and raw.prompt.variant_around
    assert raw.prompt.reference_around != raw.prompt.variant_around
    # Read after the reference's prompt instead, the same weights agree again.
    again = diff(pair, "tiny-hf", ["tiny-hf-raw"], request, scored_after="reference").variants[0]
    assert again.mean_kl < 1e-6 and again.top1_agreement == 1.0


def test_a_different_tokenizer_or_no_probabilities_is_refused_with_the_reason(pair, gpt_files, tiktoken_file, server):
    pair.catalogue.add(
        variant(id="tiktoken-gpt", backend="scratch_gpt", source={"path": str(gpt_files["safetensors"])}, dtype="fp32",
                prompt_format="raw", tokenizer={"file": str(tiktoken_file)}, scratch_gpt={"head_dim": 16})
    )
    pair.catalogue.add(variant(id="a-server", backend="openai", endpoint={"base_url": server}))
    pair.load("tiktoken-gpt", check_memory=False)
    pair.load("a-server", check_memory=False)
    request = pair.request("tiny-llamacpp", prompt=PROMPT, max_new_tokens=4, temperature=0)
    other, served = diff(pair, "tiny-llamacpp", ["tiktoken-gpt", "a-server"], request).variants
    assert re.search(r"its tokenizer differs from the reference's \(a probe text splits into \d+ tokens", other.refusal)
    assert "cannot be compared token by token" in served.refusal and "never the whole distribution" in served.refusal
    assert other.mean_kl is None and served.rows == []
    with pytest.raises(GenerationError, match="gives no token ids"):
        diff(pair, "a-server", ["tiny-llamacpp"], pair.request("a-server", prompt=PROMPT, max_new_tokens=4))


def test_prompt_comparison_names_the_first_difference():
    assert compare_prompts([1, 2, 3], [1, 2, 3]).equal
    differ = compare_prompts([1, 2, 3, 4], [1, 2, 9, 4])
    assert (differ.equal, differ.first_difference) == (False, 2)
    assert compare_prompts([1, 2], [1, 2, 3]).first_difference == 2


def test_the_diff_command_prints_the_named_fields(tiny_gguf, tmp_path):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "pair.yaml").write_text(
        f"id: tiny-cpp\ndisplay_name: tiny in llama.cpp\nbackend: llamacpp\nsource: {{path: {tiny_gguf}}}\n"
    )
    (configs / "twin.yaml").write_text(
        f"id: tiny-tf\ndisplay_name: tiny in transformers\nbackend: transformers\ndtype: fp32\n"
        f"source: {{path: {tiny_gguf}}}\n"
    )
    common = ("--config-dir", str(configs), "diff", "--reference", "tiny-cpp", "--prompt", "Hello", "--max-tokens", "5")
    result = cli(*common, "--variants", "tiny-tf", "--json")
    assert result.returncode == 0, result.stderr
    (outcome,) = json.loads(result.stdout)["variants"]
    assert {"mean_kl", "top1_agreement", "first_divergence", "prompt_tokens_equal", "rows"} <= set(outcome)
    assert outcome["prompt_tokens_equal"] is True and len(outcome["rows"]) == 5
    said = cli(*common, "--variants", "tiny-tf")
    assert re.search(r"tiny-tf: mean KL [\d.]+ nats, top-1 agreement [\d.]+, first divergence", said.stdout)
    bad = cli(*common, "--variants", " ")
    assert bad.returncode == 2 and "--variants names no variant" in bad.stderr
