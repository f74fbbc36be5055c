"""Fast batch-1 decoding for transformers models: a static KV cache and a CUDA graph per token.

Plain `generate` spends most of a small model's token on the CPU: a thousand kernel launches from
Python, a growing cache and the generation machinery around them, while the GPU waits. Here the
prompt is prefilled eagerly into a `StaticCache` sized to the request, and every later token is
one replay of a captured CUDA graph (embedding, every layer, the head). The graph builds its own
attention mask from a position counter that lives on the GPU, so nothing in it depends on the CPU.

The loop also runs one step ahead: the next step is queued before the CPU reads the token just
chosen, so sampling, text decoding and the pipe to the app overlap with the GPU's work. When the
token read turns out to be an end of sequence, that one extra step is simply dropped.

Before the first step, each layer's q/k/v projections become one matmul, and gate/up another
(`fuse_projections`): at batch 1 a small model's token is bound by kernel count, not bytes, and
this takes three of every layer's seven weight matmuls away.

On CPU, or where capture fails (bitsandbytes int8 picks outlier columns by value, which a graph
cannot hold), the same step runs eagerly: the same arithmetic without the replay, which is what
the CPU tests compare against `generate`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from transformers import StaticCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from playground.backends.base import SpeculationStats, speculative_loop
from playground.config import GenerationParams

# The smallest cache; larger requests get the next power of two. Attention reads the whole
# static cache every token, so the cache follows the request instead of the model's context.
MIN_CACHE_TOKENS = 256


# A prompt on the GPU is padded to a power of two of at least this many tokens, and each padded
# length has its own captured prefill (a graph per length, as a graph replays fixed shapes).
MIN_PREFILL_TOKENS = 32
# Padded prompt lengths captured when a cache is made, so a prompt of a new length does not pay
# a capture (three eager passes) on its first token; longer ones are captured at first use.
WARM_PREFILL_TOKENS = (32, 64, 128, 256, 512, 1024)


def time_in_turns(
    runs: dict[str, Callable[[], None]],
    synchronize: Callable[[], None],
    rounds: int = 5,
) -> dict[str, float]:
    """Each run's ms, the median of `rounds` timings taken in turns, back and forth (a drift of
    the clocks favours neither end); `synchronize` waits for what a run queued (the GPU's work).
    Each is run once before its first timing."""
    samples: dict[str, list[float]] = {label: [] for label in runs}
    for run in runs.values():
        run()
    for round_ in range(rounds):
        for label in list(runs)[:: -1 if round_ % 2 else 1]:
            synchronize()
            started = time.perf_counter()
            runs[label]()
            synchronize()
            samples[label].append((time.perf_counter() - started) * 1000)
    return {label: statistics.median(times) for label, times in samples.items()}


def power_of_two_at_least(needed: int, smallest: int) -> int:
    """The smallest of smallest, 2 * smallest, 4 * smallest, ... that holds `needed`: the padded
    lengths of caches, prompts and scored tails, so few graphs are ever captured."""
    size = smallest
    while size < needed:
        size *= 2
    return size


def prefill_tokens_for(prompt: int) -> int:
    """The padded length a prompt of `prompt` tokens is prefilled at."""
    return power_of_two_at_least(prompt, MIN_PREFILL_TOKENS)


def cache_tokens_for(needed: int, limit: int) -> int:
    """Cache length for a request of `needed` positions: a power of two, at least
    MIN_CACHE_TOKENS, never above the model's context `limit`."""
    return min(power_of_two_at_least(needed, MIN_CACHE_TOKENS), limit)


_warm_up_streams: dict[torch.device, torch.cuda.Stream] = {}


def capture_graph(
    body: Callable[[], Any], warm_ups: int, before: Callable[[], None] = lambda: None, pool: Any = None
) -> tuple[torch.cuda.CUDAGraph, Any]:
    """`body` captured as a CUDA graph, and what it returned at capture (the tensors a replay
    refills). It runs `warm_ups` times first on a side stream (a compile, cuBLAS and the
    allocator settle there); `before` runs ahead of each run, to set counters the body reads.

    One side stream per device for every capture of the process: cuBLAS keeps a workspace for
    each stream it has run on (32 MiB on a Hopper GPU), so a new stream per capture adds one per
    padded prompt length. Five lengths of 32 MiB match the ~160 MiB by which the 135M's peak
    grew on the H200 with prefill graphs (not yet measured with this change)."""
    device = torch.device("cuda", torch.cuda.current_device())
    side = _warm_up_streams.get(device)
    if side is None:
        side = _warm_up_streams[device] = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warm_ups):
            before()
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    before()
    with torch.cuda.graph(graph, pool=pool):
        out = body()
    return graph, out


