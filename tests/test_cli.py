"""`python -m playground` as a script would call it: JSON out, one-line errors, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest
from conftest import EMBEDDED_GGUF

from playground.cli import METRIC_FIELDS


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "playground", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )


def assert_one_line_error(result: subprocess.CompletedProcess, pattern: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and pattern in lines[0], result.stderr


def test_models_json_lists_every_variant_and_presence():
    result = cli("models", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["id"]: row for row in json.loads(result.stdout)}
    assert rows["smollm2-135m-gguf"]["weights_present"] is True
    assert rows["npc-fast-1.7b-bf16"]["weights_present"] is False  # a hub id, never downloaded here
    assert rows["nano-compact-3b-qkvfp16"]["backend"] == "transformers"


def test_generate_json_on_the_embedded_default():
    result = cli(
        "generate",
        "--model",
        "smollm2-135m-gguf",
        "--prompt",
        "Name three colors.",
        "--max-tokens",
        "20",
        "--temperature",
        "0",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    for field in ("text", *METRIC_FIELDS):
        assert field in out
    assert out["text"] and out["backend"] == "llamacpp" and out["device"] == "cpu"
    assert out["completion_tokens"] >= 2
    assert out["decode_tok_s"] == pytest.approx((out["completion_tokens"] - 1) / out["decode_s"])


def test_generate_json_of_a_speculative_variant_reports_its_drafts():
    """The shipped embedded variant with prompt lookup: `--json` has the speculation fields,
    and the plain output's stderr line says what the drafts bought."""
    prompt = "Repeat exactly: alpha beta gamma delta, alpha beta gamma delta, alpha beta gamma delta."
    args = ("generate", "--model", "smollm2-135m-gguf-lookup", "--prompt", prompt, "--max-tokens", "24")
    out = json.loads(cli(*args, "--json").stdout)
    assert out["speculation"] == "prompt-lookup" and out["draft_tokens"] >= out["accepted_tokens"] >= 0
    assert 0 <= out["draft_accept_rate"] <= 1 and out["spec_speedup"] > 0 and out["spec_passes"] >= 1
    sampled = json.loads(cli(*args, "--temperature", "0.7", "--json").stdout)
    assert sampled["speculation"].startswith("off: it is for greedy replies") and sampled["spec_speedup"] is None
    plain = cli(*args)
    assert plain.returncode == 0 and "speculative (prompt-lookup):" in plain.stderr, plain.stderr


def test_generate_streams_text_for_a_path(tiny_gguf):
    result = cli("generate", "--model", str(tiny_gguf), "--prompt", "Hello", "--max-tokens", "5", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert "decode_tok_s=" in result.stderr and "backend=llamacpp" in result.stderr


def test_generate_with_a_state_dict_path_explains_the_tokenizer(gpt_files):
    # A state_dict given by path gets tiktoken's gpt2: offline it cannot be fetched, and online
    # its 50257 tokens do not fit this 300-token model. Either way: one clear line.
    result = cli("generate", "--model", str(gpt_files["pt"]), "--prompt", "Hi", "--max-tokens", "3")
    assert result.returncode == 2
    assert "tiktoken encoding 'gpt2' is not available" in result.stderr or "50257 tokens" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no-such-variant"], "unknown variant 'no-such-variant'"),
        (["--model", f"{tempfile.gettempdir()}/nowhere/model.gguf"], "does not exist"),
        (["--model", "/etc/passwd"], "outside the folders this playground may read"),
        (["--model", "smollm2-135m-gguf", "--temperature", "100"], "temperature"),
        (["--model", "smollm2-135m-gguf", "--max-tokens", "0"], "max_new_tokens"),
    ],
)
def test_bad_input_exits_with_one_line(args, message):
    assert_one_line_error(cli("generate", "--prompt", "hi", *args), message)


def test_corrupt_gguf_and_wrong_format(tmp_path):
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x07" * 2048)
    assert_one_line_error(
        cli("generate", "--model", str(corrupt), "--prompt", "hi", "--no-memory-check"),
        "corrupt.gguf: not a readable GGUF file",
    )
    text = tmp_path / "weights.txt"
    text.write_text("not weights")
    assert_one_line_error(cli("generate", "--model", str(text), "--prompt", "hi"), "unknown weights format")


def test_prompt_longer_than_context():
    long_prompt = "tell me more " * 1200
    assert_one_line_error(
        cli("generate", "--model", "smollm2-135m-gguf", "--prompt", long_prompt), "but the context holds 2048"
    )


def test_embedded_file_is_what_the_configs_point_at():
    assert EMBEDDED_GGUF.exists() and EMBEDDED_GGUF.stat().st_size > 90_000_000
