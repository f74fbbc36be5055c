"""GPU paths: run on the lent GPU machine (see benchmarks/gpu/README.md); skipped without CUDA.

CI has no GPU, so these run where one is lent, and their results are written down there.
"""

from __future__ import annotations

import pytest
import torch
from conftest import check_reply, collect, variant

from playground.memory import estimate, gpu_memory

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CHAT = [{"role": "user", "content": "Hello there"}]


def _run(engine, config, **params):
    engine.catalogue.add(config)
    info = engine.load(config.id)
    request = engine.request(config.id, messages=CHAT, mode="chat", temperature=0.0, max_new_tokens=16, **params)
    started, deltas, finished = collect(engine.generate(config.id, request))
    check_reply(started, deltas, finished)
    return info, finished.metrics


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_transformers_on_cuda(engine, llama_folder, dtype):
    info, m = _run(
        engine,
        variant(
            id=f"cuda-{dtype}", backend="transformers", source={"path": str(llama_folder)}, dtype=dtype, device="cuda"
        ),
    )
    assert info.device == "cuda" and m.device == "cuda"
    assert m.gpu_allocated_peak_bytes and m.peak_mem_bytes == m.gpu_allocated_peak_bytes
    assert m.gpu_reserved_peak_bytes >= m.gpu_allocated_peak_bytes


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_bitsandbytes_on_cuda(engine, llama_folder, method):
    pytest.importorskip("bitsandbytes")
    config = variant(
        id=f"cuda-{method}",
        backend="transformers",
        source={"path": str(llama_folder)},
        device="cuda",
        quantization={"method": method, "keep_modules": ["q_proj", "k_proj", "v_proj", "lm_head"]},
    )
    info, m = _run(engine, config)
    assert info.dtype == method and any("8 linear layers quantized" in note for note in info.notes)
    assert m.device == "cuda"


def test_auto_device_picks_the_gpu_and_the_estimate_reads_nvml(engine, llama_folder):
    config = variant(id="cuda-auto", backend="transformers", source={"path": str(llama_folder)})
    needed = estimate(config)
    free, total = gpu_memory()[needed.gpu]  # the GPU with the most free memory
    assert needed.device == "cuda" and needed.available_bytes == pytest.approx(free, rel=0.05)
    info, _ = _run(engine, config)
    assert info.device == "cuda" and info.dtype == "bfloat16"


def test_llamacpp_offloads_layers_when_built_with_cuda(engine, tiny_gguf):
    llama_cpp = pytest.importorskip("llama_cpp")
    if not llama_cpp.llama_supports_gpu_offload():
        pytest.skip("llama-cpp-python here was built without GPU support")
    info, m = _run(engine, variant(id="gguf-cuda", backend="llamacpp", source={"path": str(tiny_gguf)}, device="cuda"))
    assert info.device == "cuda" and m.device == "cuda"


def _sft_rows(tmp_path, n: int = 8):
    import json

    data = tmp_path / "sft.jsonl"
    data.write_text(
        "".join(json.dumps({"instruction": f"Say blue {i}.", "response": "Blue."}) + "\n" for i in range(n))
    )
    return data


def test_qlora_trains_on_an_nf4_base_and_its_adapter_variant_loads(tmp_path, llama_folder, monkeypatch):
    from playground.engine import Engine
    from playground.jobs.manager import JobManager
    from playground.jobs.store import JobStore

    monkeypatch.setenv("PLAYGROUND_DATA_DIR", str(tmp_path / "data"))
    jobs = JobManager(JobStore(tmp_path / "data" / "jobs" / "jobs.sqlite"), tmp_path / "logs")
    options = {"model": str(llama_folder), "data": str(_sft_rows(tmp_path)), "quantize": "nf4", "name": "qlora"}
    job = jobs.submit("lora-sft", options | {"epochs": 3, "learning_rate": 0.01})
    assert job.device == "cuda" and job.gpu_bytes > 0
    done = jobs.wait(job.id, timeout_s=300)
    assert done.state == "succeeded", done.error
    events = [e for _, _, e in jobs.store.events(job.id)]
    assert "on cuda" in events[0]["message"]
    losses = [e["loss"] for e in events if "loss" in e]
    assert losses[-1] < losses[0]
    engine = Engine()
    try:
        made = engine.catalogue.get("qlora")
        assert made.quantization.method == "nf4" and made.adapter is not None
        info = engine.load("qlora")
        assert any("LoRA adapter" in note for note in info.notes) and info.device == "cuda"
        request = engine.request("qlora", messages=CHAT, mode="chat", temperature=0.0, max_new_tokens=8)
        check_reply(*collect(engine.generate("qlora", request)))
    finally:
        engine.shutdown()


