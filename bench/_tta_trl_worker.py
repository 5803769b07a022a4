"""TRL's half of bench/time_to_accuracy.py: GRPOTrainer on the demo recipe, in its own process.

    python bench/_tta_trl_worker.py SPEC.json     # SPEC written by time_to_accuracy.py

The recipe is read with grpokit's loader and mapped onto GRPOConfig (``trl_config``), in TRL's
fastest configuration on this machine: bf16, SDPA attention, no gradient checkpointing, no vLLM.
What grpokit does its own way is made to match:

- the prompts: the training rows in the order grpokit draws them (grpokit's own ``next_prompts``
  on the same seeded shuffle, reshuffles between epochs included), TRL's shuffling off;
- the rewards: each recipe component as grpokit builds and calls it (``RewardComponent``), weighted
  by TRL's ``reward_weights``;
- the learning rate: grpokit's ``lr_factor`` (warm-up from 1/w of the peak, then the recipe's decay over
  grpokit's max_steps, held at its floor after), where HF's own warm-up would start from 0.

The model is evaluated on the training clock from a TrainerCallback: on_step_begin -> on_step_end spans
generation, reward, reference pass, update and optimiser step (what step_speed's TRL worker times).
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

# bench/ is on sys.path: workers run as scripts
from _tta_eval import GreedyAccuracy, Timeline, held_out_rows, load_bench_recipe, model_facts
from _worker_common import run_and_report

ADVANTAGE_TO_SCALE_REWARDS = {"group_std": "group", "group_mean": "none", "batch_std": "batch"}


def check_mappable(recipe) -> None:
    """Refuse a recipe that uses what ``trl_config`` does not carry over, rather than compare unlike runs."""
    algo, shaping = recipe.algorithm, recipe.reward_shaping
    unsupported = {
        "algorithm.advantage": algo.advantage not in ADVANTAGE_TO_SCALE_REWARDS,
        "algorithm.kl_estimator (TRL: k3)": algo.kl_estimator != "k3",
        "algorithm.dynamic_sampling": algo.dynamic_sampling, "algorithm.replay": algo.replay.capacity > 0,
        "algorithm.overlong_buffer": algo.overlong_buffer is not None,
        "reward_shaping.normalize / curriculum": shaping.normalize or bool(shaping.curriculum),
        "training.grad_accum": recipe.training.grad_accum != 1, "model.lora: null": recipe.model.lora is None,
        "model.lora.last_k_layers / modules_to_save": recipe.model.lora is not None and bool(
            recipe.model.lora.last_k_layers or recipe.model.lora.modules_to_save),
        "data.system_prompt": recipe.data.system_prompt is not None, "rollout.environment": recipe.rollout.environment,
    }
    used = [key for key, on in unsupported.items() if on]
    if used:
        raise ValueError(f"bench/_tta_trl_worker.py does not map {used} onto TRL")


def rows_in_grpokit_order(recipe, steps: int) -> list[dict]:
    """The prompts of ``steps`` steps in grpokit's order: its setup's seeded shuffle, then its own
    ``next_prompts`` (which reshuffles with the same generator at each epoch's end)."""
    from grpokit.data import load_splits
    from grpokit.train.run import next_prompts

    train_rows = load_splits(recipe.data)[0]
    rng = random.Random(recipe.training.seed)
    order = list(range(len(train_rows)))
    rng.shuffle(order)  # as grpokit.train.run.setup
    draws = SimpleNamespace(train_rows=train_rows, order=order, rng=rng, cursor=0)
    return next_prompts(draws, steps * recipe.training.prompts_per_step)


def trl_rewards(recipe, record: list) -> list:
    """The recipe's reward components as TRL reward functions; the first also records each call's prompts."""
    from grpokit.rewards.component import RewardComponent

    G = recipe.rollout.num_generations

    def as_trl(component, first: bool):
        def reward(prompts, completions, completion_ids=None, **columns):
            if first:  # one call per generation batch = per step here
                record.append(list(dict.fromkeys(p[-1]["content"] for p in prompts)))
            return component(prompts, completions, {**columns, "completion_ids": completion_ids}, G).values
        reward.__name__ = component.name
        return reward

    return [as_trl(RewardComponent(spec, recipe.python_path), i == 0) for i, spec in enumerate(recipe.rewards)]


def trl_config(recipe, spec: dict, use_cpu: bool):
    """GRPOConfig for the recipe: one optimiser step per generation batch of exactly P x G completions."""
    from trl import GRPOConfig

    algo, rollout, training = recipe.algorithm, recipe.rollout, recipe.training
    P, G = training.prompts_per_step, rollout.num_generations
    bf16 = recipe.model.dtype == "bfloat16"
    return GRPOConfig(
        output_dir=spec["run_dir"], use_cpu=use_cpu, bf16=bf16, fp16=False, report_to="none", logging_steps=1,
        save_strategy="no", dataloader_num_workers=0, disable_tqdm=True, use_vllm=False,
        per_device_train_batch_size=P * G, gradient_accumulation_steps=1, steps_per_generation=1,
        num_iterations=algo.num_iterations, num_generations=G, max_completion_length=rollout.max_completion_length,
        temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k, min_p=None, repetition_penalty=1.0,
        beta=algo.beta, loss_type=algo.loss_type, scale_rewards=ADVANTAGE_TO_SCALE_REWARDS[algo.advantage],
        epsilon=algo.clip_range[0], epsilon_high=algo.clip_range[1], importance_sampling_level=algo.importance_level,
        mask_truncated_completions=algo.mask_truncated_completions, top_entropy_quantile=algo.top_entropy_quantile,
        reward_weights=[s.weight for s in recipe.rewards],
        learning_rate=training.learning_rate, weight_decay=training.weight_decay, max_grad_norm=training.max_grad_norm,
        max_steps=spec["max_steps"], shuffle_dataset=False, seed=training.seed, gradient_checkpointing=False,
        model_init_kwargs={"dtype": recipe.model.dtype, "attn_implementation": "sdpa"},
        remove_unused_columns=False, log_completions=False,
    )


def trainer_with_grpokit_schedule(recipe):
    """GRPOTrainer whose learning rate follows grpokit's ``lr_factor`` for the recipe, update by update."""
    import torch
    from trl import GRPOTrainer

    from grpokit.train.schedule import lr_factor

    training = recipe.training

    class Trainer(GRPOTrainer):
        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer,
                    lambda u: lr_factor(u, training.warmup_steps, training.max_steps, training.lr_schedule))
                self._created_lr_scheduler = True
            return self.lr_scheduler

    return Trainer


