"""benchmarks/gpu/speculative_speed.py end to end on a CPU: a tiny model loaded through the
transformers backend, plain decoding, then the oracle's drafts (the GPU run differs only in its
shapes and in compiling and capturing)."""

from __future__ import annotations

import json

from benchmarks.gpu.speculative_speed import OracleDrafter, main


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
