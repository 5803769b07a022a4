"""Rewards over whole multi-turn episodes: they read the ``trajectory`` column the multi-turn sampler
gives every completion (``rewards.episode_columns``), and return None for one-turn rollouts.

- ``environment_reward``: the environment's own reward, summed over the episode's steps (a TRL
  environment's ``get_reward()`` arrives as the last step's reward).
- ``episode_success``: 1 when the episode's last step says ``info["success"]`` (the replay
  environment's verdict), 0 when it says it failed.
- ``tool_misuse``: ``penalty`` (negative) per tool call that could not run: an unknown tool, arguments
  that do not fit its signature, JSON that does not parse, or a tool that raised.
- ``action_coherence``: the sum of ``pairs`` bonuses over consecutive action types
  (``{"SEGMENT->GET_PROPERTIES": 0.2}``) plus ``repeat_penalty`` for every immediate repeat. An
  action's type is its first tool call's name, else the first match of ``action_pattern`` in the
  turn (an upper-case word such as ``CLICK`` of ``CLICK([1])``).
- ``curiosity``: an intrinsic reward, ``eta`` times the prediction error of a forward-dynamics
  model trained online on the episodes' (state, action) -> next state transitions (``Curiosity``).
"""

from __future__ import annotations

import hashlib
import re

import torch

from grpokit.envs.trajectory import DEFAULT_ACTION, action_types
from grpokit.rewards.registry import register


@register("environment_reward")
def environment_reward(prompts, completions, episode_reward=None, **_) -> list[float | None]:
    """The environment's reward of each episode; None for a one-turn rollout."""
    if episode_reward is None:
        return [None] * len(completions)
    return [None if value is None else float(value) for value in episode_reward]


@register("episode_success")
def episode_success(prompts, completions, trajectory=None, **_) -> list[float | None]:
    """1.0 when the episode's last step reports ``info["success"]`` true (the replay environment does;
    a user's environment may), 0.0 when false; None when it says nothing, and for one-turn rollouts."""
    if trajectory is None:
        return [None] * len(completions)
    scores = []
    for episode in trajectory:
        info = (episode["steps"][-1].get("info") or {}) if episode and episode["steps"] else {}
        scores.append(float(bool(info["success"])) if "success" in info else None)
    return scores


@register("tool_misuse")
def tool_misuse(prompts, completions, trajectory=None, penalty: float = -0.5, **_) -> list[float | None]:
    """``penalty`` times the number of tool calls in the episode that failed."""
    if trajectory is None:
        return [None] * len(completions)
    return [None if episode is None else penalty * sum(
        1 for step in episode["steps"] for call in (step.get("info") or {}).get("tool_calls", []) if call.get("error"))
        for episode in trajectory]


@register("action_coherence")
def action_coherence(prompts, completions, trajectory=None, pairs: dict | None = None, repeat_penalty: float = -0.5,
                     action_pattern: str = DEFAULT_ACTION, **_) -> list[float | None]:
    """Bonuses for good progressions between consecutive actions, a penalty for each immediate repeat."""
    if trajectory is None:
        return [None] * len(completions)
    bonuses = {tuple(part.strip() for part in key.split("->")): float(value) for key, value in (pairs or {}).items()}
    scores = []
    for episode in trajectory:
        if episode is None:
            scores.append(None)
            continue
        types = action_types(episode, action_pattern)
        total = 0.0
        for before, after in zip(types, types[1:]):
            total += repeat_penalty if before == after and before else bonuses.get((before, after), 0.0)
        scores.append(total)
    return scores


def hashed_embeddings(texts: list[str], dim: int) -> torch.Tensor:
    """Bag-of-words embeddings ``[n, dim]``: each word counted in a bucket chosen by a stable hash, rows
    L2-normalised. Light and deterministic, for tests and for runs without the MiniLM package."""
    out = torch.zeros(len(texts), dim)
    for row, text in enumerate(texts):
        for word in re.findall(r"\w+", text.lower()):
            out[row, int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little") % dim] += 1.0
    return torch.nn.functional.normalize(out, dim=-1)


class Curiosity:
    """``curiosity``: an intrinsic reward for reaching states the agent cannot yet predict.

    A small forward-dynamics model ``f([s_t; a_t]) -> s_{t+1}`` (an MLP) is trained online on the
    episodes' transitions: states are the embeddings of the prompt's question and of each
    observation, actions those of the policy's turns. An episode's reward is ``eta`` times its mean
    prediction error ``||f(s_t, a_t) - s_{t+1}||^2`` (measured before this call's update), so
    transitions the model has learned pay less and less. ``encoder``: ``minilm`` (the embedding
    rewards' all-MiniLM-L6-v2, with its LRU cache of ``cache_size`` texts) or ``hash`` (bag of words
    in ``dim`` buckets). The model and its optimiser are saved in every checkpoint and restored on
    resume (``state_dict``). An episode without a transition scores 0; a one-turn rollout None.
    """

    grpokit_factory = True  # one instance per run, built from the recipe's args: it keeps state

    def __init__(self, eta: float = 0.1, hidden: int = 64, learning_rate: float = 1e-3, encoder: str = "minilm",
                 dim: int = 256, cache_size: int = 4096, seed: int = 0):
        if encoder not in ("minilm", "hash"):
            raise ValueError(f"encoder must be 'minilm' or 'hash', not {encoder!r}")
        self.eta, self.encoder_name, self.dim = float(eta), encoder, dim
        if encoder == "minilm":
            from grpokit.rewards.embedding import Encoder

            self._encoder = Encoder(cache_size=cache_size)
            self.dim = 384  # all-MiniLM-L6-v2's width
        generator = torch.Generator().manual_seed(seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(2 * self.dim, hidden), torch.nn.ReLU(),
                                         torch.nn.Linear(hidden, self.dim))
        with torch.no_grad():
            for parameter in self.model.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=learning_rate)
        self.updates = 0

    def _embed(self, texts: list[str]) -> torch.Tensor:
        if self.encoder_name == "hash":
            return hashed_embeddings(texts, self.dim)
        return self._encoder(texts).float().cpu()

    def __call__(self, prompts, completions, trajectory=None, **_) -> list[float | None]:
        if trajectory is None:
            return [None] * len(completions)
        owners, states, actions, nexts = [], [], [], []
        for i, (prompt, episode) in enumerate(zip(prompts, trajectory)):
            if episode is None:
                continue
            state = prompt if isinstance(prompt, str) else str(prompt[-1].get("content", ""))
            for step in episode["steps"]:
                observation = step.get("observation")
                if not observation:
                    break  # the episode ended on this turn: there is no next state to predict
                following = observation["content"] if isinstance(observation, dict) else str(observation)
                owners.append(i)
                states.append(state)
                actions.append(step.get("action") or "")
                nexts.append(str(following))
                state = str(following)
        scores = [None if episode is None else 0.0 for episode in trajectory]
        if not owners:
            return scores
        embedded = self._embed(states + actions + nexts)
        n = len(owners)
        inputs, targets = torch.cat([embedded[:n], embedded[n:2 * n]], dim=-1), embedded[2 * n:]
        errors = ((self.model(inputs) - targets) ** 2).sum(dim=-1)  # [n]
        for i in sorted(set(owners)):
            mine = [k for k, owner in enumerate(owners) if owner == i]
            scores[i] = self.eta * errors[mine].mean().item()
        self.optimizer.zero_grad()
        errors.mean().backward()
        self.optimizer.step()
        self.updates += 1
        return scores

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = state["updates"]


register("curiosity")(Curiosity)
