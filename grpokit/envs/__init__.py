"""Environments the policy acts in during multi-turn rollouts: the contract, tools, and built-ins."""

from grpokit.envs import builtin as _builtin  # noqa: F401  (registers the built-in environments)
from grpokit.envs.contract import Environment, StepResult
from grpokit.envs.registry import ENVIRONMENTS, EnvironmentSpec, build_environment, register_environment
from grpokit.envs.tools import FactoryEnvironment, ToolEnvironment, parse_tool_calls, tool_schema

__all__ = ["ENVIRONMENTS", "Environment", "EnvironmentSpec", "FactoryEnvironment", "StepResult", "ToolEnvironment",
           "build_environment", "parse_tool_calls", "register_environment", "tool_schema"]
