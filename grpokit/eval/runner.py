"""Evaluate a policy on held-out rows: greedy accuracy, and pass@k and diversity from samples.

Correctness is the ``accuracy_reward`` component being >= 1 (a correct answer under that
reward's reading of the reply). Greedy decoding makes accuracy deterministic; the sampled
half (K completions per prompt) is deterministic for a given seed. Every figure that
a comparison could hinge on carries a 95% bootstrap interval, and per-row correctness
is kept so two evaluations of the same rows can be compared paired (grpokit compare).
The file format is documented in docs/run-directory.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import mean
from typing import Any

import torch

from grpokit.data.images import message_text
from grpokit.distributed import World
from grpokit.eval.metrics import bootstrap_interval, distinct_n, pass_at_k, self_bleu
from grpokit.eval.thumbnails import image_key
from grpokit.envs import build_environment
from grpokit.models.sharding import full_weights
from grpokit.rewards import RewardSet, columns_of, completions_of, episode_columns, trainer_state
from grpokit.rollout import PromptEncoder, build_sampler, turn_options
from grpokit.rollout.sampler import prompt_seed


@dataclass
class EvalSettings:
    """How to prompt and decode; the recipe's data, rollout and eval sections unpacked."""

    accuracy_reward: str
    chat_template: bool = True
    system_prompt: str | None = None
    max_prompt_length: int = 512
    max_completion_length: int = 256
    batch_size: int = 64
    num_samples: int = 16
    num_generations: int = 0
    pass_k: tuple[int, ...] = (1, 5, 10)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    max_steps: int = 0
    backend: str = "torch"
    environment: Any = None  # multi-turn: the recipe's EnvironmentSpec
    turns: dict = field(default_factory=dict)  # multi-turn limits (rollout.turn_options)
    seed_per_prompt: bool = False  # each row samples from its own seeded stream (rollout.seed_per_prompt)

    def encoder(self, policy) -> PromptEncoder:
        return PromptEncoder(policy.processor, self.chat_template, self.system_prompt, self.max_prompt_length,
                             tools=self.environment.schemas if self.environment else None)

    @classmethod
    def from_recipe(cls, recipe, environment=None) -> "EvalSettings":
        """``environment``: the run's own EnvironmentSpec when it has one, else built from the recipe."""
        rollout, ev = recipe.rollout, recipe.eval
        return cls(
            accuracy_reward=recipe.accuracy_reward, chat_template=recipe.data.chat_template,
            system_prompt=recipe.data.system_prompt, max_prompt_length=rollout.max_prompt_length,
            max_completion_length=rollout.max_completion_length, batch_size=ev.batch_size,
            num_samples=ev.num_samples, num_generations=ev.num_generations, pass_k=tuple(ev.pass_k),
            temperature=ev.temperature or rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k,
            seed=recipe.training.seed, max_steps=recipe.training.max_steps, backend=rollout.backend,
            environment=environment or build_environment(rollout), turns=turn_options(rollout),
            seed_per_prompt=rollout.seed_per_prompt,
        )


@dataclass
class Generated:
    """``k`` completions per row, in row order (a row's k completions adjacent)."""

    texts: list[str]
    lengths: list[int]
    ids_lists: list[list[int]]
    episodes: list[dict] | None  # multi-turn: each completion's trajectory


