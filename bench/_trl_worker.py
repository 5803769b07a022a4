"""One TRL GRPOTrainer run for bench/step_speed.py, in its own process (so its peak RSS is its own).

    python bench/_trl_worker.py SPEC.json     # SPEC written by step_speed.py; writes spec["result_path"]

The dataset is given in the order grpokit draws its prompts and TRL's shuffling is off, so step k
trains on the same 4 prompts in both. Per-step wall time comes from a TrainerCallback
(on_step_begin -> on_step_end: generation, reward, reference pass, update, optimiser step); the
reward function records how many completions each step scored and their token lengths.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

from _worker_common import run_and_report  # bench/ is on sys.path: workers run as scripts


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result: dict = {"framework": "trl", "label": spec["label"], "dtype": "bfloat16" if spec["bf16"] else "float32"}
    return run_and_report(spec, result, lambda: result.update(steps=run(spec, result)))


def run(spec: dict, result: dict) -> list[dict]:
    import torch

    torch.set_num_threads(spec["threads"])
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpokit.rewards.builtin import answer_match

    result["versions"] = {"trl": trl.__version__, "torch": torch.__version__}
    P, G = spec["prompts"], spec["generations"]
    rows = spec["rows"]  # already in grpokit's draw order
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                                 for r in rows])
    scored: list[dict] = []  # one entry per reward call = per generation batch
    first_number = functools.partial(answer_match, extract="first_number")

    def answer_match_first_number(prompts, completions, completion_ids=None, answer=None, **kwargs):
        scored.append({"completions": len(completions),
                       "lengths": [len(c) for c in completion_ids] if completion_ids is not None else None,
                       "prompts": list(dict.fromkeys(p[-1]["content"] for p in prompts))})
        return first_number(prompts, completions, answer=answer)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin, self.times, self.logs = None, [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.begin)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                self.logs.append(dict(logs))

    model_kwargs = {"dtype": "bfloat16" if spec["bf16"] and not spec["full"] else "float32"}
    if spec.get("attn"):
        model_kwargs["attn_implementation"] = spec["attn"]
    config = GRPOConfig(
        output_dir=spec["run_dir"], use_cpu=True, bf16=spec["bf16"], fp16=False, report_to="none",
        logging_steps=1, save_strategy="no", dataloader_num_workers=0, disable_tqdm=True, use_vllm=False,
        # one optimiser step per generation batch of exactly P*G completions:
        # generation_batch_size = per_device_train_batch_size * processes(1) * steps_per_generation(1) = P*G
        per_device_train_batch_size=P * G, gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        num_generations=G, max_completion_length=spec["max_completion_length"],
        temperature=1.0, top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0,
        beta=spec["beta"], loss_type="grpo", scale_rewards="group", epsilon=0.2,
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        max_steps=spec["total_steps"], shuffle_dataset=False, seed=spec["seed"],
        gradient_checkpointing=spec["gradient_checkpointing"], model_init_kwargs=model_kwargs,
        remove_unused_columns=False, log_completions=False,
    )
    result["generation_batch_size"] = config.generation_batch_size
    result["steps_per_generation"] = config.steps_per_generation
    result["gradient_checkpointing"] = config.gradient_checkpointing
    peft_config = None if spec["full"] else LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                       target_modules="all-linear", task_type="CAUSAL_LM")
    timer = StepTimer()
    trainer = GRPOTrainer(model=spec["model"], reward_funcs=[answer_match_first_number], args=config,
                          train_dataset=dataset, peft_config=peft_config, callbacks=[timer])
    result["attn_implementation"] = getattr(trainer.model.config, "_attn_implementation", None)
    result["param_dtype"] = str(next(trainer.model.parameters()).dtype).replace("torch.", "")
    trainer.train()

    per_step, prev_tokens = [], 0.0
    for i, seconds in enumerate(timer.times):
        log = timer.logs[i] if i < len(timer.logs) else {}
        batch = scored[i] if i < len(scored) else {"completions": None, "lengths": None, "prompts": []}
        lengths = batch["lengths"]
        completion_tokens = sum(lengths) if lengths is not None else None
        seen = log.get("num_tokens")  # TRL: cumulative prompt + completion tokens (unpadded)
        per_step.append({
            "step": i + 1, "step_time_s": seconds, "completions": batch["completions"],
            "mean_completion_length": (completion_tokens / len(lengths)) if lengths else log.get("completions/mean_length"),
            "completion_tokens": completion_tokens,
            "prompt_tokens": (seen - prev_tokens - completion_tokens) if seen is not None and lengths else None,
            "prompts": batch["prompts"], "reward": log.get("reward"), "kl": log.get("kl"),
            "trl_mean_length": log.get("completions/mean_length"),
        })
        prev_tokens = seen if seen is not None else prev_tokens
    result["reward_calls"] = len(scored)
    return per_step


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
