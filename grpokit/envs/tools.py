"""Tools as plain Python functions, and TRL's ``environment_factory`` classes, as environments.

A tool is a function with type hints and a Google-style docstring; its JSON schema comes from
``transformers.utils.get_json_schema`` (what ``apply_chat_template(tools=...)`` takes), so
functions written for TRL's ``tools=`` run unchanged:

    def add(a: int, b: int) -> int:
        \"\"\"Add two integers.

        Args:
            a: The first.
            b: The second.
        \"\"\"
        return a + b

The policy calls a tool by writing ``<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}
</tool_call>`` (the Hermes / Qwen2.5 format most chat templates and models use); every call
in a turn runs, and the results come back as ``tool`` messages. A turn with no tool call is
the final answer and ends the episode. A call of an unknown tool, with arguments that do not
fit, or that raises becomes an ``{"error": ...}`` result the policy sees, and is counted in
``info["tool_calls"]`` (what the tool-misuse reward reads); the episode goes on.

TRL's ``environment_factory``: a class whose ``reset(**row)`` starts an episode (returning
``None`` or text for the prompt) and whose public methods are the tools; an optional
``get_reward()`` scores the finished episode. ``FactoryEnvironment`` runs one unchanged.
"""

from __future__ import annotations

import inspect
import json
import re
from typing import Any, Callable

from grpokit.envs.contract import StepResult

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def tool_schema(function: Callable) -> dict:
    """The function's JSON schema as chat templates take it (transformers' own reader of signature and
    docstring); a function it cannot read is a RecipeError naming it."""
    from transformers.utils import get_json_schema

    from grpokit.errors import RecipeError

    try:
        return get_json_schema(function)
    except Exception as exc:  # transformers raises its own TypeHintParsingException / DocstringParsingException
        name = getattr(function, "__qualname__", repr(function))
        raise RecipeError(f"tool {name}: its JSON schema cannot be read from its signature and docstring ({exc}); "
                          "give every argument a type hint and an 'Args:' line in a Google-style docstring") from None


def parse_tool_calls(text: str) -> list[dict]:
    """Every ``<tool_call>{...}</tool_call>`` in a turn, in order, as ``{"name", "arguments"}``; a call whose
    JSON does not parse is kept as ``{"name": None, "error": ...}`` so it counts as a misuse."""
    calls = []
    for body in TOOL_CALL.findall(text):
        try:
            call = json.loads(body)
        except json.JSONDecodeError as exc:
            calls.append({"name": None, "arguments": None, "error": f"the tool call is not valid JSON ({exc.msg})"})
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            calls.append({"name": None, "arguments": None, "error": 'a tool call needs {"name": ..., "arguments": {...}}'})
            continue
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        calls.append({"name": call["name"], "arguments": arguments})
    return calls


def run_call(call: dict, tools: dict[str, Callable]) -> tuple[Any, str | None]:
    """``(result, error)`` of one parsed call: the tool's return value, or why it could not run."""
    if call.get("error"):
        return {"error": call["error"]}, call["error"]
    name, arguments = call["name"], call["arguments"]
    if name not in tools:
        error = f"unknown tool {name!r}; the tools are {sorted(tools)}"
        return {"error": error}, error
    if not isinstance(arguments, dict):
        error = f"the arguments of {name} must be a JSON object, got {type(arguments).__name__}"
        return {"error": error}, error
    try:
        inspect.signature(tools[name]).bind(**arguments)
    except TypeError as exc:
        error = f"bad arguments for {name}: {exc}"
        return {"error": error}, error
    try:
        return tools[name](**arguments), None
    except Exception as exc:  # the tool's own failure is an observation, not the run's
        error = f"{name} raised {type(exc).__name__}: {exc}"
        return {"error": error}, error


def tool_turn(text: str, tools: dict[str, Callable]) -> StepResult:
    """One policy turn against ``tools``: the results of its calls as tool messages, or, with no call,
    the end of the episode (the turn was the answer)."""
    calls = parse_tool_calls(text)
    if not calls:
        return StepResult(None, done=True, info={"tool_calls": []})
    messages, record = [], []
    for call in calls:
        result, error = run_call(call, tools)
        content = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)
        messages.append({"role": "tool", "name": call.get("name") or "unknown", "content": content})
        record.append({"name": call.get("name"), "arguments": call.get("arguments"), "error": error,
                       "known": call.get("name") in tools})
    observation = messages[0] if len(messages) == 1 else {"role": "tool", "content": "\n".join(
        m["content"] for m in messages), "name": ",".join(m["name"] for m in messages)}
    return StepResult(observation, info={"tool_calls": record})


class ToolEnvironment:
    """Plain tool functions as an environment: each turn's calls run, a turn without one ends it."""

    def __init__(self, tools: list[Callable]):
        self.tools = {function.__name__: function for function in tools}
        self.schemas = [tool_schema(function) for function in tools]

    def reset(self, row: dict) -> None:
        return None

    def step(self, action: str) -> StepResult:
        return tool_turn(action, self.tools)


def public_methods(instance) -> list[Callable]:
    """A TRL environment class's tools: its public methods other than ``reset`` and ``get_reward``
    (listed on the class, so a property is never evaluated)."""
    return [getattr(instance, name) for name, _ in inspect.getmembers(type(instance), predicate=inspect.isfunction)
            if not name.startswith("_") and name not in ("reset", "get_reward")]


class FactoryEnvironment:
    """A TRL ``environment_factory`` instance as an environment: ``reset(**row)``, methods as tools, and
    ``get_reward()`` (when it has one) as the reward of the turn that ends the episode."""

    def __init__(self, instance):
        self.instance = instance
        self.tools = {method.__name__: method for method in public_methods(instance)}
        self.schemas = [tool_schema(method) for method in self.tools.values()]

    def reset(self, row: dict) -> Any:
        accepted = inspect.signature(self.instance.reset).parameters
        takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
        return self.instance.reset(**{k: v for k, v in row.items() if takes_all or k in accepted})

    def step(self, action: str) -> StepResult:
        result = tool_turn(action, self.tools)
        if result.done and hasattr(self.instance, "get_reward"):
            result.reward = float(self.instance.get_reward())
        return result


def tools_system_prompt(schemas: list[dict]) -> str:
    """The tools described in a system message, for chat templates that ignore ``tools=`` (SmolLM2's):
    the Hermes wording most tool-trained models saw, with the call format ``parse_tool_calls`` reads."""
    listed = "\n".join(json.dumps(schema, ensure_ascii=False) for schema in schemas)
    return ("You can call functions to help you. The functions are:\n<tools>\n" + listed + "\n</tools>\n"
            "To call one, write <tool_call>{\"name\": <function name>, \"arguments\": <arguments object>}</tool_call>; "
            "its result comes back in the next message. When you have the answer, reply without a tool call.")
