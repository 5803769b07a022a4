"""Evaluate a policy on held-out rows: greedy decoding, the recipe's rewards, accuracy.

Accuracy is the share of rows whose ``accuracy_reward`` component is >= 1 (a correct
answer under that reward's reading of the reply). Greedy decoding makes it deterministic.
"""

from __future__ import annotations

from statistics import mean
from typing import Any

from grpokit.rewards import RewardSet
from grpokit.rollout import TorchSampler, encode_prompts


def columns_of(rows: list[dict]) -> dict[str, list]:
    """Dataset columns other than the prompt, as lists aligned with ``rows`` (TRL's kwargs)."""
    keys = sorted({k for row in rows for k in row if k != "prompt"})
    return {k: [row.get(k) for row in rows] for k in keys}


def as_completions(prompts: list, texts: list[str]) -> list:
    """TRL's convention: conversational prompts get completions as assistant message lists."""
    return [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in zip(prompts, texts)]


def evaluate(policy, rows: list[dict], rewards: RewardSet, accuracy_reward: str, *, chat_template: bool,
             system_prompt: str | None, max_prompt_length: int, max_completion_length: int,
             batch_size: int = 64, num_samples: int = 16) -> dict[str, Any]:
    """Return accuracy, mean rewards, mean completion length and a few verbatim samples."""
    sampler = TorchSampler(policy, max_completion_length)
    texts, lengths = [], []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        ids, _ = encode_prompts(policy.tokenizer, [r["prompt"] for r in batch], chat_template, system_prompt, max_prompt_length)
        out = sampler.generate(ids, num_generations=1, greedy=True)
        texts += policy.tokenizer.batch_decode(out.completion_ids_NC, skip_special_tokens=True)
        lengths += out.completion_lengths_N.tolist()
    prompts = [r["prompt"] for r in rows]
    total_N, parts = rewards(prompts, as_completions(prompts, texts), columns_of(rows))
    correct = [v is not None and v >= 1.0 for v in parts[accuracy_reward]]
    applicable = {name: [v for v in values if v is not None] for name, values in parts.items()}
    return {
        "accuracy": sum(correct) / max(len(rows), 1),
        "reward": total_N.mean().item() if rows else 0.0,
        "rewards": {name: (mean(v) if v else None) for name, v in applicable.items()},
        "completion_length": mean(lengths) if lengths else 0.0,
        "num_examples": len(rows),
        "accuracy_reward": accuracy_reward,
        "samples": [
            {"prompt": p if isinstance(p, str) else p[-1]["content"], "completion": t, "answer": r.get("answer"),
             "reward": total_N[i].item(), "correct": correct[i]}
            for i, (p, t, r) in enumerate(zip(prompts[:num_samples], texts, rows))
        ],
    }
