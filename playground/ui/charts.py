"""Plotly figures: the comparison of replies, their trend, the live resource monitor, and jobs."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from playground.monitor import Sample
from playground.remote_health import RemoteHealth

GiB = 2**30
MiB = 2**20


@dataclass(frozen=True)
class ReplyPoint:
    """One finished reply, as the charts need it."""

    reply_index: int
    variant: str
    ttft_s: float | None
    decode_tok_s: float | None
    prefill_tok_s: float | None
    peak_mib: float


def _color(i: int) -> str:
    """The i-th variant's colour, the same in every chart of the comparison."""
    return f"hsl({(i * 67) % 360},55%,50%)"


def comparison_figure(points: Sequence[ReplyPoint]) -> go.Figure:
    """Top: each variant's last reply, side by side. Bottom: decode speed and TTFT per reply."""
    fig = make_subplots(
        rows=2,
        cols=4,
        specs=[[{}, {}, {}, {}], [{"colspan": 2}, None, {"colspan": 2}, None]],
        subplot_titles=(
            "TTFT (s)",
            "decode tok/s",
            "prefill tok/s",
            "peak memory (MiB)",
            "decode tok/s by reply",
            "TTFT (s) by reply",
        ),
        vertical_spacing=0.18,
    )
    last: dict[str, ReplyPoint] = {}
    for p in points:
        last[p.variant] = p
    names = list(last)
    for col, attr in enumerate(("ttft_s", "decode_tok_s", "prefill_tok_s", "peak_mib"), start=1):
        fig.add_trace(
            go.Bar(
                x=names,
                y=[getattr(last[n], attr) for n in names],
                showlegend=False,
                marker_color=[_color(i) for i in range(len(names))],
            ),
            row=1,
            col=col,
        )
    for i, name in enumerate(names):
        series = [p for p in points if p.variant == name]
        color = _color(i)
        x = [p.reply_index for p in series]
        fig.add_trace(
            go.Scatter(
                x=x,
                y=[p.decode_tok_s for p in series],
                name=name,
                mode="lines+markers",
                line_color=color,
                legendgroup=name,
            ),
            row=2,
            col=1,
        )
        fig.add_trace(
            go.Scatter(
                x=x,
                y=[p.ttft_s for p in series],
                name=name,
                mode="lines+markers",
                line_color=color,
                legendgroup=name,
                showlegend=False,
            ),
            row=2,
            col=3,
        )
    units = ("s", "tok/s", "tok/s", "MiB")
    for col, unit in enumerate(units, start=1):
        fig.update_yaxes(title_text=unit, row=1, col=col)
    fig.update_yaxes(title_text="tok/s", row=2, col=1)
    fig.update_yaxes(title_text="s", row=2, col=3)
    # Replies are counted: whole numbers on the axis, never 1.5.
    fig.update_xaxes(title_text="reply", tickformat="d", dtick=1, row=2)
    # Figures are never negative; a missing one (n/a) leaves its bar out, not the axis below 0.
    fig.update_yaxes(rangemode="tozero")
    fig.update_layout(
        title="Comparison of the last replies",
        height=600,
        margin={"l": 50, "r": 20, "t": 70, "b": 40},
        legend={"orientation": "h", "y": -0.14},
    )
    fig.update_xaxes(tickfont={"size": 9}, row=1)
    return fig


