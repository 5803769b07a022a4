"""Agent episodes: the schema, a validating loader, and converters to GRPO prompts and SFT samples.

An episode is one attempt at one instruction: a list of steps, each an observation the
agent saw and the action it took. Files are JSON lines, one episode per line::

    {"episode_id": "e1", "instruction": "Open the settings", "success": true, "final_reward": 1.0,
     "steps": [{"index": 0, "observation": {"text": "home screen"},
                "action": {"type": "click", "args": {"target": "menu"}}}]}

Converters turn episodes into TRL-format rows: one GRPO prompt per step (the recorded
action is the ``answer`` rewards see), or one conversational SFT sample per step. Both
build the user message the same way (``step_messages``) and render actions with one
function (``render_action``), so a prompt, an SFT sample and a preference pair made from
the same step agree to the character.

A screenshot (``observation.image_path``, relative to the episodes file's folder) becomes the
row's ``images`` entry (``step_images``), written as an absolute path, so the converted file
can live anywhere and its images still resolve when it is read back. The user message keeps
string content, with no image placeholder: TRL places the image before that text
(``images.with_image_blocks``), and so does grpokit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from grpokit.data.images import check_images, image_refs
from grpokit.errors import DataError
from grpokit.io import atomic_write
from grpokit.log import json_ready

# strict: JSON "true"/"1" is not a bool and "3" is not an int; a typo'd key is an error
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class Observation(BaseModel):
    """What the agent saw before acting: text, a screenshot path, or both (neither: the step is skipped)."""

    model_config = STRICT
    text: str | None = None
    image_path: str | None = Field(None, min_length=1)  # relative: to the episodes file's folder
    extra: dict[str, Any] = Field(default_factory=dict)


class Action(BaseModel):
    """What the agent did. Without ``text``, converters use ``type(args)`` with args as JSON."""

    model_config = STRICT
    type: str = Field(min_length=1)
    args: dict[str, Any] = Field(default_factory=dict)
    text: str | None = None


class Step(BaseModel):
    model_config = STRICT
    index: int
    observation: Observation
    action: Action
    reasoning: str | None = None
    reward: float | None = None


class Episode(BaseModel):
    model_config = STRICT
    episode_id: str = Field(min_length=1)
    instruction: str
    steps: list[Step]
    success: bool
    final_reward: float | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    _where: str = PrivateAttr(default="<memory>")
    _base_dir: Path = PrivateAttr(default=Path("."))

    @property
    def where(self) -> str:
        """``file:line`` the episode was read from, for error messages."""
        return self._where

    @property
    def base_dir(self) -> Path:
        """The folder relative image paths are read from: the episodes file's (an episode built in
        memory: the working directory)."""
        return self._base_dir


def validation_message(exc: ValidationError) -> str:
    """The first error as ``field.path: what was wrong (got X)``, plus how many more there are."""
    errors = exc.errors()
    first = errors[0]
    path = ".".join(str(part) for part in first["loc"]) or "(episode)"
    text = f"{path}: {first['msg']}"
    if first["type"] != "missing":  # for a missing field the "input" is the whole parent object
        got = repr(first.get("input"))
        text += f" (got {got[:57] + '...' if len(got) > 60 else got})"
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more)"
    return text


def read_json_objects(path: str | Path) -> list[tuple[int, dict]]:
    """``(line, object)`` pairs of a JSONL file, every failure a DataError naming file:line."""
    from grpokit.data.loaders import read_json_lines

    return read_json_lines(path, what="file")


def load_episodes(path: str | Path) -> list[Episode]:
    """Read and validate an episodes file. Every error is one line: ``file:line: field.path: what``."""
    episodes: list[Episode] = []
    seen: dict[str, int] = {}
    for lineno, obj in read_json_objects(path):
        where = f"{path}:{lineno}"
        try:
            episode = Episode.model_validate(obj)
        except ValidationError as exc:
            raise DataError(f"{where}: {validation_message(exc)}") from None
        for position, step in enumerate(episode.steps):
            if step.index != position:
                raise DataError(f"{where}: steps.{position}.index: is {step.index}, expected {position} "
                                f"(steps must be listed in index order 0..n-1)")
        if episode.episode_id in seen:
            raise DataError(f"{where}: episode_id {episode.episode_id!r} is already used on line "
                            f"{seen[episode.episode_id]}; ids must be unique")
        seen[episode.episode_id] = lineno
        episode._where = where
        episode._base_dir = Path(path).parent
        episodes.append(episode)
    if not episodes:
        raise DataError(f"{path}: no episodes (the file is empty)")
    return episodes


def render_action(action: Action) -> str:
    """The action as text: ``action.text`` when recorded, else ``type(args)`` with args as sorted-key JSON."""
    if action.text is not None:
        return action.text
    return f"{action.type}({json.dumps(action.args, sort_keys=True, ensure_ascii=False)})"


def render_observation(observation: Observation) -> str:
    """The observation's text; ``[image]`` when it has only an image; ``(no observation)`` when neither."""
    if observation.text is not None:
        return observation.text
    return "[image]" if observation.image_path is not None else "(no observation)"


def step_images(episode: Episode, step: Step) -> list[str]:
    """``[absolute path]`` of the step's screenshot, or ``[]``: the ``images`` a row made from this step
    carries (its user message shows only this step's image; earlier ones appear as ``[image]``)."""
    if step.observation.image_path is None:
        return []
    return image_refs({"image": step.observation.image_path}, f"{episode.where}: steps.{step.index}",
                      episode.base_dir)


