"""Dataset rows to a ``PromptBatch``: the one encoder every stage that prompts a model uses.

A conversational prompt goes through the chat template (with the recipe's system prompt
unless the conversation has one); a plain string is tokenized as it is when the recipe
turns the template off. Prompts over the length limit lose tokens from the left, so the
question at the end survives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from grpokit.data.chat import prompt_messages, render_chat
from grpokit.models.padding import left_pad


@dataclass
class PromptBatch:
    """What a sampler takes: B prompts, left-padded, and what the model needs besides the ids."""

    input_ids_BP: torch.Tensor  # [B, P] left-padded
    attention_mask_BP: torch.Tensor  # [B, P] 1 on real prompt tokens
    rows: list[dict] = field(default_factory=list)  # the dataset row of each prompt (metadata, reward columns)
    # whatever a multimodal processor returns beside the ids (pixel values, image grid sizes), as it returns it
    multimodal: dict[str, Any] = field(default_factory=dict)
    truncated: int = 0  # prompts cut to the length limit

    def __len__(self) -> int:
        return self.input_ids_BP.size(0)


@dataclass
class PromptEncoder:
    """How the recipe turns a row's prompt into token ids, bound to the policy's processor."""

    processor: Any  # a tokenizer, or a multimodal processor holding one
    chat_template: bool = True
    system_prompt: str | None = None
    max_length: int = 512

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    def token_ids(self, prompt: str | list[dict], where: str = "<prompt>") -> list[int]:
        """One prompt's token ids, uncut."""
        tokenizer = self.tokenizer
        if self.chat_template and tokenizer.chat_template is not None:
            text = render_chat(tokenizer, prompt_messages(prompt, self.system_prompt), where, generation_prompt=True)
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
        return tokenizer(text)["input_ids"]

    def __call__(self, rows: list[dict]) -> PromptBatch:
        """The rows' prompts as one left-padded batch, each cut to ``max_length`` from the left."""
        encoded, truncated = [], 0
        for row in rows:
            ids = self.token_ids(row["prompt"])
            if len(ids) > self.max_length:
                ids, truncated = ids[-self.max_length:], truncated + 1
            encoded.append(ids)
        ids_BP, mask_BP = left_pad(encoded, self.tokenizer.pad_token_id)
        return PromptBatch(ids_BP, mask_BP, rows=list(rows), truncated=truncated)
