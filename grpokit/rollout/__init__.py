"""Sampling completions and scoring their tokens: the Sampler contract, its factory and backends."""

from __future__ import annotations

from grpokit.errors import RecipeError
from grpokit.rollout.contract import Rollouts, Sampler, concat_rollouts
from grpokit.rollout.encoding import PromptBatch, PromptEncoder
from grpokit.rollout.logprobs import completion_logprobs
from grpokit.rollout.sampler import TorchSampler

# rollout.backend -> the class that implements the Sampler contract
BACKENDS: dict[str, type] = {"torch": TorchSampler}


def build_sampler(policy, backend: str = "torch", *, max_new_tokens: int, temperature: float = 1.0,
                  top_p: float = 1.0, top_k: int = 0, seed: int = 0) -> Sampler:
    """The one place a sampler is constructed: training, evaluation and ``grpokit generate`` all come here."""
    if backend not in BACKENDS:
        raise RecipeError(f"rollout.backend {backend!r}: choose one of {sorted(BACKENDS)}")
    return BACKENDS[backend](policy, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)


__all__ = ["BACKENDS", "PromptBatch", "PromptEncoder", "Rollouts", "Sampler", "build_sampler", "completion_logprobs",
           "concat_rollouts"]
