"""The tokenizer of a model that a server runs, held locally: a remote variant's `tokenizer.path`.

With it a remote variant counts prompt tokens exactly, renders its chat template here (so a chat
request can be scored through a completions endpoint, which takes text only), and can split
text into the windows a perplexity eval reads. A GGUF file is read by llama.cpp with its
vocabulary only (no weights); a folder by transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from playground.backends.base import Request
from playground.config import PromptFormat
from playground.errors import GenerationError, LoadError
from playground.prompts import render_without_template


class ServedTokenizer:
    """Renders and tokenizes prompts as the served model's own tokenizer does."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.exists():
            raise LoadError(f"tokenizer.path {path} does not exist")
        self._llama: Any = None
        self._hf: Any = None
        self._chat: Any = None
        if path.is_file():
            self._open_gguf(path)
        else:
            self._open_folder(path)

    def _open_gguf(self, path: Path) -> None:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        try:
            self._llama = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        except (ValueError, RuntimeError, OSError) as err:
            raise LoadError(f"llama.cpp cannot read the tokenizer in {path.name}: {err}") from None
        template = self._llama.metadata.get("tokenizer.chat_template")
        if template:

            def text(token: int) -> str:
                return self._llama.detokenize([token], special=True).decode("utf-8", errors="replace") if token >= 0 else ""

            self._chat = Jinja2ChatFormatter(
                template=template, eos_token=text(self._llama.token_eos()), bos_token=text(self._llama.token_bos())
            )

    def _open_folder(self, path: Path) -> None:
        from transformers import AutoTokenizer

        try:
            self._hf = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise LoadError(f"transformers cannot read a tokenizer in {path}: {err}") from None

    @property
    def has_chat_template(self) -> bool:
        return self._chat is not None or bool(self._hf is not None and self._hf.chat_template)

    def prompt_text(self, request: Request, prompt_format: PromptFormat, suffix: str = "") -> tuple[str, bool]:
        """The text the server is sent for `request`, and whether a chat template made it (the
        template writes any beginning-of-sequence token itself)."""
        if request.mode == "chat" and prompt_format == "chat_template":
            if not self.has_chat_template:
                raise GenerationError(f"the tokenizer in {self.path.name} has no chat template: use completion mode")
            messages = list(request.messages)
            if self._chat is not None:
                text = self._chat(messages=messages).prompt
            else:
                text = self._hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return text + request.assistant_prefix + suffix, True
        text = render_without_template(prompt_format, request.mode, request.messages, request.text)
        return text + request.assistant_prefix + suffix, False

    def encode(self, text: str, templated: bool = False) -> list[int]:
        """Token ids as the model is fed them: with its beginning-of-sequence token where it
        wants one, unless a chat template wrote it; special-token text read as such only in
        templated text."""
        if self._llama is not None:
            return self._llama.tokenize(text.encode("utf-8"), add_bos=not templated, special=templated)
        return self._hf.encode(text, add_special_tokens=not templated)

    def decode(self, ids: list[int]) -> str:
        if self._llama is not None:
            return self._llama.detokenize(ids).decode("utf-8", errors="replace")
        return self._hf.decode(ids)

    @property
    def bos_id(self) -> int | None:
        if self._llama is not None:
            return self._llama.token_bos() if self._llama._model.add_bos_token() else None
        return self._hf.bos_token_id if getattr(self._hf, "add_bos_token", False) else None

    @property
    def bos_text(self) -> str:
        """The beginning-of-sequence token's text where the model is given one, else ''."""
        bos = self.bos_id
        if bos is None:
            return ""
        if self._llama is not None:
            return self._llama.detokenize([bos], special=True).decode("utf-8", errors="replace")
        return self._hf.bos_token or ""

    def close(self) -> None:
        if self._llama is not None:
            self._llama.close()
            self._llama = None
