"""Votes persist in SQLite and become Elo ratings; exports carry the whole comparison."""

from __future__ import annotations

import json
import re
import sqlite3

import pytest

from playground.arena import VoteStore
from playground.errors import PlaygroundError
from playground.export import Answer, Comparison, PanelRecord, SessionRecord, Turn, load_session
from playground.ui.jobs_tab import result_value


def test_votes_survive_a_new_store(tmp_path):
    path = tmp_path / "votes.sqlite"
    VoteStore(path).record("a", "b", "b", "prompt one")
    store = VoteStore(path)
    store.record("a", "b", "tie", "prompt two", answer_a="A says", answer_b="B says", tag="facts", session="demo 1")
    votes = store.votes()
    assert [(v.variant_a, v.variant_b, v.outcome) for v in votes] == [("a", "b", "b"), ("a", "b", "tie")]
    assert (votes[1].answer_a, votes[1].answer_b, votes[1].tag, votes[1].session) == ("A says", "B says", "facts", "demo 1")
    assert len({v.uid for v in votes}) == 2 and all(v.t > 0 for v in votes)
    assert store.tags() == ["facts"] and [v.prompt for v in store.votes("facts")] == ["prompt two"]
    assert store.leaderboard(n_resamples=50).ratings[0].variant == "b"
    with pytest.raises(ValueError):
        store.record("a", "b", "maybe", "p")
    with pytest.raises(ValueError):
        store.record("a", "a", "a", "p")


def test_a_store_from_before_answers_and_tags_is_carried_forward(tmp_path):
    path = tmp_path / "votes.sqlite"
    with sqlite3.connect(path) as db:  # the table as the first version of the app wrote it
        db.execute(
            "CREATE TABLE votes (id INTEGER PRIMARY KEY AUTOINCREMENT, t REAL NOT NULL, variant_a TEXT NOT NULL, "
            "variant_b TEXT NOT NULL, outcome TEXT NOT NULL, prompt TEXT NOT NULL)"
        )
        db.execute("INSERT INTO votes (t, variant_a, variant_b, outcome, prompt) VALUES (1.0, 'x', 'y', 'a', 'hi')")
    store = VoteStore(path)
    (old,) = store.votes()
    assert (old.variant_a, old.outcome, old.prompt, old.answer_a, old.tag) == ("x", "a", "hi", "", "")
    assert len(old.uid) == 32
    store.record("x", "y", "b", "again", answer_a="1", answer_b="2")
    assert len(VoteStore(path).votes()) == 2


def test_votes_export_and_import_as_json_and_csv_and_merge_without_doubles(tmp_path):
    first = VoteStore(tmp_path / "one.sqlite")
    first.record("a", "b", "a", "Why, | \"quoted\"\nline?", answer_a="**bold**\n- item", answer_b="plain, text", tag="why")
    first.record("b", "c", "both_bad", "Hi", session="demo 1")
    (tmp_path / "votes.json").write_text(first.export_json())
    (tmp_path / "votes.csv").write_text(first.export_csv())
    for name in ("votes.json", "votes.csv"):
        other = VoteStore(tmp_path / f"{name}.sqlite")
        other.record("c", "d", "tie", "its own vote")
        assert other.import_file(tmp_path / name) == (2, 0)
        assert other.import_file(tmp_path / name) == (0, 2)  # the same file again adds nothing
        merged = other.votes()
        assert len(merged) == 3
        assert {(v.uid, v.prompt, v.answer_a, v.answer_b, v.tag, v.session, v.outcome) for v in merged[1:]} == {
            (v.uid, v.prompt, v.answer_a, v.answer_b, v.tag, v.session, v.outcome) for v in first.votes()
        }
        assert [v.t for v in merged[1:]] == pytest.approx([v.t for v in first.votes()])


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("v.json", '{"votes": [{"variant_a": "a", "variant_b": "b", "outcome": "a"}', "not valid JSON"),
        ("v.json", '{"votes": [{"variant_a": "a", "variant_b": "b", "outcome": "a"}, {"variant_a": "a", '
                   '"variant_b": "b", "outcome": "maybe"}]}', "vote 2: outcome"),
        ("v.json", '{"votes": [{"variant_a": "a", "variant_b": "a", "outcome": "a"}]}', "two different variants"),
        ("v.json", '{"votes": []}', "holds no votes"),
        ("v.json", '{"rows": 3}', 'expected {"votes": [...]}'),
        ("v.csv", "variant_a,outcome\na,a\n", "no variant_b column"),
        ("v.csv", "variant_a,variant_b,outcome,t\na,b,a,yesterday\n", "row 1: t"),
    ],
)
def test_a_bad_vote_file_is_named_and_nothing_is_imported(tmp_path, name, content, message):
    store = VoteStore(tmp_path / "votes.sqlite")
    (tmp_path / name).write_text(content)
    with pytest.raises(PlaygroundError, match=re.escape(message)):
        store.import_file(tmp_path / name)
    assert store.votes() == []


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
