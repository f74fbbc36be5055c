"""From-scratch GPT backend: auto-g-nano style state_dicts, converted to a transformers Llama.

The checkpoint is a plain state_dict (.pt or .safetensors) of a Llama-like GPT: RMSNorm, GQA,
SwiGLU, untied head, and *interleaved* RoPE. Every size is read from tensor shapes; only the
RoPE theta (and the head size, when no `freqs_cis` buffer is saved) comes from the config.
Converting to `LlamaForCausalLM` gives this variant everything the transformers backend has
(sampling, repetition penalty, LoRA, the GPU fast path). The tokenizer is tiktoken.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from playground.backends.tiktoken_codec import TiktokenCodec
from playground.backends.transformers_backend import TransformersBackend
from playground.config import ScratchGptOptions, TokenizerSpec
from playground.errors import LoadError
from playground.sources import fetch

# Wrappers that training code leaves in front of every key (torch.compile, DDP).
_KEY_PREFIXES = ("_orig_mod.", "module.")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


@dataclass(frozen=True)
class GptShape:
    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    ffn_hidden: int
    block_size: int


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or torch.save file, with wrapper prefixes removed."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # corrupt or foreign files raise many kinds
        raise LoadError(f"{path.name} is not a readable state_dict ({err.__class__.__name__})") from None
    # Training checkpoints often nest the weights under a key.
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LoadError(f"{path.name} does not hold a flat mapping of tensors")
    cleaned = {}
    for key, value in state.items():
        for prefix in _KEY_PREFIXES:
            key = key.removeprefix(prefix)
        cleaned[key] = value
    return cleaned


def infer_shape(state: Mapping[str, torch.Tensor], options: ScratchGptOptions) -> GptShape:
    try:
        vocab_size, n_embd = state["token_embedding_table.weight"].shape
        q_rows = state["blocks.0.attention.wq.weight"].shape[0]
        kv_rows = state["blocks.0.attention.wk.weight"].shape[0]
        ffn_hidden = state["blocks.0.feed_forward.w1.weight"].shape[0]
    except KeyError as err:
        raise LoadError(f"not an auto-g-nano style GPT state_dict: tensor {err.args[0]!r} is missing") from None
    n_layer = 1 + max(int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k)))
    freqs = state.get("freqs_cis")
    # freqs_cis is [block_size, head_dim / 2] (complex), the only place the head size is stored.
    head_dim = 2 * freqs.shape[1] if freqs is not None and freqs.dim() == 2 else options.head_dim
    block_size = freqs.shape[0] if freqs is not None and freqs.dim() == 2 else 1024
    if q_rows % head_dim or kv_rows % head_dim:
        raise LoadError(
            f"query/key sizes ({q_rows}, {kv_rows}) are not multiples of head_dim {head_dim}: "
            "set scratch_gpt.head_dim in the variant's config"
        )
    return GptShape(
        vocab_size=vocab_size,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=q_rows // head_dim,
        n_kv_head=kv_rows // head_dim,
        head_dim=head_dim,
        ffn_hidden=ffn_hidden,
        block_size=block_size,
    )


def interleaved_to_half_split(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k rows so HF's half-split RoPE computes what interleaved RoPE computed.

    Within each head, rows (0,1), (2,3)... form rotation pairs; HF pairs row i with i + d/2.
    Putting the even rows first and the odd rows second maps one onto the other (the same
    permutation the Meta-to-HF Llama conversion uses).
    """
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return weight.view(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def to_llama_state_dict(state: Mapping[str, torch.Tensor], shape: GptShape) -> dict[str, torch.Tensor]:
    out = {
        "model.embed_tokens.weight": state["token_embedding_table.weight"],
        "model.norm.weight": state["norm.weight"],
        "lm_head.weight": state["lm_head.weight"],
    }
    for i in range(shape.n_layer):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = state[src + "attention_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = state[src + "ffn_norm.weight"]
        out[dst + "self_attn.q_proj.weight"] = interleaved_to_half_split(
            state[src + "attention.wq.weight"], shape.n_head
        )
        out[dst + "self_attn.k_proj.weight"] = interleaved_to_half_split(
            state[src + "attention.wk.weight"], shape.n_kv_head
        )
        out[dst + "self_attn.v_proj.weight"] = state[src + "attention.wv.weight"]
        out[dst + "self_attn.o_proj.weight"] = state[src + "attention.wo.weight"]
        # SwiGLU: out = w3(silu(w1 x) * w2 x), so w1 is the gate, w2 the up and w3 the down projection.
        out[dst + "mlp.gate_proj.weight"] = state[src + "feed_forward.w1.weight"]
        out[dst + "mlp.up_proj.weight"] = state[src + "feed_forward.w2.weight"]
        out[dst + "mlp.down_proj.weight"] = state[src + "feed_forward.w3.weight"]
    return out


def build_llama(
    state: Mapping[str, torch.Tensor], shape: GptShape, options: ScratchGptOptions, dtype: torch.dtype
) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.n_embd,
        intermediate_size=shape.ffn_hidden,
        num_hidden_layers=shape.n_layer,
        num_attention_heads=shape.n_head,
        num_key_value_heads=shape.n_kv_head,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.block_size,
        rms_norm_eps=options.norm_eps,
        rope_theta=options.rope_theta,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    converted = {k: v.to(dtype) for k, v in to_llama_state_dict(state, shape).items()}
    missing, unexpected = model.load_state_dict(converted, strict=False, assign=True)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise LoadError(f"state_dict does not match the GPT layout (missing {missing[:3]}, extra {unexpected[:3]})")
    # Non-persistent buffers (RoPE inverse frequencies) were made on the meta device: rebuild them.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model


class ScratchGptBackend(TransformersBackend):
    name = "scratch_gpt"

    def _load_model_and_codec(self, dtype: torch.dtype, notes: list[str]) -> tuple[Any, Any]:
        if self.config.quantization.method != "none":
            raise LoadError("quantization is not supported for scratch_gpt variants yet")
        weights = fetch(self.config, self.report_download)
        if weights.kind != "state_dict":
            raise LoadError(f"{weights.location}: the scratch_gpt backend needs a .pt or .safetensors file")
        state = read_state_dict(weights.path)
        shape = infer_shape(state, self.config.scratch_gpt)
        codec = TiktokenCodec(self.config.tokenizer or TokenizerSpec(tiktoken="gpt2"), shape.vocab_size)
        model = build_llama(state, shape, self.config.scratch_gpt, dtype).to(self.device)
        notes.append(
            f"GPT {shape.n_layer} layers, {shape.n_embd} wide, {shape.n_head} heads / "
            f"{shape.n_kv_head} KV heads, FFN {shape.ffn_hidden}, context {shape.block_size}"
        )
        return model, codec
