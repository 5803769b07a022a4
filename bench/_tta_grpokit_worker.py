"""grpokit's half of bench/time_to_accuracy.py, in its own process (so its peak RSS is its own).

    python bench/_tta_grpokit_worker.py SPEC.json     # SPEC written by time_to_accuracy.py

The demo recipe trains through grpokit's own ``train``; its ``on_step`` hook hands this worker the
live run before the first step and after each one, where the trained model (``run.policy.model``,
the PEFT model with the adapters being trained, not the merged bf16 copy grpokit samples from:
TRL has no such copy, and the copy is a function of it) is evaluated on the training clock
(``_tta_eval.Timeline``, step times as grpokit's ``progress`` reports them). A run that has met
its target ends as a scheduler would end it, with SIGTERM: grpokit finishes the step, writes a
checkpoint and returns (run.json status "stopped"). grpokit's own evaluations (at step 0 and, when
max_steps is reached, at the end; on all the recipe's held-out rows) happen off the clock too.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

# bench/ is on sys.path: workers run as scripts
from _tta_eval import GreedyAccuracy, Timeline, held_out_rows, load_bench_recipe, model_facts
from _worker_common import run_and_report


def jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def step_records(run_dir: Path) -> list[dict]:
    """Per step: the prompts trained on (from samples.jsonl, which the bench makes log every completion),
    the learning rate and the mean reward (metrics.jsonl)."""
    prompts: dict[int, list[str]] = {}
    for sample in jsonl(run_dir / "samples.jsonl"):
        prompts.setdefault(sample["step"], [])
        if sample["prompt"] not in prompts[sample["step"]]:  # in order, one per group
            prompts[sample["step"]].append(sample["prompt"])
    return [{"step": m["step"], "lr": m.get("lr"), "reward": m.get("reward"), "prompts": prompts.get(m["step"], [])}
            for m in jsonl(run_dir / "metrics.jsonl") if m.get("kind") == "train"]


def train_and_evaluate(spec: dict, result: dict) -> None:
    import torch

    from grpokit import __version__
    from grpokit.train import train

    torch.set_num_threads(spec["threads"])
    recipe = load_bench_recipe(spec)
    evaluate = GreedyAccuracy(recipe, held_out_rows(recipe, spec["eval_size"]))
    timeline = Timeline(spec["interval_s"], recipe.training.max_steps)
    step_time: dict[int, float] = {}
    result["versions"] = {"grpokit": __version__, "torch": torch.__version__}

    def progress(step: int, metrics: dict) -> None:
        step_time[step] = metrics["step_time_s"]

    def on_step(run, step: int) -> None:
        model = run.policy.model
        if step == 0:
            result["model"] = model_facts(model)
            timeline.start(lambda: evaluate(model))
        elif timeline.after_step(step, step_time[step], lambda: evaluate(model)) and step < recipe.training.max_steps:
            os.kill(os.getpid(), signal.SIGTERM)  # grpokit's graceful stop: ends the run after this step

    try:
        run_dir = train(recipe, overwrite=True, progress=progress, on_step=on_step)
    finally:
        evaluate.close()
        result.update(timeline.as_dict())
    result["steps"] = step_records(run_dir)
    result["run_status"] = json.loads((run_dir / "run.json").read_text()).get("status")


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result: dict = {"framework": "grpokit", "label": spec["label"]}
    return run_and_report(spec, result, lambda: train_and_evaluate(spec, result))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