def test_a_gpu_job_waits_while_memory_is_taken_and_starts_when_it_is_freed(tmp_path, llama_folder, monkeypatch):
    from playground.jobs.manager import JobManager, free_gpu_bytes
    from playground.jobs.store import JobStore

    monkeypatch.setenv("PLAYGROUND_DATA_DIR", str(tmp_path / "data"))
    jobs = JobManager(JobStore(tmp_path / "data" / "jobs" / "jobs.sqlite"), tmp_path / "logs")
    hogs = []  # every GPU filled, as loaded variants would: the job must wait for one to free
    for index in range(torch.cuda.device_count()):
        torch.zeros(1, device=f"cuda:{index}")  # this process's CUDA context first: it takes memory too
        free = free_gpu_bytes()[index]
        hogs.append(torch.empty(free - 128 * 2**20, dtype=torch.uint8, device=f"cuda:{index}"))
    try:
        job = jobs.submit(
            "lora-sft", {"model": str(llama_folder), "data": str(_sft_rows(tmp_path, 2)), "device": "cuda"}
        )
        assert job.state == "queued"
        messages = [e["message"] for _, _, e in jobs.store.events(job.id)]
        assert messages and messages[0].startswith("waiting: needs")
    finally:
        hogs.clear()
        torch.cuda.empty_cache()
    assert jobs.wait(job.id, timeout_s=300).state == "succeeded"


def test_every_job_kind_runs_on_the_gpu(tmp_path, llama_folder, monkeypatch):
    """Each kind on a transformers variant that loads on the GPU with the fast decode path (its
    projections fused): training must load its base unfused, or peft refuses the fused layers
    (a GPU LoRA once failed so). GGUF conversion kinds run on the CPU by their records."""
    import json

    import yaml

    from playground.jobs.kinds import KINDS
    from playground.jobs.manager import JobManager
    from playground.jobs.store import JobStore

    monkeypatch.setenv("PLAYGROUND_DATA_DIR", str(tmp_path / "data"))
    made = tmp_path / "data" / "jobs" / "model_configs"
    made.mkdir(parents=True)
    base = {"id": "gpu-tiny", "display_name": "tiny on the GPU", "backend": "transformers"}
    base |= {"source": {"path": str(llama_folder)}, "context_length": 256}
    # A short prompt of its own: the tiny model's context (256) cannot hold a real router's.
    router = {"system_prompt": "Answer self or npc_fin.", "system_prompt_source": "this test"}
    (made / "gpu-tiny.yaml").write_text(yaml.safe_dump(base))
    (made / "gpu-router.yaml").write_text(
        yaml.safe_dump(base | {"id": "gpu-router", "role": "router", "router": router})
    )
    routes = tmp_path / "routes.jsonl"
    routes.write_text(
        "".join(
            json.dumps({"prompt": p, "route": r, "reason": "x"}) + "\n"
            for p, r in [("2+2?", "self"), ("Price a bond.", "npc_fin")] * 2
        )
    )
    jobs = JobManager(JobStore(tmp_path / "data" / "jobs" / "jobs.sqlite"), tmp_path / "logs")
    tiny_text = {"max_chars": 3000, "window": 64, "stride": 32}
    runs = {
        "eval-router": {"model": "gpu-router", "limit": 2},
        "eval-perplexity": {"model": "gpu-tiny"} | tiny_text,
        "eval-needle": {"model": "gpu-tiny", "lengths": [128], "depths": [0.5]},
        "eval-format": {"model": "gpu-tiny", "limit": 2, "max_new_tokens": 8},
        "eval-lm": {"model": "gpu-tiny", "tasks": ["playground_capitals"], "include_path": "tiny", "limit": 2},
        "lora-sft": {"model": "gpu-tiny", "data": str(_sft_rows(tmp_path, 4)), "name": "gpu-lora"},
        "lora-router": {"model": "gpu-router", "data": str(routes), "epochs": 1, "name": "gpu-router-lora"},
        "qat": {"model": "gpu-tiny", "steps": 3, "seq_len": 32, "max_chars": 5000, "name": "gpu-qat"},
        "export-gguf": {"model": "gpu-qat", "types": ["Q8_0"]},
        "qat-compare": {"model": "gpu-tiny", "qat": "gpu-qat", "types": ["Q8_0"]} | tiny_text,
        "matrix": {"model": "gpu-tiny", "variants": ["gpu-qat"], "limit": 2, "max_new_tokens": 8},
        "report": {"model": "gpu-tiny", "variants": ["gpu-qat"], "limit": 1, "max_new_tokens": 4, "corpus_chars": 400},
    }
    assert set(runs) == set(KINDS), "a job kind without a GPU run here"
    # The GPU kinds together (the manager starts them side by side while memory lasts), then
    # those that read what the QAT job made.
    reads_qat = ["export-gguf", "qat-compare", "matrix", "report"]
    for batch in ([k for k in runs if k not in reads_qat], reads_qat):
        submitted = {kind: jobs.submit(kind, runs[kind]) for kind in batch}
        for kind, job in submitted.items():
            assert job.device == ("cpu" if KINDS[kind].device == "cpu" else "cuda"), kind
            done = jobs.wait(job.id, timeout_s=300)
            assert done.state == "succeeded", f"{kind}: {done.error}"
            if KINDS[kind].plots_loss:
                first = next(e for _, _, e in jobs.store.events(job.id) if "message" in e)
                assert "on cuda" in first["message"], (kind, first)


