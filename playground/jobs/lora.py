"""LoRA supervised fine-tuning (peft) of a transformers-backed variant, in the job process.

Data: JSONL rows in chat form ({"messages": [...]}, the last message the assistant's answer) or
instruction form ({"instruction", "response"}); the router kind builds chat rows from router
pairs ({"prompt", "route", "reason"}) with the router's own system prompt and answer format.
The loss counts answer tokens only. Checkpoints (adapter, optimizer, step) are written as the
job goes, so an interrupted or cancelled job resumes where it stopped. The result, merged into
the base weights or kept as an adapter, is saved with a variant config that records base, data,
options and job id, so it loads next to its base at once.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from playground.backends.tiktoken_codec import TiktokenCodec
from playground.config import REPO_ROOT, ModelConfig, RouterSpec
from playground.errors import PlaygroundError
from playground.jobs.kinds import JobContext, _Options
from playground.jobs.training import (
    Step,
    check_trainable,
    load_for_training,
    padded_batch,
    saving_into,
    sequence_logprobs,
    train,
    unlabelled_prefix_length,
)
from playground.jsonl import read_jsonl
from playground.settings import named_or_allowed

if TYPE_CHECKING:
    from playground.catalogue import Catalogue

# The embedded router: its system prompt (NPC Fast's) is what a router LoRA teaches by default.
DEFAULT_ROUTER = "smollm2-135m-router"
ROUTER_TRAIN = REPO_ROOT / "assets" / "router" / "train.jsonl"
Example = tuple[list[dict[str, str]], str]  # (prompt messages, answer)


class LoraOptions(_Options):
    model: str
    data: str
    rank: Annotated[int, Field(ge=1, le=512)] = 8
    alpha: Annotated[float, Field(gt=0)] = 16.0
    learning_rate: Annotated[float, Field(gt=0, le=1.0)] = 2e-4
    epochs: Annotated[int, Field(ge=1, le=100)] = 1
    max_length: Annotated[int, Field(ge=8, le=8192)] = 256
    batch_size: Annotated[int, Field(ge=1, le=256)] = 4
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    seed: int = 0
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._\-]*$", max_length=80)] | None = None
    merge: bool = True  # False: the new variant is the base plus the adapter, applied at load
    quantize: Literal["none", "nf4"] = "none"  # nf4: QLoRA, the base frozen in NF4 (needs a GPU)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint_every: Annotated[int, Field(ge=1)] = 25  # steps
    # Run the tokens every row of a batch begins with (a shared system prompt) once per batch;
    # the loss is the same, the compute less (see training.causal_lm_loss). CPU only.
    share_prefix: bool = True
    # Batch rows of like length (within runs of 32 batches), so less of each batch is padding.
    group_by_length: bool = True

    @field_validator("data")
    @classmethod
    def _readable(cls, value: str) -> str:
        return named_or_allowed(value, (), "training data file")

    @model_validator(mode="after")
    def _qlora_needs_a_gpu(self) -> LoraOptions:
        if self.quantize == "nf4" and self.device == "cpu":
            raise ValueError("QLoRA (quantize: nf4) trains on a GPU; it cannot run with device: cpu")
        return self


class RouterLoraOptions(LoraOptions):
    """The NPC Fast card's router recipe by default: rank 32, 3 epochs, 189 steps on 500 pairs."""

    data: str = str(ROUTER_TRAIN)
    router: str | None = None  # the variant whose router spec is taught; default: the model's own
    rank: Annotated[int, Field(ge=1, le=512)] = 32
    alpha: Annotated[float, Field(gt=0)] = 64.0
    learning_rate: Annotated[float, Field(gt=0, le=1.0)] = 3e-4
    epochs: Annotated[int, Field(ge=1, le=100)] = 3
    batch_size: Annotated[int, Field(ge=1, le=256)] = 8
    # Every linear layer, as QLoRA found best; the routing decision is one token to learn well.
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    max_length: Annotated[int, Field(ge=8, le=8192)] = 512  # the router prompt alone is ~120 tokens
    # Early stopping: this many training rows (stratified by route) are held out and routed by
    # the model every `eval_every` steps; training stops once two checks in a row reach
    # `stop_at` accuracy. 0: the card's recipe, every step of every epoch.
    holdout: Annotated[int, Field(ge=0, le=2000)] = 0
    eval_every: Annotated[int, Field(ge=1)] = 8
    stop_at: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0


