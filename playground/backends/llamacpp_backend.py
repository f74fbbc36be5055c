"""llama.cpp backend (llama-cpp-python): GGUF files, the chat template stored in the file.

Tokens come from `Llama.generate` one at a time, so chunks are single tokens and the worker's
timing sees each one. GPU layers are offloaded only when the build supports it.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from playground.backends.base import (
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
    speculative_loop,
    stable_prefix_length,
)
from playground.config import GenerationParams, ModelConfig, SpeculativeSpec
from playground.cpus import usable_cpus
from playground.errors import GenerationError, LoadError
from playground.gguf_types import converted_gguf, converted_type, cpu_repack_wanted, gguf_file_type
from playground.paths import cache_dir
from playground.prompts import render_without_template
from playground.sources import check_gguf_header, fetch

log = logging.getLogger(__name__)


def cpu_repack_allowed(choice: str = "auto") -> bool:
    """`llamacpp.cpu_repack` (`choice`) resolved against this llama.cpp build's CPU features
    (`cpu_repack_wanted`): what `extra_buffer_types` is given."""
    import llama_cpp

    return cpu_repack_wanted(choice, llama_cpp.llama_print_system_info().decode())


@contextlib.contextmanager
def extra_buffer_types(allowed: bool) -> Iterator[None]:
    """While a `llama_cpp.Llama` is made: llama.cpp's extra CPU buffer types (repacked weights)
    allowed or not. llama-cpp-python's Llama takes no `use_extra_bufts`; it starts from
    `llama_model_default_params()`, so that function is wrapped for the construction (one model
    is made at a time in a worker)."""
    if allowed:
        yield
        return
    import llama_cpp.llama as llama_module

    module = llama_module.llama_cpp  # the bindings, as llama.py calls them
    default = module.llama_model_default_params

    def without_extra_buffers() -> Any:
        params = default()
        params.use_extra_bufts = False
        return params

    module.llama_model_default_params = without_extra_buffers
    try:
        yield
    finally:
        module.llama_model_default_params = default


class LlamaCppBackend(Backend):
    name = "llamacpp"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.llm: Any = None
        self.device = "cpu"
        self._chat_formatter: Any = None
        self._scored_prefix: list[int] = []  # the tokens the last score left in the KV cache
        self._probes: dict[Any, Any] = {}  # stable_prefix_length's tokenized probes
        self.draft: LlamaCppBackend | None = None  # a speculative variant's draft model

    def load(self) -> LoadInfo:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        started = time.perf_counter()
        weights = fetch(self.config, self.report_download)
        if weights.kind != "gguf":
            raise LoadError(f"{weights.location}: the llamacpp backend needs a .gguf file")
        check_gguf_header(weights.path)
        options = self.config.llamacpp
        wants_gpu = self.config.device != "cpu" and options.n_gpu_layers != 0
        can_offload = bool(llama_cpp.llama_supports_gpu_offload())
        if self.config.device.startswith("cuda") and not can_offload:
            raise LoadError(
                f"this variant asks for device {self.config.device}, but llama-cpp-python was built without GPU support"
            )
        n_gpu_layers = options.n_gpu_layers if (wants_gpu and can_offload) else 0
        path, notes = self._weights_to_run(weights.path, n_gpu_layers != 0)
        cpu_repack = cpu_repack_allowed(options.cpu_repack)
        if not cpu_repack and options.cpu_repack == "auto":
            notes.append(
                "llama.cpp's AMX repacking of the weights is off on this CPU: with it, prompts crashed the "
                "worker here (llama.cpp issue 20824); `llamacpp.cpu_repack: on` turns it on"
            )
        n_ctx = self.config.context_length
        if n_gpu_layers and "torch" in sys.modules:
            # Seen on the lent H100 (benchmarks/gpu/llamacpp_probe.py): with torch's CUDA
            # libraries loaded first, llama.cpp's CUDA start killed the process with SIGSEGV.
            # A worker has torch when the program's main module imports it at its top.
            log.warning(
                "%s: torch is loaded in this llama.cpp worker (imported by the main module %s); "
                "if the worker dies on load, keep torch out of that module's top-level imports",
                self.config.id,
                getattr(sys.modules.get("__main__"), "__file__", "?"),
            )
        self.llm = self._open(path, n_ctx, n_gpu_layers, cpu_repack)
        trained = self.llm._model.n_ctx_train()
        if 0 < trained < n_ctx:  # beyond its trained length a model degrades: reopen (mmap, fast)
            self.llm.close()
            n_ctx = trained
            self.llm = self._open(path, n_ctx, n_gpu_layers, cpu_repack)
        self.device = "cuda" if n_gpu_layers else "cpu"
        template = self.llm.metadata.get("tokenizer.chat_template")
        if template:
            self._chat_formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=self._token_text(self.llm.token_eos()),
                bos_token=self._token_text(self.llm.token_bos()),
            )
        if not template:
            notes.append("the GGUF file holds no chat template: chat mode is off")
        if n_ctx < self.config.context_length:
            notes.append(f"context capped at {n_ctx}, the length the model was trained for")
        if self.config.speculative is not None:
            spec = self.config.speculative
            if spec.method == "draft-model":
                self.draft = self._load_draft_model()
                what = f"draft model {self.draft.config.display_name} ({self.draft.device})"
            else:
                what = f"prompt lookup (n-grams of up to {spec.ngram} tokens)"
            notes.append(
                f"speculative decoding: {what}, up to {spec.num_tokens} drafted tokens a pass, for greedy "
                "replies without a repetition penalty or JSON schema"
            )
        return LoadInfo(
            backend=self.name,
            device=self.device,
            dtype=self._file_type(),
            n_params=int(self.llm._model.n_params()),
            weights_bytes=int(self.llm._model.size()),
            # llama.cpp may round the context up; the configured limit is what we enforce.
            context_length=min(self.llm.n_ctx(), n_ctx),
            load_s=time.perf_counter() - started,
            notes=notes,
        )

    def _weights_to_run(self, stored: Path, on_gpu: bool) -> tuple[Path, list[str]]:
        """The file to load, converted as `llamacpp.convert_weights` asks, and a note saying so.
        A conversion that fails (a full disk, an unsupported type) loads the stored file."""
        import llama_cpp

        choice = self.config.llamacpp.convert_weights
        if choice == "no":
            return stored, []
        stored_type = gguf_file_type(stored)
        target = converted_type(choice, stored_type, on_gpu, llama_cpp.llama_print_system_info().decode())
        if target is None:
            return stored, [f"weights kept as stored ({stored_type}): convert_weights {choice} needs no conversion here"]
        started = time.perf_counter()
        try:
            path, made = converted_gguf(stored, target, cache_dir() / "gguf-converted")
        except (OSError, RuntimeError) as err:
            return stored, [f"weights kept as stored ({stored_type}): converting them to {target} failed ({err})"]
        how = f"converted in {time.perf_counter() - started:.1f} s" if made else "converted at an earlier load"
        return path, [
            f"weights converted from {stored_type} to {target} for faster prompt processing on this "
            f"{'GPU' if on_gpu else 'CPU'} ({how}, by llama.cpp's quantizer; cached at {path})"
        ]

    def _open(self, path: Path, n_ctx: int, n_gpu_layers: int, cpu_repack: bool) -> Any:
        """The llama.cpp model; `cpu_repack`: its CPU weights may be repacked (`extra_buffer_types`)."""
        import llama_cpp

        threads = self.config.llamacpp.n_threads or usable_cpus()
        try:
            with extra_buffer_types(allowed=cpu_repack):
                return llama_cpp.Llama(
                    model_path=str(path),
                    n_ctx=n_ctx,
                    n_batch=self.config.llamacpp.n_batch,
                    # Both counts: llama-cpp-python's batch default is every logical CPU of the host.
                    n_threads=threads,
                    n_threads_batch=threads,
                    n_gpu_layers=n_gpu_layers,
                    flash_attn=self._flash_attn(n_gpu_layers),
                    verbose=False,
                )
        except (ValueError, RuntimeError, OSError) as err:
            raise LoadError(f"llama.cpp could not load {path.name}: {err}") from None

    def _flash_attn(self, n_gpu_layers: int) -> bool:
        choice = self.config.llamacpp.flash_attn
        return choice == "on" or (choice == "auto" and n_gpu_layers != 0)

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def _file_type(self) -> str:
        from gguf import LlamaFileType

        raw = self.llm.metadata.get("general.file_type")
        try:
            return LlamaFileType(int(raw)).name.removeprefix("MOSTLY_") if raw is not None else "gguf"
        except ValueError:
            return f"gguf type {raw}"

    def _tokens(self, request: Request, suffix: str = "") -> list[int]:
        if request.mode == "chat" and self.config.prompt_format == "chat_template":
            if self._chat_formatter is None:
                raise GenerationError(
                    f"{self.config.display_name} has no chat template in its GGUF file: use completion mode"
                )
            text = self._chat_formatter(messages=list(request.messages)).prompt + request.assistant_prefix + suffix
            # The template writes any BOS itself, as llama-cpp-python's own chat path assumes.
            return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        text = render_without_template(self.config.prompt_format, request.mode, request.messages, request.text)
        return self.llm.tokenize(
            (text + request.assistant_prefix + suffix).encode("utf-8"), add_bos=True, special=False
        )

    def prepare(self, request: Request) -> Prompt:
        ids = self._tokens(request)
        if not ids:
            raise GenerationError("the prompt is empty")
        return Prompt(n_tokens=len(ids), payload=ids, json_schema=request.json_schema)

    def score(self, request: Request, continuations: list[str]) -> list[float]:
        sequences = [self._tokens(request, c) for c in continuations]
        start = shared_prefix_length(sequences)
        if start == 0:
            raise GenerationError("cannot score: the continuations share no prompt tokens")
        longest = max(len(ids) for ids in sequences)
        if longest > self.llm.n_ctx():
            raise GenerationError(f"{longest} tokens exceed the context of {self.llm.n_ctx()}")

        # Two batches, fixed by the request alone so that a reused part gives the numbers a fresh
        # evaluation would (the same token fed in another batch gives slightly different numbers:
        # seen 1e-3 in P(escalate) on AVX2): the part no request changes (a router's system
        # prompt), kept in the KV cache from the last score when its tokens are the same; then the
        # rest of the prompt with the first continuation, logits kept from the last prompt token
        # on. Each other continuation follows as a batch of its own on the prompt. The longest
        # goes first: another's first token is read off the prompt's last row, so a one-token
        # tail (a route such as `self",` after the longer `npc_fin",`) needs one token decoded.
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        first = sequences[order[0]]
        stable = min(stable_prefix_length(self._tokens, request, first, self._probes), start - 1)
        reused = stable > 0 and self._scored_prefix == first[:stable]
        self.llm.reset()
        self._scored_prefix = []
        if reused:
            self.llm._ctx.kv_cache_seq_rm(-1, stable, -1)
        else:
            self.llm._ctx.kv_cache_clear()
            self._decode(first[:stable], 0, keep_from=stable)
        rows = self._decode(first[stable:-1], stable, keep_from=start - 1)
        after_prefix = rows[start - 1]
        scores = [0.0] * len(sequences)
        scores[order[0]] = float(
            after_prefix[first[start]] + sum(rows[i - 1][first[i]] for i in range(start + 1, len(first)))
        )
        for index in order[1:]:
            ids = sequences[index]
            rest = ids[start:]
            total = float(after_prefix[rest[0]])
            if len(rest) > 1:
                self.llm._ctx.kv_cache_seq_rm(-1, start, -1)  # the last continuation's positions
                rows = self._decode(rest[:-1], start, keep_from=start)
                total += sum(float(rows[i - 1][ids[i]]) for i in range(start + 1, len(ids)))
            scores[index] = total
        self.llm._ctx.kv_cache_seq_rm(-1, stable, -1)
        self._scored_prefix = first[:stable]  # in the KV cache for the next score; any other use clears it
        return scores

    def _decode(self, ids: list[int], n_past: int, keep_from: int, raw: bool = False) -> dict[int, Any]:
        """Evaluate `ids` at positions n_past onward (in batches of at most n_batch), returning
        the log-probabilities predicted at each position from `keep_from` on: only those rows
        of logits are computed. `raw`: the logits themselves (what an argmax needs)."""
        import llama_cpp
        import numpy as np

        n_vocab, rows = self.llm.n_vocab(), {}
        for offset in range(0, len(ids), self.llm.n_batch):
            chunk = ids[offset : offset + self.llm.n_batch]
            first_pos = n_past + offset
            batch = self.llm._batch
            batch.set_batch(batch=chunk, n_past=first_pos, logits_all=False)
            wanted = [i for i in range(len(chunk)) if first_pos + i >= keep_from]
            for i in range(len(chunk)):
                batch.batch.logits[i] = i in wanted
            self.llm._ctx.decode(batch)
            for i in wanted:
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, i), shape=(n_vocab,))
                if raw:
                    rows[first_pos + i] = logits.copy()
                    continue
                shifted = logits.astype(np.float64) - logits.max()
                rows[first_pos + i] = shifted - np.log(np.exp(shifted).sum())
        return rows

    def _clear_context(self) -> None:
        """An empty KV cache, and the library and `score` told so."""
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()
        self._scored_prefix = []

    def encode_text(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def position_logprobs(self, ids: list[int], last: int | None = None) -> Any:
        import llama_cpp
        import numpy as np

        if len(ids) > self.llm.n_ctx():
            raise GenerationError(f"{len(ids)} tokens exceed the context of {self.llm.n_ctx()}")
        n_vocab, n_batch = self.llm.n_vocab(), self.llm.n_batch
        first = len(ids) - min(last or len(ids), len(ids))  # the first position kept
        rows = np.empty((len(ids) - first, n_vocab), dtype=np.float32)
        # The library's eval keeps only the last position's logits unless the whole context was
        # made with logits_all (49152 floats per position here): ask for the positions wanted
        # of each batch directly instead, as llama.cpp's own perplexity tool does.
        self._clear_context()
        try:
            for start in range(0, len(ids), n_batch):
                chunk = ids[start : start + n_batch]
                self.llm._batch.set_batch(batch=chunk, n_past=start, logits_all=start + len(chunk) > first)
                self.llm._ctx.decode(self.llm._batch)
                for i in range(max(first - start, 0), len(chunk)):
                    rows[start + i - first] = np.ctypeslib.as_array(
                        llama_cpp.llama_get_logits_ith(self.llm.ctx, i), shape=(n_vocab,)
                    )
        finally:
            self._clear_context()
        logits = rows.astype(np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        return (shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))).astype(np.float32)

    def window_logprobs(self, ids: list[int]) -> tuple[list[float], list[bool]]:
        import numpy as np

        logprobs = self.position_logprobs(ids)[:-1]
        targets = np.array(ids[1:])
        chosen = logprobs[np.arange(len(targets)), targets].astype(np.float64)
        return chosen.tolist(), (logprobs.argmax(axis=1) == targets).tolist()

    def token_texts(self, ids: list[int]) -> list[str]:
        return [self._token_text(i) for i in ids]

    def tokenizer_probe(self) -> TokenizerProbe:
        probe = self.llm.tokenize(TOKENIZER_PROBE.encode("utf-8"), add_bos=False, special=False)
        return TokenizerProbe(int(self.llm.n_vocab()), tuple(probe))

    def _speculation_off(self, params: GenerationParams, prompt: Prompt) -> str:
        """Why this reply of a speculative variant decodes plainly ('' when it speculates)."""
        if params.temperature != 0:
            return "it is for greedy replies (temperature 0), and this one was sampled"
        if params.repetition_penalty != 1.0:
            return "here it is for replies without a repetition penalty, and this one had one"
        if prompt.json_schema is not None:
            return "it does not run for replies held to a JSON schema"
        return ""

    def _drafter(self, spec: SpeculativeSpec) -> Callable[[list[int], int], list[int]]:
        """What proposes a pass's drafts: llama-cpp-python's prompt lookup, or the draft model
        loaded beside this one (greedy, its KV cache kept in step with the reply)."""
        import numpy as np

        if self.draft is None:
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            lookup = LlamaPromptLookupDecoding(max_ngram_size=spec.ngram, num_pred_tokens=spec.num_tokens)
            return lambda history, count: [int(t) for t in lookup(np.array(history, dtype=np.intc))[:count]]
        drafter = DraftModelDrafter(self.draft)
        drafter.begin(self.llm.n_ctx())
        return drafter.propose

    def start_drafting(self, capacity: int) -> int:
        """As a draft model (base.DraftModel): an empty KV cache; the context it holds."""
        self._clear_context()
        return min(capacity, self.llm.n_ctx())

    def greedy_continue(self, ids: list[int], start: int, count: int) -> list[int]:
        """As a draft model: feed ids[start:] after the first `start` already in the KV cache,
        then `count` greedy tokens; the cache keeps all but the last of them."""
        import numpy as np

        self.llm._ctx.kv_cache_seq_rm(-1, start, -1)
        rows = self._decode(ids[start:], start, keep_from=len(ids) - 1, raw=True)
        drafted = [int(np.argmax(rows[len(ids) - 1]))]
        while len(drafted) < count:
            position = len(ids) + len(drafted) - 1
            rows = self._decode(drafted[-1:], position, keep_from=position, raw=True)
            drafted.append(int(np.argmax(rows[position])))
        return drafted

    def _load_draft_model(self) -> LlamaCppBackend:
        """The draft variant beside this one, on the same device, checked to share its tokenizer."""
        draft_config = self._draft_variant()
        device = "cpu" if self.device == "cpu" else draft_config.device
        return self._load_draft(LlamaCppBackend(draft_config.model_copy(update={"device": device, "speculative": None})))

    def _speculative_tokens(
        self, prompt_ids: list[int], params: GenerationParams, should_stop: ShouldStop, stats: SpeculationStats
    ) -> Iterator[int]:
        """Greedy token ids in fewer passes: each pass evaluates the last token with the tokens
        drafted (by prompt lookup or a draft model: `_drafter`) in one batch and
        keeps the drafts up to the first this model would not have chosen, plus its own choice
        there; the KV cache drops the rest. A batch's logits can differ from one-token decodes
        in the last bits, so a near tie may resolve otherwise than in plain decoding. The first
        few steps run plain and timed (`stats.plain_tok_s`, the speed-up's baseline)."""
        import numpy as np

        assert self.config.speculative is not None
        spec = self.config.speculative
        propose = self._drafter(spec)
        n_ctx = self.llm.n_ctx()
        self._clear_context()
        try:
            history = list(prompt_ids)
            rows = self._decode(history, 0, keep_from=len(history) - 1, raw=True)
            token = int(np.argmax(rows[len(history) - 1]))
            history.append(token)
            yield token

            def check(token: int, drafts: list[int], position: int) -> Callable[[int], int]:
                rows = self._decode([token, *drafts], position, keep_from=position, raw=True)
                return lambda row: int(np.argmax(rows[position + row]))

            def rewind(position: int) -> None:  # the drafts not kept leave the KV cache
                self.llm._ctx.kv_cache_seq_rm(-1, position, -1)

            yield from speculative_loop(
                history, len(prompt_ids), n_ctx, params, should_stop, spec.num_tokens, propose, check, stats, rewind
            )
        finally:
            self._clear_context()

    def _plain_tokens(self, prompt: Prompt, params: GenerationParams) -> Iterator[int]:
        """The library's own token loop, with the request's sampling settings and schema."""
        if params.seed is not None:
            self.llm.set_seed(params.seed)
        grammar = None
        if prompt.json_schema is not None:
            from llama_cpp import LlamaGrammar

            grammar = LlamaGrammar.from_json_schema(json.dumps(prompt.json_schema), verbose=False)
        # Every request prefills its whole prompt, as the other backends do: the library would
        # otherwise reuse the cached prefix of the last request and re-decode its last prompt
        # token alone, whose logits differ slightly from the batched prefill (seen: one seed gave
        # two different first tokens), and its TTFT would not be comparable.
        self._clear_context()
        return self.llm.generate(
            prompt.payload,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=0.0,
            temp=params.temperature,
            repeat_penalty=params.repetition_penalty,
            reset=True,
            grammar=grammar,
        )

    def stream(self, prompt: Prompt, params: GenerationParams, should_stop: ShouldStop) -> Iterator[Chunk | StreamEnd]:
        import llama_cpp

        spec, stats = self.config.speculative, None
        if spec is not None:
            stats = SpeculationStats(spec.method, off=self._speculation_off(params, prompt))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        vocab = self.llm._model.vocab  # the library's own end-of-generation test needs it
        produced: list[int] = []
        finish: FinishReason = "length"
        if stats is not None and not stats.off:
            tokens = self._speculative_tokens(prompt.payload, params, should_stop, stats)
        else:
            tokens = self._plain_tokens(prompt, params)
        try:
            for token in tokens:
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    finish = "stop"
                    break
                produced.append(token)
                yield Chunk(decoder.decode(self.llm.detokenize([token])), 1)
                if len(produced) >= params.max_new_tokens:
                    break
                if should_stop():
                    finish = "cancelled"
                    break
        finally:
            tokens.close()
        tail = decoder.decode(b"", final=True)
        if tail:
            yield Chunk(tail, 0)
        yield StreamEnd(finish, token_ids=tuple(produced), speculation=stats)

    def unload(self) -> None:
        if self.draft is not None:
            self.draft.unload()
            self.draft = None
        if self.llm is not None:
            self.llm.close()
            self.llm = None