# -- the fast decode path (static KV cache + CUDA graph) ----------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fast_path_matches_generate_and_its_own_eager_steps(llama_folder, qwen2_folder, arch):
    from test_fast_decode import backend_for, reply

    from playground.backends.fast_decode import StaticDecoder
    from playground.config import GenerationParams

    folder = {"llama": llama_folder, "qwen2": qwen2_folder}[arch]
    fp32 = variant(id=f"fast-{arch}", backend="transformers", source={"path": str(folder)}, dtype="fp32", device="cuda")
    plain, fast = backend_for(fp32, "off"), backend_for(fp32, "auto")
    assert fast.decode_path.name == "cuda-graph" and not fast.decode_path.reason
    # Prompts go through a captured pass per padded length (the 32-token one here).
    assert fast.decode_path.prefill_graphs and "prompts through captured passes" in fast.decode_path.describe()
    # Single-token passes through triton_layers: four matvecs and the attention kernel a layer,
    # their launch shapes timed at load; fp32 replies below are generate's, token for token.
    assert fast.decode_path.triton_layers and "inside Triton matvecs" in fast.decode_path.describe()
    assert fast.model.model.layers[0].configs["attention"] is not None
    for settings in ({"temperature": 0.0}, {"temperature": 0.8, "top_k": 30, "seed": 3, "repetition_penalty": 1.1}):
        params = GenerationParams(max_new_tokens=48, **settings)
        assert reply(fast, params, mode="completion", text="Hello world") == reply(
            plain, params, mode="completion", text="Hello world"
        )
    # bf16: the replayed graph and the same compiled steps launched one by one give the very
    # same tokens.
    bf16 = backend_for(fp32.model_copy(update={"dtype": "bf16"}), "auto")
    assert bf16.decode_path.compiled
    ids = bf16.prepare(_completion("The quick brown fox")).payload
    params = GenerationParams(temperature=0.0, max_new_tokens=64)
    graphed = list(bf16.decoder.tokens(ids, params, lambda: False))
    assert bf16.decoder._prefills[32]["graph"] is not None  # the prompt's padded length
    eager = StaticDecoder(bf16.model, bf16._context_length(), use_cuda_graph=False, compile_step=True)
    assert list(eager.tokens(ids, params, lambda: False)) == graphed
    texts, finish = reply(bf16, GenerationParams(temperature=0.0, max_new_tokens=40), stop_after=6)
    assert (len(texts), finish) == (6, "cancelled")


def _completion(text: str):
    from playground.backends.base import Request
    from playground.config import GenerationParams

    return Request(mode="completion", text=text, params=GenerationParams())


@pytest.mark.parametrize(
    "quantization",
    [{"method": "nf4"}, {"method": "int8"}, {"method": "int8", "int8_outlier_threshold": 0}],
    ids=["nf4", "int8", "int8-no-outlier-split"],
)
def test_quantized_variants_take_the_fastest_path_that_runs(engine, llama_folder, quantization):
    pytest.importorskip("bitsandbytes")
    config = variant(
        id="fast-" + "-".join(str(v) for v in quantization.values()),
        backend="transformers",
        source={"path": str(llama_folder)},
        device="cuda",
        quantization=quantization,
    )
    info, m = _run(engine, config)
    assert m.completion_tokens >= 1 and info.weights_bytes > 0
    print(quantization, "decode path:", info.decode)
    if quantization["method"] == "int8" and quantization.get("int8_outlier_threshold", 6.0) > 0:
        # bitsandbytes' outlier split asks the host in every matmul: no graph, and the UI is
        # told which setting changes that.
        assert info.decode.startswith("static KV cache, eager steps")
        assert "int8_outlier_threshold: 0" in info.decode
    else:
        assert info.decode.startswith("fast decode: static KV cache + CUDA graph")
    if quantization["method"] == "nf4":  # read in bitsandbytes' layout by the Triton layers
        assert "inside Triton matvecs" in info.decode


