"""Eval kinds, run for real on tiny models: in the backends directly, and as jobs in processes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import run_job, variant

from playground.backends.base import Request
from playground.backends.llamacpp_backend import LlamaCppBackend
from playground.backends.transformers_backend import TransformersBackend
from playground.config import GenerationParams
from playground.errors import ConfigError
from playground.evals import format_checks
from playground.evals.corpus import documents, limited

TEXT = "Hello world! This is a tiny corpus for a tiny tokenizer. " * 12


@pytest.fixture(scope="module")
def hf_backend(tiny_gguf):
    # The folder the tiny GGUF was written from: the same weights in both backends.
    backend = TransformersBackend(
        variant(id="tiny-hf", backend="transformers", source={"path": str(tiny_gguf.parent / "tiny-hf")}, dtype="fp32")
    )
    backend.load()
    return backend


@pytest.fixture(scope="module")
def gguf_backend(tiny_gguf):
    backend = LlamaCppBackend(variant(id="tiny-gguf", backend="llamacpp", source={"path": str(tiny_gguf)}))
    backend.load()
    return backend


def direct_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_token_logprobs_match_a_direct_forward_pass_and_llama_cpp(hf_backend, gguf_backend):
    ids = hf_backend.encode_text(TEXT)
    assert ids == gguf_backend.encode_text(TEXT)  # the exported tokenizer agrees
    expected = direct_logprobs(hf_backend.model, ids)
    got, greedy = hf_backend.window_logprobs(ids)
    torch.testing.assert_close(torch.tensor(got), expected, atol=1e-5, rtol=1e-5)
    assert len(greedy) == len(ids) - 1
    # llama.cpp reads every position of a batch (and across batches, n_batch is 512 here).
    from_gguf, _ = gguf_backend.window_logprobs(ids)
    torch.testing.assert_close(torch.tensor(from_gguf), expected, atol=2e-3, rtol=1e-3)


def test_only_the_positions_asked_for_are_kept_and_they_equal_the_whole_pass(hf_backend, gguf_backend):
    ids = hf_backend.encode_text(TEXT)
    for backend in (hf_backend, gguf_backend):
        whole = backend.position_logprobs(ids)
        tail = backend.position_logprobs(ids, last=5)
        assert whole.shape[0] == len(ids) and tail.shape == (5, whole.shape[1])
        np.testing.assert_allclose(tail, whole[-5:], atol=1e-5)

def test_kept_positions_may_span_llama_cpp_batches(tiny_gguf):
    small_batches = LlamaCppBackend(
        variant(id="tiny-gguf-b32", backend="llamacpp", source={"path": str(tiny_gguf)}, llamacpp={"n_batch": 32})
    )
    small_batches.load()
    try:
        ids = (small_batches.encode_text(TEXT) * 20)[:200]
        whole = small_batches.position_logprobs(ids)
        for last in (1, 40, 200):  # within the last batch, across two, all of them
            np.testing.assert_allclose(small_batches.position_logprobs(ids, last=last), whole[-last:], atol=1e-5)
    finally:
        small_batches.unload()


@pytest.mark.parametrize("spare_rows", [0, 7])
def test_a_qwen2_export_scores_as_in_transformers(tmp_path, spare_rows):
    """Qwen2 keeps HF's rotation order and its q/k/v biases in llama.cpp's QWEN2 architecture.
    With embedding rows past the tokenizer (as Qwen2.5 checkpoints have) llama.cpp still loads it."""
    import factories

    path = factories.make_gguf(tmp_path / "tiny-qwen2.gguf", arch="qwen2", spare_rows=spare_rows)
    hf = TransformersBackend(
        variant(id="qwen2-hf", backend="transformers", source={"path": str(tmp_path / "tiny-qwen2-hf")}, dtype="fp32")
    )
    hf.load()
    assert any(name.endswith("q_proj.bias") for name, _ in hf.model.named_parameters())
    gguf = LlamaCppBackend(variant(id="qwen2-gguf", backend="llamacpp", source={"path": str(path)}))
    gguf.load()
    ids = hf.encode_text(TEXT)
    from_gguf, _ = gguf.window_logprobs(ids)
    torch.testing.assert_close(torch.tensor(from_gguf), direct_logprobs(hf.model, ids), atol=2e-3, rtol=1e-3)
    assert gguf.llm.n_vocab() == len(hf.codec.tokenizer) + spare_rows


def test_an_export_whose_tokenizer_outgrows_the_embeddings_is_refused(tmp_path):
    import factories
    from transformers import AutoModelForCausalLM

    from playground.gguf_export import write_gguf

    folder = factories.make_hf_folder(tmp_path / "hf", "qwen2")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.resize_token_embeddings(model.config.vocab_size - 2)
    with pytest.raises(ValueError, match="2 token\\(s\\) with ids past the model's .* embedding rows"):
        write_gguf(model, factories.tiny_tokenizer(), tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_strided_windows_score_each_token_once_with_bounded_context(hf_backend):
    ids = hf_backend.encode_text(TEXT)
    whole = hf_backend.text_logprobs(TEXT, window=len(ids), stride=len(ids))
    strided = hf_backend.text_logprobs(TEXT, window=64, stride=32)
    assert len(whole) == len(strided) == len(ids) - 1
    assert whole[:63] == pytest.approx(strided[:63], abs=1e-5)  # the first window is the same
    # The last window starts at the first multiple of the stride whose window reaches the end; it
    # scores only the tokens after the previous window's end, with the tokens before as context.
    begin = 0
    while begin + 64 < len(ids):
        begin += 32
    expected_tail = direct_logprobs(hf_backend.model, ids[begin:])[31:]
    assert len(expected_tail) == len(ids) - (begin + 32) > 0
    torch.testing.assert_close(torch.tensor(strided[-len(expected_tail) :]), expected_tail, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(torch.tensor(whole[-len(expected_tail) :]), expected_tail, atol=1e-3)


def test_pair_logprobs_score_the_continuation_only(hf_backend):
    context, continuation = "Hello world!", " This is a tiny corpus"
    ids = hf_backend.encode_text(context + continuation)
    n_context = len(hf_backend.encode_text(context))
    logprob, greedy = hf_backend.pair_logprobs(context, continuation)
    assert logprob == pytest.approx(float(direct_logprobs(hf_backend.model, ids)[n_context - 1 :].sum()), abs=1e-4)
    assert isinstance(greedy, bool)


def test_format_checkers_pass_and_fail_on_written_answers():
    expect = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
    right = '```json\n{"name": "get_weather", "arguments": {"city": "paris", "unit": "celsius"}}\n```'
    assert format_checks.check_tool_call(right, expect) == {"valid_json": True, "name": True, "arguments": True}
    extra = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", "days": 2}}'
    assert format_checks.check_tool_call(extra, expect)["arguments"] is False
    assert format_checks.check_tool_call("Sure! " + right, expect)["valid_json"] is False
    checks = format_checks.CHECKS
    assert checks["sentence_count"]("One. Two! Three?", {"n": 3}) and not checks["sentence_count"](
        "One. Two.", {"n": 3}
    )
    assert checks["no_commas"]("no commas here", {}) and not checks["no_commas"]("a, b", {})
    assert checks["bullet_count"]("- a\n- b", {"n": 2}) and not checks["bullet_count"]("- a\nb", {"n": 2})
    assert checks["excludes"]("a dog and a catalog", {"words": ["cat"]})
    assert not checks["excludes"]("the cat sat", {"words": ["cat"]})
    assert checks["json_object"]('{"name": "Ada", "age": 36}', {"keys": ["name", "age"]})
    assert len(format_checks.read_cases()) == 20


def test_bundled_corpus_splits_without_overlap():
    train, heldout = documents("python-docs-train"), documents("python-docs-heldout")
    assert train and heldout and not {t for t, _ in train} & {t for t, _ in heldout}
    assert sum(len(text) for _, text in limited(heldout, 5000)) == 5000


def test_perplexity_jobs_agree_across_backends_on_the_same_weights(jobs, tiny_gguf, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((TEXT + "\n\n") * 4)
    common = {"corpus": str(corpus), "window": 64, "stride": 32}
    hf = run_job(jobs, "eval-perplexity", common | {"model": str(tiny_gguf.parent / "tiny-hf")}).result
    gguf = run_job(jobs, "eval-perplexity", common | {"model": str(tiny_gguf)}).result
    assert hf["tokens"] == gguf["tokens"] > 100
    assert math.isfinite(hf["perplexity"]) and hf["perplexity"] == pytest.approx(gguf["perplexity"], rel=1e-3)
    bundled = run_job(jobs, "eval-perplexity", {"model": str(tiny_gguf), "max_chars": 2000}).result
    assert bundled["corpus"] == "python-docs-heldout" and bundled["bits_per_byte"] > 0
    with pytest.raises(ConfigError, match="stride"):
        jobs.submit("eval-perplexity", {"model": str(tiny_gguf), "window": 32, "stride": 64})
    missing_file = str(tiny_gguf.parent / "nope.txt")
    missing = jobs.wait(jobs.submit("eval-perplexity", {"model": str(tiny_gguf), "corpus": missing_file}).id, 60)
    assert missing.state == "failed" and "neither bundled" in missing.error


def test_needle_grid_sizes_its_haystacks_and_skips_lengths_beyond_the_context(jobs, tiny_gguf):
    options = {"model": str(tiny_gguf), "lengths": [160, 224, 1024], "depths": [0.0, 0.5, 1.0]}
    result = run_job(jobs, "eval-needle", options).result
    assert len(result["cells"]) == 9 and result["context"] == 256  # the tiny model's trained context
    ran = [c for c in result["cells"] if "passed" in c]
    assert {c["length"] for c in ran} == {160, 224}
    assert all(0.9 * c["length"] <= c["prompt_tokens"] <= c["length"] for c in ran)
    assert all("beyond the context" in c["skipped"] for c in result["cells"] if c["length"] == 1024)
    assert result["pass_rate_by_length"]["1024"] is None
    # The context can be set for the run (up to what the model was built for).
    shorter = run_job(jobs, "eval-needle", options | {"lengths": [160, 224], "context_length": 200}).result
    assert shorter["context"] == 200 and [("passed" in c) for c in shorter["cells"]] == [True] * 3 + [False] * 3


def test_format_check_job_runs_every_case_kind(jobs, llama_folder, tmp_path):
    cases = [json.loads(line) for line in format_checks.CASES.read_text().splitlines()]
    data = tmp_path / "cases.jsonl"
    # A tool case is longer than this tiny model's context: reported for that case alone.
    data.write_text("".join(json.dumps(c) + "\n" for c in [cases[0]] + cases[-2:]))
    result = run_job(jobs, "eval-format", {"model": str(llama_folder), "data": str(data), "max_new_tokens": 16}).result
    assert [r["kind"] for r in result["rows"]] == ["tool_call", "instruction", "instruction"]
    assert "context" in result["rows"][0]["error"] and result["n_errors"] == 1
    assert result["n_instructions"] == 2 and 0.0 <= result["instruction_pass"] <= 1.0
    # Tool calls on the embedded model, whose context holds them.
    embedded = run_job(jobs, "eval-format", {"model": "smollm2-135m-gguf", "limit": 2, "max_new_tokens": 48}).result
    assert embedded["n_tool_calls"] == 2 and embedded["n_errors"] == 0
    assert all(set(r["checks"]) == {"valid_json", "name", "arguments"} for r in embedded["rows"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"kind": "instruction", "prompt": "x", "checks": [{"type": "rhymes"}]}) + "\n")
    failed = jobs.wait(jobs.submit("eval-format", {"model": str(llama_folder), "data": str(bad)}).id, 60)
    assert failed.state == "failed" and "line 1" in failed.error


def test_lm_eval_runs_local_tasks_on_transformers_and_gguf_variants(jobs, tiny_gguf):
    for model in (str(tiny_gguf.parent / "tiny-hf"), str(tiny_gguf)):
        options = {"model": model, "tasks": ["playground_capitals", "playground_echo"], "include_path": "tiny"}
        results = run_job(jobs, "eval-lm", options).result["results"]
        assert 0.0 <= results["playground_capitals"]["acc,none"] <= 1.0
        assert results["playground_echo"]["exact_match,none"] == 0.0  # a random model echoes nothing
    unknown = jobs.wait(jobs.submit("eval-lm", {"model": str(tiny_gguf), "tasks": ["no_such_task"]}).id, 120)
    assert unknown.state == "failed" and "knows no task no_such_task" in unknown.error


@pytest.mark.parametrize("name", ["hf_backend", "gguf_backend"])
def test_score_keeps_the_system_prompt_for_the_next_call(request, name):
    """After a score, the part of the prompt no request changes (a long system prompt and the
    template up to the user's words) stays in the KV cache for the next score; any other use of
    llama.cpp's context (here a perplexity pass) empties it, and a reused part scores as a fresh
    one."""
    backend = request.getfixturevalue(name)
    SYSTEM = TEXT[:200]  # noqa: N806 (fits the tiny models' 256-token context)

    def ask(text: str) -> Request:  # the same long system prompt, then a request of its own
        messages = ({"role": "system", "content": SYSTEM}, {"role": "user", "content": text})
        return Request(mode="chat", params=GenerationParams(), messages=messages, assistant_prefix="Route:")

    first = backend.score(ask("one"), [" yes", " no"])
    kept = backend._scored_prefix
    assert len(kept) > len(backend.encode_text(SYSTEM))  # the system prompt and its template tokens
    backend.score(ask("another request"), [" yes", " no"])
    assert backend._scored_prefix == kept  # the same part, whatever the request says
    assert backend.score(ask("one"), [" yes", " no"]) == first
    backend.position_logprobs(backend.encode_text("Some text to score."))
    if name == "gguf_backend":
        assert backend._scored_prefix == []
    assert backend.score(ask("one"), [" yes", " no"]) == first
