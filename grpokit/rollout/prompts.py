"""Prompts to token ids: the chat template for conversational prompts, left truncation."""

from __future__ import annotations


def as_messages(prompt, system_prompt: str | None) -> list[dict]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt and not any(m.get("role") == "system" for m in messages):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def encode_prompts(
    tokenizer, prompts: list, chat_template: bool, system_prompt: str | None, max_length: int
) -> tuple[list[list[int]], int]:
    """Token ids per prompt, and how many prompts were cut to ``max_length`` (from the left,
    so the question at the end survives)."""
    encoded, truncated = [], 0
    for prompt in prompts:
        if chat_template and tokenizer.chat_template is not None:
            text = tokenizer.apply_chat_template(as_messages(prompt, system_prompt), tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
            ids = tokenizer(text)["input_ids"]
        if len(ids) > max_length:
            ids, truncated = ids[-max_length:], truncated + 1
        encoded.append(ids)
    return encoded, truncated
