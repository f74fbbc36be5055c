"""The token embedding and LM head held as int8 rows with one scale a row (weight-only), shared
when the model ties them: `quantization.head: int8`.

Why: transformers' bitsandbytes loads leave a tied embedding/head in the compute dtype. On the
Qwen2.5-3B that is 622 MB of its 2.1 GB of NF4 weights and the largest single read of an NF4
decode step. As int8 it takes half, at a quality cost near nothing beside NF4's own: on the
embedded 135M, next-token KL 0.2687 against 0.2666 with NF4 layers (an NF4 head: 0.486;
benchmarks/RESULTS.md, "Would an NF4 head pay?"). llama.cpp's Q4_K_M keeps its output matrix at
6 bits for the same reason.

The rows are quantized by bitsandbytes (`int8_vectorwise_quant`: each row's absmax to 127) and
read as bitsandbytes dequantizes them, `row * absmax / 127`. The head multiplies x by the
int8 rows in the compute dtype (exact: |q| <= 127 fits bf16's mantissa) and scales the sums,
a vocabulary slice at a time, so no dequantized copy of the whole matrix is ever made.
"""

from __future__ import annotations

import torch
from torch import nn

# Vocabulary rows a head matmul takes at once: a slice's rows in the compute dtype stay small
# (16384 x 2048 bf16 is 64 MB), and each slice is still a large read.
HEAD_ROWS_A_SLICE = 16384


# bitsandbytes' 1/127, as its int8 dequantization multiplies by it (the Triton matvec's too)
RECIPROCAL_127 = 7.874015718698502e-3


class Int8Rows(nn.Module):
    """A [rows, columns] matrix as int8 rows and each row's absmax (fp32), as bitsandbytes'
    vector-wise int8 quantization stores it."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        import bitsandbytes.functional as bnb_functional

        dtype = weight.dtype
        weight = weight.detach()
        if weight.is_cuda:  # bitsandbytes' CUDA kernel takes fp16 only (its CPU one any float)
            if weight.abs().max() > torch.finfo(torch.float16).max:
                raise ValueError("quantization.head int8: the table holds values beyond fp16's range")
            weight = weight.to(torch.float16)
        rows, absmax, _ = bnb_functional.int8_vectorwise_quant(weight)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("absmax", absmax.float(), persistent=False)
        self.dtype = dtype

    def dequantized(self, index: torch.Tensor | slice) -> torch.Tensor:
        """Rows `index` in the model's dtype, as bitsandbytes dequantizes them (in its order:
        row times absmax, then 1/127)."""
        return (self.rows[index].float() * self.absmax[index, None] * RECIPROCAL_127).to(self.dtype)


class Int8Embedding(nn.Module):
    """`nn.Embedding` over `Int8Rows`: a token's row, dequantized."""

    def __init__(self, table: Int8Rows, padding_idx: int | None = None) -> None:
        super().__init__()
        self.table = table
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = table.rows.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.dequantized(ids)


class Int8Head(nn.Module):
    """The LM head over `Int8Rows`: x times the int8 rows in x's dtype, each row's sum scaled, a
    vocabulary slice at a time. One token's logits on a GPU (a decode step) come from the Triton
    matvec reading the int8 rows (`fused_matvec` with `row_absmax`), in the launch shape
    `config` (`triton_layers` times one at load where it installs its layers): a matmul would
    first write the rows out in the compute dtype."""

    def __init__(self, table: Int8Rows) -> None:
        super().__init__()
        from playground.backends.triton_kernels import MatvecConfig

        self.table = table
        self.out_features, self.in_features = table.rows.shape
        self.config = MatvecConfig(8, 512, 4)
        self.config_timed = False

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rows, absmax = self.table.rows, self.table.absmax
        if hidden.is_cuda and hidden.numel() == self.in_features:
            from playground.backends.triton_kernels import fused_matvec, triton_available

            if triton_available():
                logits = fused_matvec(hidden.reshape(-1), rows, self.config, row_absmax=absmax)
                return logits.view(*hidden.shape[:-1], self.out_features)
        slices = []
        for start in range(0, rows.shape[0], HEAD_ROWS_A_SLICE):
            part = slice(start, start + HEAD_ROWS_A_SLICE)
            sums = nn.functional.linear(hidden, rows[part].to(hidden.dtype))
            slices.append((sums.float() * absmax[part] * RECIPROCAL_127).to(hidden.dtype))
        return torch.cat(slices, dim=-1)


def quantize_embedding_and_head(model: nn.Module) -> str:
    """Replace `model`'s input embedding and LM head with int8 ones (one shared table when they
    are tied); returns what the load line says. Raises ValueError where the model has no plain
    embedding or head to replace."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if type(embedding) is not nn.Embedding or type(head) is not nn.Linear or head.bias is not None:
        raise ValueError("quantization.head int8 needs a plain embedding and a head without bias")
    tied = head.weight is embedding.weight
    embedding_rows = Int8Rows(embedding.weight)
    model.set_input_embeddings(Int8Embedding(embedding_rows, embedding.padding_idx))
    model.set_output_embeddings(Int8Head(embedding_rows if tied else Int8Rows(head.weight)))
    what = "tied embedding/head" if tied else "embedding and head"
    return f"{what} in int8 (a scale a row, bitsandbytes' vector-wise quantization)"
