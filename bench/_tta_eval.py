"""What both workers of bench/time_to_accuracy.py share: the recipe, the held-out rows, the one
greedy evaluation, and the training clock that decides when to evaluate and when to stop.

The evaluation is deliberately framework-neutral: a plain ``model.generate`` on the live (PEFT)
model each framework trains, prompts encoded by grpokit's own PromptEncoder (the chat template
as grpokit applies it, left padding), a tokenizer loaded from the model directory by this module
(not either trainer's, so neither framework's tokenizer tweaks reach it), and correctness read by
the recipe's accuracy reward through grpokit's RewardSet, exactly as ``grpokit.eval`` reads it
(the component's value >= 1). Both frameworks are thus scored by the same code on the same rows.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

TARGETS = (0.5, 0.9)  # the accuracies whose minutes are reported; the last one is the stop target


def load_bench_recipe(spec: dict):
    """The demo recipe through grpokit's own loader, with the bench's few overrides (``KEY=VALUE``)."""
    from grpokit.config import load_recipe

    return load_recipe(spec["recipe"], spec["overrides"])


def held_out_rows(recipe, count: int) -> list[dict]:
    """The first ``count`` of the recipe's held-out rows. data.eval_size itself stays as the recipe has it:
    a built-in task draws its held-out rows and its training rows from one seeded stream, so changing it
    would change the training data too."""
    from grpokit.data import load_splits

    return load_splits(recipe.data)[1][:count]


def model_facts(model) -> dict:
    """What may differ between the two frameworks' copies of the same model: the attention kernel, the
    dtypes of trainable and frozen weights, and of buffers (e.g. RoPE frequencies, fp32 unless cast)."""
    def dtypes(tensors) -> list[str]:
        return sorted({str(t.dtype).replace("torch.", "") for t in tensors})

    return {"attn_implementation": getattr(model.config, "_attn_implementation", None),
            "trainable_dtypes": dtypes(p for p in model.parameters() if p.requires_grad),
            "frozen_dtypes": dtypes(p for p in model.parameters() if not p.requires_grad),
            "buffer_dtypes": {name.rsplit(".", 1)[-1]: str(b.dtype).replace("torch.", "")
                              for name, b in model.named_buffers()}}


class GreedyAccuracy:
    """Greedy held-out accuracy of a live causal LM, the same for every framework (see the module's docstring)."""

    def __init__(self, recipe, rows: list[dict]):
        from transformers import AutoTokenizer

        from grpokit.models import resolve_model_dir
        from grpokit.rewards import RewardSet
        from grpokit.rollout import PromptEncoder

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(recipe.model.path))
        if tokenizer.pad_token_id is None:  # as grpokit's wrap_policy does
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer, self.rows = tokenizer, rows
        self.encoder = PromptEncoder(tokenizer, recipe.data.chat_template, recipe.data.system_prompt,
                                     recipe.rollout.max_prompt_length)
        self.max_new_tokens, self.batch_size = recipe.rollout.max_completion_length, recipe.eval.batch_size
        self.reward_name = recipe.accuracy_reward
        self.rewards = RewardSet([s for s in recipe.rewards if s.name == self.reward_name], recipe.python_path)

    def __call__(self, model) -> dict:
        """Accuracy and per-row correctness; the model is put in eval mode for it and back as it was."""
        from grpokit.rewards import as_completions, columns_of

        was_training = model.training
        model.eval()
        try:
            texts = [t for start in range(0, len(self.rows), self.batch_size)
                     for t in self._generate(model, self.rows[start:start + self.batch_size])]
        finally:
            model.train(was_training)
        prompts = [row["prompt"] for row in self.rows]
        _, parts = self.rewards(prompts, as_completions(prompts, texts), columns_of(self.rows))
        correct = [v is not None and v >= 1.0 for v in parts[self.reward_name]]
        return {"accuracy": sum(correct) / max(1, len(correct)), "num_correct": sum(correct),
                "num_examples": len(correct), "correct": [int(c) for c in correct], "samples": texts[:4]}

    def _generate(self, model, rows: list[dict]) -> list[str]:
        """One batch decoded greedily (EOS, or the recipe's completion limit, ends a reply)."""
        import torch
        from transformers import GenerationConfig

        from grpokit.models.loading import eos_token_ids

        batch = self.encoder(rows)
        config = GenerationConfig(do_sample=False, max_new_tokens=self.max_new_tokens, use_cache=True,
                                  pad_token_id=self.tokenizer.pad_token_id,
                                  eos_token_id=eos_token_ids(self.tokenizer, model))
        with torch.no_grad():
            out = model.generate(input_ids=batch.input_ids_BP.to(model.device),
                                 attention_mask=batch.attention_mask_BP.to(model.device), generation_config=config)
        return self.tokenizer.batch_decode(out[:, batch.input_ids_BP.size(1):], skip_special_tokens=True)

    def close(self) -> None:
        self.rewards.close()


