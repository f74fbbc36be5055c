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

    route = commands.add_parser("route", help="ask a router variant where a request should go")
    route.add_argument("--router", required=True, help="a variant id with a router section")
    route.add_argument("--prompt", required=True)
    route.add_argument("--threshold", type=float, default=0.5, help="escalate when P(escalate) is above it")
    route.add_argument("--json", action="store_true")

    ev = commands.add_parser("eval", help="evaluate a variant (kinds: router)")
    ev.add_argument("--kind", required=True, choices=["router"])
    ev.add_argument("--model", required=True)
    ev.add_argument("--data", default="ood", help="ood, in_distribution, or a JSONL file of {prompt, route}")
    ev.add_argument("--threshold", type=float, default=0.5)
    ev.add_argument("--limit", type=int, help="only the first N rows")
    ev.add_argument("--json", action="store_true")

    jobs = commands.add_parser("jobs", help="background jobs: submit, list, show, cancel, resume")
    job_commands = jobs.add_subparsers(dest="jobs_command", required=True)
    submit = job_commands.add_parser("submit", help="start a job (queued when others are running)")
    submit.add_argument("kind", help="e.g. eval-router")
    submit.add_argument("--model", required=True)
    submit.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a job option (repeatable)")
    submit.add_argument("--wait", action="store_true", help="wait for the job to end")
    submit.add_argument("--json", action="store_true")
    listing = job_commands.add_parser("list")
    listing.add_argument("--json", action="store_true")
    show = job_commands.add_parser("show")
    show.add_argument("id")
    show.add_argument("--json", action="store_true")
    cancel = job_commands.add_parser("cancel")
    cancel.add_argument("id")
    resume = job_commands.add_parser("resume", help="go on with an interrupted, failed or cancelled fine-tune")
    resume.add_argument("id")
    resume.add_argument("--wait", action="store_true")
    commands.add_parser("settings", help="check the settings and print them as JSON (secrets masked)")
    return parser


def _settings() -> None:
    from playground.settings import get_settings

    settings = get_settings()
    host, warning = settings.bind_host()
    shown = settings.model_dump(mode="json") | {"listening_on": host, "auth_enabled": settings.auth_enabled}
    print(json.dumps(shown, indent=1))
    if warning:
        print(warning, file=sys.stderr)


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


def _route(engine: Any, args: argparse.Namespace) -> None:
    from playground.router import Router

    decision = Router(engine, args.router).decide(args.prompt, args.threshold)
    fields = ("route", "reason", "p_escalate", "valid_json", "latency_s")
    if args.json:
        print(json.dumps(decision.to_dict()))
        return
    print(", ".join(f"{k}={_fmt(getattr(decision, k))}" for k in fields))
    if not decision.valid_json:
        print(f"the model's own answer is not valid route JSON: {decision.raw_output!r}", file=sys.stderr)


def _eval(engine: Any, args: argparse.Namespace) -> None:
    from playground.router import DATASETS, evaluate_router, read_router_data

    rows = read_router_data(DATASETS.get(args.data, Path(args.data)))
    if args.limit:
        rows = rows[: args.limit]

    def progress(done: int, total: int) -> None:
        if not args.json:
            print(f"\r{done}/{total}", end="", file=sys.stderr, flush=True)

    result = evaluate_router(engine, args.model, rows, args.threshold, progress)
    if args.json:
        print(json.dumps(result.to_dict()))
        return
    print(file=sys.stderr)
    print(
        f"{result.n} rows, threshold {result.threshold}: accuracy {result.accuracy:.3f}, escalation recall "
        f"{_fmt(result.escalation_recall)}, precision {_fmt(result.escalation_precision)}, JSON valid "
        f"{result.json_validity:.3f}, mean latency {result.mean_latency_s:.3f} s"
    )
    print(f"confusion (gold -> decided): {result.confusion}")


def _job_dict(job: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(job) | {"elapsed_s": job.elapsed_s(), "eta_s": job.eta_s()}


def _jobs(args: argparse.Namespace) -> None:
    from playground.jobs.manager import JobManager
    from playground.jobs.store import JobStore
    from playground.paths import jobs_dir

    home = jobs_dir()
    store = JobStore(home / "jobs.sqlite")
    if args.jobs_command == "list":
        jobs = store.list()
        if args.json:
            print(json.dumps([_job_dict(j) for j in jobs]))
        for job in [] if args.json else jobs:
            print(f"{job.id}  {job.kind:<14} {job.state:<11} {job.step}/{job.total}  {job.error or ''}")
        return
    if args.jobs_command == "show":
        try:
            job = store.get(args.id)
        except KeyError:
            raise PlaygroundError(f"no job {args.id!r}") from None
        events = [e for _, _, e in store.events(job.id)]
        if args.json:
            print(json.dumps(_job_dict(job) | {"events": events}))
            return
        print(f"{job.id} {job.kind} {job.state} {job.step}/{job.total} options={job.options}")
        for event in events[-20:]:
            print(f"  {event}")
        if job.error:
            print(f"error: {job.error}")
        if job.result:
            print(f"result: {json.dumps(job.result)[:2000]}")
        return
    # A manager here adopts jobs still running (the app's included) and leaves them running.
    manager = JobManager(store, home / "logs")
    if args.jobs_command in ("cancel", "resume"):
        try:
            job = manager.cancel(args.id) if args.jobs_command == "cancel" else manager.resume(args.id)
        except KeyError:
            raise PlaygroundError(f"no job {args.id!r}") from None
        if args.jobs_command == "resume" and args.wait:
            job = manager.wait(job.id)
        print(job.state + (f": {job.error}" if job.error else ""))
        return
    options: dict[str, Any] = {"model": args.model}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            raise PlaygroundError(f"--option {item!r}: expected KEY=VALUE")
        options[key] = json.loads(value) if value[:1] in "0123456789[{-" or value in ("true", "false") else value
    job = manager.submit(args.kind, options)
    if args.wait:
        job = manager.wait(job.id)
    if args.json:
        print(json.dumps(_job_dict(job)))
    else:
        print(f"{job.id} {job.state}" + (f": {job.error}" if job.error else ""))
    if args.wait and job.state != "succeeded":
        raise PlaygroundError(f"job {job.id} {job.state}: {job.error or ''}")


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    engine = None
    try:
        if args.command == "settings":  # no engine: this is also the container's start-up check
            _settings()
            return 0
        from playground.engine import Engine

        engine = Engine(args.config_dir)
        if args.command == "models":
            _models(engine, args.json)
        elif args.command == "generate":
            _generate(engine, args)
        elif args.command == "route":
            _route(engine, args)
        elif args.command == "eval":
            _eval(engine, args)
        elif args.command == "jobs":
            _jobs(args)
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
