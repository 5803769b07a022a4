"""``code_execution``: run the completion's Python program against the row's tests in a sandbox.

Reward for one completion (the formula)::

    reward = passed / total      if the program ran to the end and the tests were run
    reward = 0.0                 if the program crashed (an uncaught exception, a non-zero
                                 ``sys.exit``), timed out, or hit a limit (CPU, memory, processes)
    reward = None                if the row has no tests (the reward does not apply)

``total`` counts tests from the row's ``tests`` column:

- a list of strings: each entry is one test; it passes when it runs without an exception;
- one string: each top-level ``assert`` statement is one test, and the other top-level
  statements (imports, helpers) run in order as setup; a failing assert does not stop the
  ones after it. A string without a top-level ``assert`` (HumanEval's ``def check(...)``
  then ``check(f)``) is one test.

The program is the last fenced ```` ```python ```` block of the completion, else the last
fenced block of any language, else the whole text (an unclosed final fence — a truncated
generation — counts up to the end). The program and the tests share one namespace and run
as ``__main__``, with the standard library only and an empty stdin; ``sys.exit(0)`` in the
program does not skip the tests.

Each completion runs in its own ``run_sandboxed`` process (see ``grpokit.rewards.sandbox``
for what is and is not protected), at most ``MAX_PARALLEL`` at once.

Reward hacking: results come back as one line tagged with a random per-run nonce, so
printing fake results or exiting early earns nothing. Code that reads the harness (its
own ``__file__``, stack frames) could still find the nonce, and objects whose ``__eq__``
always returns True pass ``assert f(x) == y``; check samples for such tricks.
"""

from __future__ import annotations

import ast
import math
import re
import secrets
from concurrent.futures import ThreadPoolExecutor

from grpokit.errors import RewardError
from grpokit.rewards.registry import register
from grpokit.rewards.rewardset import completion_text
from grpokit.rewards.sandbox import active_protections, run_sandboxed

MAX_PARALLEL = 4  # sandboxes at once; each is a whole Python process
PYTHON_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
ANY_FENCE = re.compile(r"```[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)

# Runs inside the sandbox. {program}, {tests}, {nonce} are filled with repr() literals.
HARNESS = """\
import os as _os, sys as _sys

def _grpokit_run(program, tests, nonce):
    out = _os.dup(1)  # report on our own copy of stdout, whatever the program does to sys.stdout
    scope = {{"__name__": "__main__", "__builtins__": __builtins__}}
    try:
        exec(compile(program, "solution.py", "exec"), scope)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            _os._exit(3)
    except BaseException:
        import traceback
        traceback.print_exc()
        _os._exit(3)  # the program crashed: no result line, reward 0
    marks = []
    for kind, source in tests:
        try:
            exec(compile(source, "tests.py", "exec"), scope)
            passed = True
        except BaseException:
            passed = False
        if kind == "test":
            marks.append("1" if passed else "0")
    for stream in (_sys.stdout, _sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    _os.write(out, ("\\n" + nonce + " " + "".join(marks) + "\\n").encode())
    _os._exit(0)  # skip the program's atexit handlers and threads

_grpokit_run({program}, {tests}, {nonce})
"""


def extract_program(text: str) -> str:
    """The last ```python block, else the last fenced block, else the whole text."""
    for fence in (PYTHON_FENCE, ANY_FENCE):
        blocks = fence.findall(text)
        if blocks:
            return blocks[-1]
    return text


def split_tests(tests: str | list[str], row: int) -> list[tuple[str, str]]:
    """``[(kind, source)]`` with kind ``"test"`` (counted) or ``"setup"`` (run, not counted)."""
    if isinstance(tests, str):
        try:
            statements = ast.parse(tests).body
        except SyntaxError as exc:
            raise RewardError(f"code_execution: the tests of row {row} are not valid Python "
                              f"(line {exc.lineno}: {exc.msg}); fix the dataset's 'tests' column") from None
        if not any(isinstance(s, ast.Assert) for s in statements):
            return [("test", tests)]
        return [("test" if isinstance(s, ast.Assert) else "setup", ast.unparse(s)) for s in statements]
    if isinstance(tests, (list, tuple)) and all(isinstance(t, str) for t in tests):
        return [("test", t) for t in tests]
    raise RewardError(f"code_execution: the tests of row {row} must be a string or a list of strings, "
                      f"not {type(tests).__name__}")


def score_program(program: str, tests: list[tuple[str, str]], timeout_s: float, memory_mb: int) -> float:
    """Run ``program`` then ``tests`` in a sandbox; the fraction of tests passed (0.0 on a crash)."""
    nonce = secrets.token_hex(16)
    script = HARNESS.format(program=repr(program), tests=repr(tests), nonce=repr(nonce))
    result = run_sandboxed(script, timeout_s=timeout_s, cpu_s=math.ceil(timeout_s), memory_mb=memory_mb)
    total = sum(kind == "test" for kind, _ in tests)
    if result.timed_out or result.killed or result.returncode != 0:
        return 0.0
    lines = [line for line in result.stdout.splitlines() if line.startswith(nonce + " ")]
    marks = lines[-1][len(nonce) + 1:] if lines else ""
    if len(marks) != total:  # no (or a mangled) result line: the harness did not finish
        return 0.0
    return marks.count("1") / total


@register("code_execution")
def code_execution(prompts, completions, tests=None, timeout_s: float = 5.0, memory_mb: int = 512,
                   **_) -> list[float | None]:
    """Fraction of the row's tests the completion's program passes; see the module docstring."""
    if tests is None:
        return [None] * len(completions)
    if len(tests) != len(completions):
        raise RewardError(f"code_execution: {len(tests)} rows of 'tests' for {len(completions)} completions")
    jobs = {}
    for i, (completion, row_tests) in enumerate(zip(completions, tests)):
        if row_tests:  # None, "" or [] -> the reward does not apply
            jobs[i] = (extract_program(completion_text(completion)), split_tests(row_tests, i))
    rewards: list[float | None] = [None] * len(completions)
    if not jobs:
        return rewards
    with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(jobs))) as pool:
        futures = {i: pool.submit(score_program, program, row_tests, timeout_s, memory_mb)
                   for i, (program, row_tests) in jobs.items()}
        for i, future in futures.items():
            rewards[i] = future.result()
    return rewards


# called once when a run starts (RewardComponent): say which sandbox protections are active
code_execution.grpokit_prepare = active_protections  # type: ignore[attr-defined]