@pytest.mark.parametrize("head", ["keep", "int8"])
def test_nf4_fast_path_matches_bitsandbytes_generate_in_fp32(llama_folder, head, tmp_path, monkeypatch):
    """An NF4 variant computing in fp32: the Triton layers' replies are bitsandbytes' own
    `generate`'s, token for token (both dequantize the same codes and scales); also with the
    embedding and head in int8 (`quantization.head`), which the compiled step runs as is. Each
    load times its own launch shapes (an earlier test's kept picks once hid a failing picker)."""
    pytest.importorskip("bitsandbytes")
    monkeypatch.setenv("PLAYGROUND_CACHE_DIR", str(tmp_path / "cache"))
    from test_fast_decode import backend_for, reply

    from playground.config import GenerationParams

    nf4 = variant(
        id="fast-nf4-fp32",
        backend="transformers",
        source={"path": str(llama_folder)},
        dtype="fp32",
        device="cuda",
        quantization={"method": "nf4", "double_quant": True, "compute_dtype": "fp32", "head": head},
    )
    plain, fast = backend_for(nf4, "off"), backend_for(nf4, "auto")
    assert fast.decode_path.describe().startswith("fast decode: static KV cache + CUDA graph")
    assert ("the int8 head in a Triton matvec" in fast.decode_path.describe()) == (head == "int8")
    assert fast.decode_path.triton_layers, fast.decode_path.describe()
    assert "failed" not in fast.decode_path.describe() and "earlier load" not in fast.decode_path.describe()
    params = GenerationParams(max_new_tokens=48, temperature=0.0)
    assert reply(fast, params, mode="completion", text="Hello world") == reply(
        plain, params, mode="completion", text="Hello world"
    )


def test_a_second_load_takes_the_launch_shapes_the_first_timed(llama_folder, tmp_path, monkeypatch):
    """The first load on the GPU times its kernels' launch shapes and keeps them; a second load
    of the same model takes them without timing (its decode path says so) and decodes the same
    tokens; once its fused layers are removed (a failed trial) the kept picks are gone."""
    import time

    from test_fast_decode import backend_for, reply

    from playground.backends import launch_shape_cache, triton_layers
    from playground.config import GenerationParams

    monkeypatch.setenv("PLAYGROUND_CACHE_DIR", str(tmp_path / "cache"))
    config = variant(
        id="kept-shapes", backend="transformers", source={"path": str(llama_folder)}, dtype="fp32", device="cuda"
    )
    started = time.perf_counter()
    first = backend_for(config, "auto")
    first_s = time.perf_counter() - started
    assert first.decode_path.triton_layers and "earlier load" not in first.decode_path.describe()
    kept = list(launch_shape_cache.folder().glob("*.json"))
    assert len(kept) == 1
    started = time.perf_counter()
    second = backend_for(config, "auto")
    second_s = time.perf_counter() - started
    assert "launch shapes as an earlier load timed them" in second.decode_path.describe()
    assert second.model.model.layers[0].configs == first.model.model.layers[0].configs
    params = GenerationParams(max_new_tokens=32, temperature=0.0)
    assert reply(second, params, mode="completion", text="Hello world") == reply(
        first, params, mode="completion", text="Hello world"
    )
    print(f"load with timing {first_s:.1f} s, with kept launch shapes {second_s:.1f} s")
    triton_layers.remove_fused_layers(second.model)
    assert not kept[0].exists()


