"""A router's calibration: fitted against a direct computation, stored with the variant, applied
to every decision, used for target-rate thresholds, and refused with a clear message when bad."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.optimize import minimize
from test_cli import cli
from test_router import PROMPT, TINY_SPEC, router_variant

from playground.errors import ConfigError
from playground.router import Router, calibrate_router, evaluate_at_target_rate, reliability, threshold_for_rate
from playground.router_calibration import calibration_path, fit_calibration, load_calibration


@pytest.fixture(autouse=True)
def own_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PLAYGROUND_DATA_DIR", str(tmp_path / "data"))


def test_platt_scaling_is_the_logistic_fit_on_the_raw_log_odds():
    rng = np.random.default_rng(11)
    raw = rng.uniform(0.02, 0.98, 300)
    gold = rng.random(300) < raw**3  # an over-confident score: the truth is raw³
    calibration = fit_calibration("r", list(raw), list(gold), "platt", "synthetic")
    x = np.log(raw / (1 - raw))

    def log_loss(ab: np.ndarray) -> float:
        z = ab[0] * x + ab[1]
        return float(np.sum(np.logaddexp(0, -z) * gold + np.logaddexp(0, z) * ~gold))

    a, b = minimize(log_loss, np.zeros(2), method="BFGS").x
    assert (calibration.a, calibration.b) == pytest.approx((a, b), abs=1e-3)
    ece_raw = reliability(gold, raw)["ece"]
    ece_calibrated = reliability(gold, np.array(calibration.calibrated_scores))["ece"]
    assert ece_calibrated < ece_raw / 2


def test_isotonic_calibration_pools_adjacent_violators():
    calibration = fit_calibration("r", [0.1, 0.2, 0.3, 0.4], [False, True, False, True], "isotonic", "hand")
    # By hand: 0, then 1 and 0 violate the order and pool to 0.5 each, then 1.
    assert list(calibration.apply([0.1, 0.2, 0.3, 0.4])) == pytest.approx([0.0, 0.5, 0.5, 1.0])
    assert calibration.apply(0.99) == pytest.approx(1.0) and calibration.apply(0.01) == pytest.approx(0.0)


def test_calibration_needs_both_routes():
    with pytest.raises(ConfigError, match="rows of both routes"):
        fit_calibration("r", [0.2, 0.9], [True, True], "platt", "one-sided")


def test_a_damaged_or_foreign_calibration_file_is_named():
    path = calibration_path("tiny")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot be read.*fit it again or delete it"):
        load_calibration("tiny")
    path.write_text(fit_calibration("other", [0.1, 0.9], [False, True], "platt", "x").model_dump_json())
    with pytest.raises(ConfigError, match="is for other, not tiny"):
        load_calibration("tiny")
    assert load_calibration("nobody") is None


def test_a_calibrated_router_decides_on_its_calibrated_score(engine, llama_folder, tmp_path):
    config = engine.catalogue.add(
        router_variant("tiny-calibrated", "transformers", {"path": str(llama_folder)}, TINY_SPEC, dtype="fp32")
    )
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(
        json.dumps({"prompt": f"request number {i} " + ("about bonds" if i % 2 else "say hi"),
                    "route": "npc_fin" if i % 2 else "self"}) + "\n"
        for i in range(8)
    ))
    calibration = calibrate_router(engine, config.id, str(rows), "isotonic")
    assert calibration_path(config.id).exists() and calibration.n == 8 and calibration.ece_before is not None
    assert calibration.ece_after <= calibration.ece_before  # in-sample: isotonic cannot do worse
    raw = Router(engine, config.id, calibrated=False).decide(PROMPT, explain=False)
    decided = Router(engine, config.id).decide(PROMPT, explain=False)
    assert decided.p_escalate_raw == pytest.approx(raw.p_escalate)
    assert decided.p_escalate == pytest.approx(float(calibration.apply(raw.p_escalate)))
    assert decided.calibration == "isotonic on " + str(rows) + " (8 rows)"
    # A target rate reads its threshold off the stored scores of the calibration data.
    tuned = evaluate_at_target_rate(engine, config.id, str(rows), 0.5, calibration_data=str(rows))
    assert tuned.threshold == pytest.approx(threshold_for_rate(calibration.calibrated_scores, 0.5))


def test_the_calibrate_router_command(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        '{"prompt": "Say hi", "route": "self"}\n{"prompt": "Price a bond ladder with duration math", "route": "npc_fin"}\n'
        '{"prompt": "Tell me a joke", "route": "self"}\n{"prompt": "Value Apple with a DCF", "route": "npc_fin"}\n'
    )
    out = cli("calibrate-router", "--model", "smollm2-135m-router", "--data", str(rows), "--json")
    assert out.returncode == 0, out.stderr
    stored = json.loads(out.stdout)
    assert stored["method"] == "platt" and stored["n"] == 4 and len(stored["calibrated_scores"]) == 4
    assert stored["path"].endswith("router_calibration/smollm2-135m-router.json")
    out = cli("route", "--router", "smollm2-135m-router", "--prompt", PROMPT, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["calibration"].startswith("platt on")
    out = cli("calibrate-router", "--model", "smollm2-135m-router", "--remove")
    assert out.returncode == 0 and "calibration removed" in out.stdout
    bad = cli("calibrate-router", "--model", "smollm2-135m-gguf")
    assert bad.returncode == 2 and "has no router section" in bad.stderr and "Traceback" not in bad.stderr
