"""The quantization report on tiny real variants, its Pareto fronts, and the ways to run it."""

from __future__ import annotations

import csv
import io
import json

from conftest import run_job, variant
from test_cli import cli

from playground.jobs.manager import JobManager
from playground.jobs.store import JobStore
from playground.matrix import read_prompts
from playground.report import (
    REPORT_HEADERS,
    pareto_front,
    quantization_report,
    report_csv,
    report_markdown,
    report_rows,
)


def test_pareto_front_keeps_what_nothing_beats_on_both():
    points = {"a": (0.0, 5.0), "b": (0.1, 2.0), "c": (0.2, 3.0), "d": (0.1, 2.0)}
    assert pareto_front(points) == ["a", "b", "d"]  # c is beaten by b; b and d tie
    assert pareto_front({}) == []


def test_a_report_measures_every_variant_against_the_reference(engine, tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("PLAYGROUND_CACHE_DIR", str(tmp_path / "cache"))
    engine.catalogue.add(variant(id="r-hf", backend="transformers", source={"path": str(tiny_gguf)}, dtype="fp32",
                                 context_length=256))
    engine.catalogue.add(variant(id="r-cpp", backend="llamacpp", source={"path": str(tiny_gguf)}, context_length=256))
    said, asked = [], []
    generate = engine.generate

    def counted(variant_id, *args, **kwargs):  # a spy on the real engine: who generated how often
        asked.append(variant_id)
        return generate(variant_id, *args, **kwargs)

    monkeypatch.setattr(engine, "generate", counted)
    report = quantization_report(
        engine, "r-hf", ["r-cpp"], read_prompts("mixed-50")[:2], max_new_tokens=6, corpus_chars=300,
        progress=lambda message, done, total: said.append((message, done, total)),
    ).to_dict()
    # Each prompt answered once per variant (the reference's answer is also what the other read),
    # and twice more for the reproducibility check.
    assert asked.count("r-hf") == asked.count("r-cpp") == 2 + 2
    # Progress counts every step up to its total.
    assert [done for _, done, _ in said] == list(range(1, len(said) + 1)) and said[-1][2] == len(said)
    reference, other = report["variants"]
    assert (reference["variant"], other["variant"]) == ("r-hf", "r-cpp")
    assert reference["mean_kl"] == 0.0 and reference["top1_agreement"] == 1.0
    # The same F32 weights in two libraries: nearly no divergence, over every answer token.
    assert 0 <= other["mean_kl"] < 1e-3 and other["compared_tokens"] == reference["compared_tokens"] > 0
    for row in (reference, other):
        assert row["weights_bytes"] > 0 and row["load_s"] > 0 and row["peak_mem_bytes"] > 0
        assert row["decode_tok_s"] > 0 and row["ttft_s"] > 0 and row["perplexity"] > 1
        assert row["reproducible"] == "reproducible", row
        assert row["pass_rate"] is not None
    assert set(report["pareto_speed"]) <= {"r-hf", "r-cpp"} and report["pareto_speed"]
    assert any("perplexity" in m for m, _, _ in said)
    rows = report_rows(report)
    assert len(rows) == 2 and len(rows[0]) == len(REPORT_HEADERS) and rows[0][0] == "r-hf (reference)"
    table = list(csv.DictReader(io.StringIO(report_csv(report))))
    assert [r["variant"] for r in table] == ["r-hf", "r-cpp"] and table[0]["reference"] == "True"
    assert float(table[1]["mean_kl"]) == other["mean_kl"] and int(table[1]["weights_bytes"]) == other["weights_bytes"]
    markdown = report_markdown(report)
    assert "| r-hf (reference) |" in markdown and "2 prompts" in markdown and "Pareto front" in markdown


def test_the_report_command_and_job(tmp_path, tiny_gguf, monkeypatch):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "a.yaml").write_text(f"id: q-cpp\ndisplay_name: a\nbackend: llamacpp\nsource: {{path: {tiny_gguf}}}\n")
    (configs / "b.yaml").write_text(
        f"id: q-hf\ndisplay_name: b\nbackend: transformers\ndtype: fp32\nsource: {{path: {tiny_gguf}}}\n"
    )
    common = ("--config-dir", str(configs), "report", "--reference", "q-hf", "--variants", "q-cpp", "--limit", "1",
              "--max-tokens", "4", "--corpus-chars", "200")
    result = cli(*common, "--json", timeout=400)
    assert result.returncode == 0, result.stderr
    assert [v["variant"] for v in json.loads(result.stdout)["variants"]] == ["q-hf", "q-cpp"]
    bad = cli(*common[:-2], "--corpus-chars", "200", "--max-tokens", "0")
    assert bad.returncode == 2 and "--max-tokens must be in 1..4096" in bad.stderr
    monkeypatch.setenv("PLAYGROUND_CONFIG_DIRS", json.dumps([str(configs)]))
    jobs = JobManager(JobStore(tmp_path / "jobs.sqlite"), tmp_path / "logs")  # reads the folders just set
    done = run_job(jobs, "report", {"model": "q-hf", "variants": "q-cpp", "limit": 1, "max_new_tokens": 4,
                                     "corpus_chars": 200})
    assert done.result["reference"] == "q-hf" and len(done.result["variants"]) == 2


def test_no_limit_given_explicitly_survives_the_job_record():
    from playground.jobs.kinds import ReportOptions
    from playground.jobs.manager import stored_options

    unlimited = stored_options(ReportOptions(model="m", variants=["v"], limit=None))
    assert unlimited["limit"] is None and ReportOptions.model_validate(unlimited).limit is None
    default = stored_options(ReportOptions(model="m", variants=["v"]))
    assert default["limit"] == 12 and default["prompts"] == "mixed-50"