def monitor_figure(samples: Sequence[Sample]) -> go.Figure:
    has_gpu = any(s.gpus for s in samples)
    rows = 3 if has_gpu else 2
    titles = ["CPU (%)", "memory (GiB): system used and each variant's worker"]
    if has_gpu:
        titles.append("VRAM used (GiB) per GPU and per variant")
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, subplot_titles=titles, vertical_spacing=0.08)
    now = time.time()
    x = [s.t - now for s in samples]
    fig.add_trace(go.Scatter(x=x, y=[s.cpu_percent for s in samples], name="CPU", line_color="#d62728"), row=1, col=1)
    fig.add_trace(
        go.Scatter(x=x, y=[s.ram_used_bytes / GiB for s in samples], name="system RAM used", line_color="#1f77b4"),
        row=2,
        col=1,
    )
    for variant in sorted({v for s in samples for v in s.variant_rss}):
        fig.add_trace(
            go.Scatter(
                x=x, y=[s.variant_rss.get(variant, 0) / GiB for s in samples], name=f"{variant} (RSS)", stackgroup="rss"
            ),
            row=2,
            col=1,
        )
    if has_gpu:
        for index in sorted({g.index for s in samples for g in s.gpus}):
            used = [next((g.used_bytes for g in s.gpus if g.index == index), None) for s in samples]
            fig.add_trace(
                go.Scatter(x=x, y=[u / GiB if u is not None else None for u in used], name=f"GPU {index} used"),
                row=3,
                col=1,
            )
        for variant in sorted({v for s in samples for v in s.variant_gpu}):
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=[s.variant_gpu.get(variant, 0) / GiB for s in samples],
                    name=f"{variant} (GPU)",
                    line_dash="dot",
                ),
                row=3,
                col=1,
            )
    fig.update_xaxes(title_text="seconds ago", row=rows, col=1)
    fig.update_yaxes(rangemode="tozero")
    fig.update_yaxes(range=[0, 100], title_text="%", row=1, col=1)
    fig.update_yaxes(title_text="GiB", row=2, col=1)
    if has_gpu:
        fig.update_yaxes(title_text="GiB", row=3, col=1)
    fig.update_layout(
        height=220 * rows + 80, margin={"l": 40, "r": 20, "t": 40, "b": 30}, legend={"orientation": "h", "y": -0.15}
    )
    return fig


def remote_line(variant_id: str, health: RemoteHealth) -> str:
    """One remote variant's server: whether it answers, how fast, and its queue."""
    if not health.reachable:
        return f"{variant_id} → {health.base_url}: unreachable ({health.error})"
    queue = (
        f"{_count(health.running)} running, {_count(health.waiting)} waiting ({health.queue_source})"
        if health.running is not None or health.waiting is not None
        else f"queue unknown: {health.queue_source}"
    )
    return f"{variant_id} → {health.base_url}: reachable, {health.latency_ms:.0f} ms; {queue}"


