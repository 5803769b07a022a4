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

Reward hacking: the verdict is made outside the program's process. A trusted judge process
forks the runner (program + tests) and only then reads the result nonce and the expected values
from stdin; it alone writes the result line. For a test ``assert <expr> == <literal>`` the runner
sends back only the value of ``<expr>`` as plain data (no objects, so an ``__eq__`` that always
returns True gets nothing) and the judge compares. Patching ``exec``/``os.write``, reading frames
or the script, or printing fake lines therefore earns nothing for such tests. Any other test
(``check(add)``, ``assert is_prime(7)``) is judged by the runner itself, and a program that
hooks the interpreter it shares with the tests can fake those; and a program may special-case
the test inputs it can read in its own script. See docs/sandbox.md.
"""

from __future__ import annotations

import ast
import marshal
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

# Runs inside the sandbox, as two processes. The judge (trusted: it never runs a line of the
# program) forks the runner, and only then reads the secrets from stdin: the result nonce and the
# expected values of the ``assert <expr> == <literal>`` tests. The runner closed its stdin before
# the program ran, so neither is ever in its memory; the judge is not dumpable, so the program
# (same uid, no capabilities) cannot read its memory or its fds either. The runner runs the
# program, then each test: for a value test it evaluates only ``<expr>`` and sends the value back
# as plain data (marshal); the judge compares it with the expected literal itself. For any other
# test the runner's own pass/fail is taken (forgeable: see the module docstring). The judge
# writes the one result line, tagged with the nonce.
# {program} and {tests} are filled with repr() literals.
HARNESS = """\
import marshal as _marshal, os as _os, sys as _sys

def _grpokit_plain(value, depth=0):
    # the value as plain data (subclasses of builtins become their base): a value, not an object
    kind = type(value)
    if kind in (int, float, complex, str, bytes, bool, type(None)):
        return value
    if depth > 100:
        raise ValueError("nested too deep")
    for base in (bool, int, float, complex, str, bytes):
        if isinstance(value, base):
            return base(value)
    if isinstance(value, dict):
        return {{_grpokit_plain(k, depth + 1): _grpokit_plain(v, depth + 1) for k, v in dict.items(value)}}
    for base in (list, tuple, set, frozenset):
        if isinstance(value, base):
            return base(_grpokit_plain(v, depth + 1) for v in base.__iter__(value))
    raise TypeError(f"not plain data: {{kind.__name__}}")

def _grpokit_run(program, tests, results):
    empty, closed = _os.pipe()
    _os.close(closed)
    _os.dup2(empty, 0)  # the program's stdin is empty; the judge's secrets stay with the judge
    _os.close(empty)
    _exec, _eval, _compile, _dumps, _write, _exit = exec, eval, compile, _marshal.dumps, _os.write, _os._exit
    _plain = _grpokit_plain
    scope = {{"__name__": "__main__", "__builtins__": __builtins__}}
    try:
        _exec(_compile(program, "solution.py", "exec"), scope)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            _exit(3)
    except BaseException:
        import traceback
        traceback.print_exc()
        _exit(3)  # the program crashed: no result, reward 0
    answers = []
    for kind, source in tests:
        if kind == "value":
            try:
                answers.append(("value", _plain(_eval(_compile(source, "tests.py", "eval"), scope))))
            except BaseException:
                answers.append(("error", None))
            continue
        try:
            _exec(_compile(source, "tests.py", "exec"), scope)
            passed = True
        except BaseException:
            passed = False
        if kind == "test":
            answers.append(("pass" if passed else "fail", None))
    for stream in (_sys.stdout, _sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    try:
        data = _dumps(answers)
    except BaseException:
        _exit(3)
    data = len(data).to_bytes(8, "big") + data
    while data:
        data = data[_write(results, data):]
    _exit(0)  # skip the program's atexit handlers and threads

def _grpokit_judge(program, tests):
    import ctypes
    if ctypes.CDLL(None).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE 0: no /proc/<pid>/mem, fd, ptrace
        _os._exit(4)
    read_end, write_end = _os.pipe()
    runner = _os.fork()
    if runner == 0:
        _os.close(read_end)
        _grpokit_run(program, tests, write_end)
        _os._exit(3)
    _os.close(write_end)
    nonce, expected = _sys.stdin.buffer.read().split()
    nonce, expected = nonce.decode(), _marshal.loads(bytes.fromhex(expected.decode()))
    def read(n):
        data = b""
        while len(data) < n:
            chunk = _os.read(read_end, n - len(data))
            if not chunk:
                _os._exit(3)  # the runner died before sending its answers
            data += chunk
        return data
    try:
        answers = _marshal.loads(read(int.from_bytes(read(8), "big")))
        counted = [kind for kind, _ in tests if kind != "setup"]
        if type(answers) is not list or len(answers) != len(counted):
            _os._exit(3)
        marks, values = [], iter(expected)
        for kind, answer in zip(counted, answers):
            if type(answer) is not tuple or len(answer) != 2:
                _os._exit(3)
            if kind == "value":
                want = next(values)
                marks.append("1" if answer[0] == "value" and _grpokit_is_plain(answer[1]) and answer[1] == want else "0")
            else:
                marks.append("1" if answer[0] == "pass" else "0")
    except Exception:
        _os._exit(3)
    _os.write(1, ("\\n" + nonce + " " + "".join(marks) + "\\n").encode())
    _os._exit(0)

def _grpokit_is_plain(value, depth=0):
    kind = type(value)
    if kind in (int, float, complex, str, bytes, bool, type(None)):
        return True
    if depth > 100 or kind not in (list, tuple, set, frozenset, dict):
        return False
    items = [x for pair in value.items() for x in pair] if kind is dict else value
    return all(_grpokit_is_plain(x, depth + 1) for x in items)

_grpokit_judge({program}, {tests})
"""


def value_test(source: str) -> tuple[str, object] | None:
    """``(expression, expected)`` for a test ``assert <expression> == <literal>`` (either side), else None."""
    try:
        statements = ast.parse(source).body
    except SyntaxError:
        return None
    if len(statements) != 1 or not isinstance(statements[0], ast.Assert):
        return None
    test = statements[0].test
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return None
    sides = []
    for side in (test.left, test.comparators[0]):
        try:
            sides.append((True, ast.literal_eval(side)))
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            sides.append((False, side))
    (left_literal, left), (right_literal, right) = sides
    if left_literal == right_literal:  # two literals, or two expressions: nothing to judge from outside
        return None
    expression, expected = (right, left) if left_literal else (left, right)
    try:
        marshal.dumps(expected)
    except ValueError:
        return None
    return ast.unparse(expression), expected


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
    queries, expected = [], []
    for kind, source in tests:
        judged = value_test(source) if kind == "test" else None
        if judged is None:
            queries.append((kind, source))
        else:
            queries.append(("value", judged[0]))
            expected.append(judged[1])
    script = HARNESS.format(program=repr(program), tests=repr(queries))
    result = run_sandboxed(script, timeout_s=timeout_s, cpu_s=math.ceil(timeout_s), memory_mb=memory_mb,
                           stdin=nonce + " " + marshal.dumps(expected).hex() + "\n")
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
