"""Where variants differ, token by token: a reference answers, every other variant reads that
same answer teacher-forced (one forward pass, no generation), and each answer position compares
the two distributions over the vocabulary (KL, whether the top-1 token agrees).

Only variants that share the reference's tokenizer are compared token by token (same
vocabulary size and the same ids for backends.base.TOKENIZER_PROBE); the prompt ids each
backend built from the same request are compared too, since a template or BOS difference shows
there first. KL comes from scipy.stats.entropy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from scipy.stats import entropy

from playground.backends.base import Request, TeacherForced, TokenizerProbe
from playground.engine import Engine
from playground.errors import GenerationError
from playground.workers import Finished

PromptChoice = Literal["own", "reference"]
AROUND = 4  # prompt tokens shown on each side of the first difference


@dataclass(frozen=True)
class TokenRow:
    """One answer position: the reference's token, both log-probabilities, KL(ref ‖ variant)
    in nats, and each model's most likely token there."""

    position: int
    token_id: int
    token: str
    reference_logprob: float
    variant_logprob: float
    kl: float
    top1_agrees: bool
    reference_top1: str
    variant_top1: str
    # The top-k tokens at this position in each model: (text, log-probability).
    reference_top: list[tuple[str, float]] = field(default_factory=list)
    variant_top: list[tuple[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class PromptComparison:
    equal: bool
    reference_tokens: int
    variant_tokens: int
    first_difference: int | None  # index of the first prompt token that differs
    reference_around: list[str] = field(default_factory=list)  # token texts near it
    variant_around: list[str] = field(default_factory=list)


@dataclass
class VariantDivergence:
    variant_id: str
    refusal: str | None = None  # why it was not compared token by token
    mean_kl: float | None = None
    top1_agreement: float | None = None  # share of answer positions whose top-1 tokens agree
    first_divergence: int | None = None  # first answer position where they do not (None: never)
    prompt_tokens_equal: bool | None = None
    prompt: PromptComparison | None = None
    kl_over: str = ""  # what the KL sums over
    score_s: float = 0.0  # the worker's time for the teacher-forced pass
    rows: list[TokenRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DiffResult:
    reference_id: str
    answer: str
    answer_tokens: int
    finish_reason: str
    scored_after: PromptChoice  # each variant's own prompt ids, or the reference's
    reference_score_s: float
    variants: list[VariantDivergence]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "variants": [v.to_dict() for v in self.variants]}


def compare_prompts(reference: list[int], variant: list[int]) -> PromptComparison:
    """Whether two prompt id lists are equal, and where they first differ."""
    first = next((i for i, (a, b) in enumerate(zip(reference, variant, strict=False)) if a != b), None)
    if first is None and len(reference) != len(variant):
        first = min(len(reference), len(variant))
    return PromptComparison(first is None, len(reference), len(variant), first)


def around(first: int) -> slice:
    return slice(max(0, first - AROUND), first + AROUND + 1)


def tokenizer_mismatch(reference: TokenizerProbe, variant: TokenizerProbe) -> str | None:
    """Why two tokenizers are not one (None when they are)."""
    if reference.probe_ids != variant.probe_ids:
        at = next(
            (i for i, (a, b) in enumerate(zip(reference.probe_ids, variant.probe_ids, strict=False)) if a != b),
            min(len(reference.probe_ids), len(variant.probe_ids)),
        )
        return (
            f"its tokenizer differs from the reference's (a probe text splits into {len(variant.probe_ids)} "
            f"tokens against {len(reference.probe_ids)}, first differing at token {at})"
        )
    return None


def token_divergence(reference: TeacherForced, variant: TeacherForced) -> tuple[list[TokenRow], str]:
    """Per answer position: KL(reference ‖ variant) over the vocabulary both models have, and
    whether their most likely tokens agree."""
    ref_rows, var_rows = np.asarray(reference.rows), np.asarray(variant.rows)
    shared = min(ref_rows.shape[1], var_rows.shape[1])
    # float64 before exp: a float32 log-probability of -120 would become 0 and KL infinite.
    p = np.exp(ref_rows[:, :shared].astype(np.float64))
    q = np.exp(var_rows[:, :shared].astype(np.float64))
    kl = entropy(p, q, axis=1)  # renormalizes each row over the shared vocabulary
    ref_top = ref_rows[:, :shared].argmax(axis=1)
    var_top = var_rows[:, :shared].argmax(axis=1)
    rows = [
        TokenRow(
            position=i,
            token_id=ref.token.token_id,
            token=ref.token.text,
            reference_logprob=ref.token.logprob,
            variant_logprob=var.token.logprob,
            kl=float(kl[i]),
            top1_agrees=bool(ref_top[i] == var_top[i]),
            reference_top1=ref.top[0].text if ref.top else "",
            variant_top1=var.top[0].text if var.top else "",
            reference_top=[(c.text, c.logprob) for c in ref.top],
            variant_top=[(c.text, c.logprob) for c in var.top],
        )
        for i, (ref, var) in enumerate(zip(reference.tokens, variant.tokens, strict=True))
    ]
    sizes = {ref_rows.shape[1], var_rows.shape[1]}
    over = f"the full vocabulary ({shared} tokens)"
    if len(sizes) > 1:
        over += f"; the larger model's {max(sizes) - shared} extra rows are left out and each row renormalized"
    return rows, over


def reference_answer(engine: Engine, reference_id: str, request: Request) -> Finished:
    """The reference's answer to `request`, checked to be one that variants can read."""
    finished = None
    for event in engine.generate(reference_id, request):
        if isinstance(event, Finished):
            finished = event
    return usable_answer(reference_id, finished)


def usable_answer(reference_id: str, finished: Finished | None) -> Finished:
    """`finished` if it holds the token ids a teacher-forced reading needs; else why not."""
    if finished is None or finished.token_ids is None or finished.prompt_ids is None:
        raise GenerationError(f"{reference_id} gives no token ids for its answers: it cannot be a reference")
    if not finished.token_ids:
        raise GenerationError(f"{reference_id} answered nothing (its first token ended the answer)")
    return finished


def diff(
    engine: Engine,
    reference_id: str,
    variant_ids: list[str],
    request: Request,
    *,
    top_k: int = 5,
    scored_after: PromptChoice = "own",
    answer: Finished | None = None,
) -> DiffResult:
    """The reference answers `request` (or `answer` is its answer, already given); each variant
    scores that answer teacher-forced after its own prompt ids for the same request
    (`scored_after="own"`, what it would really see) or after the reference's (to tell
    arithmetic apart from prompt building)."""
    answer = usable_answer(reference_id, answer) if answer else reference_answer(engine, reference_id, request)
    prompt_ids, answer_ids = list(answer.prompt_ids or ()), list(answer.token_ids or ())
    reference = engine.score_answer(reference_id, prompt_ids, answer_ids, top_k, keep_rows=True)
    probe = engine.tokenizer_probe(reference_id)
    results = []
    for variant_id in variant_ids:
        if variant_id == reference_id:
            continue
        outcome = VariantDivergence(variant_id)
        results.append(outcome)
        try:
            own_probe = engine.tokenizer_probe(variant_id)
        except GenerationError as err:
            outcome.refusal = f"it cannot be compared token by token: {err}"
            continue
        if refusal := tokenizer_mismatch(probe, own_probe):
            outcome.refusal = refusal
            continue
        own_prompt = engine.prompt_ids(variant_id, request)
        outcome.prompt = compare_prompts(prompt_ids, own_prompt)
        if outcome.prompt.first_difference is not None:  # the tokens around it, as each backend has them
            near = around(outcome.prompt.first_difference)
            outcome.prompt.reference_around.extend(engine.token_texts(reference_id, prompt_ids[near]))
            outcome.prompt.variant_around.extend(engine.token_texts(variant_id, own_prompt[near]))
        outcome.prompt_tokens_equal = outcome.prompt.equal
        scored = engine.score_answer(
            variant_id, own_prompt if scored_after == "own" else prompt_ids, answer_ids, top_k, keep_rows=True
        )
        outcome.rows, outcome.kl_over = token_divergence(reference, scored)
        outcome.score_s = scored.seconds
        outcome.mean_kl = float(np.mean([row.kl for row in outcome.rows]))
        agrees = [row.top1_agrees for row in outcome.rows]
        outcome.top1_agreement = float(np.mean(agrees))
        outcome.first_divergence = next((i for i, same in enumerate(agrees) if not same), None)
    return DiffResult(
        reference_id=reference_id,
        answer=answer.text,
        answer_tokens=len(answer_ids),
        finish_reason=answer.metrics.finish_reason,
        scored_after=scored_after,
        reference_score_s=reference.seconds,
        variants=results,
    )