def absolute_step_images(steps: Any, base_dir: Path, where: str) -> Any:
    """An episode row's ``steps`` (training rows for the replay environment) with each screenshot path made
    absolute against the episodes file's folder and checked, as a row's own images are; a copy."""
    if not isinstance(steps, list):
        return steps
    out = []
    for index, step in enumerate(steps):
        observation = step.get("observation") if isinstance(step, dict) else None
        path = observation.get("image_path") if isinstance(observation, dict) else None
        if isinstance(path, str) and path:
            (path,) = image_refs({"image": path}, f"{where}: steps.{index}", base_dir)
            check_images([path], f"{where}: steps.{index}")
            step = {**step, "observation": {**observation, "image_path": path}}
        out.append(step)
    return out


def images_column(rows: list[dict]) -> list[dict]:
    """Keep the ``images`` column only when some row has an image: a text-only file stays TRL's text
    format, and in a mixed one every row has the column (``[]`` for none) as ``datasets`` needs."""
    if not any(row["images"] for row in rows):
        for row in rows:
            del row["images"]
    return rows


def has_observation(step: Step) -> bool:
    return step.observation.text is not None or step.observation.image_path is not None


def step_messages(episode: Episode, index: int, history: int = 0, system: str | None = None) -> list[dict]:
    """Chat messages asking for step ``index``'s action: [system?, user].

    The user message is the instruction, then the ``history`` steps before this one (their
    observation and action), then this step's observation.
    """
    if history < 0:
        raise DataError(f"history must be >= 0, not {history}")
    parts = [episode.instruction]
    for past in episode.steps[max(0, index - history):index]:
        parts.append(f"Step {past.index} observation:\n{render_observation(past.observation)}\n"
                     f"Step {past.index} action:\n{render_action(past.action)}")
    current = episode.steps[index]
    parts.append(f"Current observation (step {index}):\n{render_observation(current.observation)}")
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": "\n\n".join(parts)}]


class Converted(NamedTuple):
    """Rows a converter produced, and how many inputs it skipped (or pairs it dropped) for each reason."""

    rows: list[dict]
    skipped: dict[str, int]


def usable_steps(episode: Episode, skipped: dict[str, int]) -> Iterable[Step]:
    """The steps a converter can use, counting what it skips (no steps at all, no observation)."""
    if not episode.steps:
        skipped["episodes_without_steps"] += 1
    for step in episode.steps:
        if has_observation(step):
            yield step
        else:
            skipped["steps_without_observation"] += 1


def episodes_to_prompts(episodes: Iterable[Episode], history: int = 2, system: str | None = None) -> Converted:
    """One GRPO row per step: ``prompt`` (messages), ``answer`` (the recorded action's text),
    ``episode_id``, ``step``, ``success``, ``reward`` (the step's reward, or None).

    Steps with neither observation text nor an image are skipped, and so are episodes
    without steps. If any row has an image, every row gets an ``images`` column (TRL's
    name): ``step_images`` of the current observation (absolute), or ``[]``.
    """
    rows: list[dict] = []
    skipped = {"episodes_without_steps": 0, "steps_without_observation": 0}
    for episode in episodes:
        for step in usable_steps(episode, skipped):
            rows.append({"prompt": step_messages(episode, step.index, history, system),
                         "answer": render_action(step.action), "episode_id": episode.episode_id,
                         "step": step.index, "success": episode.success, "reward": step.reward,
                         "images": step_images(episode, step)})
    return Converted(images_column(rows), skipped)


def episodes_to_sft(episodes: Iterable[Episode], only_successful: bool = True, history: int = 2,
                    system: str | None = None) -> Converted:
    """One conversational SFT sample per step: ``{"messages": [system?, user, assistant]}``.

    The user message is the one ``episodes_to_prompts`` builds; the assistant says the
    recorded action's text; ``images`` as ``episodes_to_prompts`` gives it (TRL's SFT format for
    vision models). Skip reasons are exclusive, checked in order: an unsuccessful episode (when
    ``only_successful``), an episode without steps, a step without observation.
    """
    rows: list[dict] = []
    skipped = {"unsuccessful_episodes": 0, "episodes_without_steps": 0, "steps_without_observation": 0}
    for episode in episodes:
        if only_successful and not episode.success:
            skipped["unsuccessful_episodes"] += 1
            continue
        for step in usable_steps(episode, skipped):
            reply = {"role": "assistant", "content": render_action(step.action)}
            rows.append({"messages": step_messages(episode, step.index, history, system) + [reply],
                         "images": step_images(episode, step)})
    return Converted(images_column(rows), skipped)


# --- writing -------------------------------------------------------------------------------------

def check_outputs(outputs: Iterable[str | Path], inputs: Iterable[str | Path] = (), overwrite: bool = True) -> None:
    """Refuse an output that is an input, appears twice, or (unless ``overwrite``) already exists."""
    sources = {Path(p).resolve(): Path(p) for p in inputs}
    seen: dict[Path, Path] = {}
    for out in map(Path, outputs):
        key = out.resolve()
        if key in sources:
            raise DataError(f"{out}: output is the input file {sources[key]}; choose another output path")
        if key in seen:
            raise DataError(f"{out}: the same path is given for two outputs; choose different paths")
        if not overwrite and out.exists():
            raise DataError(f"{out}: already exists; pass --overwrite to replace it")
        if not out.parent.is_dir():
            raise DataError(f"{out}: directory {out.parent} does not exist")
        seen[key] = out


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Write rows as JSON lines atomically (``_line`` bookkeeping dropped); return how many. Values JSON
    cannot hold go through ``log.json_ready`` (image bytes as ``"<image: N bytes>"``, NaN as null)."""
    lines = [json.dumps(json_ready({k: v for k, v in row.items() if k != "_line"}), ensure_ascii=False) + "\n"
             for row in rows]
    atomic_write(path, lambda handle: handle.write("".join(lines).encode("utf-8")))
    return len(lines)