@dataclass
class Timeline:
    """The training clock and the evaluations made on it.

    The clock is the sum of step times (generation, reward, reference, update, optimiser, anything the
    first steps compile), so evaluation and model loading never count. After each step, once the clock
    has passed the next mark (every ``interval_s``), the model is evaluated; also at 0 and after the
    last step. Training stops after ``max_steps``, once the target was held at two evaluations in a
    row, or once the clock passed ``budget_s`` (TRL: 4 x grpokit's minutes to the target).
    """

    interval_s: float
    max_steps: int
    budget_s: float | None = None
    target: float = TARGETS[-1]
    seconds: float = 0.0
    next_mark: float = 0.0
    step_times: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    stop_reason: str | None = None
    _wall0: float | None = None
    wall_s: float = 0.0  # wall time from the first step's start without evaluations: the clock + time between steps

    def start(self, evaluate: Callable[[], dict]) -> None:
        """The evaluation before training (clock 0); the wall clock starts after it."""
        self._evaluate(0, evaluate)
        self.next_mark = self.interval_s
        self._wall0 = time.perf_counter()

    def after_step(self, step: int, step_s: float, evaluate: Callable[[], dict]) -> bool:
        """Advance the clock by one step; evaluate when a mark was passed (or training ends). True: stop now."""
        self.wall_s = time.perf_counter() - self._wall0 - sum(e["eval_s"] for e in self.evals[1:])
        self.seconds += step_s
        self.step_times.append(step_s)
        over_budget = self.budget_s is not None and self.seconds >= self.budget_s
        last = step >= self.max_steps or over_budget
        if self.seconds >= self.next_mark or last:
            self._evaluate(step, evaluate)
            self.next_mark = (math.floor(self.seconds / self.interval_s) + 1) * self.interval_s
        if self.target_held():
            self.stop_reason = f"held >= {self.target:.0%} at two evaluations in a row"
        elif over_budget:
            self.stop_reason = f"training clock passed the budget of {self.budget_s / 60:.2f} min"
        elif step >= self.max_steps:
            self.stop_reason = f"reached max_steps ({self.max_steps})"
        return self.stop_reason is not None

    def target_held(self) -> bool:
        return len(self.evals) >= 2 and all(e["accuracy"] >= self.target for e in self.evals[-2:])

    def _evaluate(self, step: int, evaluate: Callable[[], dict]) -> None:
        t0 = time.perf_counter()
        result = evaluate()
        self.evals.append({"seconds": self.seconds, "step": step, **result, "eval_s": time.perf_counter() - t0})

    def as_dict(self) -> dict:
        return {"training_s": self.seconds, "steps_done": len(self.step_times), "step_times_s": self.step_times,
                "evals": self.evals, "stop_reason": self.stop_reason, "wall_s_without_evals": self.wall_s,
                "budget_s": self.budget_s, "interval_s": self.interval_s}
