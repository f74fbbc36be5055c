"""`python -m playground ...`: the engine from the command line, for scripts and benchmarks.

Every failure the user can act on ends as one line on stderr and a non-zero exit; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from playground.errors import PlaygroundError

EXIT_USER_ERROR = 2
METRIC_FIELDS = (
    "prompt_tokens",
    "completion_tokens",
    "ttft_s",
    "prefill_tok_s",
    "decode_tok_s",
    "total_s",
    "peak_mem_bytes",
    "backend",
    "device",
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m playground", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config-dir", action="append", type=Path, help="model config folder (repeatable; default model_configs/)"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    models = commands.add_parser("models", help="list every variant and whether its weights are here")
    models.add_argument("--json", action="store_true")

    gen = commands.add_parser("generate", help="stream one reply and its metrics")
    gen.add_argument("--model", required=True, help="a variant id, or a path to a GGUF, HF folder or state_dict")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--mode", choices=["chat", "completion"], help="default: the variant's own")
    gen.add_argument("--system", help="a system message (chat mode)")
    gen.add_argument("--max-tokens", type=int, dest="max_new_tokens")
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--repetition-penalty", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--no-memory-check", action="store_true", help="load even if the estimate says it won't fit")
    gen.add_argument("--json", action="store_true", help="print one JSON object: text and metrics")
    return parser


def _models(engine: Any, as_json: bool) -> None:
    rows = []
    for status in engine.statuses():
        config = status.config
        rows.append(
            {
                "id": config.id,
                "display_name": config.display_name,
                "backend": config.backend,
                "role": config.role,
                "weights_present": status.weights_present,
                "location": status.weights_location,
            }
        )
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    width = max(len(r["id"]) for r in rows) if rows else 2
    for r in rows:
        here = "present" if r["weights_present"] else "absent "
        print(f"{r['id']:<{width}}  {r['backend']:<12} {r['role']:<8} {here}  {r['location']}")


def _generate(engine: Any, args: argparse.Namespace) -> None:
    from playground.workers import Finished, TextDelta

    config = engine.resolve(args.model)
    overrides = {
        name: getattr(args, name)
        for name in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")
    }
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.prompt})
    request = engine.request(config.id, prompt=args.prompt, messages=messages, mode=args.mode, **overrides)
    engine.load(config.id, check_memory=not args.no_memory_check)
    for event in engine.generate(config.id, request):
        if isinstance(event, TextDelta) and not args.json:
            sys.stdout.write(event.text)
            sys.stdout.flush()
        elif isinstance(event, Finished):
            metrics = event.metrics.to_dict()
            if args.json:
                out = {"model": config.id, "text": event.text}
                out.update(metrics)
                print(json.dumps(out))
            else:
                print()
                shown = ", ".join(f"{k}={_fmt(metrics[k])}" for k in METRIC_FIELDS)
                print(f"[{shown}, finish={metrics['finish_reason']}]", file=sys.stderr)
                for warning in metrics["warnings"]:
                    print(f"warning: {warning}", file=sys.stderr)


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    engine = None
    try:
        from playground.engine import Engine

        engine = Engine(args.config_dir)
        if args.command == "models":
            _models(engine, args.json)
        elif args.command == "generate":
            _generate(engine, args)
        return 0
    except PlaygroundError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if engine is not None:
            engine.shutdown()
