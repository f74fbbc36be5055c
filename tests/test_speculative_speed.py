"""benchmarks/gpu/speculative_speed.py end to end on a CPU: a tiny model loaded through the
transformers backend, plain decoding, then the oracle's drafts (the GPU run differs only in its
shapes and in compiling and capturing)."""

from __future__ import annotations

import json

from benchmarks.gpu.speculative_speed import OracleDrafter, TraceDrafter, main


def test_the_oracle_spoils_drafts_at_its_rate_and_never_proposes_past_the_reference():
    reference = list(range(10, 20))
    always = OracleDrafter(prompt_len=3, reference=reference, p=1.0, vocab=600)
    assert always.propose([1, 2, 3, 10, 11], 4) == [12, 13, 14, 15]
    assert always.propose([1, 2, 3, *reference[:8]], 4) == [18, 19]
    never = OracleDrafter(prompt_len=3, reference=reference, p=0.0, vocab=600)
    assert never.propose([1, 2, 3, 10], 3) == [12, 13, 14]


def test_a_tiny_run_keeps_every_right_draft_and_gives_plain_decoding_s_reply(tmp_path):
    out = tmp_path / "speculative.json"
    assert main(["--tiny", "--out", str(out), "--tokens", "16", "--runs", "1", "--seeds", "1",
                 "--drafted", "4", "--p", "0.0,1.0", "--paths", "fast,nf4,fast-own-passes"]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    assert set(report["paths"]) == {"fast", "fast-own-passes"}  # NF4 needs a GPU
    for path in ("fast", "fast-own-passes"):
        fast = report["paths"][path]
        assert fast["plain_tok_s"] > 0 and "static KV cache" in fast["decode"]
        by_p = {row["p_draft_right"]: row for row in fast["rows"]}
        assert all(row["equal_to_plain"] for row in fast["rows"]), fast["rows"]
        assert by_p[1.0]["kept_rate"] == 1.0 and by_p[1.0]["tokens_per_pass"] > 2
    assert by_p[0.0]["kept_rate"] == 0.0
    assert report["draft"]["step_ms"] > 0


def test_a_trace_replays_what_prompt_lookup_proposed_and_got_right_at_each_position():
    from benchmarks.lookup_trace import kept_without_pacer, position_outcomes
    from playground.backends.fast_decode import PromptLookupDrafter

    prompt = [5, 6, 7, 8, 9, 1, 2]
    reply = [5, 6, 7, 8, 3, 4]  # copies the prompt's start, then leaves it
    outcomes = position_outcomes(PromptLookupDrafter(2, 4), prompt, reply, 4)
    assert len(outcomes) == len(reply)
    # after "5 6" the drafter proposes what followed "5 6" in the prompt: 7 8 9 1, two of them right
    assert outcomes[2] == [4, 2]
    assert all(right <= proposed for proposed, right in outcomes)
    kept, per_pass = kept_without_pacer([[4, 4], [0, 0], [0, 0], [0, 0], [0, 0], [2, 0]])
    assert (kept, per_pass) == (4 / 6, 3.0)  # passes at 0 (5 tokens) and 5 (1 token)

    reference = list(range(100, 110))
    replay = TraceDrafter(prompt_len=2, reference=reference, outcomes=[[3, 1], [0, 0], [4, 4]], vocab=600)
    assert replay.propose([1, 2], 4) == [100, 102, 103]  # one right, then spoiled
    assert replay.propose([1, 2, 100], 4) == []
    assert replay.propose([1, 2, 100, 101], 2) == [102, 103]  # a shorter pass: its count
    assert replay.propose([1, 2, *reference], 4) == []  # past the trace


def test_a_tiny_run_replays_a_trace_and_gives_plain_decoding_s_reply(tmp_path):
    trace = tmp_path / "trace.json"
    every_other = [[4, 4] if t % 2 == 0 else [2, 0] for t in range(16)]
    trace.write_text(json.dumps({"traces": [
        {"kind": "code", "prompt_tokens": 40, "reply_tokens": 16, "outcomes": {"4": every_other}},
        {"kind": "edit", "prompt_tokens": 30, "reply_tokens": 12, "outcomes": {"4": [[0, 0]] * 12}},
    ]}))  # fmt: skip
    out = tmp_path / "speculative.json"
    assert main(["--tiny", "--out", str(out), "--tokens", "16", "--runs", "1", "--seeds", "1", "--drafted", "4",
                 "--p", "", "--draft", "", "--paths", "fast", "--trace", str(trace)]) == 0  # fmt: skip
    fast = json.loads(out.read_text())["paths"]["fast"]
    assert "rows" not in fast  # no chances asked for: the traces alone
    code, edit = fast["trace_rows"]
    assert (code["prompt_tokens"], code["reply_tokens"], edit["reply_tokens"]) == (40, 16, 12)
    assert code["equal_to_plain"] and edit["equal_to_plain"]
    assert code["kept_rate"] > 0.5 and code["tokens_per_pass"] > 2
    assert edit["kept_rate"] is None  # nothing was drafted: every token a plain step
    assert set(fast["trace_summary"]["4"]) == {"median_speedup", "min_speedup", "max_speedup", "pooled_speedup"}
