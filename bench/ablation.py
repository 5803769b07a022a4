"""Loss-type ablation on the demo task: same recipe, seed and budget, one run per loss type.

Prints a Markdown table of held-out accuracy (before -> after), mean training reward
over the last quarter of steps, mean KL and median seconds per step.

    .venv/bin/python bench/ablation.py --steps 30 --eval-size 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from grpokit.cli import quiet_libraries
from grpokit.config import load_recipe
from grpokit.train import train


def summarise(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    tail = steps[-max(1, len(steps) // 4):]
    return {
        "before": evals[0]["accuracy"], "after": evals[-1]["accuracy"],
        "reward_last_quarter": statistics.mean(r["reward"] for r in tail),
        "kl": statistics.mean(r["kl"] for r in steps),
        "s_per_step": statistics.median(r["step_time_s"] for r in steps),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/demo.yaml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-size", type=int, default=64)
    parser.add_argument("--loss-types", default="grpo,dr_grpo,dapo")
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--set", action="append", default=[], help="extra recipe overrides for every run")
    args = parser.parse_args(argv)
    quiet_libraries()
    results = {}
    for loss_type in args.loss_types.split(","):
        overrides = [f"algorithm.loss_type={loss_type}", f"training.max_steps={args.steps}",
                     f"data.eval_size={args.eval_size}", "training.eval_every=0", "logging.progress=false",
                     f"training.output_dir={args.out}/{loss_type}", *args.set]
        run_dir = train(load_recipe(args.recipe, overrides), overwrite=True)
        results[loss_type] = summarise(run_dir)
        print(f"{loss_type}: {results[loss_type]}", file=sys.stderr, flush=True)
    print(f"\n{args.steps} steps of {args.recipe}, same seed; held-out accuracy on {args.eval_size} questions (greedy)\n")
    print("| loss_type | accuracy before | accuracy after | reward (last 25% of steps) | mean KL | median s/step |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {100 * r['before']:.1f}% | {100 * r['after']:.1f}% | {r['reward_last_quarter']:.3f} "
              f"| {r['kl']:.3f} | {r['s_per_step']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
