"""Built-in environments: a calculator tool for arithmetic word problems, and the replay of recorded
episodes (a GUI agent's: the recorded observation each turn, a reward for the recorded action).

``rollout.environment: calculator`` gives the policy one tool, ``calculate(expression)``, which
evaluates arithmetic exactly (integers stay exact, however long) without running any code: the
expression is parsed with ``ast`` and only numbers, + - * / // % ** and parentheses are
evaluated, with a cap on exponents and on the size of results, so a policy cannot hang or
exhaust the trainer through its tool.
"""

from __future__ import annotations

import ast
import operator
import re

from grpokit.envs.contract import StepResult
from grpokit.envs.registry import register_environment
from grpokit.envs.tools import ToolEnvironment

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
MAX_EXPONENT = 64
MAX_DIGITS = 200
MAX_LENGTH = 500


def _evaluate(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"exponent {right} is too large (at most {MAX_EXPONENT})")
        value = _OPERATORS[type(node.op)](left, right)
        if isinstance(value, int) and len(str(abs(value))) > MAX_DIGITS:
            raise ValueError(f"the result has more than {MAX_DIGITS} digits")
        return value
    raise ValueError(f"only numbers, + - * / // % ** and parentheses are allowed, not {type(node).__name__}")


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression exactly.

    Args:
        expression: Numbers joined by + - * / // % ** and parentheses, e.g. "1234 + 5678 + 91".
    """
    if len(expression) > MAX_LENGTH:
        raise ValueError(f"the expression is longer than {MAX_LENGTH} characters")
    value = _evaluate(ast.parse(expression.replace(",", ""), mode="eval").body)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


@register_environment("calculator")
class Calculator(ToolEnvironment):
    """The ``calculate`` tool; a turn without a tool call is the answer and ends the episode."""

    def __init__(self):
        super().__init__([calculate])


@register_environment("replay")
class Replay:
    """A recorded episode replayed (the GUI-agent use): the data rows are episodes (``grpokit data``'s
    schema; ``data.prompt_field: instruction``). Each turn the policy proposes the step's action on the
    step's recorded observation; it earns 1 for the recorded action (the text compared with case and
    spacing ignored; ``match: type`` compares only the action's type, the text before any ``(`` or
    space), and the next recorded observation follows either way. ``info["success"]`` on the last step
    says whether every action matched. Replay only episodes that succeeded (``only_successful``) to
    teach what worked. ``images: true`` shows a vision-language policy each step's screenshot
    (``observation.image_path``) with the step's text; otherwise a screenshot-only step reads ``[image]``."""

    def __init__(self, match: str = "exact", only_successful: bool = True, images: bool = False):
        if match not in ("exact", "type"):
            raise ValueError(f"match must be 'exact' or 'type', not {match!r}")
        self.match, self.only_successful, self.images = match, only_successful, images

    def _observation(self, index: int):
        from grpokit.data.episodes import render_observation

        observation = self.steps[index].observation
        if not (self.images and observation.image_path):
            return render_observation(observation)
        return {"role": "user", "content": [{"type": "image", "image": observation.image_path},
                                            {"type": "text", "text": observation.text or f"Step {index}."}]}

    def reset(self, row: dict):
        from grpokit.data.episodes import Episode

        fields = {key: row[key] for key in Episode.model_fields if key in row}
        fields.setdefault("instruction", row.get("prompt") if isinstance(row.get("prompt"), str) else "")
        episode = Episode.model_validate(fields)
        if self.only_successful and not episode.success:
            raise ValueError(f"episode {episode.episode_id!r} did not succeed; replay successful episodes only "
                             "(or set environment_args.only_successful: false)")
        self.steps, self.index, self.matched = episode.steps, 0, []
        return self._observation(0) if self.steps else None

    def _normalise(self, text: str) -> str:
        text = " ".join(text.lower().split())
        return re.split(r"[ (]", text, maxsplit=1)[0] if self.match == "type" else text

    def step(self, action: str) -> StepResult:
        from grpokit.data.episodes import render_action

        if self.index >= len(self.steps):
            return StepResult(None, done=True, info={"success": all(self.matched)})
        expected = render_action(self.steps[self.index].action)
        matched = self._normalise(action) == self._normalise(expected)
        self.matched.append(matched)
        self.index += 1
        done = self.index == len(self.steps)
        info = {"expected": expected, "matched": matched, **({"success": all(self.matched)} if done else {})}
        observation = None if done else self._observation(self.index)
        return StepResult(observation, reward=float(matched), done=done, info=info)
