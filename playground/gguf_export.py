"""Write a transformers Llama-family model and its byte-level BPE tokenizer into a GGUF file.

The `gguf` package does the writing; this module only maps names and metadata. llama.cpp's
LLAMA architecture applies RoPE to interleaved pairs, so q/k rows are permuted back from HF's
half-split order (the inverse of what HF conversion scripts do). F32 and F16 are written here;
smaller types come from llama.cpp's own quantizer afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

TokenType = Literal[1, 3]  # gguf TokenType.NORMAL, TokenType.CONTROL


def half_split_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return weight.view(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def _tokenizer_tables(tokenizer: Any) -> tuple[list[str], list[int], list[str]]:
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"only BPE tokenizers can be exported, not {model.get('type')}")
    vocab: dict[str, int] = dict(model["vocab"])
    for token in tokenizer.backend_tokenizer.get_added_tokens_decoder().values():
        vocab.setdefault(token.content, tokenizer.convert_tokens_to_ids(token.content))
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    for text, index in vocab.items():
        tokens[index] = text
    special = set(tokenizer.all_special_tokens)
    types = [3 if t in special else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def write_llama_gguf(
    model: Any, tokenizer: Any, path: Path, *, dtype: Literal["f32", "f16"] = "f32", name: str = "model"
) -> Path:
    import gguf

    config = model.config
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope_theta = getattr(config, "rope_theta", None) or (config.rope_parameters or {}).get("rope_theta", 10000.0)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)

    tokens, types, merges = _tokenizer_tables(tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    if tokenizer.eos_token_id is not None:
        writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_add_bos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if "rotary_emb" in hf_name:
            continue
        if hf_name.endswith("q_proj.weight"):
            tensor = half_split_to_interleaved(tensor, n_heads)
        elif hf_name.endswith("k_proj.weight"):
            tensor = half_split_to_interleaved(tensor, n_kv)
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for tensor {hf_name}")
        array = tensor.detach().float().cpu().numpy()
        # Norm vectors stay f32 in every llama.cpp file type; matrices take the chosen type.
        if dtype == "f16" and array.ndim == 2:
            array = array.astype(np.float16)
        writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
