"""Tiny real models written by the tests: HF folders, a remote-code folder, GPT state_dicts,
a tiktoken BPE file and GGUF files. Random weights, real formats, real libraries.
"""

from __future__ import annotations

import base64
import json
import textwrap
from pathlib import Path

import torch

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! This is a tiny corpus for a tiny tokenizer.",
    "What is the capital of France? Paris is the capital of France.",
    "Numbers like 12345 and symbols like {}[]() appear in code: def f(x): return x * 2",
    "Finance: the net present value of a cash flow depends on the discount rate.",
]


def tiny_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer with ChatML special tokens, trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML,
    )


def _small_dims(tokenizer) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def make_hf_folder(folder: Path, arch: str = "llama", seed: int = 0, spare_rows: int = 0) -> Path:
    """A random Llama or Qwen2 model with its tokenizer, saved as an HF folder; `spare_rows`
    embedding rows past the tokenizer's last id, as real Qwen2.5 checkpoints have."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    dims = _small_dims(tokenizer) | {"vocab_size": len(tokenizer) + spare_rows}
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**dims, rope_theta=10000.0))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**dims, tie_word_embeddings=True))
    else:
        raise ValueError(arch)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


REMOTE_CONFIG = """
from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "tiny-remote"
"""

REMOTE_MODEL = """
from transformers import LlamaForCausalLM

from .configuration_tiny_remote import TinyRemoteConfig


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig
    # Proof that this folder's own code ran: a marker the test reads back.
    REMOTE_CODE_RAN = True
"""


def make_remote_code_folder(folder: Path) -> Path:
    """An HF folder whose model class lives in the folder itself (needs trust_remote_code)."""
    make_hf_folder(folder, "llama")
    (folder / "configuration_tiny_remote.py").write_text(textwrap.dedent(REMOTE_CONFIG))
    (folder / "modeling_tiny_remote.py").write_text(textwrap.dedent(REMOTE_MODEL))
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "tiny-remote"
    config["architectures"] = ["TinyRemoteForCausalLM"]
    config["auto_map"] = {
        "AutoConfig": "configuration_tiny_remote.TinyRemoteConfig",
        "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteForCausalLM",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


# -- from-scratch GPT (auto-g-nano layout) ---------------------------------------------------
GPT_DIMS = dict(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_kv_head=2, ffn_hidden=96, block_size=512)


def make_gpt_state_dict(dims: dict = GPT_DIMS, seed: int = 0, with_freqs: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    v, d, f = dims["vocab_size"], dims["n_embd"], dims["ffn_hidden"]
    head_dim = d // dims["n_head"]

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.08

    state = {"token_embedding_table.weight": rand(v, d), "norm.weight": 1 + rand(d), "lm_head.weight": rand(v, d)}
    for i in range(dims["n_layer"]):
        p = f"blocks.{i}."
        state[p + "attention_norm.weight"] = 1 + rand(d)
        state[p + "attention.wq.weight"] = rand(dims["n_head"] * head_dim, d)
        state[p + "attention.wk.weight"] = rand(dims["n_kv_head"] * head_dim, d)
        state[p + "attention.wv.weight"] = rand(dims["n_kv_head"] * head_dim, d)
        state[p + "attention.wo.weight"] = rand(d, dims["n_head"] * head_dim)
        state[p + "ffn_norm.weight"] = 1 + rand(d)
        state[p + "feed_forward.w1.weight"] = rand(f, d)
        state[p + "feed_forward.w2.weight"] = rand(f, d)
        state[p + "feed_forward.w3.weight"] = rand(d, f)
    if with_freqs:
        state["freqs_cis"] = reference_freqs(head_dim, dims["block_size"], theta=500_000.0)
    return state


def reference_freqs(head_dim: int, length: int, theta: float) -> torch.Tensor:
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(length).float(), inv)
    return torch.polar(torch.ones_like(angles), angles)


def reference_gpt_logits(state: dict[str, torch.Tensor], ids: torch.Tensor, dims: dict, theta: float) -> torch.Tensor:
    """The upstream GPT forward written from its description: interleaved (complex-pair) RoPE,
    float32 RMSNorm (eps 1e-6), GQA by repeat_interleave, SwiGLU w3(silu(w1 x) * w2 x)."""

    def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:  # x: [B, T, H, D]
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * freqs[None, :, None, :]).flatten(3)

    n_head, n_kv = dims["n_head"], dims["n_kv_head"]
    d = dims["n_embd"]
    hd = d // n_head
    B, T = ids.shape
    freqs = reference_freqs(hd, T, theta)
    x = state["token_embedding_table.weight"][ids]
    for i in range(dims["n_layer"]):
        p = f"blocks.{i}."
        h = rms(x, state[p + "attention_norm.weight"])
        q = (h @ state[p + "attention.wq.weight"].T).view(B, T, n_head, hd)
        k = (h @ state[p + "attention.wk.weight"].T).view(B, T, n_kv, hd)
        v = (h @ state[p + "attention.wv.weight"].T).view(B, T, n_kv, hd)
        q, k = rope(q, freqs), rope(k, freqs)
        k = k.repeat_interleave(n_head // n_kv, dim=2)
        v = v.repeat_interleave(n_head // n_kv, dim=2)
        att = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + att.transpose(1, 2).reshape(B, T, d) @ state[p + "attention.wo.weight"].T
        h = rms(x, state[p + "ffn_norm.weight"])
        gate = torch.nn.functional.silu(h @ state[p + "feed_forward.w1.weight"].T)
        up = h @ state[p + "feed_forward.w2.weight"].T
        x = x + (gate * up) @ state[p + "feed_forward.w3.weight"].T
    return rms(x, state["norm.weight"]) @ state["lm_head.weight"].T


def make_tiktoken_file(path: Path, n_merges: int = 40) -> Path:
    """A tiktoken BPE file: the 256 single bytes, then merges learned greedily from CORPUS."""
    ranks: dict[bytes, int] = {bytes([b]): b for b in range(256)}
    words = [w.encode() for line in CORPUS for w in line.split()]
    seqs = [[bytes([c]) for c in w] for w in words]
    while len(ranks) < 256 + n_merges:
        counts: dict[tuple[bytes, bytes], int] = {}
        for s in seqs:
            for a, b in zip(s, s[1:], strict=False):
                counts[(a, b)] = counts.get((a, b), 0) + 1
        if not counts:
            break
        (a, b), _ = max(counts.items(), key=lambda kv: kv[1])
        ranks[a + b] = len(ranks)
        seqs = [_merge(s, a, b) for s in seqs]
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return path


def _merge(seq: list[bytes], a: bytes, b: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


def make_gguf(path: Path, arch: str = "llama", spare_rows: int = 0, add_bos: bool = False) -> Path:
    """A tiny random model with its tokenizer and chat template, written as an F32 GGUF
    (`add_bos`: llama.cpp puts the beginning-of-sequence token before every prompt)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from playground.gguf_export import write_gguf

    folder = make_hf_folder(path.parent / f"{path.stem}-hf", arch, spare_rows=spare_rows)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return write_gguf(model, tokenizer, path, name="tiny", add_bos=add_bos)
