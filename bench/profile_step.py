"""Where a GRPO step's time goes: the trainer's own stages, one step under torch.profiler.

    .venv/bin/python bench/profile_step.py                       # step_speed's work: P=4 x G=8, <= 32 tokens
    .venv/bin/python bench/profile_step.py --steps 3 --rows 25   # more warm steps, a longer op table

Builds the run as ``grpokit train`` does (``train.run.setup``) on step_speed's recipe, runs
warm-up steps, then times each stage of the next steps (sampling + rewards, the reference pass,
forward + backward, optimiser step + weight sync) and profiles the last one: the top operators
by self CPU time, and the matmul shapes that cost the most. Nothing is written to disk.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def build_run(args):
    import torch

    from _grpokit_worker import build_recipe
    from grpokit.models import resolve_model_dir
    from grpokit.train.run import setup

    spec = {"model": args.model or resolve_model_dir("smollm2-135m-instruct"), "dtype": "bfloat16", "full": False,
            "prompts": args.prompts, "generations": args.generations, "max_completion_length": args.max_completion_length,
            "beta": 0.04, "lr": 1e-5, "total_steps": 1000, "seed": 0, "data_seed": 0, "train_size": 64, "eval_size": 8,
            "threads": args.threads or torch.get_num_threads(), "run_dir": "/nonexistent/profile", "attn": None}
    torch.set_num_threads(spec["threads"])
    return setup(build_recipe(spec))


@contextmanager
def stage(times: dict, name: str):
    t0 = time.perf_counter()
    yield
    times[name] = times.get(name, 0.0) + time.perf_counter() - t0


def timed_step(run, optimizer, scheduler, step: int) -> dict:
    """One step with each stage timed (policy_update split at its reference pass and its backward)."""
    from grpokit.train import update
    from grpokit.train.batch import collect_batch

    times: dict = {}
    fill, backward = update.fill_fixed_logprobs, __import__("torch").Tensor.backward

    def timed_fill(*a, **k):
        with stage(times, "reference pass"):
            return fill(*a, **k)

    def timed_backward(self, *a, **k):
        with stage(times, "backward"):
            return backward(self, *a, **k)

    t0 = time.perf_counter()
    with stage(times, "sample + rewards"):
        batch = collect_batch(run, step)
    update.fill_fixed_logprobs = timed_fill
    import torch
    torch.Tensor.backward = timed_backward
    try:
        with stage(times, "update (all)"):
            update.policy_update(run, optimizer, scheduler, batch.rollouts, batch.advantages_N)
    finally:
        update.fill_fixed_logprobs, torch.Tensor.backward = fill, backward
    times["step"] = time.perf_counter() - t0
    times["update forward + optimiser + sync"] = (times["update (all)"] - times.get("reference pass", 0.0)
                                                 - times.get("backward", 0.0))
    times["completion tokens"] = int(batch.rollouts.completion_mask_NC.sum())
    times["completion width"] = batch.rollouts.completion_ids_NC.size(1)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--max-completion-length", type=int, default=32)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2, help="timed steps (the last is profiled)")
    p.add_argument("--rows", type=int, default=20, help="operators listed")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-profile", action="store_true", help="stage times only")
    args = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from grpokit.train.schedule import build_optimizer

    run = build_run(args)
    optimizer, scheduler = build_optimizer(run.policy.trainable_parameters(), run.recipe.training, 1)
    for step in range(1, args.warmup + 1):
        timed_step(run, optimizer, scheduler, step)
    rows = []
    for i in range(args.steps):
        step = args.warmup + i + 1
        if i == args.steps - 1 and not args.no_profile:
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                rows.append(timed_step(run, optimizer, scheduler, step))
        else:
            rows.append(timed_step(run, optimizer, scheduler, step))
    print(f"## Stages of a grpokit GRPO step (P={args.prompts} x G={args.generations}, <= "
          f"{args.max_completion_length} tokens, {torch.get_num_threads()} threads)\n")
    print("| stage | " + " | ".join(f"step {args.warmup + i + 1}" for i in range(len(rows))) + " |")
    print("|---|" + "---|" * len(rows))
    for key in rows[0]:
        print(f"| {key} | " + " | ".join(f"{r.get(key, 0):.2f}" if isinstance(r.get(key), float) else str(r.get(key))
                                        for r in rows) + " |")
    if not args.no_profile:
        if rows[-1]["step"] > 0:
            print("\n(the profiled step runs slower than the others: the profiler's own cost)")
        print("\n### Operators by self CPU time (profiled step)\n```")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
        print("```\n### The costliest (operator, input shapes)\n```")
        by_shape = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
        for e in by_shape[:args.rows]:
            print(f"{e.key:12s} {e.count:6d} calls {e.self_cpu_time_total / 1e6:7.3f} s self  shapes {json.dumps(e.input_shapes)}")
        print("```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
