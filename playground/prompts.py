"""Prompt formats that are not a model's own chat template: Alpaca and raw text.

Chat templates belong to a tokenizer (transformers) or to a GGUF file (llama.cpp), so the
backends render those; everything else is rendered here, the same way for every backend.
"""

from __future__ import annotations

from collections.abc import Sequence

from playground.config import PromptFormat
from playground.errors import GenerationError

# The Alpaca instruction format, which the auto-g-nano SFT checkpoint was tuned on.
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)


def alpaca(messages: Sequence[dict[str, str]]) -> str:
    """Each user turn becomes an instruction, each assistant turn its response."""
    parts = [ALPACA_PREAMBLE]
    for message in messages:
        if message["role"] == "user":
            parts.append(f"### Instruction:\n{message['content']}\n\n### Response:\n")
        elif message["role"] == "assistant":
            parts.append(f"{message['content']}\n\n")
        # A system message has no place in the Alpaca format; its preamble plays that part.
    return "".join(parts)


def transcript(messages: Sequence[dict[str, str]]) -> str:
    """A base model continues plain text: the turns are joined as they were written."""
    return "\n".join(m["content"] for m in messages)


def render_without_template(
    prompt_format: PromptFormat, mode: str, messages: Sequence[dict[str, str]], text: str
) -> str:
    """Text for formats other than chat_template.

    Completion mode sends the text raw, except for Alpaca variants, whose own format wraps it
    as one instruction.
    """
    if mode == "completion":
        return alpaca([{"role": "user", "content": text}]) if prompt_format == "alpaca" else text
    if prompt_format == "alpaca":
        return alpaca(messages)
    return transcript(messages)


def check_prompt_text(text: str, what: str = "the prompt", allow_blank: bool = False) -> str:
    """Refuse text no model should get: blank (unless `allow_blank`), or holding a NUL or bytes
    that were not UTF-8 (they reach Python as lone surrogates), naming where. Returns the text
    unchanged."""
    if not text.strip() and not allow_blank:
        raise GenerationError(f"{what} is empty")
    for position, char in enumerate(text):
        if char == "\x00":
            raise GenerationError(f"{what} holds a NUL character at position {position}: remove it")
        if "\ud800" <= char <= "\udfff":
            raise GenerationError(
                f"{what} holds bytes that are not UTF-8 (at position {position}): give it as UTF-8 text"
            )
    return text
