"""transformers backend: HF folders and hub ids, bf16/fp16/fp32, bitsandbytes NF4/int8, GGUF files.

A GGUF file is dequantized into a torch model once and cached as a safetensors folder keyed by
the file's hash, so later loads take seconds. Remote code runs only when the config opts in.
On a GPU, tokens come from the static-cache + CUDA-graph decoder (fast_decode.py); where that
cannot run, from `model.generate` with a streamer, and the load info says why. This module does
not time anything.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from playground.backends import triton_kernels, triton_layers
from playground.backends.base import (
    PLAIN_STEPS_TIMED,
    TOKENIZER_PROBE,
    Backend,
    Chunk,
    DraftModelDrafter,
    FinishReason,
    LoadInfo,
    Prompt,
    Request,
    ShouldStop,
    SpeculationStats,
    StreamEnd,
    TokenizerProbe,
    shared_prefix_length,
    stable_prefix_length,
)
from playground.backends.fast_decode import (
    DecodePath,
    Drafter,
    PromptLookupDrafter,
    StaticDecoder,
    StaticScorer,
    fusable_groups,
    fuse_projections,
    time_in_turns,
)
from playground.config import GenerationParams, ModelConfig
from playground.cpus import limit_torch_threads
from playground.errors import GenerationError, LoadError
from playground.paths import cache_dir
from playground.prompts import render_without_template
from playground.sources import Weights, check_hf_folder, fetch, file_sha256

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Step replays a timing of the whole step takes (`_whole_step_pdl_choice`): 22-43 ms on the H200
# for the 1.7B and 3B shapes, five timings of each choice.
WHOLE_STEP_REPLAYS = 20


def resolve_device(config: ModelConfig) -> str:
    """cpu, cuda, or cuda:N. A worker sees only the GPU the engine placed it on
    (CUDA_VISIBLE_DEVICES), and its config says cuda; `cuda:N` reaches here only outside a
    worker (a job loading a pinned variant)."""
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise LoadError(f"this variant asks for device {config.device}, but no CUDA GPU is available here")
    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return config.device


def resolve_dtype(config: ModelConfig, device: str) -> torch.dtype:
    if config.dtype != "auto":
        return TORCH_DTYPES[config.dtype]
    if device == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    # bf16 also on CPU: decoding is memory-bound there and bf16 halves the bytes read per token.
    return torch.bfloat16


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{err.__class__.__name__}: {text[0] if text else ''}".rstrip(": ")


class TextCodec:
    """What generation needs of a tokenizer; wraps an HF tokenizer (scratch_gpt brings its own)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        eos = tokenizer.eos_token_id
        self.eos_ids: set[int] = {eos} if isinstance(eos, int) else set(eos or [])

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def piece(self, token_id: int) -> str:
        """One token's text, special tokens included; <id> for an id past the tokenizer's end
        (the spare embedding rows some checkpoints have)."""
        if token_id >= len(self.tokenizer):
            return f"<{token_id}>"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def chat(self, messages: Sequence[dict[str, str]]) -> str | None:
        if not getattr(self.tokenizer, "chat_template", None):
            return None
        return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


class _TokenQueue(BaseStreamer):
    """Receives token ids from `generate` (running in a thread) and hands them to the caller."""

    def __init__(self) -> None:
        self.queue: queue.Queue[int | None] = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate's first call passes the prompt itself
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.queue.put(token)

    def end(self) -> None:
        self.queue.put(None)


