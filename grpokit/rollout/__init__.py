"""Sampling completions and scoring their tokens: the Sampler contract, its factory and backends."""

from __future__ import annotations

from grpokit.errors import RecipeError
from grpokit.rollout.contract import Rollouts, Sampler, concat_rollouts
from grpokit.rollout.encoding import PromptBatch, PromptEncoder
from grpokit.rollout.logprobs import completion_logprobs
from grpokit.rollout.multiturn import MultiTurnSampler
from grpokit.rollout.sampler import TorchSampler

# rollout.backend -> the class that implements the Sampler contract
BACKENDS: dict[str, type] = {"torch": TorchSampler}


def build_sampler(policy, backend: str = "torch", *, max_new_tokens: int, temperature: float = 1.0,
                  top_p: float = 1.0, top_k: int = 0, seed: int = 0, environment=None, **turns) -> Sampler:
    """The one place a sampler is constructed: training, evaluation and ``grpokit generate`` all come here.
    With an ``environment`` (``envs.build_environment``) the rollouts are multi-turn episodes in it;
    ``turns`` are the multi-turn limits (``turn_options``)."""
    if backend not in BACKENDS:
        raise RecipeError(f"rollout.backend {backend!r}: choose one of {sorted(BACKENDS)}")
    common = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed}
    if environment is not None:
        return MultiTurnSampler(policy, max_new_tokens, **common, environment=environment, **turns)
    return BACKENDS[backend](policy, max_new_tokens, **common)


def turn_options(rollout) -> dict:
    """The recipe's multi-turn limits as ``MultiTurnSampler`` takes them."""
    return {"max_turns": rollout.max_turns, "max_tool_output_tokens": rollout.max_tool_output_tokens,
            "timeout_s": rollout.environment_timeout_s, "max_failures": rollout.max_consecutive_env_failures}


__all__ = ["BACKENDS", "MultiTurnSampler", "PromptBatch", "PromptEncoder", "Rollouts", "Sampler", "build_sampler",
           "completion_logprobs", "concat_rollouts", "turn_options"]