def read_sft_rows(path: Path) -> list[Example]:
    """(prompt messages, answer) pairs from chat or instruction/response JSONL."""
    rows = []
    for number, item in read_jsonl(path):
        if isinstance(item, dict) and isinstance(item.get("messages"), list) and item["messages"]:
            messages = item["messages"]
            if messages[-1].get("role") != "assistant":
                raise PlaygroundError(f"{path}, line {number}: the last message must be the assistant's answer")
            rows.append((messages[:-1], messages[-1]["content"]))
        elif (
            isinstance(item, dict)
            and isinstance(item.get("instruction"), str)
            and isinstance(item.get("response"), str)
        ):
            rows.append(([{"role": "user", "content": item["instruction"]}], item["response"]))
        else:
            raise PlaygroundError(f'{path}, line {number}: expected "messages" or "instruction" and "response"')
    if not rows:
        raise PlaygroundError(f"{path} holds no examples")
    return rows


def router_answer(route: str, reason: str) -> str:
    # The key order and spacing of json.dumps are what the router's scorer forces the answer to
    # begin with (playground.router.ROUTE_PREFIX), so training and scoring agree.
    return json.dumps({"route": route, "reason": reason})


def read_router_rows(path: Path, spec: RouterSpec) -> list[Example]:
    from playground.router import read_router_data

    rows = []
    for row in read_router_data(path):
        if row["route"] not in spec.routes:
            raise PlaygroundError(f"{path}: route {row['route']!r} is not one of {spec.routes}")
        reason = str(row.get("reason") or ("needs the partner" if row["route"] == spec.escalate_route else "simple"))
        messages = [{"role": "system", "content": spec.system_prompt}, {"role": "user", "content": row["prompt"]}]
        rows.append((messages, router_answer(row["route"], reason)))
    return rows


