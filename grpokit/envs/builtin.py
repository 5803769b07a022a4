"""Built-in environments: a calculator tool for arithmetic word problems.

``rollout.environment: calculator`` gives the policy one tool, ``calculate(expression)``, which
evaluates arithmetic exactly (integers stay exact, however long) without running any code: the
expression is parsed with ``ast`` and only numbers, + - * / // % ** and parentheses are
evaluated, with a cap on exponents and on the size of results, so a policy cannot hang or
exhaust the trainer through its tool.
"""

from __future__ import annotations

import ast
import operator

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
