"""Chat messages, for every stage that reads or renders them: one validator, one renderer.

A conversational field (a prompt, a completion, a whole sample, one side of a preference
pair) is a list of ``{"role": str, "content": ...}`` messages, as TRL's conversational
format writes it. ``content`` is a string, or (in vision-language rows) a list of content
blocks, ``{"type": "text", "text": ...}`` and ``{"type": "image"}``, checked by the same rule
as ``grpokit.data.images``. Checked when the data is read, so a bad row fails before training
with its file:line, not mid-run inside the chat template.
"""

from __future__ import annotations

from typing import Any

from grpokit.data.images import check_blocks
from grpokit.errors import DataError


def check_messages(value: Any, where: str, name: str) -> list[dict]:
    """``value`` as a non-empty list of chat messages, each with a string ``role`` and a ``content``
    that is a string or a list of content blocks; a DataError at ``where`` naming the field
    ``name`` otherwise. Whether image blocks match the row's images is the loader's check, since
    only it knows the images."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {name!r} must be a non-empty list of chat messages, got {value!r:.60}")
    for index, message in enumerate(value):
        content = message.get("content") if isinstance(message, dict) else None
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(content, (str, list))):
            raise DataError(f"{where}: {name}[{index}] is not a chat message; each needs a string 'role' and a "
                            f"string 'content' (e.g. {{\"role\": \"user\", \"content\": \"...\"}}) or a list of "
                            f"content blocks ({{\"type\": \"text\", \"text\": \"...\"}}, {{\"type\": \"image\"}}), "
                            f"got {message!r:.60}")
        if isinstance(content, list):
            check_blocks(content, where, f"{name}[{index}]['content']")
    return value


def as_chat(value: Any, role: str, where: str, name: str) -> list[dict]:
    """A string as one message of ``role``; a message list checked and copied."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list):
        raise DataError(f"{where}: {name!r} must be a string or a list of chat messages, got {value!r:.60}")
    return list(check_messages(value, where, name))


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """The system prompt as the first message, unless the conversation has its own."""
    if system_prompt and not any(m.get("role") == "system" for m in messages):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def prompt_messages(prompt: str | list[dict], system_prompt: str | None) -> list[dict]:
    """A dataset prompt (a string is the user's turn) as the messages the chat template renders."""
    return with_system([{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt),
                       system_prompt)


def render_chat(tokenizer, messages: list[dict], where: str, generation_prompt: bool = False,
                template: str | None = None, tools: list[dict] | None = None) -> str:
    """The chat template (``template``, else the tokenizer's own) applied to ``messages``; its failure
    (jinja raises its own errors, e.g. a template that requires alternating roles) as a DataError at
    ``where``. A vision-language processor's template is its own, beside its tokenizer's."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                             chat_template=template, tools=tools or None)
    except Exception as exc:
        raise DataError(f"{where}: the tokenizer's chat template failed on this conversation "
                        f"({type(exc).__name__}: {exc})") from None
