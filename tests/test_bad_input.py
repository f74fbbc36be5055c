"""Bad input, tried as a new user would: each gets one readable line naming what is wrong, and
nothing else is disturbed. Most go through `python -m playground`, in real processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import EMBEDDED_GGUF, collect, variant
from test_cli import assert_one_line_error, cli

from playground.catalogue import Catalogue
from playground.errors import GenerationError, LoadError, PlaygroundError
from playground.jsonl import read_jsonl


# -- GGUF files ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cut_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded model cut to half its length: a download that stopped."""
    path = tmp_path_factory.mktemp("cut") / "half.gguf"
    data = EMBEDDED_GGUF.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_a_gguf_cut_short_is_named_at_add_estimate_and_load(cut_gguf, tmp_path, engine):
    size = cut_gguf.stat().st_size
    with pytest.raises(LoadError, match=f"half.gguf: not a readable GGUF file, {size} bytes; it may be cut short"):
        engine.catalogue.add_path(cut_gguf)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(EMBEDDED_GGUF.read_bytes()[:3000])  # cut inside the metadata
    with pytest.raises(LoadError, match="not a readable GGUF file, 3000 bytes; it may be cut short"):
        engine.catalogue.add_path(header_only)
    last_cut = tmp_path / "last.gguf"  # only the end of the last tensor missing
    last_cut.write_bytes(EMBEDDED_GGUF.read_bytes()[:-4096])
    with pytest.raises(LoadError, match="last.gguf: not a readable GGUF file, .* it may be cut short"):
        engine.catalogue.add_path(last_cut)
    # A config that points at the file (no add-time check): the estimate and the load say it too.
    config = engine.catalogue.add(variant(id="cut", backend="llamacpp", source={"path": str(cut_gguf)}))
    with pytest.raises(LoadError, match="may be cut short"):
        engine.estimate(config.id)
    with pytest.raises(LoadError, match="may be cut short"):
        engine.load(config.id, check_memory=False)
    assert config.id not in engine.workers


def test_a_gguf_of_an_unknown_architecture_is_named(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "alien.gguf"
    writer = gguf.GGUFWriter(str(path), "alienformer")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = cli("generate", "--model", str(path), "--prompt", "hi")
    assert_one_line_error(result, "architecture 'alienformer' is not one llama.cpp supports")


# -- model folders ---------------------------------------------------------------------------
def test_broken_model_folders_name_the_file_and_the_problem(tmp_path, llama_folder):
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(llama_folder, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json"):
        (no_tokenizer / name).unlink(missing_ok=True)
    bad_json = tmp_path / "bad-json"
    shutil.copytree(llama_folder, bad_json)
    (bad_json / "config.json").write_text('{"model_type": "llama",\n "hidden_size": }')
    random_weights = tmp_path / "random-weights"
    shutil.copytree(llama_folder, random_weights)
    (random_weights / "model.safetensors").write_bytes(os.urandom(4096))
    catalogue = Catalogue()
    cases = [
        (no_tokenizer, f"{no_tokenizer} has no tokenizer (tokenizer.json, tokenizer_config.json"),
        (bad_json, f"{bad_json / 'config.json'}: not valid JSON (line 2, column 17)"),
        (random_weights, f"{random_weights / 'model.safetensors'}: not a safetensors file"),
    ]
    for folder, message in cases:
        with pytest.raises(LoadError) as refused:
            catalogue.add_path(folder)
        assert message in str(refused.value)
        assert str(refused.value).endswith(("folder", "file", ")", "read)")), "a message cut mid-sentence"
    # Through the command line: the same sentence, one line, no traceback.
    assert_one_line_error(cli("generate", "--model", str(no_tokenizer), "--prompt", "hi"), "has no tokenizer")


def test_one_broken_yaml_is_listed_and_the_others_work(tmp_path):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "good.yaml").write_text(
        f"id: good\ndisplay_name: Good\nbackend: llamacpp\nsource: {{path: {EMBEDDED_GGUF}}}\n"
        "generation: {max_new_tokens: 4, temperature: 0}\n"
    )
    (folder / "broken.yaml").write_text("id: broken\ndisplay_name: [unclosed\n")
    (folder / "wrong.yaml").write_text("id: wrong\ndisplay_name: Wrong\nbackend: llamacpp\ncolour: red\n")
    listed = cli("--config-dir", str(folder), "models", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {row["id"]: row for row in json.loads(listed.stdout)}
    assert rows["good"]["state"] == "not loaded" and rows["good"]["weights_present"]
    assert rows["broken"]["state"] == "broken" and "not valid YAML" in rows["broken"]["error"]
    assert rows["wrong"]["state"] == "broken" and "colour: unknown field" in rows["wrong"]["error"]
    made = cli("--config-dir", str(folder), "generate", "--model", "good", "--prompt", "Hi", "--json")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["completion_tokens"] >= 1
    # Asking for the broken one says why it is not there.
    assert_one_line_error(cli("--config-dir", str(folder), "generate", "--model", "wrong", "--prompt", "Hi"), "colour")


# -- data files ------------------------------------------------------------------------------
def test_a_jsonl_that_is_not_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "ok", "route": "self"}\n{"prompt": "caf\xe9", "route": "self"}\n'.encode("latin-1"))
    with pytest.raises(PlaygroundError, match=r"latin1.jsonl, line 2: not UTF-8 text \(byte 0xe9 at column 16\)"):
        list(read_jsonl(path))
    result = cli("eval", "--kind", "router", "--model", "smollm2-135m-router", "--data", str(path))
    assert_one_line_error(result, "line 2: not UTF-8 text")


def test_router_data_with_an_unknown_route_is_refused_by_line(tmp_path):
    path = tmp_path / "routes.jsonl"
    path.write_text('{"prompt": "2+2?", "route": "self"}\n{"prompt": "IRR of a bond?", "route": "finance"}\n')
    result = cli("eval", "--kind", "router", "--model", "smollm2-135m-router", "--data", str(path))
    assert_one_line_error(result, "line 2: route 'finance' is not one this router knows (self, npc_fin)")


# -- prompts ---------------------------------------------------------------------------------
def test_blank_and_malformed_prompts_are_refused_in_both_modes(engine):
    config = engine.catalogue.add(variant(id="p", backend="llamacpp", source={"path": str(EMBEDDED_GGUF)}))
    for mode in ("chat", "completion"):
        for prompt, message in [
            ("   \n", "is empty"),
            ("a\x00b", "NUL character at position 1"),
            ("caf\udce9", r"bytes that are not UTF-8 \(at position 3\)"),
        ]:
            with pytest.raises(GenerationError, match=message):
                engine.request(config.id, prompt=prompt, mode=mode)
    # An earlier answer cut by Stop may be blank in the history; the new question may not.
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]
    engine.request(config.id, messages=[*history, {"role": "user", "content": "Again?"}], mode="chat")