def split_holdout(rows: list[Example], holdout: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(training rows, held-out rows): `holdout` rows drawn with the routes in the data's
    proportions (scikit-learn's stratified split), the same for the same seed."""
    if not holdout:
        return rows, []
    from sklearn.model_selection import train_test_split

    if holdout >= len(rows):
        raise PlaygroundError(f"holdout ({holdout}) must be smaller than the {len(rows)} training rows")
    routes = [json.loads(answer)["route"] for _, answer in rows]
    try:
        kept, held = train_test_split(rows, test_size=holdout, random_state=seed, stratify=routes)
    except ValueError as err:  # a route with too few rows to split
        raise PlaygroundError(f"cannot hold out {holdout} rows stratified by route: {err}") from None
    return list(kept), list(held)


class HoldoutCheck:
    """Routes the held-out rows with the model as it trains (P(escalate) from the route tokens'
    log-probabilities, as the router decides, threshold 0.5) and says when to stop."""

    def __init__(
        self, backend: Any, model: Any, rows: list[Example], spec: RouterSpec, stop_at: float, pad: int
    ) -> None:
        self.backend, self.model, self.rows, self.spec, self.stop_at, self.pad = backend, model, rows, spec, stop_at, pad
        self.history: list[tuple[int, float]] = []

    def accuracy(self) -> float:
        """The share of held-out rows routed right: every row's route continuations scored in
        batches (training.sequence_logprobs), the numbers the router's `score` gives one request
        at a time, from the weights as they are now (no score cache of the backend to clear).
        On a 2-core CPU this is no faster than one at a time (each request runs once per route)."""
        from playground.backends.base import Request, shared_prefix_length
        from playground.config import GenerationParams
        from playground.router import ROUTE_END, ROUTE_PREFIX, route_probabilities

        continuations = [r + ROUTE_END for r in self.spec.routes]
        sequences, starts = [], []
        for messages, _ in self.rows:
            request = Request(mode="chat", params=GenerationParams(), messages=tuple(messages), assistant_prefix=ROUTE_PREFIX)
            encoded = self.backend.continuation_ids(request, continuations)
            sequences += encoded
            starts += [shared_prefix_length(encoded)] * len(encoded)
        self.model.eval()
        totals = sequence_logprobs(self.model, sequences, starts, self.pad)
        self.model.train()
        correct = 0
        for number, (_, answer) in enumerate(self.rows):
            routes = totals[number * len(continuations) : (number + 1) * len(continuations)]
            escalates = route_probabilities(self.spec.routes, routes)[self.spec.escalate_route] > 0.5
            correct += escalates == (json.loads(answer)["route"] == self.spec.escalate_route)
        return correct / len(self.rows)

    def should_stop(self, step: int) -> bool:
        self.history.append((step, self.accuracy()))
        return len(self.history) >= 2 and all(acc >= self.stop_at for _, acc in self.history[-2:])


def router_spec_for(options: RouterLoraOptions, base: ModelConfig, catalogue: Catalogue) -> RouterSpec:
    if options.router:
        spec = catalogue.resolve(options.router).router
        if spec is None:
            raise PlaygroundError(f"{options.router} has no router section to teach")
        return spec
    if base.router is not None:
        return base.router
    return catalogue.get(DEFAULT_ROUTER).router  # type: ignore[return-value]


class _Checkpoint:
    """The adapter, optimizer and step of a running fine-tune, in the job's folder."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "checkpoint.pt"

    def save(self, model: Any, optimizer: Any, step: int, losses: list[float]) -> None:
        import torch
        from peft import get_peft_model_state_dict

        partial = self.path.with_suffix(".partial")
        state = {"adapter": get_peft_model_state_dict(model), "optimizer": optimizer.state_dict()}
        try:
            torch.save(state | {"step": step, "losses": losses}, partial)
        except BaseException:  # a full disk: keep the last whole checkpoint, free what was written
            partial.unlink(missing_ok=True)
            raise
        partial.replace(self.path)  # a kill mid-write leaves the previous checkpoint whole

    def load(self, model: Any, optimizer: Any) -> tuple[int, list[float]]:
        import torch
        from peft import set_peft_model_state_dict

        if not self.path.exists():
            return 0, []
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        set_peft_model_state_dict(model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        return int(state["step"]), list(state["losses"])


def epoch_batches(
    lengths: list[int],
    batch_size: int,
    rng: random.Random,
    group_by_length: bool,
    strata: list[str] | None = None,
) -> list[list[int]]:
    """One epoch's batches of example indices, shuffled by `rng`.

    Grouped by length as transformers' Trainer does it (the shuffled order cut into runs of 32
    batches, each run sorted longest first, cut into batches, the batches shuffled again), but
    with `strata` (a router's routes) sorted within each stratum and interleaved by length rank:
    the routes' lengths differ, and a plain sort made batches of one route only."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        span = batch_size * 32
        grouped = []
        for start in range(0, len(order), span):
            run = order[start : start + span]
            groups: dict[str, list[int]] = {}
            for i in run:
                groups.setdefault(strata[i] if strata else "", []).append(i)
            rank = {}
            for members in groups.values():
                members.sort(key=lambda i: -lengths[i])
                rank |= {i: (place + 0.5) / len(members) for place, i in enumerate(members)}
            grouped += sorted(run, key=lambda i: rank[i])
        order = grouped
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


def _tokenize(
    backend: Any, rows: list[Example], max_length: int
) -> tuple[list[tuple[list[int], list[int]]], int, list[int]]:
    """Token ids and labels (-100 outside the answer) of each example that keeps part of its
    answer, how many were cut, and the indices in `rows` of those kept."""
    from playground.backends.base import Request
    from playground.config import GenerationParams

    codec, examples, cut, kept = backend.codec, [], 0, []
    for index, (messages, answer) in enumerate(rows):
        prompt = backend.prepare(Request(mode="chat", params=GenerationParams(), messages=tuple(messages)))
        answer_ids = codec.encode(answer, add_special_tokens=False) + sorted(codec.eos_ids)[:1]
        ids = (prompt.payload + answer_ids)[:max_length]
        labels = ([-100] * len(prompt.payload) + answer_ids)[:max_length]
        cut += len(prompt.payload) + len(answer_ids) > max_length
        if any(label != -100 for label in labels):
            examples.append((ids, labels))
            kept.append(index)
    if not examples:
        raise PlaygroundError(
            f"in every example the prompt fills max_length ({max_length} tokens) before the answer: raise max_length"
        )
    return examples, cut, kept


def run_lora(options: LoraOptions, ctx: JobContext) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    base = ctx.catalogue.resolve(options.model)
    check_trainable(base, "LoRA")
    held: list[Example] = []
    if isinstance(options, RouterLoraOptions):
        spec = router_spec_for(options, base, ctx.catalogue)
        rows, held = split_holdout(read_router_rows(Path(options.data), spec), options.holdout, options.seed)
    else:
        spec, rows = base.router, read_sft_rows(Path(options.data))
    torch.manual_seed(options.seed)
    backend = load_for_training(ctx.catalogue, base.id, options.device, options.quantize)
    examples, cut, kept = _tokenize(backend, rows, options.max_length)
    # A router's batches keep its routes mixed when grouped by length (see epoch_batches).
    routes = [json.loads(rows[i][1])["route"] for i in kept] if isinstance(options, RouterLoraOptions) else None
    model = backend.model
    if options.quantize == "nf4":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(
        model,
        LoraConfig(
            r=options.rank,
            lora_alpha=options.alpha,
            lora_dropout=0.0,
            target_modules=options.target_modules,
            task_type="CAUSAL_LM",
        ),
    )
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=options.learning_rate)
    ctx.folder.mkdir(parents=True, exist_ok=True)
    checkpoint = _Checkpoint(ctx.folder)
    resumed_at, losses = checkpoint.load(model, optimizer)
    steps_per_epoch = math.ceil(len(examples) / options.batch_size)
    # A CPU step is bound by compute, which sharing cuts; a small model's GPU step is bound by
    # kernel launches, which the second pass adds (the 135M router's LoRA on the H200: 84.8 s
    # with it, 45.5 s without).
    share = options.share_prefix and backend.device == "cpu"
    common = unlabelled_prefix_length(examples) if share and options.batch_size > 1 else 0
    total = steps_per_epoch * options.epochs
    ctx.emit(
        {
            "message": f"{len(examples)} examples, {total} steps on {backend.device}"
            + (f"; {cut} cut at max_length {options.max_length}, their answers in part or not at all" if cut else "")
            + (f"; resumed from the checkpoint at step {resumed_at}" if resumed_at else "")
            + (f"; the {common} prompt tokens every example begins with run once per batch" if common else "")
            + (
                f"; {len(held)} rows held out, routed every {options.eval_every} steps (stops at accuracy "
                f"{options.stop_at:g} twice in a row)"
                if held
                else ""
            ),
            "step": resumed_at,
            "total": total,
        }
    )
    pad = sorted(backend.codec.eos_ids)[0] if backend.codec.eos_ids else 0

    check = HoldoutCheck(backend, model, held, spec, options.stop_at, pad) if held and spec else None
    stopped = {"at": 0, "last": resumed_at}

    def batches() -> Iterator[Step]:
        rng, step = random.Random(options.seed), 0
        lengths = [len(ids) for ids, _ in examples]
        for epoch in range(options.epochs):
            # Replayed on resume, so the data order is the same as without a break.
            for indices in epoch_batches(lengths, options.batch_size, rng, options.group_by_length, routes):
                step += 1
                if step <= resumed_at:
                    continue
                if stopped["at"]:
                    return
                batch = [examples[i] for i in indices]
                shared = unlabelled_prefix_length(batch) if share else 0
                yield Step(step, padded_batch(batch, pad, backend.device), {"epoch": epoch + 1}, shared_prefix=shared)

    def keep(step: int, losses_so_far: list[float]) -> None:
        stopped["last"] = step
        if check is not None and step % options.eval_every == 0 and step < total:
            if check.should_stop(step):
                stopped["at"] = step
            accuracy = check.history[-1][1]
            ctx.emit(
                {"message": f"step {step}: held-out route accuracy {accuracy:.3f} ({len(held)} rows)"
                 + ("; stopping early" if stopped["at"] else ""), "metrics": {"held-out route accuracy": accuracy}}
            )  # fmt: skip
        if step % options.checkpoint_every == 0 and step < total and not stopped["at"]:
            checkpoint.save(model, optimizer, step, losses_so_far)

    started = time.perf_counter()
    losses = train(model, optimizer, batches(), total, ctx.emit, losses=losses, after_step=keep)
    wall = time.perf_counter() - started
    variant_id = options.name or f"{base.id}-lora-{ctx.job_id[-6:]}"
    label = "router LoRA" if isinstance(options, RouterLoraOptions) else "LoRA"
    config = result_config(base, options, variant_id, ctx.job_id, label, spec)
    if options.merge and options.quantize == "none":
        folder = ctx.folder / "merged"
        model = model.merge_and_unload()
        with saving_into(folder) as partial:
            model.save_pretrained(partial)
            if not isinstance(backend.codec, TiktokenCodec):
                backend.codec.tokenizer.save_pretrained(partial)
        config.update(backend="transformers", source={"path": str(folder)})
        if isinstance(backend.codec, TiktokenCodec):
            # A tiktoken tokenizer (scratch_gpt) has no HF form: the config names it.
            config["tokenizer"] = (
                base.tokenizer.model_dump(exclude_none=True) if base.tokenizer else {"tiktoken": "gpt2"}
            )
    else:  # an adapter on the unchanged base (QLoRA results are always kept this way)
        folder = ctx.folder / "adapter"
        with saving_into(folder) as partial:
            model.save_pretrained(partial)
        config["adapter"] = {"path": str(folder)}
    save_variant_config(config, ctx.catalogue)
    checkpoint.path.unlink(missing_ok=True)
    ctx.emit({"message": f"saved {variant_id} in {folder}"})
    result = {
        "variant_id": variant_id,
        "folder": str(folder),
        "steps": stopped["last"],
        "final_loss": losses[-1] if losses else None,
        "train_wall_s": round(wall, 2),
        "resumed_at": resumed_at,
    }
    if check is not None:
        result |= {"planned_steps": total, "stopped_early_at": stopped["at"] or None, "holdout": len(held)}
        result["holdout_accuracy"] = [{"step": step, "accuracy": acc} for step, acc in check.history]
    return result


def result_config(
    base: ModelConfig,
    options: Any,
    variant_id: str,
    job_id: str,
    label: str,
    spec: RouterSpec | None = None,
) -> dict[str, Any]:
    """The base's config, renamed, with its provenance; the caller says where the weights are."""
    config = base.model_dump(mode="json", exclude_none=True, exclude={"shape", "notes"})
    config.update(
        id=variant_id,
        display_name=f"{base.display_name} + {label} ({job_id[-6:]})",
        finetune={
            "base": base.id,
            "data": getattr(options, "data", None) or getattr(options, "corpus", ""),
            "job_id": job_id,
            "options": options.model_dump(),
        },
    )
    if getattr(options, "quantize", "none") == "nf4":
        config.update(
            device="cuda", quantization={"method": "nf4", "compute_dtype": "bf16", "keep_modules": ["lm_head"]}
        )
    if spec is not None:
        config.update(router=spec.model_dump(), role="router")
    return config


def save_variant_config(config: dict[str, Any], catalogue: Catalogue) -> Path:
    """Write a job-made variant's config where every catalogue finds it, after validating it."""
    ModelConfig.model_validate(config)  # never leave a config the catalogue would refuse
    if catalogue.made_dir is None:
        raise PlaygroundError("this catalogue has no folder for the variants jobs make")
    config_dir = catalogue.made_dir
    config_dir.mkdir(parents=True, exist_ok=True)
    path = config_dir / f"{config['id']}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
