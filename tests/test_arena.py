"""Votes persist in SQLite and become Elo ratings; exports carry the whole comparison."""

from __future__ import annotations

import json

import pytest

from playground.arena import VoteStore, elo
from playground.errors import PlaygroundError
from playground.export import Answer, Comparison, PanelRecord, SessionRecord, Turn, load_session
from playground.ui.jobs_tab import result_value


def test_elo_moves_the_right_way_and_conserves_points():
    table = {s.variant: s for s in elo([("x", "y", "a")])}
    assert table["x"].rating == pytest.approx(1016.0) and table["y"].rating == pytest.approx(984.0)
    table = {s.variant: s for s in elo([("x", "y", "a"), ("x", "y", "tie")])}
    # After a win, a tie moves points back towards the loser.
    assert table["x"].rating < 1016.0 and table["x"].rating + table["y"].rating == pytest.approx(2000.0)
    table = {s.variant: s for s in elo([("x", "y", "both_bad"), ("y", "z", "b")])}
    assert (table["x"].both_bad, table["y"].both_bad, table["y"].losses, table["z"].wins) == (1, 1, 1, 1)


def test_votes_survive_a_new_store(tmp_path):
    path = tmp_path / "votes.sqlite"
    VoteStore(path).record("a", "b", "b", "prompt one")
    store = VoteStore(path)
    store.record("a", "b", "tie", "prompt two")
    assert store.votes() == [("a", "b", "b"), ("a", "b", "tie")]
    assert store.leaderboard()[0].variant == "b"
    with pytest.raises(ValueError):
        store.record("a", "b", "maybe", "p")
    with pytest.raises(ValueError):
        store.record("a", "a", "a", "p")


def test_export_markdown_and_json():
    comparison = Comparison(
        prompt="Why is the sky blue?",
        mode="chat",
        settings={"temperature": 0.7, "max_new_tokens": 64},
        answers=[
            Answer(
                "v1",
                "Variant One",
                "Rayleigh scattering.",
                {
                    "ttft_s": 0.1,
                    "decode_tok_s": 50.0,
                    "prefill_tok_s": 300.0,
                    "prompt_tokens": 9,
                    "completion_tokens": 4,
                    "peak_mem_bytes": 200 * 2**20,
                },
            ),
            Answer("v2", "Variant Two", "", None, error="the worker was killed by SIGKILL"),
        ],
    )
    md = comparison.to_markdown()
    assert "| Variant One | 0.100 | 50.0 | 300 | 9/4 | 200 |" in md
    assert "**Error:** the worker was killed by SIGKILL" in md and "Why is the sky blue?" in md
    data = json.loads(comparison.to_json())
    assert data["answers"][0]["metrics"]["decode_tok_s"] == 50.0 and data["settings"]["temperature"] == 0.7


def test_a_session_record_marks_cut_answers_and_loads_back():
    record = SessionRecord(
        n_panels=1,
        mode="chat",
        settings={"max_new_tokens": 16, "seed": None},
        panels=[
            PanelRecord(
                variant_id="v1",
                display_name="Variant One",
                turns=[
                    Turn(prompt="Hi", mode="chat", answer="Hello!", metrics={"finish_reason": "stop"}),
                    Turn(prompt="Tell a story", mode="chat", answer="Once", metrics={"finish_reason": "cancelled"}),
                ],
            )
        ],
    )
    md = record.to_markdown()
    assert "finish: cancelled by Stop (the answer is incomplete)" in md and "> Tell a story" in md
    back = load_session(record.to_json())
    assert back.panels[0].turns[1].finish_reason == "cancelled" and back.settings["max_new_tokens"] == 16
    for text, reason in [
        ("not json", "the file is not JSON"),
        ('{"hello": 1}', "no `format` field"),
        ('{"format": "variant-playground-session", "n_panels": 9}', "n_panels"),
    ]:
        with pytest.raises(PlaygroundError, match=reason):
            load_session(text)


def test_job_results_are_shown_with_units_and_four_significant_digits():
    assert result_value("perplexity", 12.345678901) == "12.35"
    assert result_value("mean_latency_s", 0.123456) == "0.1235 s"
    assert result_value("accuracy", 0.8125) == "81.2%"
    assert result_value("file_bytes", 3 * 2**20) == "3.0 MiB"
    assert result_value("rows", 64) == "64"
