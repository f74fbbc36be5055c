"""Model variants as data: the schema of `model_configs/*.yaml` and the code that loads it.

A variant says where its weights are, which backend runs them, how prompts are formatted and how
it generates by default. Validation refuses unknown keys and names the file and field at fault.
This module knows nothing about how a backend loads weights.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from playground.capabilities import CAPABILITIES, capabilities, with_capability
from playground.errors import ConfigError
from playground.gguf_types import ConvertWeights

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_DIR = REPO_ROOT / "model_configs"

BackendName = Literal["transformers", "llamacpp", "scratch_gpt", "openai"]
Dtype = Literal["auto", "bf16", "fp16", "fp32"]
# auto, cpu, cuda (any GPU: the one with the most free memory), or cuda:N (GPU N, as nvml and
# nvidia-smi number them).
def _device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d{1,2})?", value):
        raise ValueError(f"{value!r} is not a device: auto, cpu, cuda, or cuda:N (GPU N)")
    return value


Device = Annotated[str, AfterValidator(_device)]
PromptFormat = Literal["chat_template", "alpaca", "raw"]
Role = Literal["general", "router", "partner"]
# auto: the static-cache + CUDA-graph decoder on a GPU, plain generate on CPU; on: the static
# cache on CPU too (eager steps); off: always plain generate.
FastDecode = Literal["auto", "on", "off"]
Mode = Literal["chat", "completion"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GenerationParams(_Strict):
    """Sampling settings. Bounds refuse absurd values before a worker ever sees them."""

    temperature: Annotated[float, Field(ge=0.0, le=5.0)] = 0.7
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 0.95
    top_k: Annotated[int, Field(ge=0, le=100_000)] = 40
    max_new_tokens: Annotated[int, Field(ge=1, le=32_768)] = 256
    repetition_penalty: Annotated[float, Field(ge=0.5, le=3.0)] = 1.0
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] | None = None

    def merged(self, **overrides: Any) -> GenerationParams:
        """These settings with the non-None overrides applied (validated again)."""
        values = self.model_dump()
        values.update({k: v for k, v in overrides.items() if v is not None})
        return validate_params(values)


class Source(_Strict):
    """Where the weights are: a hub repo id, a local path, or a file shipped in a Python package."""

    repo: str | None = None
    path: str | None = None
    package: str | None = None
    file: str | None = None
    revision: str | None = None
    # A Hugging Face–compatible hub to download `repo` from (a company mirror, say); by default
    # HF_ENDPOINT, else huggingface.co.
    endpoint: str | None = None

    @model_validator(mode="after")
    def _exactly_one_location(self) -> Source:
        given = [name for name in ("repo", "path", "package") if getattr(self, name)]
        if len(given) != 1:
            raise ValueError("give exactly one of repo, path or package")
        if self.endpoint is not None:
            if not self.repo:
                raise ValueError("endpoint is where a hub repo is downloaded from: it needs `repo`")
            if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", self.endpoint):
                raise ValueError(f"endpoint {self.endpoint!r} is not an http(s) URL")
        if self.package and not self.file:
            raise ValueError("a package source needs `file`: the weights file inside the package")
        if self.repo and not re.fullmatch(r"[\w.\-]+/[\w.\-]+", self.repo):
            raise ValueError(f"repo {self.repo!r} is not a hub id of the form owner/name")
        return self


BNB_INT8_THRESHOLD = 6.0  # bitsandbytes' and transformers' default llm_int8_threshold


class Quantization(_Strict):
    """Load-time quantization (bitsandbytes). `keep_modules` stay unquantized (in fp16/bf16)."""

    method: Literal["none", "nf4", "int8"] = "none"
    keep_modules: list[str] = []
    compute_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    double_quant: bool = False
    # int8 only (bitsandbytes' llm_int8_threshold): activation columns above it run in 16-bit.
    # Finding them asks the host in every matmul, which a CUDA graph cannot hold; 0 turns the
    # split off, and the int8 step can then take the fast path.
    int8_outlier_threshold: Annotated[float, Field(ge=0.0, le=1000.0)] = BNB_INT8_THRESHOLD
    # The token embedding and LM head (bitsandbytes leaves them in the compute dtype): "int8"
    # holds them as int8 rows with a scale each, weight-only (playground/backends/int8_head.py).
    head: Literal["keep", "int8"] = "keep"

    @model_validator(mode="after")
    def _threshold_is_int8s(self) -> Quantization:
        # Compared with the default, not with the fields set: a dumped and re-read config sets all.
        if self.method != "int8" and self.int8_outlier_threshold != BNB_INT8_THRESHOLD:
            raise ValueError("int8_outlier_threshold applies to method int8 only")
        if self.method == "none" and self.head != "keep":
            raise ValueError("quantization.head applies with a quantization method (nf4 or int8)")
        return self


class RouterSpec(_Strict):
    """What a router variant is asked and which answers it may give."""

    system_prompt: str
    system_prompt_source: str
    routes: list[str] = ["self", "npc_fin"]
    escalate_route: str = "npc_fin"


class CostSpec(_Strict):
    """What one answer of this variant costs, for the router's cost-quality curve: its price per
    million tokens (an API's list price, or your own hardware's) and its typical seconds."""

    usd_per_million_input_tokens: Annotated[float, Field(ge=0)] = 0.0
    usd_per_million_output_tokens: Annotated[float, Field(ge=0)] = 0.0
    seconds_per_answer: Annotated[float, Field(ge=0)] | None = None

    def usd(self, input_tokens: float, output_tokens: float) -> float:
        return (input_tokens * self.usd_per_million_input_tokens + output_tokens * self.usd_per_million_output_tokens) / 1e6


class LlamaCppOptions(_Strict):
    n_threads: Annotated[int, Field(ge=0, le=512)] = 0  # 0: playground.cpus.usable_cpus()
    n_gpu_layers: Annotated[int, Field(ge=-1)] = -1  # -1: all layers when built with GPU support
    n_batch: Annotated[int, Field(ge=1, le=65_536)] = 512
    # auto: flash attention where layers run on a GPU (llama.cpp's own tools default to it there).
    flash_attn: Literal["auto", "on", "off"] = "auto"
    # The weights converted at load (once, cached) to a type whose CPU prompt kernels are faster:
    # what a router wants, whose decision is all prompt processing. auto: a 2- to 6-bit file
    # on the CPU becomes BF16 where the CPU has bf16 dot products, else F16 (playground.gguf_types).
    convert_weights: ConvertWeights = "no"
    # llama.cpp's repacking of CPU weights into its AMX, AVX or Arm layouts. auto: off on a CPU
    # with AMX, where prompt processing with the repacked weights crashed (SIGSEGV) here
    # (llama.cpp issue 20824); on elsewhere (playground.gguf_types.cpu_repack_wanted).
    cpu_repack: Literal["auto", "on", "off"] = "auto"


SpeculativeMethod = Literal["prompt-lookup", "draft-model"]


class SpeculativeSpec(_Strict):
    """Speculative decoding: a few tokens are drafted cheaply, then the variant checks them all
    in one forward pass and keeps those it would have chosen itself, so a greedy reply is the
    same tokens plain decoding gives, in fewer passes. For greedy replies (temperature 0);
    a sampled reply decodes plainly and says so."""

    # prompt-lookup: the draft is what followed the last few tokens where they appeared before
    # in the prompt or reply (no model; good for summarising, editing, code). draft-model: a
    # small variant with the same tokenizer drafts, loaded in this variant's worker.
    method: SpeculativeMethod
    num_tokens: Annotated[int, Field(ge=1, le=32)] = 8  # drafted per pass
    ngram: Annotated[int, Field(ge=1, le=8)] = 3  # prompt-lookup: the longest n-gram matched
    draft_variant: str | None = None  # draft-model: its variant id

    @model_validator(mode="after")
    def _draft_named(self) -> SpeculativeSpec:
        if self.method == "draft-model" and not self.draft_variant:
            raise ValueError("speculative method draft-model needs `draft_variant`: the id of a smaller variant")
        if self.method == "prompt-lookup" and self.draft_variant:
            raise ValueError("speculative method prompt-lookup drafts from the text itself: drop `draft_variant`")
        return self


class ScratchGptOptions(_Strict):
    """What the tensor shapes of a from-scratch GPT state_dict cannot tell."""

    rope_theta: Annotated[float, Field(gt=0)] = 500_000.0
    # Needed only when the checkpoint has no `freqs_cis` buffer to read it from.
    head_dim: Annotated[int, Field(ge=8, le=1024)] = 128
    norm_eps: Annotated[float, Field(gt=0)] = 1e-6


class TokenizerSpec(_Strict):
    """A tokenizer other than the one inside the weights folder: tiktoken for scratch_gpt
    variants and the HF folders fine-tuned from them; for a remote variant, the served model's
    own tokenizer (`path`: a tokenizer folder or a GGUF file), for exact token counts, its chat
    template and token-level scoring through the server."""

    tiktoken: str | None = None  # a tiktoken encoding name, e.g. gpt2
    file: str | None = None  # a tiktoken BPE file (base64 token, rank per line)
    path: str | None = None  # a local tokenizer folder or GGUF file (remote variants)
    eos_token_id: int | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> TokenizerSpec:
        if sum(bool(kind) for kind in (self.tiktoken, self.file, self.path)) != 1:
            raise ValueError("give exactly one of tiktoken (an encoding name), file or path")
        return self


class EndpointSpec(_Strict):
    """An OpenAI-compatible server (vLLM, TGI, llama.cpp server, Ollama)."""

    base_url: str
    model: str = ""
    api_key_env: str | None = None  # name of the environment variable holding the key
    timeout_s: Annotated[float, Field(gt=0, le=3600)] = 120.0

    def api_key(self) -> str:
        """The key, read from the environment when asked (never stored in a config)."""
        return os.environ.get(self.api_key_env, "") if self.api_key_env else ""

    def auth_headers(self) -> dict[str, str]:
        key = self.api_key()
        return {"Authorization": f"Bearer {key}"} if key else {}


class ShapeHint(_Strict):
    """Sizes for the memory estimate when the weights are not on disk yet (hub variants).

    Unknown attention sizes leave the KV cache out of the estimate (and the estimate says so).
    `weights_bytes` (e.g. from a model card) replaces n_params x dtype size when given.
    """

    n_params: Annotated[float, Field(gt=0)]
    n_layers: Annotated[int, Field(ge=1)] | None = None
    n_kv_heads: Annotated[int, Field(ge=1)] | None = None
    head_dim: Annotated[int, Field(ge=1)] | None = None
    weights_bytes: Annotated[int, Field(gt=0)] | None = None
    # The token embedding's and LM head's parameters (one table if tied): a quantized variant
    # keeps them in its load dtype, so its estimate needs them apart from the rest.
    embedding_params: Annotated[float, Field(gt=0)] | None = None


class AdapterSpec(_Strict):
    """A LoRA adapter (a peft folder) applied on top of the base weights when the variant loads."""

    path: str


class FinetuneRecord(_Strict):
    """Where a fine-tuned variant came from: written by the job that made it."""

    base: str
    data: str
    job_id: str
    options: dict[str, Any] = {}


class ModelConfig(_Strict):
    id: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._\-]*$", max_length=80)]
    display_name: str
    backend: BackendName
    source: Source | None = None
    endpoint: EndpointSpec | None = None
    dtype: Dtype = "auto"
    device: Device = "auto"
    quantization: Quantization = Quantization()
    fast_decode: FastDecode = "auto"
    trust_remote_code: bool = False
    prompt_format: PromptFormat = "chat_template"
    context_length: Annotated[int, Field(ge=16, le=1_048_576)] = 2048
    # Requests its worker streams at once; more wait in the variant's fair queue (request_queue).
    concurrency: Annotated[int, Field(ge=1, le=64)] = 1
    generation: GenerationParams = GenerationParams()
    role: Role = "general"
    router: RouterSpec | None = None
    tokenizer: TokenizerSpec | None = None
    llamacpp: LlamaCppOptions = LlamaCppOptions()
    scratch_gpt: ScratchGptOptions = ScratchGptOptions()
    shape: ShapeHint | None = None
    # Warn when decoding greedily (temperature 0): some models loop (the auto-g-nano card says so).
    warn_greedy: bool = False
    adapter: AdapterSpec | None = None
    finetune: FinetuneRecord | None = None
    cost: CostSpec | None = None  # for a router's cost-quality curve in money or seconds
    speculative: SpeculativeSpec | None = None
    notes: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        caps = capabilities(self.backend)

        def only(flag: str) -> str:
            return " and ".join(with_capability(flag)) + " backend" + ("s" if len(with_capability(flag)) > 1 else "")

        if caps.remote:
            if self.endpoint is None:
                raise ValueError(f"backend {self.backend} needs an `endpoint`")
            if self.tokenizer is not None and not self.tokenizer.path:
                raise ValueError("a remote variant's tokenizer is `path`: the served model's tokenizer folder or GGUF")
        elif self.tokenizer is not None and self.tokenizer.path:
            raise ValueError("tokenizer.path names a remote variant's tokenizer; a local one has its own")
        elif self.source is None:
            raise ValueError(f"backend {self.backend} needs a `source`")
        if self.role == "router" and self.router is None:
            raise ValueError("role router needs a `router` section (system prompt and routes)")
        if self.quantization.method != "none" and not caps.load_time_quantization:
            raise ValueError(f"load-time quantization applies to the {only('load_time_quantization')} only")
        if self.fast_decode != "auto" and not caps.fast_decode:
            raise ValueError(f"fast_decode applies to the {only('fast_decode')} only")
        if self.adapter is not None and not caps.adapters:
            raise ValueError(f"a LoRA adapter applies to the {only('adapters')} only")
        if self.concurrency > 1 and not caps.serves_concurrently:
            raise ValueError(
                f"concurrency above 1 needs the {only('serves_concurrently')}: a local worker decodes one request at a time"
            )
        if self.speculative and self.speculative.method not in caps.speculative_methods:
            backends = [b for b in CAPABILITIES if self.speculative.method in CAPABILITIES[b].speculative_methods]
            raise ValueError(f"speculative method {self.speculative.method} applies to the {' and '.join(backends)} backend(s) only")
        if self.speculative and self.speculative.draft_variant == self.id:
            raise ValueError("a variant cannot be its own draft model")
        if self.router and self.router.escalate_route not in self.router.routes:
            raise ValueError("router.escalate_route must be one of router.routes")
        return self

    @property
    def default_mode(self) -> Mode:
        return "chat" if self.prompt_format == "chat_template" else "completion"


def describe_errors(err: ValidationError, unknown: str = "unknown field") -> str:
    """A validation error as `where: what` parts; unknown keys called `unknown`. Inputs are never
    shown (they may be secrets)."""
    parts = []
    for e in err.errors(include_input=False):
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = unknown if e["type"] == "extra_forbidden" else e["msg"]
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def setting_error(name: str, value: Any) -> str | None:
    """Why one generation setting is refused (its bounds, whole numbers where needed); None when
    it is fine. Empty means 'the variant's default' and is fine."""
    if value is None:
        return None
    try:
        GenerationParams.model_validate({name: value})
    except ValidationError as err:
        return err.errors(include_input=False)[0]["msg"]
    return None


def validate_params(values: dict[str, Any]) -> GenerationParams:
    try:
        return GenerationParams.model_validate(values)
    except ValidationError as err:
        raise ConfigError(f"invalid generation settings: {describe_errors(err)}") from None


def parse_config(data: Any, origin: str) -> ModelConfig:
    """Validate one variant's data; `origin` names it in messages (usually the file path)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping of fields, got {type(data).__name__}")
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{origin}: {describe_errors(err)}") from None


def load_config_file(path: Path) -> ModelConfig:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err.__class__.__name__}: {err})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror})") from None
    return parse_config(data, str(path))


def load_config_dir(directory: Path = DEFAULT_CONFIG_DIR) -> dict[str, ModelConfig]:
    """Every `*.yaml` in `directory`, by id. Duplicate ids are an error naming both files."""
    configs: dict[str, ModelConfig] = {}
    origins: dict[str, Path] = {}
    for path in sorted(Path(directory).glob("*.yaml")):
        config = load_config_file(path)
        if config.id in configs:
            raise ConfigError(f"{path}: id {config.id!r} is already used by {origins[config.id]}")
        configs[config.id] = config
        origins[config.id] = path
    return configs