class _StopWhen(StoppingCriteria):
    def __init__(self, should_stop: ShouldStop) -> None:
        self.should_stop = should_stop

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool, device=input_ids.device)


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas without splitting a character."""

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.decode(self.ids[self.prefix : self.read])
        after = self.decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""


def generation_kwargs(params: GenerationParams) -> dict[str, Any]:
    if params.temperature == 0:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {
        "do_sample": True,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k or None,
    }


class TransformersBackend(Backend):
    name = "transformers"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.model: Any = None
        self.codec: TextCodec | None = None
        self.device = "cpu"
        self.decoder: StaticDecoder | None = None
        self.decode_path = DecodePath("generate")
        # `score`'s prefix cache: the tokens and KV state the last score left, and whether this
        # model's own forward honours a passed cache (checked against a plain pass once).
        self._scored_prefix: list[int] = []
        self._score_cache: Any = None
        self._prefix_cache_ok: bool | None = None
        self._probes: dict[Any, Any] = {}  # stable_prefix_length's tokenized probes
        # On a GPU with the fast path, scores run as one batched, graph-captured pass.
        self._scorer: StaticScorer | None = None
        # Speculative decoding (config `speculative`): what drafts, the draft model where one
        # drafts.
        self.drafter: Drafter | None = None
        self.draft: TransformersBackend | None = None

    # -- loading ---------------------------------------------------------------------------
    def load(self) -> LoadInfo:
        started = time.perf_counter()
        limit_torch_threads()
        self.device = resolve_device(self.config)
        dtype = resolve_dtype(self.config, self.device)
        notes: list[str] = []
        try:
            self.model, self.codec = self._load_model_and_codec(dtype, notes)
            if self.config.adapter is not None:
                self.model = self._apply_adapter(self.model, notes)
        except LoadError:
            raise
        except ImportError as err:
            raise LoadError(f"a library this variant needs is missing: {first_line(err)}") from None
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
            raise LoadError(f"could not load {self.config.display_name}: {first_line(err)}") from None
        self.model.eval()
        # On a GPU the allocator knows the true size (bitsandbytes keeps its scales outside the
        # parameters); the worker holds nothing else yet.
        on_gpu = self.device == "cuda"
        weights_bytes = torch.cuda.memory_allocated() if on_gpu else self.model.get_memory_footprint()
        self.decode_path = self._set_up_decoder()
        speculation = self._set_up_speculation()
        if speculation:
            notes.append(speculation)
        n_params = sum(p.numel() for p in self.model.parameters())
        shown_dtype = self.config.quantization.method if self.is_quantized else str(dtype).removeprefix("torch.")
        return LoadInfo(
            backend=self.name,
            device=self.device,
            dtype=shown_dtype,
            n_params=n_params,
            context_length=self._context_length(),
            load_s=time.perf_counter() - started,
            notes=notes,
            weights_bytes=int(weights_bytes),
            decode=self.decode_path.describe(),
        )

    def _set_up_decoder(self) -> DecodePath:
        """Pick the fastest decode path that works for this model here, by trying it once: a
        model or library that cannot run a step falls back, and the reason is kept for the UI."""
        mode = self.config.fast_decode
        if mode == "off":
            return DecodePath("generate", "fast_decode is off in this variant's config")
        on_cuda = self.device == "cuda"
        if mode == "auto" and not on_cuda and self.config.speculative is None:
            return DecodePath("generate", "the fast path is for CUDA; fast_decode: on uses its static cache on CPU")
        fused, not_fused = self._fuse_projections(on_cuda)
        failures = [not_fused] if not_fused else []
        # Fastest first; each is tried once on a request of the variant's default size, which
        # also compiles and captures the step for the cache size most requests will use.
        # (path name, CUDA graph, torch.compile, Triton layers' install options or None)
        attempts: list[tuple[str, bool, bool, dict[str, bool] | None]] = []
        # Plain weights (their projections fused above) or bitsandbytes NF4 ones; without
        # programmatic dependent launch again if the graph would not hold it.
        if on_cuda and triton_kernels.triton_available():
            why_not_fused = self._unfusable_reason()
            if why_not_fused:
                failures.append(f"no Triton layers: {why_not_fused}")
            else:
                attempts += [("cuda-graph", True, True, {"pdl": True}), ("cuda-graph", True, True, {"pdl": False})]
        if on_cuda:
            attempts += [("cuda-graph", True, True, None), ("cuda-graph", True, False, None)]
        attempts.append(("static-cache", False, False, None))
        picked_pdl = True
        for name, use_graph, compile_step, layers in attempts:
            if layers and not layers["pdl"] and not picked_pdl:
                continue  # the attempt before picked no PDL: these would be the same kernels
            decoder = StaticDecoder(self.model, self._context_length(), use_graph, compile_step)
            try:
                if layers:  # its kernels' launch shapes are timed here, on this model's weights
                    triton_layers.install_fused_layers(self.model, **layers)
                    picked_pdl = triton_layers.uses_pdl(self.model)
                self._try_decoder(decoder)
                if layers and use_graph:
                    decoder, undecided = self._whole_step_pdl_choice(decoder, compile_step)
                    if undecided:
                        failures.append(undecided)
                    picked_pdl = triton_layers.uses_pdl(self.model)
            except Exception as err:  # any failure of an optional path means: use the next one
                decoder.release()
                what = "torch.compile" if compile_step else "CUDA graph" if use_graph else "static cache"
                if layers:
                    what = "Triton layers" + (" with programmatic dependent launch" if picked_pdl else "")
                failures.append(f"{what} failed: {first_line(err)}")
                if layers:
                    triton_layers.remove_fused_layers(self.model)
                if on_cuda:
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                continue
            self.decoder = decoder
            if on_cuda and not use_graph:
                failures.extend(self._graph_hint())
            if decoder.prefill_graph_failure:
                failures.append(decoder.prefill_graph_failure)
            prefill_graphs = use_graph and not decoder.prefill_graph_failure
            return DecodePath(
                name,
                "; ".join(failures),
                compiled=compile_step,
                fused=fused,
                prefill_graphs=prefill_graphs,
                triton_layers=layers is not None,
                triton_choices=triton_layers.describe_choices(self.model) if layers is not None else "",
            )
        return DecodePath("generate", "; ".join([*failures, *self._graph_hint()]), fused=fused)

    def _whole_step_pdl_choice(self, decoder: StaticDecoder, compile_step: bool) -> tuple[StaticDecoder, str]:
        """`decoder`, or one whose step takes the PDL trial's runner-up, whichever replays its
        step faster; and why the whole step could not decide ("" when it did or was not asked).
        Asked only where the layer trial timed the two within a hair
        (`triton_layers.close_pdl_choice`), since the step's other kernels (norms, the head)
        are not in that trial. The choice is stored for the next load of these shapes."""
        runner_up = triton_layers.close_pdl_choice(self.model)
        if runner_up is None:
            return decoder, ""
        chosen = self.model._launch_shapes["pdl_trial"]["chosen"]
        # (a CPU decoder is timed in the tests; torch.cuda.empty_cache is a no-op there)
        synchronize = torch.cuda.synchronize if self.device == "cuda" else lambda: None
        triton_layers.use_pdl_choice(self.model, runner_up)
        other = StaticDecoder(self.model, self._context_length(), decoder.use_cuda_graph, compile_step)
        try:
            self._try_decoder(other)
            count = WHOLE_STEP_REPLAYS
            step_ms = time_in_turns(
                {chosen: lambda: decoder.replay_steps(count), runner_up: lambda: other.replay_steps(count)},
                synchronize,
            )
        except Exception as err:  # the runner-up cannot run the step: the trial's choice stands
            other.release()
            triton_layers.use_pdl_choice(self.model, chosen)
            synchronize()
            torch.cuda.empty_cache()
            return decoder, f"PDL left as the layer trial chose it: timing the whole step failed: {first_line(err)}"
        step_ms = {label: ms / count for label, ms in step_ms.items()}
        faster = runner_up if step_ms[runner_up] < step_ms[chosen] else chosen
        keep, drop = (other, decoder) if faster == runner_up else (decoder, other)
        triton_layers.use_pdl_choice(self.model, faster)
        drop.release()
        torch.cuda.empty_cache()
        triton_layers.keep_launch_shapes(self.model, step_ms)
        return keep, ""

    def _unfusable_reason(self) -> str:
        """Why the Triton layers do not fit this model; a model the check itself cannot read
        takes the next path rather than failing its load."""
        try:
            return triton_layers.unfusable_reason(self.model)
        except Exception as err:
            return f"the check failed: {first_line(err)}"

    def _set_up_speculation(self) -> str:
        """The drafter of a speculative variant (a draft model loaded here, checked to share
        this model's tokenizer); the load note that says how it drafts, or why it cannot."""
        spec = self.config.speculative
        if spec is None:
            return ""
        if self.decoder is None:
            why = self.decode_path.reason or "fast_decode is off"
            return f"speculative decoding off: it runs on the static-cache decoder, which this variant does not use ({why})"
        if spec.method == "prompt-lookup":
            self.drafter = PromptLookupDrafter(spec.ngram, spec.num_tokens)
            what = f"prompt lookup (n-grams of up to {spec.ngram} tokens)"
        else:
            self.draft = self._load_draft_model()
            assert self.draft.decoder is not None
            self.drafter = DraftModelDrafter(self.draft.decoder)
            what = f"draft model {self.draft.config.display_name} ({self.draft.decode_path.name})"
        note = f"speculative decoding: {what}, up to {spec.num_tokens} drafted tokens a pass, for greedy replies"
        if self.decoder.use_cuda_graph:
            failure = self._try_speculation(spec.num_tokens)
            if failure:
                note += f" ({failure}; its passes run eagerly)"
        return note

    def _try_speculation(self, num_tokens: int) -> str:
        """One short speculative reply of the default size, so the pass is compiled and captured
        at load rather than in the first reply; why its graph failed, if it did. The trial's
        prompt repeats one token, so prompt lookup drafts too."""
        decoder, drafter = self.decoder, self.drafter
        assert decoder is not None and drafter is not None
        self._trial_reply(
            decoder,
            lambda prompt, trial: decoder.speculative_tokens(
                prompt, trial, lambda: False, drafter, num_tokens, SpeculationStats("trial")
            ),
            PLAIN_STEPS_TIMED + 3,
        )
        return decoder.verify_graph_failure

    def _load_draft_model(self) -> TransformersBackend:
        # Beside this model, on its device, with its own static cache (eager steps on a CPU).
        update = {"device": self.device, "fast_decode": "on", "speculative": None}
        draft = TransformersBackend(self._draft_variant().model_copy(update=update))

        def unusable(draft: TransformersBackend) -> str:
            return "" if draft.decoder is not None else f"cannot decode step by step: {draft.decode_path.reason}"

        return self._load_draft(draft, unusable)

    def _graph_hint(self) -> list[str]:
        """What the config can change when a GPU step could not be captured, where we know it."""
        spec = self.config.quantization
        if spec.method == "int8" and spec.int8_outlier_threshold > 0:
            return [
                f"int8's outlier split (threshold {spec.int8_outlier_threshold:g}) asks the host in every "
                "matmul; quantization.int8_outlier_threshold: 0 turns it off"
            ]
        return []

    def _fuse_projections(self, on_cuda: bool) -> tuple[bool, str]:
        """Fuse q/k/v and gate/up (fast_decode.fuse_projections). On a GPU the model goes to the
        host for it and back: transformers reserves one block the model's size before loading
        (caching_allocator_warmup), so weights dropped in place stay reserved by this process and
        the fused copies come on top (seen on the H100: 2 GB more on the 1.7B). Skipped when the
        host cannot hold the model. Returns whether it fused, and why not where it could have."""
        if not fusable_groups(self.model):
            return False, ""
        if on_cuda:
            import psutil

            model_bytes = sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))
            if psutil.virtual_memory().available < 1.25 * model_bytes:
                return False, "projections not fused: too little free host memory to rearrange the weights"
            self.model.to("cpu")
            torch.cuda.empty_cache()
        fuse_projections(self.model)
        if on_cuda:
            self.model.to(self.device)
        return True, ""

    def _try_decoder(self, decoder: StaticDecoder) -> None:
        """Three greedy tokens after a short prompt, in a cache sized for the default settings."""
        self._trial_reply(decoder, lambda prompt, trial: decoder.tokens(prompt, trial, lambda: False), 3)

    def _trial_reply(
        self,
        decoder: StaticDecoder,
        reply: Callable[[list[int], GenerationParams], Iterator[int]],
        count: int,
    ) -> None:
        """The first `count` tokens of `reply` to a short prompt of one repeated token, greedy,
        in a cache sized for the variant's default settings: what a load tries, compiles and
        captures before the first real reply."""
        prompt = [0] * min(64, decoder.context_limit // 2)
        trial = GenerationParams(temperature=0.0, max_new_tokens=self.config.generation.max_new_tokens)
        tokens = reply(prompt, trial)
        with torch.inference_mode():
            for _ in zip(range(count), tokens, strict=False):
                pass
        tokens.close()

    def _context_length(self) -> int:
        """The configured context, capped by the positions the model was built for."""
        trained = getattr(self.model.config, "max_position_embeddings", None)
        return min(self.config.context_length, trained) if trained else self.config.context_length

    @property
    def is_quantized(self) -> bool:
        return self.config.quantization.method != "none"

    def _load_model_and_codec(self, dtype: torch.dtype, notes: list[str]) -> tuple[Any, TextCodec]:
        weights = fetch(self.config, self.report_download)
        if weights.kind == "state_dict":
            raise LoadError(f"{weights.location}: a bare state_dict needs the scratch_gpt backend")
        location, kwargs = self._from_pretrained_args(weights, notes)
        if weights.kind == "hf_folder" and weights.present:  # name a broken file before transformers trips on it
            check_hf_folder(Path(location), needs_tokenizer=self.config.tokenizer is None)
        self._refuse_unapproved_remote_code(weights)
        model_kwargs = dict(kwargs, dtype=dtype, device_map={"": self.device})
        quantization = self._quantization_config(dtype)
        if quantization is not None:
            model_kwargs["quantization_config"] = quantization
        model = AutoModelForCausalLM.from_pretrained(location, **model_kwargs)
        if quantization is not None:
            notes.append(self._quantization_summary(model))
        if self.config.quantization.head == "int8":
            from playground.backends.int8_head import quantize_embedding_and_head

            try:
                notes.append(quantize_embedding_and_head(model))
            except ValueError as err:
                raise LoadError(str(err)) from None
        if self.config.tokenizer is not None:  # an HF folder fine-tuned from a scratch GPT
            from playground.backends.tiktoken_codec import TiktokenCodec

            return model, TiktokenCodec(self.config.tokenizer, model.config.vocab_size)
        return model, TextCodec(AutoTokenizer.from_pretrained(location, **kwargs))

    def _apply_adapter(self, model: Any, notes: list[str]) -> Any:
        """The LoRA adapter on top of the loaded base; merged into unquantized weights, so
        generation runs at the base's speed."""
        from peft import PeftModel

        folder = Path(self.config.adapter.path).expanduser()
        if not (folder / "adapter_config.json").is_file():
            raise LoadError(f"{folder} is not a LoRA adapter folder (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, str(folder))
        if self.is_quantized:
            notes.append(f"LoRA adapter {folder.name} applied on the quantized base (not merged)")
            return model
        notes.append(f"LoRA adapter {folder.name} merged into the base at load")
        return model.merge_and_unload()

    def _quantization_summary(self, model: Any) -> str:
        import bitsandbytes as bnb

        quantized_types = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        quantized = sum(isinstance(m, quantized_types) for m in linears)
        kept = ", ".join(self.config.quantization.keep_modules) or "none"
        return (
            f"bitsandbytes {self.config.quantization.method}: {quantized} linear layers quantized, "
            f"{len(linears) - quantized} kept unquantized (kept: {kept})"
        )

    def _from_pretrained_args(self, weights: Weights, notes: list[str]) -> tuple[str, dict[str, Any]]:
        kwargs: dict[str, Any] = {"trust_remote_code": self.config.trust_remote_code}
        if self.config.source and self.config.source.revision and weights.kind == "hub_repo":
            kwargs["revision"] = self.config.source.revision
        if weights.kind == "gguf":
            folder, fresh = dequantized_gguf_folder(weights.path)
            notes.append(
                f"dequantized from {weights.path.name} into {folder}" + (" (made now)" if fresh else " (cached)")
            )
            return str(folder), kwargs
        return weights.location, kwargs

    def _refuse_unapproved_remote_code(self, weights: Weights) -> None:
        """A folder that ships its own model code loads only for a variant whose config asks for
        it; whether the admin allows that variant is the catalogue's check, before this process
        started."""
        if self.config.trust_remote_code:
            return
        if weights.kind != "hf_folder":
            return
        config_file = weights.path / "config.json"
        if not config_file.exists():
            raise LoadError(f"{weights.location} has no config.json: it is not an HF model folder")
        try:
            auto_map = json.loads(config_file.read_text()).get("auto_map")
        except (OSError, json.JSONDecodeError) as err:
            raise LoadError(f"{config_file}: cannot be read as JSON ({err.__class__.__name__})") from None
        if auto_map:
            raise LoadError(
                f"{weights.location} ships its own model code (auto_map in config.json); it runs only "
                "if its config sets trust_remote_code: true"
            )

    def _quantization_config(self, dtype: torch.dtype) -> Any:
        spec = self.config.quantization
        if spec.method == "none":
            return None
        try:
            import bitsandbytes  # noqa: F401  (imported here: it is slow and optional)
        except ImportError:
            raise LoadError("NF4/int8 loading needs bitsandbytes, which is not installed") from None
        from transformers import BitsAndBytesConfig

        skip = list(spec.keep_modules) or None
        if spec.method == "nf4":
            return BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=TORCH_DTYPES[spec.compute_dtype],
                bnb_4bit_use_double_quant=spec.double_quant,
                llm_int8_skip_modules=skip,
            )
        return BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_skip_modules=skip, llm_int8_threshold=spec.int8_outlier_threshold
        )

    # -- generation ------------------------------------------------------------------------
    def render(self, request: Request) -> tuple[str, bool]:
        """The prompt text, and whether a chat template wrote it (then it holds its own BOS)."""
        assert self.codec is not None, "load() first"
        if request.mode == "chat" and self.config.prompt_format == "chat_template":
            text = self.codec.chat(request.messages)
            if text is None:
                raise GenerationError(
                    f"{self.config.display_name} has no chat template: use completion mode, or set "
                    "prompt_format to alpaca or raw in its config"
                )
            return text + request.assistant_prefix, True
        text = render_without_template(self.config.prompt_format, request.mode, request.messages, request.text)
        return text + request.assistant_prefix, False

    def prompt_ids(self, request: Request) -> list[int]:
        assert self.codec is not None, "load() first"
        text, templated = self.render(request)
        return self.codec.encode(text, add_special_tokens=not templated)

    def prepare(self, request: Request) -> Prompt:
        ids = self.prompt_ids(request)
        if not ids:
            raise GenerationError("the prompt is empty")
        return Prompt(n_tokens=len(ids), payload=ids)

    def continuation_ids(self, request: Request, continuations: list[str]) -> list[list[int]]:
        """The token ids of the request's prompt followed by each continuation, as `score` reads them."""
        assert self.codec is not None, "load() first"
        text, templated = self.render(request)
        return [self.codec.encode(text + c, add_special_tokens=not templated) for c in continuations]

    def score(self, request: Request, continuations: list[str]) -> list[float]:
        assert self.codec is not None and self.model is not None, "load() first"
        sequences = self.continuation_ids(request, continuations)
        start = shared_prefix_length(sequences)
        if start == 0:
            raise GenerationError("cannot score: the continuations share no prompt tokens")
        with torch.inference_mode():
            if self._prefix_cache_ok is None:  # the first score on this model: is the cache honoured?
                plain = self._score_plain(sequences, start)
                if self.decoder is not None and self.device == "cuda" and self._scorer is None:
                    self._scorer = StaticScorer(self.model, self._context_length(), self.decoder.use_cuda_graph)
                cached = None
                for _ in range(2):  # the batched static pass first where there is one, then the kept cache
                    try:
                        cached = self._score_cached(request, sequences, start)
                        break
                    except (_CacheIgnored, TypeError, ValueError, AttributeError, RuntimeError):  # a model of its own code
                        if self._scorer is None:
                            break
                        self._drop_scorer()
                # The numbers agree as closely as the dtype allows (bf16: ~0.1 between batch shapes).
                tolerance = 0.05 if self.model.dtype == torch.float32 else 1.0
                self._prefix_cache_ok = cached is not None and all(
                    abs(a - b) <= tolerance + 1e-2 * abs(b) for a, b in zip(cached, plain, strict=True)
                )
                if not self._prefix_cache_ok:
                    self._drop_scorer()
                return cached if self._prefix_cache_ok else plain
            if self._prefix_cache_ok:
                return self._score_cached(request, sequences, start)
            return self._score_plain(sequences, start)

    def _drop_scorer(self) -> None:
        if self._scorer is not None:
            self._scorer.release()
            self._scorer = None

    def _score_plain(self, sequences: list[list[int]], start: int) -> list[float]:
        """Each whole sequence in one forward pass."""
        scores = []
        for ids in sequences:
            logits = self.model(torch.tensor([ids], device=self.model.device)).logits[0].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            # The token at position i is predicted by the logits at position i - 1.
            scores.append(float(sum(logprobs[i - 1, ids[i]] for i in range(start, len(ids)))))
        return scores

    def _score_cached(self, request: Request, sequences: list[list[int]], start: int) -> list[float]:
        """The part of the prompt no request changes in a KV cache kept from the last score when
        its tokens are the same, then the rest of the prompt with the first continuation in one
        pass, then each other continuation on top; as llamacpp_backend.score does, and for the
        same reasons. On a GPU with the fast path, the static scorer does the same in one
        batched, graph-captured pass (fast_decode.StaticScorer)."""
        from transformers import DynamicCache

        device = self.model.device
        first = sequences[0]
        stable = min(stable_prefix_length(self.prompt_ids, request, first, self._probes), start - 1)
        if self._scorer is not None and stable > 0 and self._scorer.fits(stable, max(map(len, sequences))):
            if self._scorer.rows == 0 and self._scorer.use_cuda_graph:  # the first score: capture the common lengths
                self._scorer.warm_up(first[:stable], len(sequences))
            return self._scorer.score(first[:stable], sequences, start)
        reused = stable > 0 and self._scored_prefix == first[:stable]
        cache = self._score_cache if reused else DynamicCache(config=self.model.config)
        self._scored_prefix, self._score_cache = [], None  # until this score has finished
        if reused:
            _keep_first(cache, stable)
        elif stable:
            prompt_start = torch.tensor([first[:stable]], device=device)
            self.model(prompt_start, past_key_values=cache, use_cache=True, logits_to_keep=1)
        # Logits from the last prompt token on: the first continuation's tokens and what follows the prompt.
        rest_of_prompt = torch.tensor([first[stable:-1]], device=device)
        logits = self.model(
            rest_of_prompt, past_key_values=cache, use_cache=True, logits_to_keep=len(first) - start
        ).logits[0]
        if cache.get_seq_length() != len(first) - 1:  # this model's forward ignores a passed cache
            raise _CacheIgnored
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        after_prefix = logprobs[0]
        scores = [_picked(logprobs, first[start:])]
        for ids in sequences[1:]:
            rest = ids[start:]
            total = float(after_prefix[rest[0]])
            if len(rest) > 1:
                _keep_first(cache, start)  # the last continuation's positions go
                logits = self.model(
                    torch.tensor([rest[:-1]], device=device), past_key_values=cache, use_cache=True
                ).logits[0]
                total += _picked(torch.log_softmax(logits.float(), dim=-1), rest[1:])
            scores.append(total)
        _keep_first(cache, stable)
        self._scored_prefix, self._score_cache = first[:stable], cache
        return scores

    def encode_text(self, text: str) -> list[int]:
        assert self.codec is not None, "load() first"
        return self.codec.encode(text, add_special_tokens=True)

    def window_logprobs(self, ids: list[int]) -> tuple[list[float], list[bool]]:
        assert self.model is not None, "load() first"
        with torch.inference_mode():
            logits = self.model(torch.tensor([ids], device=self.model.device)).logits[0, :-1].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            targets = torch.tensor(ids[1:], device=logits.device)
            chosen = logprobs.gather(1, targets[:, None])[:, 0]
            greedy = logprobs.argmax(dim=-1) == targets
        return chosen.tolist(), greedy.tolist()

    def position_logprobs(self, ids: list[int], last: int | None = None) -> Any:
        assert self.model is not None, "load() first"
        if len(ids) > self._context_length():
            raise GenerationError(f"{len(ids)} tokens exceed the context of {self._context_length()}")
        keep = min(last or len(ids), len(ids))
        with torch.inference_mode():
            inputs = torch.tensor([ids], device=self.model.device)
            try:  # the model computes only the rows kept (transformers' own models take this)
                logits = self.model(inputs, logits_to_keep=keep).logits[0]
            except TypeError:  # a model of its own code may not
                logits = self.model(inputs).logits[0]
            return torch.log_softmax(logits[-keep:].float(), dim=-1).cpu().numpy()

    def token_texts(self, ids: list[int]) -> list[str]:
        assert self.codec is not None, "load() first"
        return [self.codec.piece(i) for i in ids]

    def tokenizer_probe(self) -> TokenizerProbe:
        assert self.codec is not None and self.model is not None, "load() first"
        probe = self.codec.encode(TOKENIZER_PROBE, add_special_tokens=False)
        return TokenizerProbe(int(self.model.config.vocab_size), tuple(probe))

    def end_ids(self) -> set[int]:
        """The tokens a reply ends at: the tokenizer's end and the generation config's."""
        assert self.codec is not None and self.model is not None, "load() first"
        return set(self.codec.eos_ids) | set(_as_list(self.model.generation_config.eos_token_id))

    def stream(self, prompt: Prompt, params: GenerationParams, should_stop: ShouldStop) -> Iterator[Chunk | StreamEnd]:
        assert self.codec is not None and self.model is not None, "load() first"
        codec = self.codec
        if params.seed is not None:
            torch.manual_seed(params.seed)
        eos = self.end_ids()
        spec, stats = self.config.speculative, None
        if self.decoder is not None and self.drafter is not None and spec is not None:
            stats = SpeculationStats(spec.method)
            if params.temperature == 0:
                tokens = self.decoder.speculative_tokens(
                    prompt.payload, params, should_stop, self.drafter, spec.num_tokens, stats
                )
            else:
                stats.off = "it is for greedy replies (temperature 0), and this one was sampled"
                tokens = self.decoder.tokens(prompt.payload, params, should_stop)
        elif self.decoder is not None:
            tokens = self.decoder.tokens(prompt.payload, params, should_stop)
        else:
            tokens = self._generate_tokens(prompt.payload, params, sorted(eos), should_stop)
        decoder = IncrementalDecoder(codec.decode)
        finish: FinishReason = "length"  # the token limit or the end of the context
        try:
            for token in tokens:
                if token in eos:
                    finish = "stop"
                    break  # the end-of-sequence token is neither text nor counted
                yield Chunk(decoder.push(token), 1)
        except torch.OutOfMemoryError as err:
            raise GenerationError(f"out of memory while generating: {first_line(err)}") from None
        except GenerationError:
            raise
        except Exception as err:
            raise GenerationError(f"generation failed: {first_line(err)}") from None
        finally:
            tokens.close()  # ends generate's thread, or drops the decoder's step queued ahead
        yield StreamEnd("cancelled" if should_stop() else finish, token_ids=tuple(decoder.ids), speculation=stats)

    def _generate_tokens(
        self, prompt_ids: list[int], params: GenerationParams, eos: list[int], should_stop: ShouldStop
    ) -> Iterator[int]:
        """Token ids from `model.generate`, which runs in a thread and hands them over a queue."""
        input_ids = torch.tensor([prompt_ids], device=self.model.device)
        streamer = _TokenQueue()
        failure: list[BaseException] = []
        abandoned = threading.Event()  # the caller stopped reading (an end of sequence, an error)
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=params.max_new_tokens,
            repetition_penalty=params.repetition_penalty,
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_StopWhen(lambda: abandoned.is_set() or should_stop())]),
            eos_token_id=eos or None,
            pad_token_id=eos[0] if eos else None,
            **generation_kwargs(params),
        )

        def run() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(**kwargs)
            except BaseException as err:  # re-raised in the caller's thread below
                failure.append(err)
                streamer.end()

        thread = threading.Thread(target=run, name="generate", daemon=True)
        thread.start()
        try:
            while (token := streamer.queue.get()) is not None:
                yield token
        finally:
            abandoned.set()
            thread.join()  # the model is never used by two threads at once
        if failure:
            raise failure[0]

    # -- memory ------------------------------------------------------------------------------
    def reset_memory_peaks(self) -> None:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def device_memory(self) -> dict[str, int]:
        if self.device != "cuda":
            return {}
        return {
            "allocated_peak": torch.cuda.max_memory_allocated(),
            "reserved_peak": torch.cuda.max_memory_reserved(),
        }

    def unload(self) -> None:
        if self.draft is not None:
            self.draft.unload()
            self.draft, self.drafter = None, None
        if self.decoder is not None:
            self.decoder.release()
            self.decoder = None
        self._drop_scorer()
        self.model = None
        self._scored_prefix, self._score_cache, self._prefix_cache_ok = [], None, None
        if self.device == "cuda":
            torch.cuda.empty_cache()


