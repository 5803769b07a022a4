"""Seconds per multi-turn rollout batch: the embedded model solving sums with the calculator tool.

    .venv/bin/python bench/multiturn_rollout.py [--prompts 4] [--generations 4] [--reps 3] [--adapter DIR]

P prompts of builtin:multi_sum x G episodes each, decoded greedily (the same work every repetition
and on every commit), <= 96 completion tokens, the calculator environment answering tool calls. ``--adapter runs/agent-sft/adapter`` (after ``make agent-demo``)
starts from the warm start, which calls the tool in most episodes; the untrained model mostly answers
at once.
Prints seconds per batch (best and median of --reps after a warm-up), completion tokens (the
environment's included) per second, and the CPU pressure during the timed part: above 5 % the
machine was busy and the figure is not a measurement. Run it on two commits, one after the other,
to compare them (PYTHONPATH=<a worktree> runs another commit's grpokit).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_speed import cpu_stall_us  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--adapter", default=None, help="a LoRA adapter to merge first (model.adapter)")
    args = parser.parse_args(argv)

    import torch

    import grpokit
    from grpokit.config import recipe_from_dict
    from grpokit.data import load_splits
    from grpokit.envs import build_environment
    from grpokit.models.loading import load_policy
    from grpokit.rollout import PromptEncoder, build_sampler, turn_options

    recipe = recipe_from_dict({"model": {"adapter": args.adapter, "dtype": "bfloat16"}, "data": {"source": "builtin:multi_sum", "eval_size": 8},
                               "rewards": [{"name": "answer_match"}],
                               "rollout": {"environment": "calculator", "max_turns": 3,
                                           "max_completion_length": args.max_new_tokens}})
    rows, _ = load_splits(recipe.data)
    environment = build_environment(recipe.rollout)
    policy = load_policy(recipe.model, 0.0, recipe.rollout.merge_lora)
    encoder = PromptEncoder(policy.processor, True, recipe.data.system_prompt, recipe.rollout.max_prompt_length,
                            tools=environment.schemas)
    sampler = build_sampler(policy, max_new_tokens=args.max_new_tokens, environment=environment,
                            **turn_options(recipe.rollout))
    batch = encoder(rows[:args.prompts])
    sampler.generate(batch, args.generations, greedy=True)  # warm-up
    times, tokens, turns = [], 0, []
    stall_before, wall_before = cpu_stall_us(), time.perf_counter()
    for _ in range(args.reps):
        start = time.perf_counter()
        out = sampler.generate(batch, args.generations, greedy=True)
        times.append(time.perf_counter() - start)
        tokens = int(out.completion_mask_NC.sum())
        turns = [episode["turns"] for episode in out.trajectories_N]
    stall_after, wall = cpu_stall_us(), time.perf_counter() - wall_before
    pressure = None if stall_before is None else (stall_after - stall_before) / 1e6 / wall
    print(f"grpokit at {Path(grpokit.__file__).resolve().parent.parent}; torch threads {torch.get_num_threads()}")
    print(f"P={args.prompts} x G={args.generations}, <= {args.max_new_tokens} tokens, greedy, calculator")
    print(f"s/batch: best {min(times):.2f}, median {statistics.median(times):.2f} over {args.reps}")
    print(f"completion tokens per batch {tokens} ({tokens / min(times):.0f}/s); turns per episode "
          f"{statistics.mean(turns):.2f}")
    print(f"CPU pressure {pressure:.1%}" if pressure is not None else "CPU pressure: unknown (no /proc/pressure)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
