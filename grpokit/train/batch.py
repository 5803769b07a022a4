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
from grpokit.rollout.sampler import prompt_seed
from grpokit.train.run import Run, next_prompts


@dataclass
class Round:
    """One generation round: ``rows`` (one per group) and their G completions each.

    In a multi-process run ``rows``, ``rollouts`` and ``texts`` are this rank's share while
    ``rewards_N`` and ``parts`` cover the whole round (every rank's, in rank order), so every
    rank filters groups and computes batch-wide statistics alike; this rank's completions start
    at ``first`` in them."""

    rows: list[dict]
    rollouts: Rollouts
    texts: list[str]
    rewards_N: torch.Tensor  # [N_round] every rank's completions
    parts: dict[str, list]  # every rank's raw values, per component
    latency_s: dict[str, float]
    shaping_metrics: dict[str, float]
    logged_extra: dict[str, list]  # columns reward functions gave TRL's log_extra, one value per completion
    first: int = 0  # where this rank's completions start in rewards_N and parts

    @property
    def own_rewards_N(self) -> torch.Tensor:
        return self.rewards_N[self.first:self.first + len(self.texts)]


@dataclass
class Batch:
    rows: list[dict]  # one per group
    rollouts: Rollouts  # N = groups * G
    advantages_N: torch.Tensor
    fresh: list[Round]  # every round sampled this step (for reward metrics and samples)
    metrics: dict[str, float]


def sample_round(run: Run, rows: list[dict], step: int, round_index: int = 0) -> Round:
    """Generate G completions for this rank's share of ``rows`` (the round's prompts, the same on every
    rank) and score them; the rewards cover every rank's share."""
    share = run.world.share(len(rows))
    mine = rows[share]
    batch = run.encoder(mine)
    if run.recipe.rollout.seed_per_prompt:  # a prompt's samples depend on its place in the step alone
        batch.seeds = [prompt_seed(run.recipe.training.seed, step, round_index, i)
                       for i in range(share.start, share.stop)]
    run.world.mark("sampling completions")
    rollouts = run.sampler.generate(batch, run.recipe.rollout.num_generations)
    texts = run.policy.tokenizer.batch_decode(rollouts.completion_ids_NC, skip_special_tokens=True)
    return Round(mine, rollouts, texts, *score(run, mine, texts, rollouts, step))


def score(run: Run, rows: list[dict], texts: list[str], rollouts: Rollouts, step: int):
    """Rewards for the G completions of each row (the row's columns repeated G times), scored on this rank
    and combined over every rank's: ``(total_N, raw parts, latency per component, orchestrator metrics,
    log_extra columns, where this rank's completions start)``. The orchestrator's running statistics see
    the whole round on every rank, so they stay the same everywhere (and equal a single process's)."""
    G, algo = run.recipe.rollout.num_generations, run.recipe.algorithm
    group_rows = [row for row in rows for _ in range(G)]
    prompts = [row["prompt"] for row in group_rows]
    extras = {"completion_ids": rollouts.completion_id_lists(),
              "trainer_state": trainer_state(step, run.recipe.training.max_steps)}
    episodes = rollouts.trajectories_N
    run.world.mark("computing the rewards")
    scores = run.rewards.score(prompts, completions_of(episodes, prompts, texts),
                               columns_of(group_rows), G, {**extras, **episode_columns(episodes)})
    lengths = rollouts.completion_lengths_N.tolist()
    gathered = run.world.gather((scores.parts, scores.errors, lengths), "gathering the rewards")
    first = sum(len(piece[2]) for piece in gathered[:run.world.rank])
    parts = {name: [v for piece in gathered for v in piece[0][name]] for name in scores.parts}
    errors = {name: error for piece in gathered for name, error in piece[1].items()}
    run.orchestrator.record_failures(errors)
    rewards_N, shaping = run.orchestrator.combine(parts, step)
    # what reward functions reported through TRL's log_metric, beside the orchestrator's figures
    shaping.update({f"reward_log/{key}": value for key, value in scores.logged_metrics.items()})
    if algo.overlong_buffer:
        penalty_N = overlong_penalty(torch.tensor([n for piece in gathered for n in piece[2]]),
                                     run.recipe.rollout.max_completion_length, algo.overlong_buffer,
                                     algo.overlong_penalty)
        rewards_N = rewards_N + penalty_N
        parts["overlong_penalty"] = penalty_N.tolist()
    return rewards_N, parts, scores.latency_s, shaping, scores.logged_extra, first


