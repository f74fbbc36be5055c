"""Answers drawn token by token: coloured by probability (the token view) or by divergence from a
reference (the diff view), each token's numbers and alternatives in its tooltip. HTML only; no
Gradio here, so it is easy to test."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from playground.backends.base import ScoredToken
from playground.divergence import DiffResult, TokenRow, VariantDivergence

# The diff colour runs on a log scale: KL (nats) below KL_FAINT is white, KL_FULL and above full
# red (most tokens of a good quantization sit near 0.001-0.05, which a linear scale hides).
KL_FAINT, KL_FULL = 0.001, 0.5


def _shown(text: str) -> str:
    """A token's text, its whitespace made visible enough to see where tokens meet."""
    return html.escape(text).replace("\n", "↵<br>") or "∅"


def _tip(lines: Sequence[str]) -> str:
    return html.escape("\n".join(lines), quote=True)


def _alternatives(top: Sequence[tuple[str, float]]) -> str:
    return ", ".join(f"{text!r} {math.exp(logprob):.3f}" for text, logprob in top)


def probability_html(tokens: Sequence[ScoredToken]) -> str:
    """The token view: each token on a background from red (unlikely) to green (certain); its
    probability, rank and the top-k alternatives in its tooltip."""
    spans = []
    for position, scored in enumerate(tokens):
        p = math.exp(scored.token.logprob)
        hue = round(120 * p)  # 0 red .. 120 green
        top = [(c.text, c.logprob) for c in scored.top]
        rank = next((i + 1 for i, c in enumerate(scored.top) if c.token_id == scored.token.token_id), None)
        tip = _tip([
            f"token {position}: {scored.token.text!r} (id {scored.token.token_id})",
            f"p = {p:.3f}" + (f" · rank {rank}" if rank else f" · not in the top {len(top)}"),
            f"top {len(top)}: {_alternatives(top)}",
        ])
        spans.append(
            f'<span class="tok" data-p="{p:.4f}" title="{tip}" style="background: hsl({hue} 70% 85%)">'
            f"{_shown(scored.token.text)}</span>"
        )
    return f'<div class="token-view">{"".join(spans)}</div>'


def divergence_html(rows: Sequence[TokenRow]) -> str:
    """The reference's answer as this variant reads it: the more the variant's distribution
    departs from the reference's at a token (KL), the redder; a top-1 disagreement underlined."""
    spans = []
    for row in rows:
        share = min(math.log1p(row.kl / KL_FAINT) / math.log1p(KL_FULL / KL_FAINT), 1.0)
        lightness = round(100 - 45 * share)
        tip = _tip([
            f"token {row.position}: {row.token!r}",
            f"KL(reference ‖ variant) = {row.kl:.4f} nats",
            f"p reference {math.exp(row.reference_logprob):.3f} · p variant {math.exp(row.variant_logprob):.3f}",
            f"reference top: {_alternatives(row.reference_top)}",
            f"variant top: {_alternatives(row.variant_top)}",
        ])
        mark = "" if row.top1_agrees else " disagrees"
        spans.append(
            f'<span class="tok{mark}" data-kl="{row.kl:.5f}" title="{tip}" '
            f'style="background: hsl(0 85% {lightness}%)">{_shown(row.token)}</span>'
        )
    return f'<div class="token-view">{"".join(spans)}</div>'


def _prompt_line(outcome: VariantDivergence) -> str:
    prompt = outcome.prompt
    if prompt is None:
        return ""
    if prompt.equal:
        return "equal"
    return (
        f"differ at token {prompt.first_difference} ({prompt.reference_tokens} vs {prompt.variant_tokens} tokens): "
        f"reference `{html.escape(''.join(prompt.reference_around))!r}` · variant "
        f"`{html.escape(''.join(prompt.variant_around))!r}`"
    )


def diff_summary_markdown(result: DiffResult) -> str:
    """One row per variant: mean KL, top-1 agreement, first divergence, prompt ids."""
    rows = [
        f"Reference **{result.reference_id}** answered {result.answer_tokens} tokens (finish: {result.finish_reason}); "
        f"each variant read that answer after {'its own' if result.scored_after == 'own' else 'the reference’s'} "
        "prompt ids, in one forward pass.",
        "",
        "| variant | mean KL (nats) | top-1 agreement | first divergence | prompt token ids | scored in |",
        "| --- | ---: | ---: | ---: | --- | ---: |",
    ]
    for outcome in result.variants:
        if outcome.refusal:
            rows.append(f"| {outcome.variant_id} | – | – | – | not compared: {html.escape(outcome.refusal)} | – |")
            continue
        first = "none" if outcome.first_divergence is None else f"token {outcome.first_divergence}"
        rows.append(
            f"| {outcome.variant_id} | {outcome.mean_kl:.4f} | {outcome.top1_agreement:.1%} | {first} | "
            f"{_prompt_line(outcome)} | {outcome.score_s:.2f} s |"
        )
    return "\n".join(rows)


def diff_tokens_html(result: DiffResult) -> str:
    parts = []
    for outcome in result.variants:
        if outcome.refusal:
            continue
        parts.append(
            f'<div class="diff-variant" data-variant="{html.escape(outcome.variant_id)}">'
            f"<b>{html.escape(outcome.variant_id)}</b> (KL over {html.escape(outcome.kl_over)})"
            f"{divergence_html(outcome.rows)}</div>"
        )
    return "".join(parts) or "<p>No variant could be compared token by token.</p>"
