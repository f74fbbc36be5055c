"""The router's cost-quality curve and RouteLLM's numbers, against hand computation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.integrate import trapezoid

from playground.config import CostSpec
from playground.errors import PlaygroundError
from playground.router_curve import QualityRow, cost_quality_curve, read_quality_data


def rows(weak, strong, tokens=None):
    return [
        QualityRow(f"p{i}", w, s, *(tokens[i] if tokens else (None, None))) for i, (w, s) in enumerate(zip(weak, strong, strict=True))
    ]


def test_curve_apgr_and_cpt_match_a_hand_computation():
    # By P(escalate): request 0, then 2, 3, 1. Escalating 0 and 2 fixes both of the weak model's misses.
    curve = cost_quality_curve([0.9, 0.1, 0.6, 0.3], rows([0, 1, 0, 1], [1, 1, 1, 0]))
    assert [p.strong_share for p in curve.router] == [0, 0.25, 0.5, 0.75, 1]
    assert [p.quality for p in curve.router] == [0.5, 0.75, 1.0, 0.75, 0.75]
    assert (curve.weak_quality, curve.strong_quality) == (0.5, 0.75)
    area = trapezoid([0.5, 0.75, 1.0, 0.75, 0.75], [0, 0.25, 0.5, 0.75, 1])
    assert curve.apgr == pytest.approx((area - 0.5) / 0.25) == pytest.approx(1.125)
    # 50% of the gap is quality 0.625, reached a half of the way from share 0 to 0.25.
    assert curve.cpt50 == pytest.approx(0.125) and curve.cpt80 == pytest.approx(0.2)
    # The oracle escalates where the partner gains (0 and 2) first: quality 1.0 at a share of 0.5.
    assert curve.oracle[2].quality == 1.0 and curve.oracle_apgr >= curve.apgr


def test_a_router_that_cannot_tell_requests_apart_is_random_routing():
    rng = np.random.default_rng(3)
    weak, strong = rng.random(50), rng.random(50) + 0.5
    curve = cost_quality_curve([0.4] * 50, rows(weak, strong))
    assert [p.strong_share for p in curve.router] == [0, 1]  # equal scores: no threshold splits them
    assert curve.apgr == pytest.approx(0.5)  # the straight line from weak to strong
    assert curve.cpt50 == pytest.approx(0.5) and curve.cpt80 == pytest.approx(0.8)


def test_a_router_scoring_by_the_true_gain_is_the_oracle():
    rng = np.random.default_rng(4)
    weak, strong = rng.integers(0, 2, 200).astype(float), rng.integers(0, 2, 200).astype(float)
    gains = strong - weak + rng.random(200) * 1e-3  # tie-breaking noise only
    curve = cost_quality_curve(list(gains), rows(weak, strong))
    assert curve.apgr == pytest.approx(curve.oracle_apgr, abs=1e-9)
    assert curve.apgr > 1  # the oracle beats the partner alone where the partner also fails sometimes


def test_money_and_seconds_come_from_the_configs_and_each_requests_tokens():
    weak_cost = CostSpec(usd_per_million_input_tokens=0, usd_per_million_output_tokens=0, seconds_per_answer=0.5)
    strong_cost = CostSpec(usd_per_million_input_tokens=1.0, usd_per_million_output_tokens=4.0, seconds_per_answer=3.0)
    tokens = [((100, 50), (100, 200)), ((10, 5), (10, 1000))]
    curve = cost_quality_curve([0.9, 0.2], rows([0, 1], [1, 1], tokens), weak_cost, strong_cost)
    assert [p.usd for p in curve.router] == pytest.approx([0, (100 + 4 * 200) / 1e6, (100 + 800 + 10 + 4000) / 1e6])
    assert [p.seconds for p in curve.router] == pytest.approx([1.0, 3.5, 6.0])
    no_tokens = cost_quality_curve([0.9, 0.2], rows([0, 1], [1, 1]), weak_cost, strong_cost)
    assert no_tokens.router[1].usd is None and "no money axis" in no_tokens.notes[0]


def test_no_gap_means_no_pgr():
    curve = cost_quality_curve([0.9, 0.2], rows([1, 1], [1, 0]))
    assert curve.apgr is None and curve.cpt50 is None and "no better" in curve.notes[0]


def test_bad_quality_files_are_named(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"prompt": "a", "weak_quality": 1, "strong_quality": 0}\n{"prompt": "b", "weak_quality": "x"}\n')
    with pytest.raises(PlaygroundError, match=r"line 2: \"weak_quality\" and \"strong_quality\" must both be numbers"):
        read_quality_data(path)
    path.write_text('{"prompt": "a", "weak_quality": 1, "strong_quality": 0, "weak_tokens": [1]}\n')
    with pytest.raises(PlaygroundError, match=r"line 1: \"weak_tokens\" must be \[input tokens, output tokens\]"):
        read_quality_data(path)
    path.write_text('{"prompt": "a", "weak_quality": 1, "strong_quality": 0.5, "strong_tokens": [3, 4]}\n')
    assert read_quality_data(path) == [QualityRow("a", 1.0, 0.5, None, (3.0, 4.0))]


def test_several_routers_share_one_table_and_chart_and_a_failed_one_is_named():
    from playground.ui.charts import cost_quality_figure
    from playground.ui.router_tab import cost_quality_markdown

    quality = rows([0, 1, 0, 1], [1, 1, 1, 0])
    curves = {"good": cost_quality_curve([0.9, 0.1, 0.6, 0.3], quality), "flat": cost_quality_curve([0.4] * 4, quality)}
    failures = {"absent": PlaygroundError("its weights are not on this machine")}
    text, axis = cost_quality_markdown(curves, failures, {"good": "Good router"}, "money")
    assert "| Good router | 1.125 | 12.5% | 20.0% | 4 |" in text
    assert "| flat | 0.500 | 50.0% | 80.0% | 4 |" in text
    assert "absent could not score: ⚠ its weights are not on this machine" in text
    alone, _ = cost_quality_markdown({}, failures, {}, "partner calls")
    assert alone == "absent could not score: ⚠ its weights are not on this machine"
    assert "quality 0.500; partner only: 0.750; oracle APGR" in text
    # No cost sections here: the money axis falls back to partner calls, and says so.
    assert axis == "partner calls" and "No money axis for these routers" in text
    fig = cost_quality_figure(curves, axis)
    names = [t.name for t in fig.data]
    assert names[:4] == ["random routing", "oracle", "good", "flat"]
    assert list(fig.data[2].x) == [p.strong_share for p in curves["good"].router]
