"""The Router tab: see each decision (route, reason, P(escalate), latency), then the answer from
whichever model the route chose; a threshold slider; the session's trail; and the router eval
with its threshold curve (inline until the jobs system runs it in the background)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import gradio as gr

from playground.engine import Engine
from playground.errors import PlaygroundError
from playground.jobs.manager import JobManager
from playground.request_queue import Queued
from playground.router import (
    DATASETS,
    EvalCancelled,
    RouteDecision,
    Router,
    answering_variant,
    calibrate_router,
    evaluate_router_file,
)
from playground.router_calibration import remove_calibration
from playground.router_curve import CostQualityCurve, read_quality_data, router_cost_quality
from playground.settings import allowed_path
from playground.ui.access import Access
from playground.ui.charts import COST_AXES, cost_quality_figure, router_eval_figure
from playground.ui.formatting import error_text, load_progress, metrics_line, ordinal, preformatted
from playground.ui.live import LivePage, VariantView, picker_choices
from playground.ui.session import Session, Sessions
from playground.ui.streaming import FRAME_S
from playground.workers import Finished, TextDelta

NO_PARTNER = "(none: the router answers everything)"
# What an answer may run to when the router answers itself or hands on (its own budget is for its JSON).
ANSWER_MAX_TOKENS = 256


def decision_markdown(d: RouteDecision, answered_by: str, answered_by_router: bool) -> str:
    bar = "█" * round(d.p_escalate * 20) + "░" * (20 - round(d.p_escalate * 20))
    lines = [
        f"**Route: `{d.route}`** → answered by **{answered_by}**"
        + (" (it escalates, but no partner is chosen)" if d.escalated and answered_by_router else ""),
        f"P(escalate) {d.p_escalate:.3f} `{bar}` threshold {d.threshold:.2f}"
        + (f" (calibrated, {d.calibration}; raw {d.p_escalate_raw:.3f})" if d.calibration else ""),
        f"Route decided in {d.decision_latency_s * 1000:.0f} ms (scoring {d.score_latency_s * 1000:.0f} ms); "
        f"its reason written in {d.reason_latency_s or 0:.2f} s{' under a JSON grammar' if d.grammar else ', free'}",
    ]
    if d.valid_json:
        agree = "" if d.model_route == d.route else f" — it wrote route `{d.model_route}`, the scores decided otherwise"
        lines.append(f"Reason: {d.reason}{agree}")
    else:
        lines.append("⚠ The router's own answer is not valid route JSON (shown as written, not used):")
        return "  \n".join(lines) + "\n\n" + preformatted(d.raw_output)
    return "  \n".join(lines)


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


class RouterTab:
    def __init__(self, engine: Engine, sessions: Sessions, access: Access, jobs: JobManager | None = None) -> None:
        self.engine = engine
        self.sessions = sessions
        self.access = access
        self.jobs = jobs
        self.router: gr.Dropdown | None = None
        self.curve_routers: gr.Dropdown | None = None

    def routers(self) -> list[tuple[str, str]]:
        return [(c.display_name, c.id) for c in self.engine.catalogue.configs.values() if c.router is not None]

    def partners(self) -> list[tuple[str, str]]:
        ranked = sorted(self.engine.catalogue.configs.values(), key=lambda c: c.role != "partner")
        return [(NO_PARTNER, "")] + [(c.display_name, c.id) for c in ranked if c.router is None]

    def build(self) -> None:
        routers = self.routers()
        default = (
            "smollm2-135m-router"
            if "smollm2-135m-router" in self.engine.catalogue.configs
            else (routers or [("", None)])[0][1]
        )
        with gr.Row():
            router = self.router = gr.Dropdown(routers, value=default, label="Router", elem_id="router-variant")
            partner = gr.Dropdown(
                self.partners(), value="", label="Partner (when it escalates)", elem_id="router-partner"
            )
            threshold = gr.Slider(
                0.0, 1.0, value=0.5, step=0.01, label="escalate when P(npc_fin) is above", elem_id="router-threshold"
            )
            # The router's own max_new_tokens is sized for its JSON decision; an answer needs its own budget.
            answer_tokens = gr.Slider(
                1, 4096, value=ANSWER_MAX_TOKENS, step=1, label="answer max tokens", elem_id="router-answer-tokens"
            )
        self.state_line = gr.Markdown(elem_id="router-state")
        prompt = gr.Textbox(label="Request", lines=2, elem_id="router-prompt")
        with gr.Row():
            go_button = gr.Button("Route and answer", variant="primary", elem_id="router-go")
            stop = gr.Button("Stop", elem_id="router-stop")
        decision = gr.Markdown(elem_id="router-decision")
        answer = gr.Textbox(label="Answer", lines=6, interactive=False, elem_id="router-answer")
        metrics = gr.Markdown(elem_id="router-metrics")
        gr.Markdown("### Decisions in this session")
        trail = gr.Markdown("No decisions yet.", elem_id="router-trail")
        go_button.click(
            self.route,
            [router, partner, threshold, prompt, answer_tokens],
            [decision, answer, metrics, trail],
            show_progress="hidden",
        )
        stop.click(self.stop, None, None, queue=False)
        router.change(self.pick_router, router, None, queue=False)
        self.partner = partner

        with gr.Accordion("Evaluate the router", open=False):
            gr.Markdown(
                "`ood` and `ood2` were written by hand apart from the training generator (generalization); "
                "`in_distribution` comes from the same generator as the training pairs (format fidelity)."
            )
            with gr.Row():
                dataset = gr.Radio([*DATASETS, "file"], value="ood", label="data", elem_id="eval-data")
                path = gr.Textbox(label="JSONL of {prompt, route} (for 'file')", elem_id="eval-path")
                limit = gr.Number(value=None, precision=0, label="first N rows (empty: all)", elem_id="eval-limit")
            with gr.Row():
                run = gr.Button("Run eval here", elem_id="eval-run")
                cancel = gr.Button("Cancel", elem_id="eval-cancel")
                background = gr.Button("Run as a background job", elem_id="eval-background")
            with gr.Row():
                method = gr.Radio(
                    ["platt", "isotonic"], value="platt", label="calibration method", elem_id="calibrate-method"
                )
                calibrate = gr.Button("Fit calibration on this data (in-distribution)", elem_id="calibrate-run")
                uncalibrate = gr.Button("Remove its calibration", elem_id="calibrate-remove")
            status = gr.Markdown(elem_id="eval-status")
            plot = gr.Plot(elem_id="eval-plot", show_label=False)
            calibrate.click(self.calibrate, [router, dataset, path, limit, method], status)
            uncalibrate.click(self.uncalibrate, router, status)
            run.click(self.evaluate, [router, threshold, dataset, path, limit], [status, plot])
            cancel.click(self.cancel_eval, None, None, queue=False)
            background.click(self.submit_eval, [router, threshold, dataset, path, limit], status)

        with gr.Accordion("Cost against quality: what a router buys", open=False):
            gr.Markdown(
                "A JSONL file, one request per line: `prompt`, `weak_quality` (how good the router's own "
                "answer was) and `strong_quality` (the partner's), on one scale such as 0/1 from a check; "
                "`weak_tokens` and `strong_tokens` as [input, output] give the money axis from the variants' "
                "`cost:` sections. Each threshold is a point. APGR, CPT(50%) and CPT(80%) are RouteLLM's: the "
                "share of the quality gap recovered on average, and the partner calls needed to recover half "
                "and 80% of it."
            )
            with gr.Row():
                curve_routers = self.curve_routers = gr.Dropdown(
                    routers, value=[default] if default else [], multiselect=True, label="routers on one chart",
                    elem_id="curve-routers",
                )  # fmt: skip
                curve_path = gr.Textbox(label="quality file (JSONL)", elem_id="curve-path")
                curve_axis = gr.Radio(list(COST_AXES), value="partner calls", label="cost axis", elem_id="curve-axis")
            with gr.Row():
                curve_run = gr.Button("Draw the curves", elem_id="curve-run")
                curve_cancel = gr.Button("Cancel", elem_id="curve-cancel")
            curve_status = gr.Markdown(elem_id="curve-status")
            curve_plot = gr.Plot(elem_id="curve-plot", show_label=False)
            curve_run.click(
                self.cost_quality, [curve_routers, curve_path, curve_axis, partner], [curve_status, curve_plot]
            )
            curve_cancel.click(self.cancel_eval, None, None, queue=False)

    def follow_live(self, live: LivePage) -> None:
        """The picked router's state (loading with elapsed time, ready, failed...) and both
        pickers' marks follow the engine."""
        assert self.router is not None
        default = self.router.value

        def state(session: Session, views: dict[str, VariantView]) -> list[tuple[Any, Any]]:
            router_id = session.router_id or default
            line = self._state_text(views.get(router_id) if router_id else None)
            return [(line, line)]

        def pickers(_session: Session, views: dict[str, VariantView]) -> list[tuple[Any, Any]]:
            routers = picker_choices(views, [v for _, v in self.routers()])
            partners = [(NO_PARTNER, "")] + picker_choices(views, [v for _, v in self.partners()[1:]])
            marked = gr.update(choices=routers)
            return [(tuple(routers), marked), (tuple(partners), gr.update(choices=partners)), (tuple(routers), marked)]

        live.add([self.state_line], state)
        live.add([self.router, self.partner, self.curve_routers], pickers)

    def _state_text(self, view: VariantView | None) -> str:
        if view is None:
            return ""
        if view.state == "loading":  # the snapshot has the load's timing already
            return f"Router {view.name}: loading the router… " + load_progress(view)
        if view.state == "ready":
            return f"Router {view.name}: ready"
        if view.state in ("failed", "dead", "hung"):
            return f"⚠ Router {view.name}: {view.state}" + (f": {view.error}" if view.error else "")
        return f"Router {view.name}: not loaded (it loads when you send a request)"

    def pick_router(self, router_id: str | None, request: gr.Request) -> None:
        self.sessions.get(request).router_id = router_id

    def stop(self, request: gr.Request) -> None:
        self.sessions.get(request).router_cancel.set()

    def cancel_eval(self, request: gr.Request) -> None:
        self.sessions.get(request).eval_cancel.set()

    def submit_eval(
        self, router_id: str, threshold: float, dataset: str, path: str, limit: float | None, request: gr.Request
    ) -> str:
        """The same eval as a job: it survives closing the page, and its result joins the Jobs tab's table."""
        if refusal := self.access.refusal(request, "start jobs"):
            return refusal
        if self.jobs is None:
            return "⚠ Background jobs are not available in this app."
        options: dict[str, Any] = {"model": router_id, "threshold": float(threshold)}
        options["data"] = (path or "").strip() if dataset == "file" else dataset
        if limit:
            options["limit"] = int(limit)
        try:
            job = self.jobs.submit("eval-router", options)
        except Exception as err:
            return error_text(err)
        return f"Started job `{job.id}` ({job.state}): watch it in the Jobs tab."

    def route(
        self,
        router_id: str,
        partner_id: str,
        threshold: float,
        prompt: str,
        answer_tokens: float | None,
        request: gr.Request,
    ) -> Iterator[tuple[str, str, str, str]]:
        session = self.sessions.get(request)
        trail = session.router_trail
        shown = "\n".join(trail) if trail else "No decisions yet."
        if not router_id:
            yield "⚠ Pick a router.", "", "", shown
            return
        if not prompt or not prompt.strip():
            yield "⚠ Type a request first.", "", "", shown
            return
        session.router_cancel = cancel = threading.Event()
        try:
            for loading in self.engine.loading(router_id):
                if cancel.is_set():
                    yield "Stopped while the router loaded (it goes on loading).", "", "", shown
                    return
                yield f"Loading the router… {load_progress(loading)}", "", "", shown
            yield "Routing…", "", "", shown
            decision = Router(self.engine, router_id, session.key).decide(prompt, float(threshold))
            chosen = answering_variant(decision, router_id, partner_id or None)
        except Exception as err:
            yield error_text(err), "", "", shown
            return
        name = self.engine.catalogue.configs[chosen].display_name
        if not trail:
            trail += [
                "| request | route | P(escalate) | threshold | valid JSON | router s | answered by |",
                "| --- | --- | ---: | ---: | --- | ---: | --- |",
            ]
        short = prompt.strip().replace("|", "/")[:60]
        trail.append(
            f"| {short} | {decision.route} | {decision.p_escalate:.3f} | {decision.threshold:.2f} | "
            f"{'yes' if decision.valid_json else 'no'} | {decision.latency_s:.2f} | {name} |"
        )
        card = decision_markdown(decision, name, chosen == router_id)
        text = ""
        try:
            for loading in self.engine.loading(chosen):
                if cancel.is_set():
                    yield card, "", f"Stopped while {name} loaded (it goes on loading).", "\n".join(trail)
                    return
                yield card, "", f"Loading {name}… {load_progress(loading)}", "\n".join(trail)
            answer_request = self.engine.request(
                chosen, prompt=prompt, mode="chat", max_new_tokens=int(answer_tokens or ANSWER_MAX_TOKENS)
            )
            last = 0.0
            for event in self.engine.generate(chosen, answer_request, cancel, session=session.key):
                if isinstance(event, Queued):
                    yield card, text, f"⏳ queued for {name}: {ordinal(event.position)} in line", "\n".join(trail)
                elif isinstance(event, TextDelta):
                    text += event.text
                    if time.monotonic() - last > FRAME_S:  # the pace every streamed answer keeps
                        last = time.monotonic()
                        yield card, text, "streaming…", "\n".join(trail)
                elif isinstance(event, Finished):
                    yield card, event.text, metrics_line(event.metrics), "\n".join(trail)
        except Exception as err:
            yield card, text, error_text(err), "\n".join(trail)

    def _over_rows(
        self, request: gr.Request, task: Callable[[Callable[[int, int], None], threading.Event], Any],
        outcome: dict[str, Any],
    ) -> Iterator[str]:
        """Run `task(progress, cancel)` in a thread, yielding a progress line every half second;
        its result or error lands in `outcome`. Cancel (the eval's own button) stops it between rows."""
        session = self.sessions.get(request)
        session.eval_cancel = cancel = threading.Event()
        progress = {"done": 0, "total": 0}

        def work() -> None:
            try:
                outcome["result"] = task(lambda done, total: progress.update(done=done, total=total), cancel)
            except Exception as err:
                outcome["error"] = err

        thread = threading.Thread(target=work, daemon=True)
        started = time.monotonic()
        thread.start()
        while thread.is_alive():
            thread.join(0.5)
            said = "cancelling after this row…" if cancel.is_set() else ""
            yield f"⏳ {progress['done']}/{progress['total']} rows, {time.monotonic() - started:.0f} s {said}".rstrip()

    def calibrate(
        self, router_id: str, dataset: str, path: str, limit: float | None, method: str, request: gr.Request
    ) -> Iterator[str]:
        if refusal := self.access.refusal(request, "calibrate routers"):
            yield refusal
            return
        source = dataset if dataset in DATASETS else (path or "").strip()
        if not source:
            yield error_text(ValueError("give the path of a JSONL file"))
            return
        outcome: dict[str, Any] = {}
        yield from self._over_rows(
            request,
            lambda progress, cancel: calibrate_router(
                self.engine, router_id, source, method, int(limit) if limit else None, progress, cancel
            ),
            outcome,
        )
        if "error" in outcome:
            yield error_text(outcome["error"])
            return
        c = outcome["result"]
        yield (
            f"Calibrated: {c.describe()}. ECE on that data {_rate(c.ece_before)} raw → {_rate(c.ece_after)} "
            "calibrated (in-sample). Every decision of this router now uses the calibrated P(escalate); "
            "evaluate it on other data (ood) to see how it holds."
        )

    def uncalibrate(self, router_id: str, request: gr.Request) -> str:
        if refusal := self.access.refusal(request, "calibrate routers"):
            return refusal
        if not router_id:
            return "⚠ Pick a router."
        removed = remove_calibration(router_id)
        return "Calibration removed: decisions use the raw P(escalate) again." if removed else "It had no calibration."

    def evaluate(
        self, router_id: str, threshold: float, dataset: str, path: str, limit: float | None, request: gr.Request
    ) -> Iterator[tuple[str, Any]]:
        source = dataset if dataset in DATASETS else (path or "").strip()
        if not source:
            yield error_text(ValueError("give the path of a JSONL file")), gr.update()
            return
        outcome: dict[str, Any] = {}
        task = partial(evaluate_router_file, self.engine, router_id, source, float(threshold), int(limit) if limit else None)
        for line in self._over_rows(request, task, outcome):
            yield line, gr.update()
        if "error" in outcome:
            yield error_text(outcome["error"]), gr.update()
            return
        r = outcome["result"]
        text = (
            f"**{r.n} rows** ({dataset}), threshold {r.threshold:.2f}: accuracy **{r.accuracy:.3f}** "
            f"(95% CI {r.accuracy_ci95[0]:.3f}–{r.accuracy_ci95[1]:.3f}), "
            f"escalation recall {_rate(r.escalation_recall)}, precision {_rate(r.escalation_precision)}, "
            f"JSON valid {_rate(r.json_validity)}; AUROC {_rate(r.auroc)}, ECE {_rate(r.ece)}, Brier {_rate(r.brier)}; "
            f"route decided in p50 {r.decision_latency_p50_s * 1000:.0f} ms, p95 {r.decision_latency_p95_s * 1000:.0f} ms; "
            f"with the written reason p50 {r.latency_p50_s:.2f} s, p95 {r.latency_p95_s:.2f} s"
        )
        yield text, router_eval_figure(r.curve, r.confusion, r.threshold, r.reliability)

    def cost_quality(
        self, router_ids: list[str] | None, path: str, axis: str, partner_id: str | None, request: gr.Request
    ) -> Iterator[tuple[str, Any]]:
        """Each chosen router scores every request of the quality file: one chart, one table. A
        router that cannot (its weights absent, say) is named in the table; the others are drawn."""
        path = (path or "").strip()
        if not router_ids:
            yield "⚠ Pick at least one router.", gr.update()
            return
        try:
            if not path:
                raise PlaygroundError("give the path of a JSONL quality file")
            read_quality_data(allowed_path(path, "quality data file"))  # refused before any router loads
        except Exception as err:
            yield error_text(err), gr.update()
            return
        outcome: dict[str, Any] = {}

        def task(progress: Callable[[int, int], None], cancel: threading.Event) -> Any:
            curves: dict[str, CostQualityCurve] = {}
            failures: dict[str, Exception] = {}
            for k, router_id in enumerate(router_ids):
                def told(done: int, total: int, k: int = k) -> None:
                    progress(k * total + done, len(router_ids) * total)

                try:
                    curves[router_id] = router_cost_quality(
                        self.engine, router_id, path, partner_id or None, progress=told, cancel=cancel
                    )
                except EvalCancelled:
                    raise
                except Exception as err:  # this router only: the others are still drawn
                    failures[router_id] = err
            return curves, failures

        for line in self._over_rows(request, task, outcome):
            yield line, gr.update()
        if "error" in outcome:
            yield error_text(outcome["error"]), gr.update()
            return
        curves, failures = outcome["result"]
        names = {c.id: c.display_name for c in self.engine.catalogue.configs.values()}
        text, axis = cost_quality_markdown(curves, failures, names, axis)
        named = {names.get(router_id, router_id): curve for router_id, curve in curves.items()}
        yield text, cost_quality_figure(named, axis) if curves else gr.update()


