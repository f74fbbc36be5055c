"""Format checks written for this project: tool-call answers (valid JSON, right function, right
arguments) and instructions a program can verify ("exactly 3 sentences", "no commas", ...).

The cases are data (assets/evals/format_checks.jsonl or a user's file of the same form); each
answer is generated greedily and every check is a small pure function of the text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from playground.config import REPO_ROOT
from playground.engine import Engine
from playground.errors import GenerationError, PlaygroundError
from playground.jsonl import read_jsonl
from playground.workers import Finished

CASES = REPO_ROOT / "assets" / "evals" / "format_checks.jsonl"
TOOL_SYSTEM = (
    "You can call one of these functions:\n{tools}\n\nReply with only one JSON object of the form "
    '{{"name": <function name>, "arguments": {{<argument>: <value>}}}} and no other text.'
)


def strip_fences(text: str) -> str:
    """The answer without a surrounding Markdown code fence (```json ... ```), which many chat
    models add; anything else around the JSON still makes it invalid."""
    match = re.fullmatch(r"\s*```[a-zA-Z]*\s*\n?(.*?)\n?```\s*", text, flags=re.S)
    return (match.group(1) if match else text).strip()


def _same(expected: Any, got: Any) -> bool:
    if isinstance(expected, str):
        return isinstance(got, str) and got.strip().lower() == expected.strip().lower()
    if isinstance(expected, bool) or expected is None:
        return got == expected
    if isinstance(expected, int | float):
        return isinstance(got, int | float) and not isinstance(got, bool) and float(got) == float(expected)
    return got == expected


def check_tool_call(answer: str, expect: dict[str, Any]) -> dict[str, bool]:
    """valid_json: one JSON object; name: the expected function; arguments: exactly the
    expected arguments (strings compared without case, numbers by value)."""
    try:
        data = json.loads(strip_fences(answer))
    except json.JSONDecodeError:
        return {"valid_json": False, "name": False, "arguments": False}
    if not isinstance(data, dict):
        return {"valid_json": False, "name": False, "arguments": False}
    name_ok = data.get("name") == expect["name"]
    arguments = data.get("arguments")
    args_ok = (
        name_ok
        and isinstance(arguments, dict)
        and set(arguments) == set(expect["arguments"])
        and all(_same(value, arguments[key]) for key, value in expect["arguments"].items())
    )
    return {"valid_json": True, "name": name_ok, "arguments": args_ok}


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if re.search(r"\w", s)]


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9']+", text)


def _json_object(text: str, keys: list[str]) -> bool:
    try:
        data = json.loads(strip_fences(text))
    except json.JSONDecodeError:
        return False
    return isinstance(data, dict) and all(k in data for k in keys)


CHECKS: dict[str, Callable[[str, dict[str, Any]], bool]] = {
    "sentence_count": lambda t, c: len(_sentences(t)) == c["n"],
    "no_commas": lambda t, c: "," not in t,
    "lowercase": lambda t, c: t.strip() != "" and t == t.lower(),
    "uppercase": lambda t, c: any(ch.isalpha() for ch in t) and t == t.upper(),
    "max_words": lambda t, c: 0 < len(_words(t)) <= c["n"],
    "min_words": lambda t, c: len(_words(t)) >= c["n"],
    "bullet_count": lambda t, c: (
        len([ln for ln in t.strip().splitlines() if ln.strip()]) == c["n"]
        and all(ln.strip().startswith(("- ", "* ")) for ln in t.strip().splitlines() if ln.strip())
    ),
    "starts_with": lambda t, c: t.strip().lower().startswith(c["text"].lower()),
    "ends_with": lambda t, c: t.strip().lower().endswith(c["text"].lower()),
    "includes": lambda t, c: all(re.search(rf"\b{re.escape(w)}\b", t, flags=re.I) for w in c["words"]),
    "excludes": lambda t, c: not any(re.search(rf"\b{re.escape(w)}\b", t, flags=re.I) for w in c["words"]),
    "json_object": lambda t, c: _json_object(t, c.get("keys", [])),
}


def read_cases(path: Path = CASES) -> list[dict[str, Any]]:
    cases = []
    for number, case in read_jsonl(path):
        kind = case.get("kind") if isinstance(case, dict) else None
        if kind == "tool_call":
            ok = isinstance(case.get("tools"), list) and isinstance(case.get("expect"), dict) and "request" in case
        elif kind == "instruction":
            checks = case.get("checks")
            ok = "prompt" in case and isinstance(checks, list) and all(c.get("type") in CHECKS for c in checks)
        else:
            ok = False
        if not ok:
            raise PlaygroundError(
                f"{path}, line {number}: expected a tool_call case (tools, request, expect) or an instruction "
                f"case (prompt, checks of types {', '.join(CHECKS)})"
            )
        cases.append(case)
    if not cases:
        raise PlaygroundError(f"{path} holds no cases")
    return cases


def run_format_checks(
    engine: Engine,
    variant_id: str,
    cases: list[dict[str, Any]],
    max_new_tokens: int = 160,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    config = engine.catalogue.get(variant_id)
    chat = config.default_mode == "chat"
    rows = []
    for done, case in enumerate(cases, start=1):
        if case["kind"] == "tool_call":
            system = TOOL_SYSTEM.format(tools=json.dumps(case["tools"], indent=1))
            messages = [{"role": "system", "content": system}, {"role": "user", "content": case["request"]}]
        else:
            messages = [{"role": "user", "content": case["prompt"]}]
        if chat:
            request = engine.request(
                variant_id, messages=messages, mode="chat", temperature=0.0, max_new_tokens=max_new_tokens
            )
        else:  # a base model is asked in completion style
            text = "\n\n".join(m["content"] for m in messages) + "\n\nAnswer:"
            request = engine.request(
                variant_id, prompt=text, mode="completion", temperature=0.0, max_new_tokens=max_new_tokens
            )
        try:
            answer = [e for e in engine.generate(variant_id, request) if isinstance(e, Finished)][0].text
        except GenerationError as err:  # e.g. a prompt longer than the context: this case only
            rows.append(
                {
                    "id": case.get("id", str(done)),
                    "kind": case["kind"],
                    "checks": {},
                    "passed": False,
                    "error": str(err),
                    "answer": "",
                }
            )
            if progress:
                progress(done, len(cases))
            continue
        if case["kind"] == "tool_call":
            results = check_tool_call(answer, case["expect"])
        else:
            results = {c["type"]: CHECKS[c["type"]](answer, c) for c in case["checks"]}
        rows.append(
            {
                "id": case.get("id", str(done)),
                "kind": case["kind"],
                "checks": results,
                "passed": all(results.values()),
                "answer": answer[:300],
            }
        )
        if progress:
            progress(done, len(cases))
    return {"rows": rows, **summarize(rows)}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def rate(values: list[bool]) -> float | None:
        return sum(values) / len(values) if values else None

    tools = [r["checks"] for r in rows if r["kind"] == "tool_call" and "error" not in r]
    instructions = [r for r in rows if r["kind"] == "instruction" and "error" not in r]
    return {
        "tool_json_valid": rate([c["valid_json"] for c in tools]),
        "tool_name": rate([c["name"] for c in tools]),
        "tool_arguments": rate([c["arguments"] for c in tools]),
        "instruction_pass": rate([r["passed"] for r in instructions]),
        "n_tool_calls": len(tools),
        "n_instructions": len(instructions),
        "n_errors": sum("error" in r for r in rows),
    }
