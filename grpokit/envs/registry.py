"""``rollout.environment`` and ``rollout.tools`` to an ``EnvironmentSpec``: what to build per trajectory.

``rollout.environment`` is a registered name (``calculator``, ``replay``, ...) or ``module:Class``;
the class is either grpokit's kind (``reset(row)`` / ``step(action)``) or TRL's
``environment_factory`` kind (``reset(**row)`` and tool methods), told apart by whether it has a
``step`` method. ``rollout.tools`` lists plain functions (``module:function``), run as a
``ToolEnvironment``; with an environment as well, its tools are added to the environment's.
``rollout.environment_args`` go to the class's constructor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from grpokit.envs.tools import FactoryEnvironment, ToolEnvironment, tool_schema, tool_turn
from grpokit.errors import RecipeError
from grpokit.imports import import_function, resolve_name

ENVIRONMENTS: dict[str, type] = {}


def register_environment(name: str):
    """Decorator: make a class available as ``rollout.environment: <name>``."""
    def add(cls: type) -> type:
        ENVIRONMENTS[name] = cls
        return cls
    return add


@dataclass
class EnvironmentSpec:
    """How to make one episode's environment, and the tool schemas its prompts show."""

    make: Callable[[], Any]
    schemas: list[dict] = field(default_factory=list)
    name: str = ""


class _WithTools:
    """An environment plus extra tool functions: a turn with tool calls runs them; else the environment steps."""

    def __init__(self, environment, tools: dict[str, Callable]):
        self.environment, self.tools = environment, tools

    def reset(self, row: dict):
        return self.environment.reset(row)

    def step(self, action: str):
        result = tool_turn(action, self.tools)
        return self.environment.step(action) if result.done else result


def build_environment(section) -> EnvironmentSpec | None:
    """The environment a recipe section names (``rollout``, or an SFT recipe's ``data``) with its
    ``environment``, ``tools`` and ``environment_args``; None without the first two. A probe instance
    is made now, so a bad class or tool fails before the model loads."""
    spec, tool_specs = section.environment, list(section.tools)
    if spec is None and not tool_specs:
        return None
    functions = [import_function(t, "rollout.tools", RecipeError) for t in tool_specs]
    tool_schemas = [tool_schema(f) for f in functions]
    if spec is None:
        return EnvironmentSpec(lambda: ToolEnvironment(functions), tool_schemas, "tools")
    cls = resolve_name(spec, ENVIRONMENTS, "rollout.environment", RecipeError,
                       f"rollout.environment {spec!r}: not a registered environment ({sorted(ENVIRONMENTS)}) "
                       "and not module:Class")
    args = dict(getattr(section, "environment_args", {}))

    def make():
        instance = cls(**args)
        wrapped = instance if hasattr(instance, "step") else FactoryEnvironment(instance)
        return _WithTools(wrapped, {f.__name__: f for f in functions}) if functions else wrapped

    try:
        probe = make()
    except Exception as exc:
        raise RecipeError(f"rollout.environment {spec!r}: constructing it with rollout.environment_args {args} "
                          f"failed ({type(exc).__name__}: {exc})") from None
    own = list(getattr(getattr(probe, "environment", probe), "schemas", []))
    return EnvironmentSpec(make, own + tool_schemas, spec)