def _picked(logprobs: torch.Tensor, targets: list[int]) -> float:
    """The summed log-probabilities of `targets`, row i giving target i's."""
    rows = torch.arange(len(targets), device=logprobs.device)
    return float(logprobs[rows, torch.tensor(targets, device=logprobs.device)].sum())


class _CacheIgnored(Exception):
    """A model's forward left a passed KV cache as it was (its own code may not take one)."""


def _keep_first(cache: Any, length: int) -> None:
    """Cut a KV cache back to its first `length` positions (transformers 5's `crop` takes the
    number of positions to remove, as a negative count)."""
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def dequantized_gguf_folder(gguf_path: Path) -> tuple[Path, bool]:
    """A safetensors folder holding the dequantized weights and tokenizer of a GGUF file.

    Returns (folder, made_now). The folder is keyed by the file's SHA-256, so a changed file
    gets a new folder; it is written to a temporary name and renamed, so a crash leaves no half
    folder behind.
    """
    folder = cache_dir() / "gguf-dequant" / file_sha256(gguf_path)[:24]
    if (folder / "config.json").exists():
        return folder, False
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as err:  # gguf raises many kinds on a corrupt or unsupported file
        raise LoadError(f"{gguf_path.name}: transformers cannot read this GGUF ({first_line(err)})") from None
    # A model loaded from GGUF stays marked as GGUF-quantized and refuses save_pretrained:
    # rebuild a plain model from its config and copy the (dequantized) weights across.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, folder)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (folder / "config.json").exists():  # another process may have won the race
            raise
    return folder, True
