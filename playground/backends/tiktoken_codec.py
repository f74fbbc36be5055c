"""A tokenizer for the from-scratch GPTs: a tiktoken encoding (gpt2 by name, or a BPE file),
behind the same small interface as transformers_backend.TextCodec (encode, decode, chat,
eos_ids). Both the scratch_gpt backend and HF folders fine-tuned from it use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from playground.config import TokenizerSpec
from playground.errors import LoadError


class TiktokenCodec:
    """The TextCodec interface over a tiktoken encoding (gpt2 by name, or a BPE file)."""

    def __init__(self, spec: TokenizerSpec, vocab_size: int) -> None:
        import tiktoken

        if spec.file:
            from tiktoken.load import load_tiktoken_bpe

            path = Path(spec.file).expanduser()
            try:
                ranks = load_tiktoken_bpe(str(path))
            except Exception as err:
                raise LoadError(f"{path}: not a tiktoken BPE file ({err.__class__.__name__})") from None
            eot = spec.eos_token_id if spec.eos_token_id is not None else len(ranks)
            self.encoding = tiktoken.Encoding(
                name=path.stem,
                # The GPT-2 split pattern: the file holds only ranks, not how text is pre-split.
                pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
                mergeable_ranks=ranks,
                special_tokens={"<|endoftext|>": eot},
            )
        else:
            try:
                self.encoding = tiktoken.get_encoding(spec.tiktoken or "gpt2")
            except Exception as err:  # offline without a cached BPE file, or an unknown name
                raise LoadError(
                    f"tiktoken encoding {spec.tiktoken!r} is not available ({err.__class__.__name__}); "
                    "offline, give tokenizer.file instead"
                ) from None
            eot = spec.eos_token_id if spec.eos_token_id is not None else self.encoding.eot_token
        if self.encoding.n_vocab > vocab_size:
            raise LoadError(f"the tokenizer has {self.encoding.n_vocab} tokens but the model only {vocab_size}")
        self.eos_ids = {eot}

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.encoding.encode(text, allowed_special="all")

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode([i for i in ids if i not in self.eos_ids])

    def piece(self, token_id: int) -> str:
        """One token's text, special tokens included; <id> for an id the encoding lacks."""
        try:
            return self.encoding.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")
        except KeyError:
            return f"<{token_id}>"

    def chat(self, messages: Sequence[dict[str, str]]) -> str | None:
        return None  # a from-scratch GPT has no chat template; Alpaca or raw prompts apply