def test_a_close_pdl_choice_is_settled_by_timing_the_whole_captured_step(llama_folder, tmp_path, monkeypatch):
    """With the margin wide open, the load captures its step with the layer trial's PDL choice
    and with the runner-up, times both, keeps the faster decoder and stores that choice: the
    decode line gives both times, the kept picks are the installed ones, and the fp32 replies
    are plain generate's."""
    from test_fast_decode import backend_for, reply

    from playground.backends import launch_shape_cache, triton_layers
    from playground.config import GenerationParams

    monkeypatch.setenv("PLAYGROUND_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(triton_layers, "WHOLE_STEP_PDL_MARGIN", 100.0)
    config = variant(
        id="whole-step", backend="transformers", source={"path": str(llama_folder)}, dtype="fp32", device="cuda"
    )
    fast = backend_for(config, "auto")
    shapes = fast.model._launch_shapes
    assert "whole_step_ms" in shapes, fast.decode_path.reason  # the first GPU run: inference-mode buffers
    step_ms = shapes["whole_step_ms"]
    assert set(step_ms) == {"plain", "pdl"} and "PDL decided on the whole step" in fast.decode_path.describe()
    chosen = shapes["pdl_trial"]["chosen"]
    assert step_ms[chosen] == min(step_ms.values())  # the faster kept
    assert triton_layers.uses_pdl(fast.model) == (chosen == "pdl")
    configs = fast.model.model.layers[0].configs
    (kept,) = launch_shape_cache.folder().glob("*.json")
    assert launch_shape_cache.load(kept.stem, set(configs)) == configs
    plain = backend_for(config, "off")
    params = GenerationParams(max_new_tokens=32, temperature=0.0)
    assert reply(fast, params, mode="completion", text="Hello world") == reply(
        plain, params, mode="completion", text="Hello world"
    )


def test_one_gpu_times_one_variant_s_launch_shapes_at_a_time():
    """Two loads timing kernels on the same GPU take turns (in the app they are two workers; a
    file lock serves threads and processes alike): the second starts only after the first ends.
    Another process's load may hold the lock first (run_gpu_tests.sh runs two pytest processes
    on one GPU; a 10 s wait for the first thread once ran out so, and the two then raced), so the
    second asks only once the first holds it."""
    import threading
    import time

    from playground.backends.triton_layers import TIMING_LOCK_WAIT_S, timing_lock

    device = torch.device("cuda", 0)
    held, spans = threading.Event(), {}

    def first() -> None:
        with timing_lock(device):
            held.set()
            time.sleep(0.5)
            spans["first_released"] = time.monotonic()

    worker = threading.Thread(target=first)
    worker.start()
    assert held.wait(TIMING_LOCK_WAIT_S + 60), "the first thread never got the lock"
    with timing_lock(device):
        spans["second_acquired"] = time.monotonic()
    worker.join()
    assert spans["second_acquired"] >= spans["first_released"]


@pytest.mark.parametrize("lookup", ["byte", "nibble", "registers", "scaled"])
def test_nf4_matvec_weights_round_to_bf16_as_bitsandbytes_dequantizes(lookup):
    """bf16 NF4 weights, read back one column at a time (x one-hot, so each output is one
    weight times one): bit for bit bitsandbytes' own dequantization, with each lookup, plain,
    prefetched or pipelined (four loop steps a row), summed by tensor cores (pipelined too), or
    its columns shared by several programs. On the GPU the kernel rounds a pair of
    products with one packed conversion, and the scaled lookup rounds each block's values
    ahead, which the interpreter's tests do not run. Columns 0-7 are the four bytes of one
    register, each in its own place."""
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    from playground.backends.triton_kernels import MatvecConfig, NF4Weight, nf4_matvec

    rows, columns = 64, 256
    generator = torch.Generator().manual_seed(3)
    linear = bnb.nn.Linear4bit(columns, rows, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    weight = (torch.randn(rows, columns, generator=generator) * 3).to(torch.bfloat16)
    linear.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4")
    linear = linear.to("cuda")  # quantizes
    dequantized = bnbf.dequantize_4bit(linear.weight.data, linear.weight.quant_state)
    assert dequantized.dtype == torch.bfloat16
    packed = NF4Weight.of([linear])
    configs = [
        MatvecConfig(8, 64, 4, nf4_lookup=lookup, nf4_prefetch=prefetch, nf4_stages=stages)
        for prefetch, stages in ((False, 1), (True, 1), (False, 3))
    ]
    # Tensor cores (wgmma, 64 rows) on the tile's block-fastest column order, whole or split
    # over 2 or 4 programs; and FMA programs split 4 ways.
    configs += [MatvecConfig(64, 256, 4, nf4_lookup=lookup, nf4_dot=True)]
    configs += [MatvecConfig(64, 64, 4, nf4_lookup=lookup, nf4_dot=True, nf4_splits=n) for n in (2, 4)]
    configs += [MatvecConfig(64, 64, 4, nf4_lookup=lookup, nf4_dot=True, nf4_stages=3)]
    configs += [MatvecConfig(8, 64, 4, nf4_lookup=lookup, nf4_splits=4)]
    for config in configs:
        for column in (*range(8), 63, 64, 129, 255):
            x = torch.zeros(columns, dtype=torch.bfloat16, device="cuda")
            x[column] = 1.0
            got = nf4_matvec(x, packed, config)
            assert torch.equal(got, dequantized[:, column]), (config, column)
        assert not packed.counters.any()  # left at zero for the next launch


@pytest.mark.parametrize("gated", [False, True], ids=["qkv", "gate-up"])
def test_nf4_matvec_reads_x_in_pairs_as_a_column_at_a_time(gated):
    """bf16 x and norm at word-aligned addresses: the register lookups' kernel reads each
    byte's two columns as one word, normalises them and packs them again by PTX (`X_WORDS`);
    a copy of x at an odd address is read a column at a time. Both give the same bits."""
    bnb = pytest.importorskip("bitsandbytes")

    from playground.backends.triton_kernels import MatvecConfig, NF4Weight, _pairs_readable, nf4_matvec

    rows, columns = 64, 512
    generator = torch.Generator().manual_seed(4)
    linears = []
    for _ in range(2 if gated else 1):
        linear = bnb.nn.Linear4bit(columns, rows, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        weight = torch.randn(rows, columns, generator=generator).to(torch.bfloat16)
        linear.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        linears.append(linear.to("cuda"))
    packed = NF4Weight.of(linears)
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(columns).to("cuda", torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(columns, generator=generator))
        x = (torch.randn(columns, generator=generator) * 3).to(torch.bfloat16).cuda()
        unaligned = torch.empty(columns + 1, dtype=torch.bfloat16, device="cuda")[1:]
        unaligned.copy_(x)
        assert _pairs_readable(x, norm.weight) and not _pairs_readable(unaligned, norm.weight)
        for config in (
            MatvecConfig(8, 256, 4, nf4_lookup="scaled"),
            MatvecConfig(16, 512, 4, nf4_lookup="scaled", nf4_whole_blocks=True),
            MatvecConfig(8, 256, 4, nf4_lookup="registers", nf4_stages=3),
        ):
            pairs = nf4_matvec(x, packed, config, norm=norm, gated=gated)
            single = nf4_matvec(unaligned, packed, config, norm=norm, gated=gated)
            assert torch.equal(pairs, single), config


# -- token-level divergence on the GPU -----------------------------------------------------------
def test_gpu_variants_are_diffed_against_a_cpu_reference_and_give_a_token_view(engine, llama_folder):
    """The fast-path bf16 and the NF4 forms read the fp32 CPU reference's answer teacher-forced;
    the answer they generate on the fast path carries its token ids for the token view."""
    pytest.importorskip("bitsandbytes")
    from playground.divergence import diff

    base = {"backend": "transformers", "source": {"path": str(llama_folder)}}
    for config in (
        variant(id="ref-cpu", dtype="fp32", device="cpu", **base),
        variant(id="gpu-bf16", dtype="bf16", device="cuda", **base),
        variant(id="gpu-nf4", device="cuda", quantization={"method": "nf4"}, **base),
    ):
        engine.catalogue.add(config)
        engine.load(config.id)
    assert engine.status("gpu-bf16").info.decode.startswith("fast decode")
    request = engine.request("ref-cpu", prompt="Hello there", max_new_tokens=24, temperature=0.0)
    result = diff(engine, "ref-cpu", ["gpu-bf16", "gpu-nf4"], request)
    bf16, nf4 = result.variants
    for outcome in (bf16, nf4):
        assert outcome.refusal is None and outcome.prompt_tokens_equal and len(outcome.rows) == result.answer_tokens
        assert outcome.mean_kl >= 0 and 0 <= outcome.top1_agreement <= 1
    assert bf16.mean_kl < nf4.mean_kl  # 4-bit weights depart further than bf16 from fp32
    started, deltas, finished = collect(engine.generate("gpu-bf16", request))
    check_reply(started, deltas, finished)
    assert len(finished.token_ids) == finished.metrics.completion_tokens
    scored = engine.score_answer("gpu-bf16", list(finished.prompt_ids), list(finished.token_ids), top_k=5)
    # Greedy on the fast path: each generated token is the model's own top-1 read teacher-forced
    # (bf16 noise may swap a near tie; allow one).
    assert sum(not t.rank1 for t in scored.tokens) <= 1


# -- the router's kept system prompt on the GPU -------------------------------------------------
def test_a_router_on_the_gpu_keeps_its_system_prompt_and_scores_as_a_fresh_pass(engine, llama_folder):
    """A bf16 router on CUDA keeps its system prompt's KV state between scores: a request scored
    after others gets the numbers of its first pass, near the fp32 CPU figure."""
    from test_router import PROMPT, TINY_SPEC, router_variant

    from playground.router import Router

    source = {"path": str(llama_folder)}
    on_gpu = engine.catalogue.add(
        router_variant("router-cuda", "transformers", source, TINY_SPEC, dtype="bf16", device="cuda")
    )
    on_cpu = engine.catalogue.add(
        router_variant("router-cpu", "transformers", source, TINY_SPEC, dtype="fp32", device="cpu")
    )
    router = Router(engine, on_gpu.id, calibrated=False)
    router.ensure_loaded()
    fresh, _ = router.score(PROMPT)
    others = [router.score(p)[0] for p in ("What is 2 + 2?", "Summarize the Q3 earnings call of a bank.")]
    assert all(o["npc_fin"] != fresh["npc_fin"] for o in others)
    assert router.score(PROMPT)[0] == fresh
    decision = router.decide(PROMPT, explain=False)
    assert decision.p_escalate == pytest.approx(fresh["npc_fin"]) and decision.decision_latency_s > 0
    reference = Router(engine, on_cpu.id, calibrated=False)
    reference.ensure_loaded()
    assert fresh["npc_fin"] == pytest.approx(reference.score(PROMPT)[0]["npc_fin"], abs=0.05)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_router_scores_on_the_gpu_run_as_one_captured_pass_with_the_plain_numbers(llama_folder, dtype):
    """With the fast path, `score` on CUDA is the batched static pass replayed from a CUDA graph:
    its numbers are a plain forward pass's (fp32: to float noise; bf16: as the first-score check
    allows), across a changed system prompt and a longer request (another graph)."""
    from test_fast_decode import backend_for
    from test_router import TINY_SPEC

    from playground.backends.base import Request, shared_prefix_length
    from playground.config import GenerationParams
    from playground.router import ROUTE_END, ROUTE_PREFIX

    config = variant(
        id=f"scorer-{dtype}", backend="transformers", source={"path": str(llama_folder)}, dtype=dtype, device="cuda"
    )
    backend = backend_for(config, "auto")
    assert backend.decode_path.name == "cuda-graph"
    continuations = [r + ROUTE_END for r in TINY_SPEC["routes"]]
    tolerance = 1e-3 if dtype == "fp32" else 0.5
    for system, prompt in (
        (TINY_SPEC["system_prompt"], "Hi"),
        (TINY_SPEC["system_prompt"], "Value a ten-year bond with a 5% coupon at a 4% yield, step by step."),
        ("A different system prompt.", "What is 2 + 2?"),
        (TINY_SPEC["system_prompt"], "Hi"),
    ):
        messages = ({"role": "system", "content": system}, {"role": "user", "content": prompt})
        request = Request(mode="chat", params=GenerationParams(), messages=messages, assistant_prefix=ROUTE_PREFIX)
        scores = backend.score(request, continuations)
        sequences = backend.continuation_ids(request, continuations)
        with torch.inference_mode():
            plain = backend._score_plain(sequences, shared_prefix_length(sequences))
        assert scores == pytest.approx(plain, abs=tolerance)
    assert backend._prefix_cache_ok and backend._scorer is not None
    graphs = {length: run["graph"] for length, run in backend._scorer._passes.items()}
    # The common tail lengths were captured at the first score (the tiny model holds 256
    # positions, so 128 fits after the short system prompt).
    assert set(graphs) >= {16, 32, 64, 128} and all(graph is not None for graph in graphs.values())
    backend.unload()
    assert backend._scorer is None


@pytest.mark.parametrize("method", ["prompt-lookup", "draft-model"])
def test_speculative_decoding_on_the_gpu_gives_plain_greedy_tokens(llama_folder, method, tmp_path, monkeypatch):
    """fp32 on CUDA: the speculative reply (single steps and padded passes of drafts, each through
    its captured graph, the passes through the Triton rows kernel) is plain generate's, token
    for token; the same weights as draft keep every draft."""
    from playground.backends import triton_layers
    from playground.backends.base import Request, StreamEnd
    from playground.backends.transformers_backend import TransformersBackend
    from playground.config import GenerationParams

    # The rows kernel whatever the tiny model's timing says (cuBLAS may win at its size), with
    # launch shapes timed afresh, not taken from an earlier test's load.
    monkeypatch.setenv("PLAYGROUND_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(triton_layers, "rows_kernel_pays", lambda kernel_ms, own_ms: True)

    base = dict(backend="transformers", source={"path": str(llama_folder)}, dtype="fp32", device="cuda")
    spec = {"method": method, "num_tokens": 4}
    if method == "draft-model":
        spec["draft_variant"] = "gpu-draft"
    plain = TransformersBackend(variant(id="gpu-plain", **base, fast_decode="off"))
    fast = TransformersBackend(variant(id="gpu-spec", **base, speculative=spec))
    fast.draft_config = variant(id="gpu-draft", **base)
    plain.load(), fast.load()
    assert fast.decode_path.name == "cuda-graph"
    assert "checks of 2-16 tokens through a Triton kernel of several rows" in fast.decode_path.describe()
    params = GenerationParams(temperature=0.0, max_new_tokens=48)
    ends = []
    for backend in (plain, fast):
        prompt = backend.prepare(Request(mode="completion", params=params, text="one two three four five. " * 3))
        ends.append([item for item in backend.stream(prompt, params, lambda: False) if isinstance(item, StreamEnd)][0])
    assert ends[1].token_ids == ends[0].token_ids and len(ends[0].token_ids) == 48
    stats = ends[1].speculation
    assert stats.accepted > 0 and stats.passes == 47 - stats.accepted
    # The passes of drafts replayed their own graph (padded to one length).
    assert not fast.decoder.verify_graph_failure and fast.decoder._verify_graph is not None
    if method == "draft-model":
        assert stats.accepted == stats.drafted
    fast.unload(), plain.unload()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (the lent nvidia-h200-x2)")
def test_variants_spread_over_two_gpus_within_a_budget_and_a_pinned_one_stays(engine, llama_folder):
    """A GPU budget that holds two of these variants per GPU (gpu_budget_mib): four `device:
    auto` loads spread two and two, each to the GPU with the most room; a fifth is refused with
    each GPU's room named; once one on GPU 1 is unloaded, a `cuda:1` variant goes there. A GPU
    the machine lacks is refused before a worker starts. Each answers, and says where it is."""
    from playground.errors import InsufficientMemory
    from playground.ui.formatting import loaded_markdown

    def config(name, device="auto"):
        return engine.catalogue.add(
            variant(id=name, backend="transformers", source={"path": str(llama_folder)}, dtype="bf16", device=device)
        )

    one = engine.estimate(config("spread-0").id).total_bytes
    engine.gpu_budget_bytes = int(2.5 * one)
    placed = {}
    for number in range(4):
        info, _ = _run(engine, config(f"spread-{number}"))
        placed[number] = engine.status(f"spread-{number}").gpu
        assert info.device == "cuda" and f"placed on GPU {placed[number]}" in info.notes
    assert sorted(placed.values()) == [0, 0, 1, 1] and placed[0] != placed[1]
    with pytest.raises(InsufficientMemory, match=r"will not fit: .*budget per GPU: GPU 0 0\.\d+ GiB, GPU 1 0\.\d+ GiB"):
        engine.load(config("spread-4").id)
    assert "spread-4" not in engine.workers
    pinned = config("spread-pinned", device="cuda:1")
    with pytest.raises(InsufficientMemory, match="will not fit"):
        engine.load(pinned.id)
    engine.unload(next(f"spread-{n}" for n, gpu in placed.items() if gpu == 1))
    info, _ = _run(engine, pinned)
    assert engine.status(pinned.id).gpu == 1 and "placed on GPU 1" in info.notes
    assert "on GPU 1" in loaded_markdown(engine) and "on GPU 0" in loaded_markdown(engine)
    too_far = config("spread-far", device="cuda:7")
    with pytest.raises(InsufficientMemory, match="asks for GPU 7, and this machine has 2"):
        engine.load(too_far.id)
    assert "spread-far" not in engine.workers


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (the lent nvidia-h200-x2)")
def test_a_gpu_job_runs_on_the_gpu_with_more_room(tmp_path, llama_folder, jobs):
    """With 20 GiB taken on GPU 0 by this process, a LoRA job goes to GPU 1, sees only that GPU,
    and trains there."""
    from test_jobs import _sft_file

    hog = torch.empty(20 * 2**30, dtype=torch.uint8, device="cuda:0")
    options = {"model": str(llama_folder), "data": str(_sft_file(tmp_path, n=4)), "device": "cuda", "name": "on-gpu-1"}
    done = jobs.wait(jobs.submit("lora-sft", options).id, timeout_s=300)
    assert done.state == "succeeded", done.error
    assert done.gpu == 1
    del hog