def _count(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"


def monitor_summary(sample: Sample | None, remote: dict[str, RemoteHealth] | None = None) -> str:
    if sample is None:
        return "Sampling…"
    lines = [
        f"CPU {sample.cpu_percent:.0f}% · RAM {sample.ram_used_bytes / GiB:.1f} / {sample.ram_total_bytes / GiB:.1f} GiB"
    ]
    for gpu in sample.gpus:
        util = f", {gpu.util_percent}% busy" if gpu.util_percent is not None else ""
        on_it = sorted(v for v, index in sample.variant_gpu_index.items() if index == gpu.index)
        lines.append(
            f"GPU {gpu.index} {gpu.name}: {gpu.used_bytes / MiB:.0f} / {gpu.total_bytes / MiB:.0f} MiB{util}"
            + (f"; variants: {', '.join(on_it)}" if on_it else "")
        )
    for variant, rss in sorted(sample.variant_rss.items()):
        gpu = sample.variant_gpu.get(variant)
        index = sample.variant_gpu_index.get(variant)
        on = f", GPU {gpu / MiB:.0f} MiB" + (f" on GPU {index}" if index is not None else "") if gpu else ""
        lines.append(f"{variant}: RSS {rss / MiB:.0f} MiB{on}")
    lines += [remote_line(variant, health) for variant, health in sorted((remote or {}).items())]
    return "  \n".join(lines)


def router_eval_figure(
    curve: Sequence[dict[str, float]],
    confusion: dict[str, dict[str, int]],
    threshold: float,
    reliability: Sequence[dict[str, float]] = (),
) -> go.Figure:
    """Left: escalation rate and accuracy across thresholds. Middle: the reliability diagram
    (observed escalation frequency against mean P(escalate) per bin; the diagonal is perfect
    calibration). Right: the confusion matrix."""
    fig = make_subplots(
        rows=1,
        cols=3,
        column_widths=[0.4, 0.3, 0.3],
        subplot_titles=(
            "escalation rate and accuracy by threshold",
            "reliability: observed against predicted",
            f"confusion at threshold {threshold:.2f}",
        ),
    )
    fig.add_trace(
        go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot", "color": "grey"}, name="perfect calibration"),
        row=1,
        col=2,
    )
    if reliability:
        fig.add_trace(
            go.Scatter(
                x=[b["confidence"] for b in reliability],
                y=[b["frequency"] for b in reliability],
                mode="lines+markers",
                marker={"size": [6 + min(14, b["count"]) for b in reliability]},
                text=[f"{b['count']} rows" for b in reliability],
                name="P(escalate) bins",
            ),
            row=1,
            col=2,
        )
    x = [p["threshold"] for p in curve]
    fig.add_trace(
        go.Scatter(x=x, y=[p["escalation_rate"] for p in curve], name="escalation rate", mode="lines+markers"),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Scatter(x=x, y=[p["accuracy"] for p in curve], name="accuracy", mode="lines+markers"), row=1, col=1
    )
    fig.add_vline(x=threshold, line_dash="dot", row=1, col=1)
    gold = list(confusion)
    decided = sorted({d for row in confusion.values() for d in row})
    fig.add_trace(
        go.Heatmap(
            z=[[confusion[g].get(d, 0) for d in decided] for g in gold],
            x=decided,
            y=gold,
            text=[[str(confusion[g].get(d, 0)) for d in decided] for g in gold],
            texttemplate="%{text}",
            colorscale="Blues",
            showscale=False,
        ),
        row=1,
        col=3,
    )
    fig.update_xaxes(title_text="threshold", range=[0, 1], row=1, col=1)
    fig.update_yaxes(range=[0, 1.02], title_text="share of requests", row=1, col=1)
    fig.update_xaxes(title_text="mean P(escalate)", range=[0, 1], row=1, col=2)
    fig.update_yaxes(title_text="share escalating (gold)", range=[0, 1.02], row=1, col=2)
    fig.update_xaxes(title_text="decided", row=1, col=3)
    fig.update_yaxes(title_text="gold", row=1, col=3)
    fig.update_layout(height=380, margin={"l": 40, "r": 20, "t": 40, "b": 40}, legend={"orientation": "h", "y": -0.2})
    return fig


def loss_figure(steps: Sequence[int], losses: Sequence[float], title: str = "Training loss") -> go.Figure:
    fig = go.Figure(go.Scatter(x=list(steps), y=list(losses), mode="lines+markers", name="loss"))
    return _titled(fig, title, xaxis_title="step", yaxis_title="loss")


def _titled(fig: go.Figure, title: str, **layout: object) -> go.Figure:
    """The layout the job charts share: a title, one height, room for labels."""
    fig.update_layout(title=title, height=340, margin=dict(t=60, b=60), **layout)
    return fig


def needle_figure(result: dict) -> go.Figure:
    """Pass (1) / fail (0) per context length and needle depth; skipped cells left blank."""
    lengths, depths = result["lengths"], result["depths"]
    grid: list[list[float | None]] = [[None] * len(lengths) for _ in depths]
    for cell in result["cells"]:
        if "passed" in cell:
            grid[depths.index(cell["depth"])][lengths.index(cell["length"])] = 1.0 if cell["passed"] else 0.0
    fig = go.Figure(
        go.Heatmap(
            z=grid,
            x=[str(n) for n in lengths],
            y=[f"{d:.0%}" for d in depths],
            zmin=0,
            zmax=1,
            colorscale=[[0, "#d9534f"], [1, "#5cb85c"]],
            showscale=False,
            xgap=2,
            ygap=2,
        )
    )
    return _titled(
        fig, "Needle in a haystack (green: found)", xaxis_title="context length (tokens)", yaxis_title="needle depth"
    )


def metric_bars(values: dict[str, float], title: str, unit: str = "") -> go.Figure:
    fig = _titled(go.Figure(go.Bar(x=list(values), y=list(values.values()))), title, yaxis_title=unit)
    fig.update_yaxes(rangemode="tozero")
    return fig


def quant_compare_figure(rows: Sequence[dict]) -> go.Figure:
    """Perplexity of each variant (base, QAT, control) per file type, side by side."""
    fig = go.Figure()
    for role in dict.fromkeys(r["role"] for r in rows):
        mine = [r for r in rows if r["role"] == role]
        fig.add_trace(
            go.Bar(
                name=f"{role} ({mine[0]['variant']})",
                x=[r["type"] for r in mine],
                y=[r["perplexity"] for r in mine],
                text=[f"{r['perplexity']:.2f}<br>{r['bytes'] / MiB:.0f} MiB" for r in mine],
                textposition="outside",
            )
        )
    return _titled(
        fig,
        "Perplexity after export and quantization (lower is better)",
        barmode="group",
        yaxis_title="perplexity (llama.cpp)",
    )


def pareto_figure(report: dict) -> go.Figure:
    """Quality (mean KL against the reference, lower is better) against decode speed and
    against peak memory; the variants on each Pareto front are drawn as filled markers."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("KL against decode speed", "KL against peak memory"))
    panels = (
        (1, "decode_tok_s", 1.0, "decode tok/s (higher is better)", set(report["pareto_speed"])),
        (2, "peak_mem_bytes", 1 / MiB, "peak memory, MiB (lower is better)", set(report["pareto_memory"])),
    )
    for col, key, scale, title, front in panels:
        shown = [v for v in report["variants"] if v["mean_kl"] is not None and v[key] is not None]
        for i, v in enumerate(shown):
            fig.add_trace(
                go.Scatter(
                    x=[v[key] * scale],
                    y=[v["mean_kl"]],
                    mode="markers+text",
                    text=[v["variant"]],
                    textposition="top center",
                    marker=dict(
                        size=12, color=_color(i), symbol="circle" if v["variant"] in front else "circle-open"
                    ),
                    name=v["variant"],
                    showlegend=col == 1,
                    legendgroup=v["variant"],
                ),
                row=1,
                col=col,
            )
        fig.update_xaxes(title_text=title, rangemode="tozero", row=1, col=col)
        fig.update_yaxes(title_text="mean KL to the reference (nats)", rangemode="tozero", row=1, col=col)
    return _titled(fig, "Quality against speed and memory (filled: on the Pareto front)")


COST_AXES = {
    "partner calls": ("strong_share", "share of requests sent to the partner"),
    "money": ("usd", "cost of all answers (USD)"),
    "seconds": ("seconds", "time of all answers (s)"),
}


def cost_quality_figure(curves: dict[str, Any], axis: str = "partner calls") -> go.Figure:
    """Answer quality against what it costs, for each router's `CostQualityCurve` (routers
    scored on the same quality rows), with the baselines: weak only and strong only (the two
    ends), random routing (the straight line between them) and the oracle."""
    field, title = COST_AXES[axis]
    fig = go.Figure()
    first = next(iter(curves.values()))

    def xs(points: Sequence[Any]) -> list[float | None]:
        return [getattr(p, field) for p in points]

    ends = [first.oracle[0], first.oracle[-1]]
    fig.add_trace(
        go.Scatter(
            x=xs(ends), y=[first.weak_quality, first.strong_quality], mode="lines",
            line={"dash": "dash", "color": "grey"}, name="random routing",
        )
    )  # fmt: skip
    fig.add_trace(
        go.Scatter(
            x=xs(first.oracle), y=[p.quality for p in first.oracle], mode="lines",
            line={"dash": "dot", "color": "black"}, name="oracle",
        )
    )  # fmt: skip
    for i, (router_id, curve) in enumerate(curves.items()):
        fig.add_trace(
            go.Scatter(
                x=xs(curve.router), y=[p.quality for p in curve.router], mode="lines+markers",
                line={"color": _color(i)}, name=router_id,
            )
        )  # fmt: skip
    fig.add_trace(
        go.Scatter(
            x=xs(ends), y=[first.weak_quality, first.strong_quality], mode="markers+text",
            text=["router only", "partner only"], textposition=["top right", "bottom left"],
            marker={"size": 11, "color": "grey", "symbol": "diamond"}, showlegend=False,
        )
    )  # fmt: skip
    return _titled(
        fig, "Answer quality against cost", xaxis_title=title, yaxis_title="mean answer quality",
        xaxis={"rangemode": "tozero"}, legend={"orientation": "h", "y": -0.25},
    )  # fmt: skip
