"""Write a transformers Llama or Qwen2 model and its byte-level BPE tokenizer into a GGUF file.

The `gguf` package does the writing; this module only maps names and metadata. llama.cpp's
LLAMA architecture applies RoPE to interleaved pairs, so q/k rows are permuted back from HF's
half-split order (the inverse of what HF conversion scripts do); its QWEN2 architecture rotates
halves as HF does, and keeps the q/k/v biases. F32 and F16 are written here; smaller types come
from llama.cpp's own quantizer afterwards (playground.gguf_types).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

TokenType = Literal[1, 3, 4]  # gguf TokenType.NORMAL, CONTROL, USER_DEFINED


def half_split_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return weight.view(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def _tokenizer_tables(tokenizer: Any, n_embeddings: int) -> tuple[list[str], list[int], list[str]]:
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"only BPE tokenizers can be exported, not {model.get('type')}")
    vocab: dict[str, int] = dict(model["vocab"])
    added = list(tokenizer.backend_tokenizer.get_added_tokens_decoder().values())
    for token in added:
        vocab.setdefault(token.content, tokenizer.convert_tokens_to_ids(token.content))
    # llama.cpp wants one token per embedding row. Checkpoints often have spare rows past the
    # tokenizer (Qwen2.5: 151,936 rows, 151,665 tokens): those become unused padding tokens.
    # A token past the last row has no embedding, so that pairing cannot be exported.
    if max(vocab.values()) >= n_embeddings:
        beyond = sorted(text for text, index in vocab.items() if index >= n_embeddings)
        raise ValueError(
            f"the tokenizer has {len(beyond)} token(s) with ids past the model's {n_embeddings} embedding rows "
            f"({', '.join(beyond[:3])}); the tokenizer does not belong to this model"
        )
    tokens = [f"[PAD{i}]" for i in range(n_embeddings)]
    for text, index in vocab.items():
        tokens[index] = text
    # Added tokens are matched whole, as HF does: special ones as CONTROL (3), the others as
    # USER_DEFINED (4); left NORMAL, llama.cpp would split them into bytes.
    special = set(tokenizer.all_special_tokens) | {t.content for t in added if t.special}
    user_defined = {t.content for t in added if not t.special}
    types = [3 if t in special else 4 if t in user_defined else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


# transformers model_type -> the gguf package's architecture, and whether q/k rows are permuted.
ARCHITECTURES = {"llama": ("LLAMA", True), "qwen2": ("QWEN2", False)}


def write_gguf(
    model: Any,
    tokenizer: Any,
    path: Path,
    *,
    dtype: Literal["f32", "f16"] = "f32",
    name: str = "model",
    tokenizer_from: Path | None = None,
    add_bos: bool = False,
) -> Path:
    """Write `model` to `path`. With `tokenizer_from` (a GGUF file), its tokenizer and chat
    template metadata are copied as they are (pre-tokenizer name included), so the export
    tokenizes exactly as the file the model came from; else they are built from `tokenizer`."""
    import gguf

    config = model.config
    if config.model_type not in ARCHITECTURES:
        raise ValueError(f"GGUF export knows {', '.join(ARCHITECTURES)} models, not {config.model_type}")
    arch, permute = ARCHITECTURES[config.model_type]
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch]])
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

    if tokenizer_from is not None:
        _copy_tokenizer_metadata(writer, Path(tokenizer_from))
    else:
        _write_tokenizer_metadata(writer, tokenizer, model.get_input_embeddings().weight.shape[0], add_bos)
    _write_tensors(writer, model, gguf.MODEL_ARCH[arch], n_heads if permute else 0, n_kv if permute else 0, dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _copy_tokenizer_metadata(writer: Any, source: Path) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(str(source))
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub_type = field.types[-1] if len(field.types) > 1 else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)


def _write_tokenizer_metadata(writer: Any, tokenizer: Any, n_embeddings: int, add_bos: bool = False) -> None:
    tokens, types, merges = _tokenizer_tables(tokenizer, n_embeddings)
    writer.add_tokenizer_model("gpt2")
    # HF's ByteLevel pre-tokenizer splits text with GPT-2's pattern; llama.cpp's "gpt-2"
    # pre-tokenizer is that pattern ("default" splits numbers differently).
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    if tokenizer.eos_token_id is not None:
        writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_add_bos_token(add_bos)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _write_tensors(writer: Any, model: Any, arch: Any, n_heads: int, n_kv: int, dtype: str) -> None:
    """n_heads/n_kv: the head counts to permute q/k rows by, or 0 to keep HF's order."""
    import gguf

    names = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    tied = getattr(model.config, "tie_word_embeddings", False)
    for hf_name, tensor in model.state_dict().items():
        # A tied head is the embedding itself: llama.cpp reads it from token_embd when the
        # file has no output.weight (as the original SmolLM2 GGUF files do).
        if "rotary_emb" in hf_name or (tied and hf_name == "lm_head.weight"):
            continue
        if n_heads and hf_name.endswith("q_proj.weight"):
            tensor = half_split_to_interleaved(tensor, n_heads)
        elif n_kv and hf_name.endswith("k_proj.weight"):
            tensor = half_split_to_interleaved(tensor, n_kv)
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for tensor {hf_name}")
        array = tensor.detach().float().cpu().numpy()
        # Norm vectors stay f32 in every llama.cpp file type; matrices take the chosen type.
        if dtype == "f16" and array.ndim == 2:
            array = array.astype(np.float16)
        writer.add_tensor(gguf_name, array)
