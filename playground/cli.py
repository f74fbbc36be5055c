"""`python -m playground ...`: the engine from the command line, for scripts and benchmarks.

Every failure the user can act on ends as one line on stderr and a non-zero exit; no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
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
        "--config-dir",
        action="append",
        type=Path,
        help="model config folder (repeatable; default model_configs/); the same as PLAYGROUND_CONFIG_DIRS",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="let libraries print their own progress bars and reports on stderr"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    models = commands.add_parser("models", help="list every variant and whether its weights are here")
    models.add_argument("--json", action="store_true")

    gen = commands.add_parser("generate", help="stream one reply and its metrics")
    gen.add_argument("--model", required=True, help="a variant id, or a path to a GGUF, HF folder or state_dict")
    _prompt_arguments(gen)
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
    _prompt_arguments(route)
    route.add_argument("--threshold", type=float, default=0.5, help="escalate when P(escalate) is above it")
    route.add_argument(
        "--no-reason", action="store_true", help="decide the route only; the model writes no reason (faster)"
    )
    route.add_argument("--json", action="store_true")

    ev = commands.add_parser("eval", help="evaluate a variant (kinds: router)")
    ev.add_argument("--kind", required=True, choices=["router"])
    ev.add_argument("--model", required=True)
    ev.add_argument("--data", default="ood", help="ood, ood2, in_distribution, or a JSONL file of {prompt, route}")
    ev.add_argument("--threshold", type=float, default=0.5)
    ev.add_argument("--limit", type=int, help="only the first N rows")
    ev.add_argument(
        "--target-escalation-rate",
        type=float,
        help="pick the threshold that escalates this share of --calibration-data, then evaluate at it",
    )
    ev.add_argument("--calibration-data", default="in_distribution", help="where the threshold is tuned")
    ev.add_argument(
        "--no-reason", action="store_true", help="routes only: the router writes no answers (no JSON validity; faster)"
    )
    ev.add_argument(
        "--quality-data",
        help="a JSONL file of {prompt, weak_quality, strong_quality}: adds the cost-quality curve, cpt50, cpt80, apgr",
    )
    ev.add_argument("--partner", help="the strong variant whose cost the curve uses (default: the partner variant)")
    ev.add_argument("--json", action="store_true")

    rq = commands.add_parser(
        "router-quality", help="write a quality file for the cost-quality curve from a finished matrix job's checks"
    )
    rq.add_argument("--matrix", required=True, help="the id of a finished matrix job")
    rq.add_argument("--weak", required=True, help="its column with the router's own answers")
    rq.add_argument("--strong", required=True, help="its column with the partner's answers")
    rq.add_argument("--out", required=True, type=Path, help="the JSONL file to write")

    cal = commands.add_parser(
        "calibrate-router", help="fit a router's P(escalate) calibration on in-distribution data and store it"
    )
    cal.add_argument("--model", required=True)
    cal.add_argument("--data", default="in_distribution", help="in_distribution, or a JSONL file of {prompt, route}")
    cal.add_argument("--method", choices=["platt", "isotonic"], default="platt")
    cal.add_argument("--limit", type=int, help="only the first N rows")
    cal.add_argument("--remove", action="store_true", help="delete the stored calibration instead")
    cal.add_argument("--json", action="store_true")

    jobs = commands.add_parser("jobs", help="background jobs: submit, list, show, cancel, resume")
    job_commands = jobs.add_subparsers(dest="jobs_command", required=True)
    submit = job_commands.add_parser("submit", help="start a job (queued when others are running)")
    submit.add_argument("kind", help="e.g. eval-router")
    submit.add_argument("--model", required=True)
    submit.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a job option (repeatable)")
    submit.add_argument("--preset", help="a named option set of the kind (lora-router: card, quick); --option adds to it")
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
    dif = commands.add_parser(
        "diff", help="where variants depart from a reference, token by token (teacher-forced KL, top-1 agreement)"
    )
    dif.add_argument("--reference", required=True, help="the variant whose answer the others read")
    dif.add_argument("--variants", required=True, help="comma-separated variant ids to compare with it")
    _prompt_arguments(dif)
    dif.add_argument("--mode", choices=["chat", "completion"], help="default: the reference's own")
    dif.add_argument("--max-tokens", type=int, default=64, dest="max_new_tokens", help="the answer's length (64)")
    dif.add_argument("--temperature", type=float, default=0.0, help="the reference's sampling (0: greedy)")
    dif.add_argument("--seed", type=int)
    dif.add_argument("--top-k", type=int, default=5, help="alternatives kept per token (5)")
    dif.add_argument(
        "--scored-after",
        choices=["own", "reference"],
        default="own",
        help="each variant reads the answer after its own prompt ids (default) or the reference's",
    )
    dif.add_argument("--no-memory-check", action="store_true")
    dif.add_argument("--json", action="store_true", help="one JSON object, with every token's row")

    rep = commands.add_parser(
        "report", help="the quantization report: memory, speed, perplexity, KL and agreement against a reference"
    )
    rep.add_argument("--reference", required=True)
    rep.add_argument("--variants", required=True, help="comma-separated variant ids")
    rep.add_argument("--prompts", default="mixed-50", help="mixed-50 (bundled) or a JSONL prompt file")
    rep.add_argument("--limit", type=int, help="only the first N prompts")
    rep.add_argument("--max-tokens", type=int, default=48, dest="max_new_tokens", help="tokens per answer (48)")
    rep.add_argument("--corpus", default="python-docs-heldout", help="held-out text for perplexity")
    rep.add_argument("--corpus-chars", type=int, default=4000, help="how much of it (4000 characters)")
    rep.add_argument("--json", action="store_true")

    commands.add_parser("settings", help="check the settings and print them as JSON (secrets masked)")
    return parser


def _prompt_arguments(command: argparse.ArgumentParser) -> None:
    given = command.add_mutually_exclusive_group(required=True)
    given.add_argument("--prompt", help="the prompt text")
    given.add_argument(
        "--prompt-file", type=Path, metavar="PATH", help="read the prompt from a UTF-8 file; - reads standard input"
    )


def _prompt_of(args: argparse.Namespace) -> str:
    """The prompt from --prompt or --prompt-file (any length: arguments stop near 128 KiB)."""
    if args.prompt is not None:
        return args.prompt
    source = args.prompt_file
    try:
        data = sys.stdin.buffer.read() if str(source) == "-" else source.read_bytes()
    except OSError as err:
        raise PlaygroundError(f"--prompt-file {source}: cannot be read ({err.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        where = "standard input" if str(source) == "-" else str(source)
        raise PlaygroundError(
            f"{where} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})"
        ) from None


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
                "state": status.state,
            }
        )
    # A config file that does not validate is listed with its error; the others stay usable.
    broken = [
        {"id": b.path.stem, "state": "broken", "file": str(b.path), "error": b.error} for b in engine.catalogue.broken
    ]
    if as_json:
        print(json.dumps([*rows, *broken], indent=2))
        return
    width = max(len(r["id"]) for r in rows) if rows else 2
    for r in rows:
        here = "present" if r["weights_present"] else "absent "
        print(f"{r['id']:<{width}}  {r['backend']:<12} {r['role']:<8} {here}  {r['location']}")
    for b in broken:
        print(f"broken: {b['error']}")


def _generate(engine: Any, args: argparse.Namespace) -> None:
    from playground.workers import Finished, TextDelta

    config = engine.catalogue.resolve(args.model)
    overrides = {
        name: getattr(args, name)
        for name in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")
    }
    messages = [{"role": "system", "content": args.system}] if args.system else []
    prompt = _prompt_of(args)
    messages.append({"role": "user", "content": prompt})
    request = engine.request(config.id, prompt=prompt, messages=messages, mode=args.mode, **overrides)
    said = ""
    for loading in engine.loading(config.id, check_memory=not args.no_memory_check):
        if loading.download_bytes is not None and sys.stderr.isatty():  # a download: its bytes, on one line
            total = f" of {loading.download_total / 1e6:.1f}" if loading.download_total else ""
            said = f"\rdownloading {loading.download_bytes / 1e6:.1f}{total} MB"
            sys.stderr.write(said)
    if said:
        sys.stderr.write("\n")
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
                if event.metrics.speculation:
                    from playground.ui.formatting import speculation_line

                    print(speculation_line(event.metrics), file=sys.stderr)
                for warning in metrics["warnings"]:
                    print(f"warning: {warning}", file=sys.stderr)


def _route(engine: Any, args: argparse.Namespace) -> None:
    from playground.router import Router

    decision = Router(engine, args.router).decide(_prompt_of(args), args.threshold, explain=not args.no_reason)
    fields = ("route", "p_escalate", "decision_latency_s") + (() if args.no_reason else ("reason", "valid_json", "latency_s"))
    if args.json:
        print(json.dumps(decision.to_dict()))
        return
    print(", ".join(f"{k}={_fmt(getattr(decision, k))}" for k in fields))
    if not decision.valid_json and not args.no_reason:
        print(f"the model's own answer is not valid route JSON: {decision.raw_output!r}", file=sys.stderr)


def _eval(engine: Any, args: argparse.Namespace) -> None:
    from playground.router import evaluate_at_target_rate, evaluate_router_file

    def progress(done: int, total: int) -> None:
        if not args.json:
            print(f"\r{done}/{total}", end="", file=sys.stderr, flush=True)

    rate = args.target_escalation_rate
    if rate is not None and not 0.0 <= rate <= 1.0:
        raise PlaygroundError(f"--target-escalation-rate is a share in 0..1; got {rate}")
    if rate is None:
        result = evaluate_router_file(
            engine, args.model, args.data, args.threshold, args.limit, progress, explain=not args.no_reason
        )
    else:
        result = evaluate_at_target_rate(
            engine, args.model, args.data, rate, args.calibration_data, args.limit, progress
        )
    summary = result.to_dict()
    if rate is not None:
        summary["calibrated_threshold"] = result.threshold
    curve = None
    if args.quality_data:
        from playground.router_curve import router_cost_quality

        curve = router_cost_quality(engine, args.model, args.quality_data, args.partner, args.limit)
        summary |= {"cpt50": curve.cpt50, "cpt80": curve.cpt80, "apgr": curve.apgr, "cost_quality": curve.to_dict()}
    if args.json:
        print(json.dumps(summary))
        return
    print(file=sys.stderr)
    tuned = (
        f" (tuned on {result.calibration_data} to escalate {rate:.0%}; escalated {result.escalation_rate:.0%} here)"
        if rate is not None
        else ""
    )
    print(
        f"{result.n} rows, threshold {result.threshold:.4f}{tuned}: accuracy {result.accuracy:.3f} (95% CI "
        f"{result.accuracy_ci95[0]:.3f}-{result.accuracy_ci95[1]:.3f}), escalation "
        f"recall {_fmt(result.escalation_recall)}, precision {_fmt(result.escalation_precision)}, JSON valid "
        f"{_fmt(result.json_validity)}"
    )
    print(
        f"AUROC {_fmt(result.auroc)}, ECE {_fmt(result.ece)}, Brier {_fmt(result.brier)}; route decided in p50 "
        f"{result.decision_latency_p50_s:.3f} s, p95 {result.decision_latency_p95_s:.3f} s; with the written reason "
        f"p50 {result.latency_p50_s:.3f} s, p95 {result.latency_p95_s:.3f} s"
    )
    print(f"confusion (gold -> decided): {result.confusion}")
    if curve is not None:
        print(
            f"cost-quality over {curve.n} requests: weak {curve.weak_quality:.3f}, strong {curve.strong_quality:.3f}; "
            f"APGR {_fmt(curve.apgr)} (oracle {_fmt(curve.oracle_apgr)}), CPT(50%) {_fmt(curve.cpt50)}, "
            f"CPT(80%) {_fmt(curve.cpt80)} of requests to the partner"
        )
        for note in curve.notes:
            print(f"note: {note}")


def _calibrate(engine: Any, args: argparse.Namespace) -> None:
    from playground.router import calibrate_router, router_spec
    from playground.router_calibration import calibration_path, remove_calibration

    config = engine.catalogue.resolve(args.model)
    router_spec(config)  # a variant with no router section is refused before anything runs
    if args.remove:
        removed = remove_calibration(config.id)
        said = {"variant": config.id, "removed": removed, "path": str(calibration_path(config.id))}
        print(json.dumps(said) if args.json else f"{config.id}: {'calibration removed' if removed else 'had none'}")
        return

    if args.limit is not None and args.limit < 2:
        raise PlaygroundError(f"--limit must be at least 2 (a calibration needs both routes); got {args.limit}")

    def progress(done: int, total: int) -> None:
        if not args.json:
            print(f"\r{done}/{total}", end="", file=sys.stderr, flush=True)

    calibration = calibrate_router(engine, config.id, args.data, args.method, args.limit, progress)
    if args.json:
        print(json.dumps(calibration.model_dump() | {"path": str(calibration_path(config.id))}))
        return
    print(file=sys.stderr)
    print(
        f"{config.id}: {calibration.describe()}; ECE on that data {_fmt(calibration.ece_before)} raw, "
        f"{_fmt(calibration.ece_after)} calibrated (in-sample); stored in {calibration_path(config.id)}"
    )


def _diff(engine: Any, args: argparse.Namespace) -> None:
    from playground.divergence import diff

    reference = engine.catalogue.resolve(args.reference).id
    variants = [engine.catalogue.resolve(v.strip()).id for v in args.variants.split(",") if v.strip()]
    if not variants:
        raise PlaygroundError("--variants names no variant")
    if not 0 < args.top_k <= 100:
        raise PlaygroundError(f"--top-k must be in 1..100; got {args.top_k}")
    for variant_id in [reference, *variants]:
        engine.load(variant_id, check_memory=not args.no_memory_check)
    request = engine.request(
        reference, prompt=_prompt_of(args), mode=args.mode, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, seed=args.seed,
    )
    result = diff(engine, reference, variants, request, top_k=args.top_k, scored_after=args.scored_after)
    if args.json:
        print(json.dumps(result.to_dict()))
        return
    print(f"reference {reference} ({result.answer_tokens} tokens, finish: {result.finish_reason}): {result.answer!r}")
    for outcome in result.variants:
        if outcome.refusal:
            print(f"{outcome.variant_id}: not compared: {outcome.refusal}")
            continue
        prompt = outcome.prompt
        said = "equal" if prompt.equal else (
            f"differ at token {prompt.first_difference} ({prompt.reference_tokens} against {prompt.variant_tokens} "
            f"tokens; reference {prompt.reference_around!r}, variant {prompt.variant_around!r})"
        )
        first = "never" if outcome.first_divergence is None else f"at answer token {outcome.first_divergence}"
        print(
            f"{outcome.variant_id}: mean KL {outcome.mean_kl:.4f} nats, top-1 agreement {outcome.top1_agreement:.3f}, "
            f"first divergence {first}; prompt token ids {said}; KL over {outcome.kl_over}"
        )


def _report(engine: Any, args: argparse.Namespace) -> None:
    from playground.matrix import read_prompts
    from playground.report import REPORT_HEADERS, quantization_report, report_rows

    reference = engine.catalogue.resolve(args.reference).id
    variants = [engine.catalogue.resolve(v.strip()).id for v in args.variants.split(",") if v.strip()]
    if not variants:
        raise PlaygroundError("--variants names no variant")
    if args.limit is not None and args.limit < 1:
        raise PlaygroundError(f"--limit must be at least 1; got {args.limit}")
    if not 1 <= args.max_new_tokens <= 4096:
        raise PlaygroundError(f"--max-tokens must be in 1..4096; got {args.max_new_tokens}")
    cases = read_prompts(args.prompts)[: args.limit]

    def progress(message: str, done: int, total: int) -> None:
        if not args.json:
            print(f"\r{done}/{total} {message[:64]:<64}", end="", file=sys.stderr, flush=True)

    report = quantization_report(
        engine, reference, variants, cases, max_new_tokens=args.max_new_tokens, corpus=args.corpus,
        corpus_chars=args.corpus_chars, progress=progress,
    ).to_dict()
    if args.json:
        print(json.dumps(report))
        return
    print(file=sys.stderr)
    rows = [REPORT_HEADERS, *report_rows(report)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(REPORT_HEADERS))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    print(f"Pareto front, KL against decode speed: {', '.join(report['pareto_speed']) or '–'}")
    print(f"Pareto front, KL against peak memory: {', '.join(report['pareto_memory']) or '–'}")
    for variant in report["variants"]:
        for note in variant["notes"]:
            print(f"note: {variant['variant']}: {note}", file=sys.stderr)


def _job_dict(job: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(job) | {"elapsed_s": job.elapsed_s(), "eta_s": job.eta_s()}


def _router_quality(args: argparse.Namespace) -> None:
    from playground.jobs.store import JobStore
    from playground.paths import jobs_dir
    from playground.router_curve import quality_rows_from_matrix, write_quality_data

    try:
        job = JobStore(jobs_dir() / "jobs.sqlite").get(args.matrix)
    except KeyError:
        raise PlaygroundError(f"no job {args.matrix!r}") from None
    if job.kind != "matrix" or job.state != "succeeded" or not job.result:
        raise PlaygroundError(f"job {job.id} is a {job.kind} job, {job.state}: a finished matrix job is needed")
    rows = quality_rows_from_matrix(job.result, args.weak, args.strong)
    write_quality_data(rows, args.out)
    priced = sum(1 for r in rows if r.weak_tokens)
    print(f"{len(rows)} prompts with checks written to {args.out} ({priced} with token counts for the money axis)")


def _jobs(args: argparse.Namespace) -> None:
    from playground.jobs.kinds import KINDS
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
    from playground.jobs.scheduler import ensure_scheduler

    # This manager only records and controls: the scheduler process (or the app) starts jobs
    # and watches them, so they run and end after this command has returned.
    manager = JobManager(store, home / "logs")
    if args.jobs_command in ("cancel", "resume"):
        try:
            job = manager.cancel(args.id) if args.jobs_command == "cancel" else manager.resume(args.id, start=False)
        except KeyError:
            raise PlaygroundError(f"no job {args.id!r}") from None
        if args.jobs_command == "resume":
            ensure_scheduler(store.path, home / "logs")
            if args.wait:
                job = manager.wait(job.id)
        print(job.state + (f": {job.error}" if job.error else ""))
        return
    options: dict[str, Any] = {"model": args.model}
    if args.preset:
        presets = KINDS[args.kind].presets if args.kind in KINDS else {}
        if args.preset not in presets:
            known = ", ".join(presets) or "none"
            raise PlaygroundError(f"{args.kind} has no preset {args.preset!r} (its presets: {known})")
        options |= presets[args.preset][1]
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            raise PlaygroundError(f"--option {item!r}: expected KEY=VALUE")
        options[key] = json.loads(value) if value[:1] in "0123456789[{-" or value in ("true", "false") else value
    job = manager.submit(args.kind, options, start=False)
    ensure_scheduler(store.path, home / "logs")
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


# Set for this process and the workers and jobs it starts, unless --verbose: libraries' own
# progress bars, reports and warnings would fill stderr where one line of ours was promised.
QUIET_LIBRARIES = {
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore",
    "GGML_LOG_LEVEL": "error",
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.verbose:
        for name, value in QUIET_LIBRARIES.items():
            os.environ.setdefault(name, value)
        warnings.simplefilter("ignore")
    if args.config_dir:  # as the setting, so the job processes this command starts see them too
        os.environ["PLAYGROUND_CONFIG_DIRS"] = json.dumps([str(d.expanduser().resolve()) for d in args.config_dir])
    engine = None
    try:
        if args.command == "settings":  # no engine: this is also the container's start-up check
            _settings()
            return 0
        from playground.engine import Engine

        engine = Engine.from_settings()
        if args.command == "models":
            _models(engine, args.json)
        elif args.command == "generate":
            _generate(engine, args)
        elif args.command == "route":
            _route(engine, args)
        elif args.command == "eval":
            _eval(engine, args)
        elif args.command == "calibrate-router":
            _calibrate(engine, args)
        elif args.command == "router-quality":
            _router_quality(args)
        elif args.command == "jobs":
            _jobs(args)
        elif args.command == "diff":
            _diff(engine, args)
        elif args.command == "report":
            _report(engine, args)
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
