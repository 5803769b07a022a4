"""Built-in verifiable tasks: seeded question generators with exact answers.

They let a recipe run with no data files, and their answers are unambiguous, so a
reward can check them. Each generator returns rows ``{"prompt", "answer", ...}``.
"""

from __future__ import annotations

import random
from typing import Callable

from grpokit.errors import DataError

Row = dict


def larger_number(rng: random.Random) -> Row:
    """"Which number is larger, A or B?": two distinct two-digit numbers; answer the larger."""
    a, b = rng.sample(range(10, 100), 2)
    return {
        "prompt": f"Which number is larger, {a} or {b}? Answer with the number only.",
        "answer": str(max(a, b)),
        "a": a,
        "b": b,
    }


def greater_yes_no(rng: random.Random) -> Row:
    """"Is A greater than B?": a balanced yes/no comparison of two distinct two-digit numbers."""
    a, b = rng.sample(range(10, 100), 2)
    return {"prompt": f"Is {a} greater than {b}? Answer yes or no.", "answer": "yes" if a > b else "no", "a": a, "b": b}


def addition(rng: random.Random) -> Row:
    """"What is a + b?" with one-digit operands."""
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return {"prompt": f"What is {a} + {b}? Answer with the number only.", "answer": str(a + b), "a": a, "b": b}


def multi_sum(rng: random.Random) -> Row:
    """"What is a + b + c?" with three 3-4 digit numbers: hard for a 135M model by heart, exact with the
    calculator environment. ``messages`` is a demonstration for an SFT warm start: the tool call
    (the ``calculate`` tool of ``rollout.environment: calculator``), its result, then the answer."""
    numbers = [rng.randint(100, 9999) for _ in range(3)]
    expression, total = " + ".join(map(str, numbers)), str(sum(numbers))
    prompt = f"What is {expression}? Use the calculator, then answer with the number only."
    call = '<tool_call>{"name": "calculate", "arguments": {"expression": "' + expression + '"}}</tool_call>'
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": call},
                {"role": "tool", "name": "calculate", "content": total}, {"role": "assistant", "content": total}]
    return {"prompt": prompt, "answer": total, "messages": messages}


TASKS: dict[str, Callable[[random.Random], Row]] = {
    "multi_sum": multi_sum,
    "larger_number": larger_number,
    "greater_yes_no": greater_yes_no,
    "addition": addition,
}


def make_task(name: str, train_size: int, eval_size: int, seed: int) -> tuple[list[Row], list[Row]]:
    """Generate disjoint train and held-out rows: no held-out prompt appears in training."""
    if name not in TASKS:
        raise DataError(f"unknown built-in task {name!r} (data.source: builtin:{name}); choose one of {sorted(TASKS)}")
    return split_generated(TASKS[name], train_size, eval_size, seed, key=lambda row: row["prompt"],
                           what=f"task {name!r} has fewer than {eval_size} distinct questions")


def split_generated(generate: Callable[[random.Random], Row], train_size: int, eval_size: int, seed: int,
                    key: Callable[[Row], object], what: str) -> tuple[list[Row], list[Row]]:
    """``eval_size`` held-out rows distinct by ``key``, then ``train_size`` training rows whose key is
    not held out, all from one seeded stream; ``what`` is the DataError when the task runs out of
    distinct rows."""
    held_out: dict[object, Row] = {}
    rng = random.Random(seed)
    attempts = 0
    while len(held_out) < eval_size:
        row = generate(rng)
        held_out.setdefault(key(row), row)
        attempts += 1
        if attempts > 100 * (eval_size + 1):
            raise DataError(f"{what}; lower data.eval_size")
    train = [row for row in (generate(rng) for _ in range(train_size * 2)) if key(row) not in held_out][:train_size]
    return train, list(held_out.values())