def test_the_cli_takes_long_prompts_from_a_file_or_stdin_and_refuses_bad_bytes(tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("word " * 40_000)  # ~200 KB: past what one command-line argument can hold
    result = cli("generate", "--model", "smollm2-135m-gguf", "--prompt-file", str(big), "--mode", "completion")
    assert_one_line_error(result, "but the context holds 2048: shorten it")
    piped = subprocess.run(
        [sys.executable, "-m", "playground", "generate", "--model", "smollm2-135m-gguf", "--prompt-file", "-"]
        + ["--max-tokens", "3", "--json"],
        input=b"What is 2+2?",
        capture_output=True,
        timeout=180,
    )
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["prompt_tokens"] > 5
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 au lait")
    assert_one_line_error(
        cli("generate", "--model", "smollm2-135m-gguf", "--prompt-file", str(bad)),
        "is not UTF-8 text (byte 0xe9 at offset 3)",
    )
    assert_one_line_error(cli("generate", "--model", "smollm2-135m-gguf", "--prompt", "  "), "message is empty")


def test_the_cli_keeps_stderr_to_its_own_lines(tmp_path):
    """transformers' dequantization and llama.cpp's loader print progress and reports of their
    own; without --verbose only ours reach stderr."""
    result = cli(
        "generate", "--model", "smollm2-135m-gguf", "--prompt", "Hi", "--max-tokens", "3", "--temperature", "0"
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("[prompt_tokens="), result.stderr
    verbose = cli("--verbose", "models")
    assert verbose.returncode == 0


def test_a_reply_streams_after_bad_input_was_refused(engine):
    """Nothing the refusals above touch is disturbed: the same worker answers afterwards."""
    config = engine.catalogue.add(variant(id="q", backend="llamacpp", source={"path": str(EMBEDDED_GGUF)}))
    engine.load(config.id)
    with pytest.raises(GenerationError):
        engine.request(config.id, prompt="\x00")
    _, _, finished = collect(engine.generate(config.id, engine.request(config.id, prompt="Hi", max_new_tokens=3)))
    assert finished is not None and finished.metrics.completion_tokens >= 1
