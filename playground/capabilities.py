"""What each backend can do, declared once, as data that imports no torch or llama.cpp.

The UI process, the router, the job placement, the memory estimate and config validation all
read this table instead of comparing backend names; a worker reads it too (`Backend.caps`).
Adding a backend means one row here and one entry in the lazy registry (playground/backends/__init__.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Capabilities:
    """What one backend can do; each row below names only what differs from these defaults."""

    scores_tokens: bool = False  # log-probabilities of given text: route scoring, perplexity, lm-eval
    grammar: bool = False  # constrains output to a JSON schema
    remote: bool = False  # the model runs on a server; this process only talks to it
    streams_tokens: bool = True  # chunks are single tokens as they are made
    counts_tokens_locally: bool = True  # False: token counts come from the server's usage report
    serves_concurrently: bool = False  # its worker may stream `concurrency` requests at once
    can_finetune: bool = False  # LoRA, QAT: the weights are torch modules in this process
    exports_gguf: bool = False  # the GGUF export reads its weights
    runs_on_gpu: bool = False  # may place weights on a local GPU (memory estimate, job placement)
    load_time_quantization: bool = False  # bitsandbytes NF4/int8 at load
    fast_decode: bool = False  # the static-cache / CUDA-graph decoder
    adapters: bool = False  # a LoRA adapter applied at load
    # Speculative decoding (config `speculative`): drafted tokens checked in one pass. Which
    # drafting methods: prompt lookup needs nothing more; a draft model is loaded beside it.
    speculative_methods: tuple[str, ...] = ()
    # Runs the weights file as it is (GGUF): the file's size is the weights' size in memory,
    # and its own options say whether layers go to a GPU.
    weights_as_file: bool = False


_TORCH_MODEL = {"scores_tokens": True, "can_finetune": True, "runs_on_gpu": True, "fast_decode": True, "adapters": True}
CAPABILITIES: dict[str, Capabilities] = {
    "transformers": Capabilities(
        **_TORCH_MODEL,
        exports_gguf=True,
        load_time_quantization=True,
        speculative_methods=("prompt-lookup", "draft-model"),
    ),
    # Its tiktoken tokenizer has no GGUF form here, and bitsandbytes is not wired to it.
    "scratch_gpt": Capabilities(**_TORCH_MODEL),
    "llamacpp": Capabilities(
        scores_tokens=True,
        grammar=True,
        runs_on_gpu=True,
        weights_as_file=True,
        speculative_methods=("prompt-lookup", "draft-model"),
    ),
    # A server batches requests itself and reports its own token counts.
    "openai": Capabilities(remote=True, counts_tokens_locally=False, serves_concurrently=True),
}


def capabilities(backend: str) -> Capabilities:
    try:
        return CAPABILITIES[backend]
    except KeyError:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(sorted(CAPABILITIES))}") from None


def with_capability(flag: str) -> list[str]:
    """The backends that have `flag`, for messages ("... applies to transformers and scratch_gpt")."""
    return [name for name, caps in CAPABILITIES.items() if getattr(caps, flag)]