def sampling_processors(params: GenerationParams) -> tuple[LogitsProcessorList, bool]:
    """The logits processors `generate` would build for these settings, in its order, and
    whether to sample (False: greedy)."""
    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    sample = params.temperature > 0
    if sample:
        if params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            processors.append(TopKLogitsWarper(top_k=params.top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=params.top_p))
    return processors, sample


class FusedProjections(nn.Module):
    """Several projections of one input as one matmul; each `ProjectionPart` returns its slice.

    The parts stay where the model's own forward calls them (q_proj, k_proj, v_proj), so no
    architecture's attention code is rewritten. The first part called computes every output and
    keeps them for the others; a part called with another input computes afresh, so an
    unexpected call order costs speed, never correctness."""

    def __init__(self, linears: Sequence[nn.Linear]) -> None:
        super().__init__()
        with torch.no_grad():
            self.weight = nn.Parameter(torch.cat([linear.weight for linear in linears]), requires_grad=False)
            has_bias = linears[0].bias is not None
            bias = torch.cat([linear.bias for linear in linears]) if has_bias else None
            self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.sizes = [linear.out_features for linear in linears]
        self._input: torch.Tensor | None = None
        self._outputs: tuple[torch.Tensor, ...] = ()

    def part(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index == 0 or self._input is not x:
            self._outputs = nn.functional.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)
            self._input = x
        out = self._outputs[index]
        if index == len(self.sizes) - 1:  # the last part: nothing is kept past the layer
            self._input, self._outputs = None, ()
        return out