def _generate(policy, rows: list[dict], settings: EvalSettings, k: int, greedy: bool,
              world: World | None = None) -> Generated:
    """The sampler has its own generator seeded from ``settings.seed``: evaluating never moves training's.
    Several processes generate a share of the rows each and every rank gets them all, in row order;
    each row then samples from its own stream (seeded from its index), as it would alone."""
    world = world or World()
    sampler = build_sampler(policy, settings.backend, max_new_tokens=settings.max_completion_length,
                            temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
                            seed=settings.seed, environment=settings.environment, **settings.turns)
    encoder = settings.encoder(policy)
    prompts_per_batch = max(1, settings.batch_size // k)
    out = Generated([], [], [], [] if settings.environment is not None else None)
    share = world.share(len(rows))
    with full_weights(policy.sampling_model):  # FSDP: gathered once, whatever number of batches each rank has
        for start in range(share.start, share.stop, prompts_per_batch):
            batch = encoder(rows[start:min(start + prompts_per_batch, share.stop)])
            if settings.seed_per_prompt:
                batch.seeds = [prompt_seed(settings.seed, index) for index in range(start, start + len(batch))]
            rollouts = sampler.generate(batch, num_generations=k, greedy=greedy)
            out.texts += policy.tokenizer.batch_decode(rollouts.completion_ids_NC, skip_special_tokens=True)
            out.lengths += rollouts.completion_lengths_N.tolist()
            out.ids_lists += rollouts.completion_id_lists()
            if out.episodes is not None:
                out.episodes += rollouts.trajectories_N
    if not world.distributed:
        return out
    pieces = world.gather(out, "the evaluation's generations")
    return Generated(*([x for piece in pieces for x in getattr(piece, name)] for name in ("texts", "lengths", "ids_lists")),
                     None if out.episodes is None else [e for piece in pieces for e in piece.episodes])


def _score(rows: list[dict], generated: Generated, rewards: RewardSet, settings: EvalSettings, step: int, k: int):
    """Total reward, correctness and per-component means of ``k`` completions per row; rewards get
    TRL's ``completion_ids`` and ``trainer_state`` here too, as in training, and a multi-turn
    episode's trajectory columns."""
    prompts = [r["prompt"] for r in rows for _ in range(k)]
    columns = columns_of([r for r in rows for _ in range(k)])
    extras = {"completion_ids": generated.ids_lists, "trainer_state": trainer_state(step, settings.max_steps),
              **episode_columns(generated.episodes)}
    completions = completions_of(generated.episodes, prompts, generated.texts)
    total_N, parts = rewards(prompts, completions, columns, group_size=k, extras=extras)
    correct = [v is not None and v >= 1.0 for v in parts[settings.accuracy_reward]]
    applicable = {name: [v for v in values if v is not None] for name, values in parts.items()}
    means = {name: (mean(v) if v else None) for name, v in applicable.items()}
    return total_N, correct, means


def _interval(values: list[float], seed: int) -> list[float]:
    return list(bootstrap_interval(values, seed=seed)) if values else [0.0, 0.0]


def sampled_metrics(rows: list[dict], texts: list[str], lengths: list[int], correct: list[bool],
                    total_N: torch.Tensor, means: dict, settings: EvalSettings) -> dict[str, Any]:
    """pass@k with intervals (bootstrap over prompts), self-BLEU, distinct-n, sampled rewards."""
    k_samples = settings.num_generations
    num_correct = [sum(correct[i * k_samples:(i + 1) * k_samples]) for i in range(len(rows))]
    pass_k, intervals = {}, {}
    for k in (k for k in settings.pass_k if k <= k_samples):
        per_prompt = [pass_at_k(k_samples, c, k) for c in num_correct]
        pass_k[str(k)] = mean(per_prompt) if per_prompt else 0.0
        intervals[str(k)] = _interval(per_prompt, settings.seed)
    groups = [texts[i * k_samples:(i + 1) * k_samples] for i in range(len(rows))]
    return {
        "num_generations": k_samples, "temperature": settings.temperature, "top_p": settings.top_p,
        "top_k": settings.top_k, "seed": settings.seed,
        "pass_at_k": pass_k, "pass_at_k_interval": intervals, "num_correct": num_correct,
        "self_bleu": mean(self_bleu(g) for g in groups) if k_samples >= 2 and groups else None,
        "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
        "reward": total_N.mean().item() if texts else 0.0, "rewards": means,
        "completion_length": mean(lengths) if lengths else 0.0,
    }


def source_accuracy(rows: list[dict], correct: list[bool], seed: int) -> dict[str, dict[str, Any]]:
    """Greedy accuracy per ``data_source`` when the held-out rows come from several (``data.sources``)."""
    groups: dict[str, list[float]] = {}
    for row, right in zip(rows, correct):
        groups.setdefault(str(row.get("data_source")), []).append(float(right))
    if len(groups) < 2:
        return {}
    return {name: {"accuracy": mean(values), "accuracy_interval": _interval(values, seed), "num_examples": len(values)}
            for name, values in groups.items()}


def evaluate(policy, rows: list[dict], rewards: RewardSet, settings: EvalSettings, step: int = 0,
             world: World | None = None) -> dict[str, Any]:
    """Greedy accuracy (with interval and per-row correctness), rewards, lengths, verbatim samples;
    with ``settings.num_generations`` >= 1 also a ``sampling`` block (pass@k, diversity).
    ``step`` is the training step evaluated (rewards see it as ``trainer_state.global_step``).
    With a ``world`` of several processes each generates its share of the rows; every rank scores
    them all and gets the same result."""
    greedy = _generate(policy, rows, settings, 1, greedy=True, world=world)
    texts, lengths = greedy.texts, greedy.lengths
    total_N, correct, means = _score(rows, greedy, rewards, settings, step, 1)
    result: dict[str, Any] = {
        "accuracy": sum(correct) / max(len(rows), 1),
        "accuracy_interval": _interval([float(c) for c in correct], settings.seed),
        "correct": [int(c) for c in correct],
        "reward": total_N.mean().item() if rows else 0.0,
        "rewards": means,
        "completion_length": mean(lengths) if lengths else 0.0,
        "num_examples": len(rows),
        "accuracy_reward": settings.accuracy_reward,
        "samples": [_sample(r, t, total_N[i].item(), correct[i], greedy.episodes[i] if greedy.episodes else None)
                    for i, (r, t) in enumerate(zip(rows[:settings.num_samples], texts))],
        "sampling": None,
    }
    by_source = source_accuracy(rows, correct, settings.seed)
    if by_source:
        result["by_source"] = by_source
    if settings.num_generations >= 1 and rows:
        k = settings.num_generations
        sampled = _generate(policy, rows, settings, k, greedy=False, world=world)
        s_texts, s_lengths = sampled.texts, sampled.lengths
        s_total_N, s_correct, s_means = _score(rows, sampled, rewards, settings, step, k)
        result["sampling"] = sampled_metrics(rows, s_texts, s_lengths, s_correct, s_total_N, s_means, settings)
    return result


def _sample(row: dict, text: str, reward: float, correct: bool, episode: dict | None = None) -> dict[str, Any]:
    """One verbatim sample: the question's text (a chat prompt's last message), the reply, its verdict,
    the keys of the row's images (``eval/thumbnails.py`` stores them once), and a multi-turn episode's
    turns (the policy's and the environment's messages) with how it ended."""
    prompt = row["prompt"]
    sample = {"prompt": prompt if isinstance(prompt, str) else message_text(prompt[-1].get("content")),
              "completion": text, "answer": row.get("answer"), "reward": reward, "correct": correct}
    if row.get("images"):
        sample["images"] = [image_key(ref) for ref in row["images"]]
    if episode:
        sample["trajectory"] = {"messages": episode["messages"], "end": episode["end"], "turns": episode["turns"]}
    return sample


def metrics_line(result: dict[str, Any]) -> dict[str, Any]:
    """The scalars of an eval result, as one metrics.jsonl line's fields (no lists, no samples)."""
    line = {"accuracy": result["accuracy"], "accuracy_lo": result["accuracy_interval"][0],
            "accuracy_hi": result["accuracy_interval"][1], "reward": result["reward"],
            "completion_length": result["completion_length"], "num_examples": result["num_examples"]}
    line.update({f"rewards/{k}": v for k, v in result["rewards"].items()})
    line.update({f"accuracy/{name}": block["accuracy"] for name, block in result.get("by_source", {}).items()})
    sampling = result.get("sampling")
    if sampling:
        line.update({f"pass@{k}": v for k, v in sampling["pass_at_k"].items()})
        line.update({key: sampling[key] for key in ("self_bleu", "distinct_1", "distinct_2")})
    return line
