"""One grpokit training run for bench/step_speed.py, in its own process (so its peak RSS is its own).

    python bench/_grpokit_worker.py SPEC.json     # SPEC written by step_speed.py; writes spec["result_path"]

Per step it reports grpokit's own ``step_time_s`` and ``completion_length`` (metrics.jsonl), the
prompts and completion count of the step (samples.jsonl, which logs every completion here), and
the prompt tokens per step counted with the model's chat template.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from _worker_common import run_and_report  # bench/ is on sys.path: workers run as scripts


def build_recipe(spec: dict):
    from grpokit.config import recipe_from_dict

    n = spec["prompts"] * spec["generations"]
    model = {"path": spec["model"], "dtype": spec["dtype"],
             "lora": None if spec["full"] else {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}}
    if spec.get("attn"):
        model["attn_implementation"] = spec["attn"]
    return recipe_from_dict({
        "model": model,
        "data": {"source": "builtin:larger_number", "train_size": spec["train_size"], "eval_size": spec["eval_size"],
                 "seed": spec["data_seed"]},
        "rollout": {"num_generations": spec["generations"], "max_completion_length": spec["max_completion_length"],
                    "temperature": 1.0, "top_p": 1.0, "top_k": 0},
        "algorithm": {"beta": spec["beta"], "num_iterations": 1},
        "rewards": [{"name": "answer_match", "args": {"extract": "first_number"}}],
        "training": {"learning_rate": spec["lr"], "warmup_steps": 0, "lr_schedule": "constant",
                     "max_steps": spec["total_steps"], "prompts_per_step": spec["prompts"], "grad_accum": 1,
                     "seed": spec["seed"], "eval_every": 0, "save_every": 0, "output_dir": spec["run_dir"],
                     "num_threads": spec["threads"]},
        "eval": {"batch_size": 64, "num_samples": 0},
        # samples.jsonl gets every completion of every step: it tells which prompts and how many completions
        "logging": {"samples_every": 1, "num_samples": 2 * n, "progress": False},
    }, origin="bench/step_speed.py")


def prompt_token_counter(model_dir: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)

    def count(prompt: str) -> int:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return len(tok(text, add_special_tokens=False)["input_ids"])
    return count


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result: dict = {"framework": "grpokit", "label": spec["label"], "dtype": spec["dtype"]}

    def measure() -> None:
        import torch

        torch.set_num_threads(spec["threads"])
        from grpokit.train import train

        run_dir = train(build_recipe(spec), overwrite=True)
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        steps = [x for x in lines if x.get("kind") == "train"]
        samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines() if x.strip()]
        count = prompt_token_counter(spec["model"])
        per_step = []
        for row in steps:
            mine = [s for s in samples if s["step"] == row["step"]]
            prompts = list(dict.fromkeys(s["prompt"] for s in mine))  # in order, one per group
            completions = len(mine)
            per_step.append({
                "step": row["step"], "step_time_s": row["step_time_s"], "generate_time_s": row.get("generate_time_s"),
                "completions": completions, "mean_completion_length": row["completion_length"],
                "completion_tokens": row["completion_length"] * completions,
                "prompt_tokens": sum(count(p) for p in prompts) * spec["generations"],
                "prompts": prompts, "reward": row.get("reward"), "kl": row.get("kl"),
                "grpokit_tokens_per_s": row.get("tokens_per_s"),
            })
        result["steps"] = per_step

    return run_and_report(spec, result, measure)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
