"""Building one step's generation batch: sample, score, and (optionally) filter and mix.

- Dynamic sampling (DAPO, arXiv:2503.14476): groups whose G rewards are all equal carry
  no advantage; they are dropped and more prompts are sampled, up to
  ``max_sampling_rounds`` extra rounds, so the update sees P informative groups.
- Replay: a share of the P groups comes from a buffer of past high-|advantage| groups;
  their advantages are the stored ones, and their log-probs are recomputed under the
  current policy by the update like any fresh sample.
- Soft overlong penalty (DAPO): added to the total reward as its own component.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grpokit.algo import group_advantages, overlong_penalty, zero_spread_groups
from grpokit.algo.replay import groups_from_batch, replay_count
from grpokit.rewards import columns_of, completions_of, episode_columns, trainer_state
from grpokit.rollout import Rollouts, concat_rollouts
from grpokit.train.run import Run, next_prompts


@dataclass
class Round:
    """One generation round: ``rows`` (one per group) and their G completions each."""

    rows: list[dict]
    rollouts: Rollouts
    texts: list[str]
    rewards_N: torch.Tensor
    parts: dict[str, list]
    latency_s: dict[str, float]
    shaping_metrics: dict[str, float]
    logged_extra: dict[str, list]  # columns reward functions gave TRL's log_extra, one value per completion


@dataclass
class Batch:
    rows: list[dict]  # one per group
    rollouts: Rollouts  # N = groups * G
    advantages_N: torch.Tensor
    fresh: list[Round]  # every round sampled this step (for reward metrics and samples)
    metrics: dict[str, float]


def sample_round(run: Run, rows: list[dict], step: int) -> Round:
    """Generate G completions per row and score them."""
    rollouts = run.sampler.generate(run.encoder(rows), run.recipe.rollout.num_generations)
    texts = run.policy.tokenizer.batch_decode(rollouts.completion_ids_NC, skip_special_tokens=True)
    return Round(rows, rollouts, texts, *score(run, rows, texts, rollouts, step))


def score(run: Run, rows: list[dict], texts: list[str], rollouts: Rollouts, step: int):
    """Rewards for the G completions of each row (the row's columns repeated G times):
    ``(total_N, raw parts, latency per component, orchestrator metrics, log_extra columns)``."""
    G, algo = run.recipe.rollout.num_generations, run.recipe.algorithm
    group_rows = [row for row in rows for _ in range(G)]
    prompts = [row["prompt"] for row in group_rows]
    extras = {"completion_ids": rollouts.completion_id_lists(),
              "trainer_state": trainer_state(step, run.recipe.training.max_steps)}
    episodes = rollouts.trajectories_N
    scores = run.rewards.score(prompts, completions_of(episodes, prompts, texts),
                               columns_of(group_rows), G, {**extras, **episode_columns(episodes)})
    run.orchestrator.record_failures(scores.errors)
    rewards_N, shaping = run.orchestrator.combine(scores.parts, step)
    # what reward functions reported through TRL's log_metric, beside the orchestrator's figures
    shaping.update({f"reward_log/{key}": value for key, value in scores.logged_metrics.items()})
    parts = dict(scores.parts)
    if algo.overlong_buffer:
        penalty_N = overlong_penalty(rollouts.completion_lengths_N, run.recipe.rollout.max_completion_length,
                                     algo.overlong_buffer, algo.overlong_penalty)
        rewards_N = rewards_N + penalty_N
        parts["overlong_penalty"] = penalty_N.tolist()
    return rewards_N, parts, scores.latency_s, shaping, scores.logged_extra


def _take_groups(rnd: Round, groups: list[int], G: int) -> tuple[list[dict], Rollouts, torch.Tensor]:
    rows_M = torch.tensor([g * G + j for g in groups for j in range(G)], dtype=torch.long)
    return [rnd.rows[g] for g in groups], rnd.rollouts.select(rows_M), rnd.rewards_N[rows_M]


def collect_batch(run: Run, step: int, next_prompts=next_prompts) -> Batch:
    """Sample until the step has its groups, then compute advantages and mix in replay."""
    algo, G, P = run.recipe.algorithm, run.recipe.rollout.num_generations, run.recipe.training.prompts_per_step
    n_replay = min(replay_count(P, algo.replay.ratio), len(run.replay)) if run.replay is not None else 0
    wanted = P - n_replay
    rounds, kept = [], []  # kept: (round index, group index)
    while True:
        rnd = sample_round(run, next_prompts(run, wanted - len(kept)), step)
        rounds.append(rnd)
        spread_B = ~zero_spread_groups(rnd.rewards_N.view(-1, G)) if algo.dynamic_sampling else torch.ones(len(rnd.rows), dtype=torch.bool)
        kept += [(len(rounds) - 1, g) for g in range(len(rnd.rows)) if spread_B[g]]
        if len(kept) >= wanted or len(rounds) > algo.max_sampling_rounds:
            break
    if not kept:  # nothing informative even after every round: train on the last round as it is
        kept = [(len(rounds) - 1, g) for g in range(len(rounds[-1].rows))]
    pieces = [_take_groups(rounds[r], [g for rr, g in kept if rr == r], G) for r in range(len(rounds))
              if any(rr == r for rr, _ in kept)]
    rows = [row for piece in pieces for row in piece[0]]
    rollouts = concat_rollouts([piece[1] for piece in pieces], run.policy.tokenizer.pad_token_id)
    rewards_N = torch.cat([piece[2] for piece in pieces])
    advantages_N, metrics = group_advantages(rewards_N, G, algo.advantage)
    if algo.dynamic_sampling:
        metrics["dynamic_sampling/extra_rounds"] = len(rounds) - 1
        metrics["dynamic_sampling/dropped_groups"] = sum(len(r.rows) for r in rounds) - len(kept)
    if run.replay is not None:
        rows, rollouts, advantages_N = mix_replay(run, step, n_replay, rows, rollouts, advantages_N, rewards_N)
        metrics.update(run.replay.stats())
        metrics["replay/reuse_rate"] = n_replay / P
    return Batch(rows, rollouts, advantages_N, rounds, metrics)


def mix_replay(run: Run, step, n_replay, rows, rollouts, advantages_N, rewards_N):
    """Append ``n_replay`` buffered groups, then store this step's fresh groups in the buffer."""
    G = run.recipe.rollout.num_generations
    replayed = run.replay.sample(n_replay, run.rng) if n_replay else []
    fresh = groups_from_batch(rollouts.prompt_ids_NP, rollouts.prompt_mask_NP, rollouts.completion_ids_NC,
                              rollouts.completion_mask_NC, rollouts.truncated_N, rewards_N, advantages_N, rows, G, step,
                              loss_mask_NC=rollouts.loss_mask_NC, sampling_logprobs_NC=rollouts.sampling_logprobs_NC,
                              prompt_inputs_N=rollouts.prompt_inputs_N, completion_inputs_N=rollouts.completion_inputs_N)
    run.replay.add(fresh)
    if not replayed:
        return rows, rollouts, advantages_N
    old = [Rollouts(g.prompt_ids_GP, g.prompt_mask_GP, g.completion_ids_GC, g.completion_mask_GC, g.truncated_G,
                    g.loss_mask_GC, g.sampling_logprobs_GC,
                    None if g.prompt_inputs is None else [g.prompt_inputs] * G,
                    completion_inputs_N=g.completion_inputs_G) for g in replayed]
    pad_id = run.policy.tokenizer.pad_token_id
    rollouts = concat_rollouts([rollouts, *old], pad_id)
    advantages_N = torch.cat([advantages_N, *[g.advantages_G for g in replayed]])
    return rows + [g.row for g in replayed], rollouts, advantages_N