def _take_groups(rnd: Round, groups: list[int], G: int) -> tuple[list[dict], Rollouts, torch.Tensor]:
    """This rank's groups among ``groups`` (indices over the whole round): rows, rollouts, rewards."""
    own = [g - rnd.first // G for g in groups if 0 <= g - rnd.first // G < len(rnd.rows)]
    rows_M = torch.tensor([g * G + j for g in own for j in range(G)], dtype=torch.long)
    return [rnd.rows[g] for g in own], rnd.rollouts.select(rows_M), rnd.own_rewards_N[rows_M]


def collect_batch(run: Run, step: int, next_prompts=next_prompts) -> Batch:
    """Sample until the step has its groups, then compute advantages and mix in replay."""
    algo, G, P = run.recipe.algorithm, run.recipe.rollout.num_generations, run.recipe.training.prompts_per_step
    n_replay = min(replay_count(P, algo.replay.ratio), len(run.replay)) if run.replay is not None else 0
    wanted = P - n_replay
    rounds, kept = [], []  # kept: (round index, group index over the whole round); the same on every rank
    while True:
        rnd = sample_round(run, next_prompts(run, wanted - len(kept)), step, len(rounds))
        rounds.append(rnd)
        groups = rnd.rewards_N.numel() // G
        spread_B = ~zero_spread_groups(rnd.rewards_N.view(-1, G)) if algo.dynamic_sampling else torch.ones(groups, dtype=torch.bool)
        kept += [(len(rounds) - 1, g) for g in range(groups) if spread_B[g]]
        if len(kept) >= wanted or len(rounds) > algo.max_sampling_rounds:
            break
    if not kept:  # nothing informative even after every round: train on the last round as it is
        kept = [(len(rounds) - 1, g) for g in range(rounds[-1].rewards_N.numel() // G)]
    pieces = [_take_groups(rounds[r], [g for rr, g in kept if rr == r], G) for r in range(len(rounds))]
    rows = [row for piece in pieces for row in piece[0]]
    rollouts = concat_rollouts([piece[1] for piece in pieces], run.policy.tokenizer.pad_token_id)
    # advantages (and their batch-wide statistics) over every rank's kept groups, then this rank's share
    kept_N = torch.cat([rounds[r].rewards_N[g * G:(g + 1) * G] for r, g in kept])
    all_advantages_N, metrics = group_advantages(kept_N, G, algo.advantage)
    own_N = torch.tensor([i * G + j for i, (r, g) in enumerate(kept)
                          if 0 <= g - rounds[r].first // G < len(rounds[r].rows) for j in range(G)], dtype=torch.long)
    advantages_N, rewards_N = all_advantages_N[own_N], kept_N[own_N]
    if algo.dynamic_sampling:
        metrics["dynamic_sampling/extra_rounds"] = len(rounds) - 1
        metrics["dynamic_sampling/dropped_groups"] = sum(r.rewards_N.numel() // G for r in rounds) - len(kept)
    if run.replay is not None:
        rows, rollouts, advantages_N = mix_replay(run, step, n_replay, rows, rollouts, advantages_N, rewards_N)
        metrics.update(run.replay.stats())
        metrics["replay/reuse_rate"] = n_replay / P
    return Batch(rows, rollouts, advantages_N, rounds, metrics)


def mix_replay(run: Run, step, n_replay, rows, rollouts, advantages_N, rewards_N):
    """Append ``n_replay`` buffered groups, then store this step's fresh groups in the buffer."""
    G = run.recipe.rollout.num_generations
    # every rank holds the same buffer (every rank's groups) and draws the same groups, then replays its share
    replayed = run.replay.sample(n_replay, run.rng) if n_replay else []
    replayed = replayed[run.world.share(len(replayed))]
    fresh = groups_from_batch(rollouts.prompt_ids_NP, rollouts.prompt_mask_NP, rollouts.completion_ids_NC,
                              rollouts.completion_mask_NC, rollouts.truncated_N, rewards_N, advantages_N, rows, G, step,
                              loss_mask_NC=rollouts.loss_mask_NC, sampling_logprobs_NC=rollouts.sampling_logprobs_NC,
                              prompt_inputs_N=rollouts.prompt_inputs_N, completion_inputs_N=rollouts.completion_inputs_N)
    run.replay.add([group for piece in run.world.gather(fresh, "sharing the replay groups") for group in piece])
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