class ProjectionPart(nn.Module):
    def __init__(self, fused: FusedProjections, index: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.__dict__["fused"] = fused  # registered once, on the parent, not under every part
        self.index = index
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.part(self.index, x)


# Groups of sibling projections that read the same input: attention's, then the gated MLP's.
FUSABLE_GROUPS = {"qkv_fused": ("q_proj", "k_proj", "v_proj"), "gate_up_fused": ("gate_proj", "up_proj")}


def fusable_groups(model: nn.Module) -> list[tuple[nn.Module, str, tuple[str, ...]]]:
    """(parent module, fused name, projection names) of every group of FUSABLE_GROUPS found as
    plain `nn.Linear`s of one input size and alike in bias; quantized or adapter layers are not."""
    found = []
    for module in model.modules():
        for fused_name, names in FUSABLE_GROUPS.items():
            linears = [getattr(module, name, None) for name in names]
            if not all(type(linear) is nn.Linear for linear in linears):
                continue
            if (
                len({linear.in_features for linear in linears}) == 1
                and len({linear.bias is None for linear in linears}) == 1
            ):
                found.append((module, fused_name, names))
    return found


def fuse_projections(model: nn.Module) -> int:
    """Fuse every group `fusable_groups` finds; returns how many. The separate weights are
    dropped group by group, so the model's tensors grow by one group's projections at most."""
    groups = fusable_groups(model)
    for module, fused_name, names in groups:
        linears = [getattr(module, name) for name in names]
        fused = FusedProjections(linears)
        module.add_module(fused_name, fused)
        for index, linear in enumerate(linears):
            setattr(module, names[index], ProjectionPart(fused, index, linear.in_features, linear.out_features))
    return len(groups)


@dataclass(frozen=True)
class DecodePath:
    """How a variant decodes, for the UI: `name` is short, `reason` says why not faster."""

    name: str  # "cuda-graph", "static-cache" or "generate"
    reason: str = ""
    compiled: bool = False  # the step went through torch.compile
    fused: bool = False  # q/k/v and gate/up projections run as one matmul each
    prefill_graphs: bool = False  # prompts go through a captured pass per padded length
    triton_layers: bool = False  # single-token passes through triton_layers' kernels
    triton_choices: str = ""  # what their load-time timing chose, where it matters to a reader

    def describe(self) -> str:
        text = {
            "cuda-graph": "fast decode: static KV cache + CUDA graph",
            "static-cache": "static KV cache, eager steps",
            "generate": "plain generate",
        }[self.name]
        if self.compiled:
            text += " of a compiled step"
        if self.fused:
            text += ", fused projections"
        if self.triton_layers:
            text += ", norms, SiLU and residual adds inside Triton matvecs, attention in a Triton kernel"
            if self.triton_choices:
                text += f" ({self.triton_choices})"
        if self.prefill_graphs:
            text += ", prompts through captured passes"
        return f"{text} ({self.reason})" if self.reason else text


class StaticDecoder:
    """Decodes one sequence at a time into a static cache, replaying a CUDA graph per token."""

    def __init__(
        self,
        model: Any,
        context_limit: int,
        use_cuda_graph: bool,
        compile_step: bool = False,
        pad_prefill: bool | None = None,
    ) -> None:
        self.model = model
        self.context_limit = context_limit
        self.use_cuda_graph = use_cuda_graph
        self.device = model.device
        self.capacity = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        # Prompts are prefilled padded to a power of two (prefill_tokens_for) on a GPU, where
        # that lets each length replay a captured pass: eagerly, a 1.7B's 256-token prefill took
        # ~30 ms of launching for ~3 ms of GPU work (3x llama.cpp's time to first token). A
        # decoder without graphs pads too, so it computes what the graphed one does; a CPU
        # would only pay for the padding, so there it is off unless asked for (the tests).
        self.pad_prefill = self.device.type == "cuda" if pad_prefill is None else pad_prefill
        self._prefills: dict[int, dict[str, Any]] = {}  # per padded length: buffers, graph, logits
        self._prefill_pool: Any = None
        self.prefill_graph_failure = ""
        # A graph removes launch gaps, not launches: the model's ~50 small kernels per layer
        # (norms, RoPE, SiLU, adds) still cost ~1.5 us each. torch.compile fuses them; the graph
        # is then captured around the compiled step. Compiled once per cache size.
        self._step_fn = torch.compile(self._step, dynamic=False) if compile_step else self._step
        # Speculative passes on a GPU: the last token and `_verify_length - 1` drafts, padded,
        # through a graph captured at the first pass (per cache size).
        self._verify_length = 0
        self._verify_graph: torch.cuda.CUDAGraph | None = None
        # Compiled as the step is (its elementwise kernels fused), once: Dynamo recompiles it
        # for a new pass length or cache size, and reuses what it compiled otherwise.
        self._verify_fn = torch.compile(self._fixed_verify, dynamic=False) if compile_step else self._fixed_verify
        self.verify_graph_failure = ""

    # -- buffers and the graph ---------------------------------------------------------------
    def prepare(self, capacity: int) -> None:
        """Allocate the cache and step buffers for `capacity` positions (and capture the step)."""
        if capacity == self.capacity:
            return
        self.release()
        with torch.inference_mode():
            self.cache = StaticCache(config=self.model.config, max_cache_len=capacity)
            self._token = torch.zeros((1, 1), dtype=torch.long, device=self.device)
            self._position = torch.zeros((1,), dtype=torch.long, device=self.device)
            self._positions = torch.arange(capacity, device=self.device)
            self._mask = torch.zeros((capacity,), dtype=torch.bool, device=self.device)
            self._history = torch.zeros((1, capacity), dtype=torch.long, device=self.device)
            # The chosen token comes back through pinned memory, so its copy can be waited on
            # alone while the next step runs.
            self._host = torch.empty((1,), dtype=torch.long, pin_memory=self.device.type == "cuda")
            # The cache allocates its tensors on first use: one eager token does that here, so
            # the graph below records fixed addresses.
            self.model(input_ids=self._token, past_key_values=self.cache, use_cache=True)
        self.capacity = capacity
        if self.use_cuda_graph:
            self._capture()
            for length in WARM_PREFILL_TOKENS:
                if length <= capacity and not self.prefill_graph_failure:
                    self._prefill_for(length)

    def release(self) -> None:
        """Drop the cache, buffers and graphs (a bigger request, or unloading)."""
        self._graph = self._verify_graph = None
        self._prefills.clear()
        for name in ("cache", "_token", "_position", "_positions", "_mask", "_history", "_host", "_graph_logits"):
            self.__dict__.pop(name, None)
        for name in ("_verify_tokens", "_verify_start", "_verify_offsets", "_verify_logits"):
            self.__dict__.pop(name, None)
        self.capacity = 0

    def _step(self) -> torch.Tensor:
        """Feed the token at the current position; return the next token's logits [1, vocab].
        Everything here stays on the GPU, so it can be captured."""
        torch.le(self._positions, self._position, out=self._mask)  # attend to 0..position
        out = self.model(
            input_ids=self._token,
            position_ids=self._position.view(1, 1),
            attention_mask=self._mask.view(1, 1, 1, -1),
            past_key_values=self.cache,
            use_cache=True,
        )
        self._position.add_(1)
        return out.logits[:, -1, :]

    def _capture(self) -> None:
        with torch.inference_mode():
            self._position.fill_(1)  # warm-up steps write cache slots that every request rewrites
            self._graph, self._graph_logits = capture_graph(self._step_fn, warm_ups=3)

    def replay_steps(self, count: int) -> None:
        """`count` steps (replays of the captured step, where there is one) from the middle of
        the cache on (timing: each attends to as many slots as a reply halfway through its room
        would). The slots they write are rewritten by every request. In inference mode, as a
        request runs: the buffers were made in it, and may not be written outside it."""
        assert self.capacity, "no cache: prepare() first"
        with torch.inference_mode():
            self._position.fill_(max(1, min(self.capacity // 2, self.capacity - count)))
            for _ in range(count):
                self._run_step()

    def replay_passes(self, count: int) -> None:
        """`count` speculative passes of the length the last speculative reply used, from the
        middle of the cache on, each as a reply's pass runs (the write counters set, then the
        pass's graph, or the eager pass where none was captured). Timing, as replay_steps; the
        slots they write are rewritten by every request."""
        assert self.capacity and self._verify_length, "no pass yet: run a speculative reply first"
        start = max(1, min(self.capacity // 2, self.capacity - self._verify_length))
        with torch.inference_mode():
            for _ in range(count):
                self._verify([1] * self._verify_length, start)

    def _run_step(self) -> torch.Tensor:
        if self._graph is not None:
            self._graph.replay()
            return self._graph_logits
        return self._step_fn()

    # -- one request ---------------------------------------------------------------------------
    def _prefill(self, prompt_ids: Sequence[int], room_after: int, capture_verify: bool = False) -> torch.Tensor:
        """A cache sized for the prompt and `room_after` more positions, the prompt written into
        it in one pass; the logits after its last token, [1, vocab]. `capture_verify`: first
        capture the speculative pass's graph, if steps replay one and it is not there yet."""
        n_prompt = len(prompt_ids)
        if n_prompt >= self.context_limit:
            raise ValueError(f"the prompt ({n_prompt} tokens) leaves no room in the context ({self.context_limit})")
        self.prepare(cache_tokens_for(n_prompt + room_after, self.context_limit))
        if capture_verify and self.use_cuda_graph and self._verify_graph is None and not self.verify_graph_failure:
            self._capture_verify()
        return self._write_prompt(prompt_ids)

    def _write_prompt(self, prompt_ids: Sequence[int]) -> torch.Tensor:
        """The prompt into the cache from position 0, padded where `pad_prefill` says; the
        logits after its last token, [1, vocab]."""
        n_prompt = len(prompt_ids)
        with torch.inference_mode():
            self._history[:, :n_prompt] = torch.tensor([list(prompt_ids)], dtype=torch.long)
            length = prefill_tokens_for(n_prompt)
            if self.pad_prefill and length <= self.capacity:
                logits = self._padded_prefill(prompt_ids, length)
                self._set_length(n_prompt)  # the first step writes over the first padding row
            else:
                self.cache.reset()
                prompt = self._history[:, :n_prompt]
                logits = self.model(
                    input_ids=prompt, past_key_values=self.cache, use_cache=True, logits_to_keep=1
                ).logits[:, -1, :]
            self._position.fill_(n_prompt)
        return logits

    def _padded_prefill(self, prompt_ids: Sequence[int], length: int) -> torch.Tensor:
        """The prompt padded to `length` with its last token, through that length's graph where
        there is one. Padding rows come after every real one, so no real row sees them (the
        mask is causal), and the cache slots they fill are masked until a step writes them."""
        run = self._prefill_for(length)
        padded = list(prompt_ids) + [prompt_ids[-1]] * (length - len(prompt_ids))
        run["ids"].copy_(torch.tensor([padded], dtype=torch.long), non_blocking=True)
        run["last"].fill_(len(prompt_ids) - 1)
        self._set_length(0)
        if run["graph"] is not None:
            run["graph"].replay()
            return run["logits"]
        return self._prefill_pass(run)

    def _prefill_pass(self, run: dict[str, Any]) -> torch.Tensor:
        ids = run["ids"]
        # The last real row's logits only: the head is a large matmul.
        return self._masked_pass(ids, self._positions[: ids.shape[1]], logits_to_keep=run["last"])[:, -1, :]

    def _prefill_for(self, length: int) -> dict[str, Any]:
        """The buffers of a padded prefill of `length`, and its graph (captured here, once per
        cache) where steps replay one; a failed capture leaves eager passes and its reason in
        `prefill_graph_failure`."""
        if length in self._prefills:
            return self._prefills[length]
        run: dict[str, Any] = {
            "ids": torch.zeros((1, length), dtype=torch.long, device=self.device),
            "last": torch.zeros((1,), dtype=torch.long, device=self.device),
            "graph": None,
        }
        self._prefills[length] = run
        if not self.use_cuda_graph or self.prefill_graph_failure:
            return run
        if self._prefill_pool is None:
            # One pool for every length: a replay's logits are read before another prefill
            # replays, so the lengths can share their scratch memory.
            self._prefill_pool = torch.cuda.graph_pool_handle()
        try:
            with torch.inference_mode():
                run["graph"], run["logits"] = capture_graph(
                    lambda: self._prefill_pass(run), 2, lambda: self._set_length(0), self._prefill_pool
                )
        except Exception as err:  # eager padded passes give the same logits, only slower
            self.prefill_graph_failure = f"the prefill could not be captured: {str(err).splitlines()[0]}"
            torch.cuda.synchronize()
        return run

    def tokens(
        self, prompt_ids: Sequence[int], params: GenerationParams, should_stop: Callable[[], bool]
    ) -> Iterator[int]:
        """Token ids as they are made: at most max_new_tokens, ending early when the caller
        stops iterating (end of sequence) or should_stop() turns true; the cache's end also
        ends it."""
        n_prompt = len(prompt_ids)
        logits = self._prefill(prompt_ids, params.max_new_tokens)
        processors, sample = sampling_processors(params)
        on_cuda = self.device.type == "cuda"
        host = self._host
        copied = torch.cuda.Event() if on_cuda else None
        position, produced = n_prompt, 0
        while True:
            with torch.inference_mode():
                chosen = self._choose(logits, position, processors, sample)
                self._token.copy_(chosen.view(1, 1))
                host.copy_(chosen, non_blocking=on_cuda)
                if copied is not None:
                    copied.record()
                # Queue the next step before reading this token back (see the module's note).
                more = produced + 1 < params.max_new_tokens and position + 1 < self.capacity
                if more:
                    logits = self._run_step()
            if copied is not None:
                copied.synchronize()
            yield int(host[0])
            produced += 1
            if not more or should_stop():
                return
            position += 1

    def _choose(
        self, logits: torch.Tensor, position: int, processors: LogitsProcessorList, sample: bool
    ) -> torch.Tensor:
        scores = processors(self._history[:, :position], logits.float())
        if sample:
            chosen = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).view(1)
        else:
            chosen = torch.argmax(scores, dim=-1)
        self._history[:, position] = chosen
        return chosen

    # -- speculative decoding ----------------------------------------------------------------
    def speculative_tokens(
        self,
        prompt_ids: Sequence[int],
        params: GenerationParams,
        should_stop: Callable[[], bool],
        drafter: Drafter,
        num_tokens: int,
        stats: SpeculationStats,
    ) -> Iterator[int]:
        """Greedy token ids as `tokens` gives them, made in fewer passes: each pass feeds the last
        token with up to `num_tokens` drafted after it, and keeps the drafts up to the first
        one this model would not have chosen, plus its own choice there. Each row of the pass
        sees exactly the cache a single step would see there (the mask hides later rows and
        slots left by rejected drafts), so the choices are plain decoding's. The first few
        steps run plain and timed: `stats.plain_tok_s`, at this reply's length and on this
        machine as it is now, is what the reply's speed-up is measured against."""
        processors, sample = sampling_processors(params)
        if sample:
            raise ValueError("speculative decoding here is for greedy replies")
        n_prompt = len(prompt_ids)
        if self._verify_length != num_tokens + 1:
            self._verify_length, self._verify_graph, self.verify_graph_failure = num_tokens + 1, None, ""
        # Room for a whole pass past the last token kept: its drafts are written, then dropped.
        # The pass's graph is captured before the prompt is written: capturing runs the pass on
        # the cache, which mid-reply would write over the prompt's first positions.
        logits = self._prefill(prompt_ids, params.max_new_tokens + num_tokens + 1, capture_verify=True)
        drafter.begin(self.capacity)
        with torch.inference_mode():
            token = int(self._choose(logits, n_prompt, processors, sample))
        yield token

        def check(token: int, drafts: list[int], position: int) -> Callable[[int], int]:
            with torch.inference_mode():
                if not drafts:
                    rows = self._single(token, position)
                else:
                    # A graph replays one fixed length: pad with the last draft (rows past the
                    # drafts are never read, and their cache slots are written over later).
                    padded = self.use_cuda_graph and position + num_tokens + 1 <= self.capacity
                    padding = [drafts[-1]] * (num_tokens - len(drafts)) if padded else []
                    rows = self._verify([token, *drafts, *padding], position)
                return self._row_chooser(rows, len(drafts) + 1, position + 1, processors)

        # The cache holds the last token and the drafts kept: each pass sets its write counters
        # (_single, _verify), so nothing needs rewinding.
        yield from speculative_loop(
            [*prompt_ids, token], n_prompt, self.capacity, params, should_stop, num_tokens,
            drafter.propose, check, stats,
        )  # fmt: skip

    def _row_chooser(
        self, rows: torch.Tensor, count: int, at: int, processors: LogitsProcessorList
    ) -> Callable[[int], int]:
        """The greedy choice at each of a pass's first `count` rows (row i at position at + i).
        Without processors every row's choice is read back at once (one wait on the GPU, not
        one a row); a repetition penalty needs each choice in the history before the next."""
        if processors:

            def choose(row: int) -> int:
                with torch.inference_mode():
                    return int(self._choose(rows[row : row + 1], at + row, processors, False))

            return choose
        chosen = torch.argmax(rows[:count], dim=-1)
        self._history[0, at : at + count] = chosen  # rows past the kept ones are rewritten later
        choices = chosen.tolist()
        return lambda row: choices[row]

    def _set_length(self, length: int) -> None:
        """The cache's next write goes to `length` (each layer's own counter). All the layers'
        counters in two launches, not one a layer: a speculative reply sets them before each
        pass, after the last pass's choices were read back, so the GPU waits for every launch."""
        counters = [layer.cumulative_length for layer in self.cache.layers]
        torch._foreach_zero_(counters)
        if length:
            torch._foreach_add_(counters, length)

    def _single(self, token: int, position: int) -> torch.Tensor:
        """One token at `position` through the step (the graph where there is one): [1, vocab]."""
        self._set_length(position)
        self._token.fill_(token)
        self._position.fill_(position)
        return self._run_step()

    def _verify(self, tokens: list[int], position: int) -> torch.Tensor:
        """`tokens` at positions position.. in one pass: the logits after each, [len, vocab].
        Where steps replay a CUDA graph, a pass of `tokens` padded to a fixed length replays
        one too (captured at its first use): eagerly, a pass costs a step's ~900 launches."""
        self._set_length(position)
        count = len(tokens)
        if self.use_cuda_graph and count == self._verify_length:
            rows = self._verify_replay(tokens, position)
            if rows is not None:
                return rows
        token_ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        return self._masked_pass(token_ids, self._positions[position : position + count])[0]

    def _masked_pass(
        self, token_ids: torch.Tensor, positions: torch.Tensor, logits_to_keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`token_ids` [1, n] at `positions` in one pass over the cache, each row seeing the
        cache up to its own position (later rows, padding and stale slots masked); the logits
        [1, rows, vocab], of every row or of the rows `logits_to_keep` names. Everything stays
        on the device, so it can be captured."""
        count = token_ids.shape[1]
        mask = self._positions.view(1, -1) <= positions.view(-1, 1)
        keep = {} if logits_to_keep is None else {"logits_to_keep": logits_to_keep}
        out = self.model(
            input_ids=token_ids,
            position_ids=positions.view(1, -1),
            attention_mask=mask.view(1, 1, count, -1),
            past_key_values=self.cache,
            use_cache=True,
            **keep,
        )
        return out.logits

    def _verify_replay(self, tokens: list[int], position: int) -> torch.Tensor | None:
        """The fixed-length pass through its graph; None where it cannot be captured (then
        passes run eagerly, and the reason is kept in `verify_graph_failure`)."""
        if self._verify_graph is None:  # captured before the prompt (_prefill), or failed
            return None
        self._verify_tokens.copy_(torch.tensor([tokens], dtype=torch.long), non_blocking=True)
        self._verify_start.fill_(position)
        self._verify_graph.replay()
        return self._verify_logits

    def _fixed_verify(self) -> torch.Tensor:
        """The pass of `_verify_tokens` from `_verify_start`: what the verify graph holds."""
        return self._masked_pass(self._verify_tokens, self._verify_start + self._verify_offsets)[0]

    def _capture_verify(self) -> None:
        """The fixed-length pass's graph. Its warm-up and capture write cache slots from 1 on,
        so this runs before a prompt is written (_prefill)."""
        length = self._verify_length
        self._verify_tokens = torch.zeros((1, length), dtype=torch.long, device=self.device)
        self._verify_start = torch.ones((1,), dtype=torch.long, device=self.device)
        self._verify_offsets = torch.arange(length, device=self.device)
        try:
            with torch.inference_mode():  # three runs: the first compiles
                self._verify_graph, self._verify_logits = capture_graph(self._verify_fn, 3, lambda: self._set_length(1))
        except Exception as err:  # eager passes still give the same tokens, only slower
            self.verify_graph_failure = f"the verify pass could not be captured: {str(err).splitlines()[0]}"
            torch.cuda.synchronize()

    def start_drafting(self, capacity: int) -> int:
        """As a draft model (base.DraftModel): a cache for `capacity` positions, within the context."""
        self.prepare(min(capacity, self.context_limit))
        return self.capacity

    def greedy_continue(self, ids: list[int], start: int, count: int) -> list[int]:
        """As a draft model: feed ids[start:] after the first `start` already in the cache, then
        `count` greedy tokens in all; the cache keeps all but the last of them."""
        with torch.inference_mode():
            new = ids[start:]
            if start == 0 and len(new) > 4:  # the prompt: as the target's own is written
                logits = self._write_prompt(new)
            elif len(new) <= 4:  # the usual case: the last draft and the target's own token, as steps
                for offset, token in enumerate(new):
                    logits = self._single(token, start + offset)
            else:
                logits = self._verify(new, start)[-1:]
            drafted = [int(torch.argmax(logits, dim=-1))]
            position = len(ids)
            while len(drafted) < count and position + 1 < self.capacity:
                logits = self._single(drafted[-1], position)
                drafted.append(int(torch.argmax(logits, dim=-1)))
                position += 1
        return drafted


class Drafter(Protocol):
    """What proposes the tokens a speculative pass checks."""

    def begin(self, capacity: int) -> None: ...

    def propose(self, history: list[int], count: int) -> list[int]: ...


class PromptLookupDrafter:
    """Drafts what followed the last few tokens where they appeared before in the prompt or
    reply (transformers' own prompt-lookup candidate generator)."""

    def __init__(self, ngram: int, num_tokens: int) -> None:
        from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

        self.generator = PromptLookupCandidateGenerator(
            num_output_tokens=num_tokens, max_matching_ngram_size=ngram, max_length=1 << 30
        )

    def begin(self, capacity: int) -> None:
        return None

    def propose(self, history: list[int], count: int) -> list[int]:
        ids = torch.tensor([history], dtype=torch.long)  # on the host: the search reads values
        candidates, _ = self.generator.get_candidates(ids)
        return candidates[0, len(history) :].tolist()[:count]


# The shortest tail a scoring pass is padded to; longer tails take the next power of two.
MIN_SCORE_TOKENS = 16
# Tail lengths whose graphs are captured at the first score, so a request of a new length does
# not pay a capture (suspected behind the 1.7B router's p95 of ~100 ms on the H200 against a
# 6.3 ms p50: benchmarks/RESULTS.md).
WARM_SCORE_TOKENS = (16, 32, 64, 128)


class StaticScorer:
    """Log-probabilities of several continuations of one prompt in one batched pass.

    A router's decision was two eager passes of ~870 kernel launches each: on the H200 a 1.7B
    pass took ~20 ms of CPU launching for ~3 ms of GPU work. Here each continuation is a row of
    one batch; the prompt's stable part (a router's system prompt) is prefilled once into a
    static cache and kept while it stays the same; the rest of the prompt and the continuation
    are padded to a power-of-two length, and each length has a captured CUDA graph that also
    picks and sums the log-probabilities, so a decision is one replay and one read back.
    Without a graph (CPU, or a failed capture) the same pass runs eagerly."""

    def __init__(self, model: Any, context_limit: int, use_cuda_graph: bool) -> None:
        self.model = model
        self.context_limit = context_limit
        self.use_cuda_graph = use_cuda_graph
        self.device = model.device
        self.rows = 0
        self.capacity = 0
        self.stable: list[int] | None = None
        self._passes: dict[int, dict[str, Any]] = {}  # per padded length: buffers, graph, output

    def release(self) -> None:
        self._passes.clear()
        self.__dict__.pop("cache", None)
        self.rows = self.capacity = 0
        self.stable = None

    def score(self, stable: Sequence[int], sequences: Sequence[Sequence[int]], start: int) -> list[float]:
        """Summed log-probabilities of each sequence's tokens from `start` on, all sequences
        beginning with `stable` (at least one token, fewer than `start`)."""
        kept = len(stable)
        if not 0 < kept < start:
            raise ValueError("the kept prefix must hold at least one token, and end before the scored ones")
        length = self._padded(max(len(ids) for ids in sequences) - kept)
        if kept + length > self.context_limit:
            raise ValueError(f"{kept + length} positions exceed the context ({self.context_limit})")
        needed = cache_tokens_for(kept + length, self.context_limit)
        with torch.inference_mode():
            # The cache only grows: a shorter request after a long one keeps the cache and the
            # graphs captured on it (shrinking made requests of mixed lengths capture again).
            if len(sequences) != self.rows or needed > self.capacity:
                capacity = max(needed, self.capacity) if len(sequences) == self.rows else needed
                self.release()
                self.cache = StaticCache(config=self.model.config, max_cache_len=capacity)
                self.rows, self.capacity = len(sequences), capacity
                self._positions = torch.arange(capacity, device=self.device)
                self._start = torch.zeros((), dtype=torch.long, device=self.device)
            if self.stable != list(stable):
                self.stable = None  # until the prefill below has finished
                self.cache.reset()  # in place: captured graphs keep their addresses
                prefix = torch.tensor([list(stable)] * self.rows, device=self.device)
                self.model(input_ids=prefix, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
                self._start.fill_(kept)
                self.stable = list(stable)
            run = self._pass_for(length)
            ids = torch.zeros((self.rows, length), dtype=torch.long)
            targets = torch.zeros((self.rows, length), dtype=torch.long)
            weights = torch.zeros((self.rows, length))
            for row, sequence in enumerate(sequences):
                tail = list(sequence[kept:])
                ids[row, : len(tail)] = torch.tensor(tail)
                # The token at position p is predicted by the logits at p - 1: tail index p - 1 - kept.
                scored = range(start - 1 - kept, len(sequence) - 1 - kept)
                targets[row, scored.start : scored.stop] = torch.tensor(list(sequence[start:]))
                weights[row, scored.start : scored.stop] = 1.0
            for name, value in (("ids", ids), ("targets", targets), ("weights", weights)):
                run[name].copy_(value, non_blocking=False)
            if run["graph"] is not None:
                run["graph"].replay()
                totals = run["out"]
            else:
                totals = self._forward(run)
            return totals.tolist()

    def warm_up(self, stable: Sequence[int], rows: int, lengths: Sequence[int] = WARM_SCORE_TOKENS) -> list[int]:
        """Run (and, with graphs, capture) a pass of each padded tail length in `lengths` that
        fits, on `rows` rows over `stable`, longest first so the cache grows once; returns the
        lengths now ready. The cache keeps `stable`, so the next real score reuses it."""
        kept = len(stable)
        ready = []
        for length in sorted({self._padded(n) for n in lengths}, reverse=True):
            if kept + length > self.context_limit:
                continue
            filler = [list(stable) + [stable[-1]] * length for _ in range(rows)]
            self.score(stable, filler, kept + 1)
            ready.append(length)
        return sorted(ready)

    def fits(self, kept: int, longest: int) -> bool:
        """Whether sequences of up to `longest` tokens, `kept` of them kept, fit the context once
        padded (a near-full context is scored another way)."""
        return kept + self._padded(longest - kept) <= self.context_limit

    @staticmethod
    def _padded(tail: int) -> int:
        return power_of_two_at_least(tail, MIN_SCORE_TOKENS)

    def _pass_for(self, length: int) -> dict[str, Any]:
        if length in self._passes:
            return self._passes[length]
        shape = (self.rows, length)
        run: dict[str, Any] = {
            "ids": torch.zeros(shape, dtype=torch.long, device=self.device),
            "targets": torch.zeros(shape, dtype=torch.long, device=self.device),
            "weights": torch.zeros(shape, dtype=torch.float32, device=self.device),
            "offsets": torch.arange(length, device=self.device),
            "graph": None,
        }
        if self.use_cuda_graph:
            run["graph"], run["out"] = capture_graph(lambda: self._forward(run), warm_ups=2)
        self._passes[length] = run
        return run

    def _forward(self, run: dict[str, Any]) -> torch.Tensor:
        """The padded tails on top of the kept prefix; the summed picked log-probabilities per
        row. Everything stays on the device, so it can be captured."""
        for layer in self.cache.layers:  # write the tail right after the kept prefix
            layer.cumulative_length.copy_(self._start)
        positions = self._start + run["offsets"]
        # Each tail position sees the prefix and the tail up to itself; later (padding) keys and
        # whatever an earlier, longer pass left in the cache stay masked.
        mask = self._positions[None, :] <= positions[:, None]
        logits = self.model(
            input_ids=run["ids"],
            position_ids=positions.expand(self.rows, -1),
            attention_mask=mask[None, None],
            past_key_values=self.cache,
            use_cache=True,
        ).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        picked = logprobs.gather(-1, run["targets"][..., None])[..., 0]
        return (picked * run["weights"]).sum(dim=-1)
