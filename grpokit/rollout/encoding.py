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
from grpokit.data.images import PLACEHOLDER, message_text, open_images, with_image_blocks
from grpokit.envs.tools import tools_system_prompt
from grpokit.errors import DataError
from grpokit.models.multimodal import chat_template_of, process_text, reads_images, tokenizer_of
from grpokit.models.padding import left_pad


@dataclass
class PromptBatch:
    """What a sampler takes: B prompts, left-padded, and what the model needs besides the ids."""

    input_ids_BP: torch.Tensor  # [B, P] left-padded
    attention_mask_BP: torch.Tensor  # [B, P] 1 on real prompt tokens
    rows: list[dict] = field(default_factory=list)  # the dataset row of each prompt (metadata, reward columns)
    # a vision-language model's image inputs, one dict per prompt as its processor returned them (pixel
    # values, image grid sizes, token types; unpadded); None for a text model
    multimodal: list[dict] | None = None
    truncated: int = 0  # prompts cut to the length limit
    # what encoded these prompts: a multi-turn environment whose reset adds to a prompt re-encodes its row
    encoder: "PromptEncoder | None" = None
    # one seed per prompt: its samples come from their own streams (rollout.seed_per_prompt); None: the
    # sampler's generator serves the batch
    seeds: list[int] | None = None

    def __len__(self) -> int:
        return self.input_ids_BP.size(0)


@dataclass
class PromptEncoder:
    """How the recipe turns a row's prompt into token ids, bound to the policy's processor.

    A multimodal processor (one with an image processor) encodes every row on its own, its
    images decoded then and there: a batch holds decoded pixels only while it is encoded, and
    each prompt's image inputs stay separate, so a group, a replayed group or a micro-batch
    can pick its own (``models.multimodal.collate`` stacks them)."""

    processor: Any  # a tokenizer, or a multimodal processor holding one
    chat_template: bool = True
    system_prompt: str | None = None
    max_length: int = 512
    tools: list[dict] | None = None  # tool schemas the prompt shows (a multi-turn environment's)

    @property
    def tokenizer(self):
        return tokenizer_of(self.processor)

    @property
    def multimodal(self) -> bool:
        return reads_images(self.processor)

    @property
    def templated(self) -> bool:
        """Whether prompts go through a chat template (the recipe asks and the model has one)."""
        return self.chat_template and chat_template_of(self.processor) is not None

    def _text(self, messages: list[dict] | str, where: str) -> str:
        """The prompt as the model reads it: through the chat template (the processor's, for a VLM), or
        the messages' text joined when the recipe turns the template off."""
        if self.templated:
            return render_with_tools(self.tokenizer, prompt_messages(messages, self.system_prompt), where,
                                     chat_template_of(self.processor), self.tools, generation_prompt=True)
        if isinstance(messages, str):
            return messages
        image = getattr(self.processor, "image_token", PLACEHOLDER)
        return "\n".join(part.get("text", "") if part.get("type") == "text" else image
                         for m in messages for part in _blocks(m["content"]))

    def encode(self, row: dict, where: str = "<prompt>") -> tuple[list[int], dict]:
        """One row's prompt token ids (uncut) and its image inputs (empty for a text model)."""
        if not self.multimodal:
            if row.get("images"):
                raise DataError(f"{where}: the row has {len(row['images'])} image(s), but the model reads text "
                                "only; use a vision-language model (model.name) or drop the images")
            # a rendered template holds its own special tokens; plain text gets the tokenizer's
            return self.tokenizer(self._text(row["prompt"], where), add_special_tokens=not self.templated)["input_ids"], {}
        refs = row.get("images") or []
        text = self._text(with_image_blocks(row["prompt"], len(refs), where), where)
        return process_text(self.processor, text, open_images(refs))

    def token_ids(self, row: dict, where: str = "<prompt>") -> list[int]:
        """One row's prompt token ids, uncut."""
        return self.encode(row, where)[0]

    def __call__(self, rows: list[dict]) -> PromptBatch:
        """The rows' prompts as one left-padded batch, each cut to ``max_length`` from the left; a prompt
        with images is never cut (its image tokens must stay whole), so it is refused instead."""
        encoded, images, truncated = [], [], 0
        for row in rows:
            ids, inputs = self.encode(row)
            if len(ids) > self.max_length:
                if any(key.startswith("pixel") for key in inputs):
                    raise DataError(f"a prompt with images has {len(ids)} tokens, over rollout.max_prompt_length = "
                                    f"{self.max_length}; raise the limit or lower model.max_pixels "
                                    f"(prompt: {message_text(_last_content(row['prompt']))[:60]!r})")
                ids, truncated = ids[-self.max_length:], truncated + 1
                inputs = {key: (value[:, -self.max_length:] if key.endswith("token_type_ids") else value)
                          for key, value in inputs.items()}
            encoded.append(ids)
            images.append(inputs)
        ids_BP, mask_BP = left_pad(encoded, self.tokenizer.pad_token_id)
        return PromptBatch(ids_BP, mask_BP, rows=list(rows), multimodal=images if self.multimodal else None,
                           truncated=truncated, encoder=self)


def render_with_tools(tokenizer, messages: list[dict], where: str, template: str | None, tools: list[dict] | None,
                      generation_prompt: bool = False) -> str:
    """The conversation through the chat template with ``tools`` shown: as the template renders
    ``tools=``, or, for a template that ignores them (SmolLM2's), described in the system message."""
    text = render_chat(tokenizer, messages, where, generation_prompt=generation_prompt, template=template, tools=tools)
    if tools and text == render_chat(tokenizer, messages, where, generation_prompt=generation_prompt,
                                     template=template):
        text = render_chat(tokenizer, with_tools_described(messages, tools), where,
                           generation_prompt=generation_prompt, template=template)
    return text


def with_tools_described(messages: list[dict], schemas: list[dict]) -> list[dict]:
    """The conversation with the tools described at the end of its system message (a new one if it has
    none), for a chat template that does not render ``tools=`` itself."""
    described = tools_system_prompt(schemas)
    if messages and messages[0].get("role") == "system" and isinstance(messages[0].get("content"), str):
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + described}, *messages[1:]]
    return [{"role": "system", "content": described}, *messages]


def _blocks(content) -> list[dict]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])


def _last_content(prompt):
    return prompt if isinstance(prompt, str) else prompt[-1].get("content")