def _share(value: float | None) -> str:
    return "never" if value is None else f"{value:.1%}"


def cost_quality_markdown(
    curves: dict[str, CostQualityCurve], failures: dict[str, Exception], names: dict[str, str], axis: str
) -> tuple[str, str]:
    """The routers' numbers in one table, the baselines and notes under it; and the axis the
    chart can draw (money or seconds only where every point has them)."""
    lines = ["| router | APGR | CPT(50%) | CPT(80%) | requests |", "| --- | ---: | ---: | ---: | ---: |"]
    for router_id, c in curves.items():
        apgr = "—" if c.apgr is None else f"{c.apgr:.3f}"
        lines.append(f"| {names.get(router_id, router_id)} | {apgr} | {_share(c.cpt50)} | {_share(c.cpt80)} | {c.n} |")
    notes = [f"{names.get(router_id, router_id)} could not score: {error_text(err)}" for router_id, err in failures.items()]
    if curves:
        first = next(iter(curves.values()))
        oracle = "—" if first.oracle_apgr is None else f"{first.oracle_apgr:.3f}"
        notes.append(
            f"Router's own answers only: quality {first.weak_quality:.3f}; partner only: {first.strong_quality:.3f}; "
            f"oracle APGR {oracle}; random routing's APGR is 0.5. CPT: the share of requests sent to the partner."
        )
        field = COST_AXES[axis][0]
        if any(getattr(p, field) is None for c in curves.values() for p in c.router):
            notes.append(f"No {axis} axis for these routers: drawn against partner calls.")
            axis = "partner calls"
        notes += sorted({n for c in curves.values() for n in c.notes})
    if not curves:
        lines = []
    return "\n\n".join(filter(None, ["\n".join(lines), *notes])), axis
