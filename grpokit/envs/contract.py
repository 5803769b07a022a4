"""What an environment promises: ``reset(row) -> observation`` and ``step(action) -> StepResult``.

An environment is one episode's world. The multi-turn sampler makes a fresh one per
trajectory (G per prompt), calls ``reset`` with the dataset row, then, each time the policy
ends a turn, ``step`` with the text of that turn. What ``step`` returns goes back into the
context as the next message (role ``user`` unless the observation names another, ``tool``
for tool results), in the context but out of the loss, until ``done``.

    class Guess:                                   # registered, or given as "my_module:Guess"
        def reset(self, row):
            self.target = row["answer"]
            return None                            # nothing to add: the prompt says it all
        def step(self, action):
            right = action.strip() == self.target
            return StepResult("Correct." if right else "Try again.", reward=float(right), done=right)

``reset`` may return ``None`` (the prompt is enough), a string, or ``{"role", "content"}``,
added to the prompt before the first turn (appended to its last user message, where TRL appends
``reset``'s string). It must give the same opening for the G trajectories of one row: GRPO
compares G attempts at one start. ``info`` is free-form and reaches rewards with the trajectory
(``tool_calls`` in it is what the tool-misuse reward reads).

An observation shows images to a vision-language policy as content blocks, the chat format
processors read: ``{"role": "user", "content": [{"type": "image", "image": screenshot},
{"type": "text", "text": "Where next?"}]}``, the image a PIL image, a file path or encoded bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from grpokit.data.images import block_image, encoded, with_image_blocks
from grpokit.errors import EnvFailure


@dataclass
class StepResult:
    observation: Any = None  # str, {"role", "content"}, or None (nothing to add)
    reward: float = 0.0
    done: bool = False
    info: dict = field(default_factory=dict)


@runtime_checkable
class Environment(Protocol):
    def reset(self, row: dict) -> Any:
        """Start an episode for ``row``; what to add to the prompt (None, a string, or a message)."""
        ...

    def step(self, action: str) -> StepResult:
        """React to the policy's turn (its text, special tokens removed)."""
        ...


def as_step_result(value: Any, where: str) -> StepResult:
    """``step``'s return value as a StepResult: a StepResult, or gym's ``(observation, reward, done, info)``."""
    if isinstance(value, StepResult):
        return value
    if isinstance(value, tuple) and len(value) == 4:
        observation, reward, done, info = value
        return StepResult(observation, float(reward or 0.0), bool(done), dict(info or {}))
    raise EnvFailure(f"{where}: step() must return a StepResult or (observation, reward, done, info), got "
                            f"{type(value).__name__}")


def as_message(observation: Any, default_role: str, where: str) -> dict | None:
    """An observation as the chat message it becomes, or None when there is nothing to add."""
    if observation is None or observation == "":
        return None
    if isinstance(observation, str):
        return {"role": default_role, "content": observation}
    if isinstance(observation, dict) and isinstance(observation.get("content"), (str, list)):
        return {"role": observation.get("role", default_role), **observation}
    raise EnvFailure(f"{where}: an observation must be None, a string or a {{'role', 'content'}} message, "
                            f"got {type(observation).__name__}")


def image_blocks(content) -> list[dict]:
    """The image blocks of a message's content (none in a string)."""
    return [part for part in content if isinstance(part, dict) and part.get("type") == "image"] \
        if isinstance(content, list) else []


def _blocks(content) -> list[dict]:
    """Content as blocks, each image block reduced to ``{"type": "image"}`` (its pixels travel apart)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [{"type": "image"} if part.get("type") == "image" else dict(part) for part in content]


def opened_row(row: dict, opening: dict, where: str) -> dict:
    """``row`` with ``reset``'s observation (a message) in its prompt: joined to the last user message, or a
    message of its own after another role. Its images join the row's ``images`` (as PNG bytes)."""
    prompt = row["prompt"]
    images = [block_image(block, where) for block in image_blocks(opening["content"])]
    refs = list(row.get("images") or [])
    if images or refs:  # the prompt's own images placed explicitly, so the new blocks cannot shift them
        messages = with_image_blocks(prompt, len(refs), where)
    else:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    last, content = messages[-1], opening["content"]
    if last["role"] == opening["role"] == "user":
        joined = (last["content"] + "\n\n" + content if isinstance(last["content"], str) and isinstance(content, str)
                  else _blocks(last["content"]) + _blocks(content))
        messages[-1] = {**last, "content": joined}
    else:
        messages.append({**opening, "content": content if isinstance(content, str) else _blocks(content)})
    opened = {**row, "prompt": messages}
    if images:
        opened["images"] = refs + [encoded(image) for image in images]
    return opened