def clocked_callback(timeline: Timeline, evaluate: GreedyAccuracy, log: list):
    """Evaluates before training and, on the training clock, after steps; stops training when the timeline says."""
    from transformers import TrainerCallback

    class Clocked(TrainerCallback):
        begin = 0.0

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            timeline.start(lambda: evaluate(model))

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            seconds = time.perf_counter() - self.begin
            if timeline.after_step(state.global_step, seconds, lambda: evaluate(model)):
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "learning_rate" in logs:
                log.append({"lr": logs["learning_rate"], "reward": logs.get("reward")})

    return Clocked()


def train_and_evaluate(spec: dict, result: dict) -> None:
    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig

    from grpokit.models import resolve_model_dir
    from grpokit.models.loading import pick_device

    torch.set_num_threads(spec["threads"])
    recipe = load_bench_recipe(spec)
    check_mappable(recipe)
    result["versions"] = {"trl": trl.__version__, "torch": torch.__version__}
    rows = rows_in_grpokit_order(recipe, spec["max_steps"])
    dataset = Dataset.from_list([{**row, "prompt": [{"role": "user", "content": row["prompt"]}]} for row in rows])
    lora = recipe.model.lora
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=lora.target_modules, task_type="CAUSAL_LM")
    prompts, log = [], []
    evaluate = GreedyAccuracy(recipe, held_out_rows(recipe, spec["eval_size"]))
    timeline = Timeline(spec["interval_s"], spec["max_steps"], budget_s=spec["budget_s"])
    config = trl_config(recipe, spec, use_cpu=pick_device(recipe.model.device).type == "cpu")
    trainer = trainer_with_grpokit_schedule(recipe)(
        model=resolve_model_dir(recipe.model.path), reward_funcs=trl_rewards(recipe, prompts), args=config,
        train_dataset=dataset, peft_config=peft_config, callbacks=[clocked_callback(timeline, evaluate, log)])
    result["model"] = model_facts(trainer.model)
    result["gradient_checkpointing"] = config.gradient_checkpointing
    try:
        trainer.train()
    finally:
        evaluate.close()
        result.update(timeline.as_dict())
    result["steps"] = [{"step": i + 1, "prompts": prompts[i] if i < len(prompts) else [], **entry}
                       for i, entry in enumerate(log)]


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result: dict = {"framework": "trl", "label": spec["label"]}
    return run_and_report(spec, result, lambda: train_and_evaluate(spec, result))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
