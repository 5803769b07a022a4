"""Sampling completions and scoring their tokens: the Sampler protocol and grpokit's own backend."""

from grpokit.rollout.logprobs import completion_logprobs
from grpokit.rollout.prompts import encode_prompts
from grpokit.rollout.sampler import Rollouts, Sampler, TorchSampler, concat_rollouts

__all__ = ["Rollouts", "Sampler", "TorchSampler", "completion_logprobs", "concat_rollouts", "encode_prompts"]
