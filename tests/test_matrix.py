"""The prompt-set matrix: prompt files, checks, a run across two real variants, its views, and
the job as scripts submit it."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import pytest
from conftest import variant

from playground.errors import ConfigError
from playground.matrix import (
    PROMPT_SETS,
    Check,
    MatrixResult,
    differing_prompts,
    keep_prompt_file,
    read_prompts,
    run_matrix,
    to_csv,
    to_markdown,
    word_diff,
)
from playground.router_curve import read_quality_data


def test_the_bundled_set_is_varied_and_every_check_is_valid():
    cases = read_prompts("mixed-50")
    assert len(cases) == 50 and len({c.id for c in cases}) == 50
    assert {c.category for c in cases} == {"fact", "reasoning", "code", "json", "instruction", "router"}
    assert sum(1 for c in cases if c.checks) == 50
    assert {k.kind for c in cases for k in c.checks} == {
        "contains", "regex", "valid_json", "json_schema", "max_words", "equals"
    }


@pytest.mark.parametrize(
    "check, answer, passes",
    [
        ({"kind": "contains", "value": "paris"}, "The capital is Paris.", True),
        ({"kind": "contains", "value": "Paris"}, "Lyon", False),
        ({"kind": "regex", "value": r"^\s*42\s*$"}, " 42 ", True),
        ({"kind": "regex", "value": r"^\s*42\s*$"}, "It is 42", False),
        ({"kind": "valid_json"}, '```json\n{"a": 1}\n```', True),
        ({"kind": "valid_json"}, "{a: 1}", False),
        ({"kind": "json_schema", "value": {"type": "array", "items": {"type": "integer"}}}, "[2, 3, 5]", True),
        ({"kind": "json_schema", "value": {"type": "array", "items": {"type": "integer"}}}, '[2, "3"]', False),
        ({"kind": "max_words", "value": 3}, "one two three", True),
        ({"kind": "max_words", "value": 3}, "one two three four", False),
        ({"kind": "equals", "value": "7"}, "7.", True),
        ({"kind": "equals", "value": "7"}, "seven", False),
    ],
)
def test_each_check_kind_passes_and_fails(check, answer, passes):
    assert Check.model_validate(check).passes(answer) is passes


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "a"}\n{"prompt": \n', r"line 2: not valid JSON"),
        ('{"prompt": "a", "checks": [{"kind": "smells_nice"}]}\n', r"line 1: .*checks"),
        ('{"prompt": "a", "checks": [{"kind": "regex", "value": "("}]}\n', r"line 1: .*does not compile"),
        ('{"prompt": "a", "checks": [{"kind": "json_schema", "value": {"type": 5}}]}\n', r"not a valid JSON schema"),
        ('{"prompt": "   "}\n', r"line 1: the prompt is empty"),
        ('{"id": "x", "prompt": "a"}\n{"id": "x", "prompt": "b"}\n', r"the id 'x' is used twice"),
        ("\n\n", r"holds no prompts"),
        ("[1, 2]\n", r"line 1: expected an object with a `prompt`, got list"),
    ],
)
def test_a_bad_prompt_file_names_the_line_and_the_problem(tmp_path, content, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_prompts(path)
    with pytest.raises(ConfigError, match="cannot be read"):
        read_prompts(tmp_path / "absent.jsonl")


def test_two_variants_answer_every_prompt_with_speed_and_checks(engine, tiny_gguf, llama_folder, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        '{"id": "a", "prompt": "Say something.", "checks": [{"kind": "max_words", "value": 1000}]}\n'
        '"A bare string is a prompt too."\n'
    )
    engine.catalogue.add(variant(id="m-cpp", backend="llamacpp", source={"path": str(tiny_gguf)}, context_length=256))
    engine.catalogue.add(variant(id="m-hf", backend="transformers", source={"path": str(llama_folder)}, dtype="fp32"))
    seen = []
    result = run_matrix(engine, ["m-cpp", "m-hf"], read_prompts(prompts), 6, lambda d, t: seen.append((d, t)))
    assert seen[-1] == (4, 4) and not engine.workers  # each variant unloaded after its column
    assert [(c.prompt_id, c.variant) for c in result.cells] == [("a", "m-cpp"), ("p002", "m-cpp"), ("a", "m-hf"), ("p002", "m-hf")]
    for cell in result.cells:
        assert cell.error is None and 0 < cell.completion_tokens <= 6 and cell.decode_tok_s > 0 and cell.ttft_s > 0
    assert result.pass_rates() == {"m-cpp": 1.0, "m-hf": 1.0}
    again = MatrixResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again.to_dict() == result.to_dict()
    rows = list(csv.DictReader(io.StringIO(to_csv(result))))
    assert len(rows) == 4 and rows[0]["checks_total"] == "1"
    assert to_markdown(result).count("\n| ") >= 2 + 2


def test_only_differing_rows_and_a_word_diff():
    result = MatrixResult(
        ["x", "y"],
        [{"id": "same", "category": "", "prompt": "p1"}, {"id": "differs", "category": "", "prompt": "p2"}],
        [],
        8,
    )
    from playground.matrix import Cell

    result.cells = [Cell("same", "x", "Paris."), Cell("same", "y", " Paris."), Cell("differs", "x", "the cat sat"),
                    Cell("differs", "y", "the dog sat down")]
    assert differing_prompts(result) == ["differs"]
    assert word_diff("the cat sat", "the dog sat down") == [
        ("same", "the"), ("removed", "cat"), ("added", "dog"), ("same", "sat"), ("added", "down")
    ]
    shown = to_markdown(result, only_differing=True)
    assert "p2" in shown and "p1" not in shown


def test_the_matrix_job_runs_from_the_command_line(tmp_path, tiny_gguf):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "a.yaml").write_text(f"id: col-a\ndisplay_name: a\nbackend: llamacpp\nsource: {{path: {tiny_gguf}}}\n")
    (configs / "b.yaml").write_text(
        f"id: col-b\ndisplay_name: b\nbackend: transformers\ndtype: fp32\nsource: {{path: {tiny_gguf}}}\n"
    )
    env = os.environ | {"PLAYGROUND_DATA_DIR": str(tmp_path / "data"), "PLAYGROUND_CONFIG_DIRS": json.dumps([str(configs)])}
    command = [sys.executable, "-m", "playground", "jobs", "submit", "matrix", "--model", "col-a",
               "--option", "variants=col-b", "--option", "prompts=mixed-50", "--option", "limit=2",
               "--option", "max_new_tokens=4", "--wait", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=400)
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert job["state"] == "succeeded" and job["result"]["variants"] == ["col-a", "col-b"]
    assert len(job["result"]["cells"]) == 4 and set(job["result"]["pass_rate"]) == {"col-a", "col-b"}
    # Its checks become the quality file of the router's cost-quality curve (col-a as the router's
    # own answers, col-b as the partner's), with each side's tokens for the money axis.
    quality = tmp_path / "quality.jsonl"
    made = subprocess.run([sys.executable, "-m", "playground", "router-quality", "--matrix", job["id"], "--weak", "col-a",
                           "--strong", "col-b", "--out", str(quality)], capture_output=True, text=True, env=env, timeout=60)
    assert made.returncode == 0, made.stderr
    assert "2 prompts with checks written" in made.stdout and "(2 with token counts" in made.stdout
    rows = read_quality_data(quality)
    cells = {(c["prompt_id"], c["variant"]): c for c in job["result"]["cells"]}
    for row, prompt in zip(rows, job["result"]["prompts"], strict=True):
        weak, strong = cells[prompt["id"], "col-a"], cells[prompt["id"], "col-b"]
        assert row.prompt == prompt["prompt"]
        assert row.weak_quality == sum(weak["checks"].values()) / len(weak["checks"])
        assert row.strong_quality == sum(strong["checks"].values()) / len(strong["checks"])
        assert row.weak_tokens == (weak["prompt_tokens"], weak["completion_tokens"]) and weak["prompt_tokens"] > 0
    wrong = subprocess.run([*made.args[:7], "col-z", *made.args[8:]], capture_output=True, text=True, env=env, timeout=60)
    assert wrong.returncode == 2 and "col-z is not a column of this matrix (its columns: col-a, col-b)" in wrong.stderr
    bad = subprocess.run([*command[:-2], "--option", "prompts=/nowhere/p.jsonl"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert bad.returncode == 2 and "prompt file" in bad.stderr and "Traceback" not in bad.stderr


def test_prompt_sets_are_where_they_are_named():
    assert all(path.is_file() for path in PROMPT_SETS.values())


def test_an_uploaded_prompt_file_is_checked_then_kept_where_jobs_may_read_it(tmp_path, monkeypatch):
    from playground.jobs.kinds import MatrixOptions

    home = tmp_path / "home"
    monkeypatch.setenv("PLAYGROUND_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("PLAYGROUND_ALLOWED_ROOTS", json.dumps([str(home)]))  # the data folder is not among them
    upload = tmp_path / "gradio-tmp" / "My prompts!.jsonl"
    upload.parent.mkdir()
    upload.write_text('{"prompt": "Say hi."}\n"Say bye."\n')
    kept, cases = keep_prompt_file(upload)
    assert [c.prompt for c in cases] == ["Say hi.", "Say bye."]
    assert kept.parent == tmp_path / "data" / "uploads" / "prompts" and kept.name.startswith("My-prompts-")
    assert kept.read_bytes() == upload.read_bytes()
    assert keep_prompt_file(upload)[0] == kept  # the same content kept twice is one file
    assert MatrixOptions(model="m", prompts=str(kept)).prompts == str(kept)  # a job may read it
    with pytest.raises(ValueError, match="outside the folders"):  # the upload folder of gradio may not
        MatrixOptions(model="m", prompts=str(upload))
    upload.write_text('{"prompt": "Say hi."}\n{"prompt": ""}\n')
    with pytest.raises(ConfigError, match="line 2: the prompt is empty"):
        keep_prompt_file(upload)
    assert len(list(kept.parent.iterdir())) == 1  # nothing kept of a bad file
