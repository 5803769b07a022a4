"""The accuracy judge (grpokit/rewards/maths.py): one test per rule of its module docstring,
hand-written cases, and every GSM8K gold solution judged correct against its own answer."""

import faulthandler
import threading

import pytest

from grpokit.data.loaders import find_gsm8k, gsm8k_answer, read_jsonl
from grpokit.errors import DataError
from grpokit.rewards import maths
from grpokit.rewards.maths import accuracy, final_answer, is_correct, reference_answer
from grpokit.rewards.registry import REWARDS, run_in_of

SURVEY = "Each survey has 10 questions, so he answered 10 * 7 = <<10*7=70>>70 questions.\n#### 70"


@pytest.fixture
def no_math_verify(monkeypatch):
    """Fail if math-verify is reached: the case must be settled by the numeric fast path."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"math-verify was called with {args!r}")

    monkeypatch.setattr(maths, "parse", refuse)
    monkeypatch.setattr(maths, "verify", refuse)


# ---------------------------------------------------------------- rule 1: the committed segment


@pytest.mark.parametrize("reply, segment", [
    ("So \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # balanced braces
    ("\\fbox{7} is it", "7"),
    ("\\boxed{3}, no: \\boxed{4}", "4"),  # the last of two boxes
    ("$\\boxed{\\{1, 2\\}}$", "\\{1, 2\\}"),  # "\{" is a literal brace, not grouping
    ("\\boxed{5}. Check: 5+1=6", "5"),  # a later number is no commitment
    ("The answer is \\boxed{72}.", "72"),  # the box starts after the phrase
    ("\\boxed{\\text{the answer is } 5}", "\\text{the answer is } 5"),  # a phrase inside the box is the box's
    ("\\boxed{3} Wait, I was wrong: the answer is 4.", "4"),  # the phrase starts last
    ("The answer is 3. No, the answer is 4.", "4"),  # the last of two phrases
    ("#### 3\nActually, final answer: 4", "4"),
    ("Answer: 3\n#### 4", "4"),
    ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
    ("#### 1,000", "1,000"),
    ("The answer is 72. I double-checked 71.", "72"),  # a phrase takes its own sentence only
    ("THE ANSWER IS 3.5.", "3.5"),  # "3.5" does not end the sentence; the final "." does
    ("so the answer is 10 * 7 = 70 questions", "70 questions"),  # after the last "="
    ("So the answer is 10*7=<<10*7=70>>70.", "70"),  # GSM8K calculator annotations are removed first
    ("Final answer: $x = \\frac{3}{4}$.", "\\frac{3}{4}"),  # delimiters dropped, then "="
    ("**Answer:** 12\nThat is all.", "12"),
    ("Final answer:\n\n72", "72"),  # the phrase ends its line: the next non-blank line
    ("Answer is -3 dollars!", "-3 dollars"),
    ("I get 10, then 70.", "70"),  # no marker: the last number
    ("x is 5 - 3", "3"),  # a minus after a digit is subtraction, not a sign
    ("x = -3", "-3"),
    ("12 apples cost $\\frac{3}{4}$ each", "\\frac{3}{4}"),  # the maths span ends after the last number
    ("It is $\\frac{3}{4}$, or 0.75", "0.75"),  # the last number ends after the span
    ("答案：72元", "72"),
    ("She answered \\boxed{7", "7"),  # unclosed box: no commitment, the last number judges
    ("\\boxed{", None),
    ("\\boxed{}", None),  # a blank commitment commits to nothing
    ("The answer is", None),
    ("", None),
    ("no number here", None),
])
def test_final_answer_is_the_last_commitment(reply, segment):
    assert final_answer(reply) == segment


# ---------------------------------------------------------------- rule 2: nothing else counts


@pytest.mark.parametrize("reply, reference", [
    (SURVEY, "10"),  # issue #13: the earlier 10 must not score
    ("Each survey has 10 questions. \\boxed{70}", "10"),
    ("Each survey has 10 questions, so the answer is 70.", "10"),
    ("Each survey has 10 questions, so he answered 70", "10"),  # no marker: the last number is wrong
    ("First $10$, then $\\frac{1}{2}$", "10"),
    ("\\boxed{10} is wrong; the answer is 70", "10"),
])
def test_an_earlier_right_number_never_rescues_a_wrong_answer(reply, reference):
    assert not is_correct(reply, reference)
    assert is_correct(reply, final_answer(reply))  # the same replies do commit to an answer


# ---------------------------------------------------------------- rule 3: comparison


@pytest.mark.parametrize("reply, reference, expected", [
    ("#### 1,000", "1000.0", True),  # thousands separators, by value
    ("The answer is 1,234,567.", "1234567", True),
    ("The answer is $18.", "\\$18", True),  # currency on either side
    ("The answer is \\$18 dollars.", "18", True),
    ("#### 70 questions", "70", True),  # unit words after the reply's number
    ("The answer is -5.", "-5", True),
    ("The answer is -5.", "5", False),
    ("#### 2.50", "2.5", True),
    ("#### 0.1", "0.1000000000001", True),  # within 1e-9
    ("#### 0.1", "0.100001", False),
    ("#### 71", "72", False),
])
def test_plain_numbers_compare_by_value_without_math_verify(reply, reference, expected, no_math_verify):
    assert is_correct(reply, reference) is expected


@pytest.mark.parametrize("reply, reference, expected", [
    ("\\boxed{\\frac{1}{2}}", "1/2", True),
    ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("\\boxed{\\frac{1}{3}}", "0.5", False),
    ("The answer is $\\frac{140}{2}$", "70", True),
    ("#### 2 pi", "2", False),  # "pi" is no unit: math-verify reads 2π
    ("\\boxed{\\sqrt 2}", "\\sqrt{2}", True),  # a bare LaTeX reference is parsed as $…$
    ("\\boxed{(1,2)}", "(1, 2)", True),  # the interval, not 2
    ("\\boxed{x = 5}", "5", True),
    ("The answer is 70 questions", "\\frac{140}{2}", True),  # the unit words stay out of math-verify
])
def test_other_answers_go_to_math_verify(reply, reference, expected):
    assert is_correct(reply, reference) is expected


def test_math_verify_timeout_is_always_on(monkeypatch):
    seen = []

    def spy(fn, key):
        def call(*args, **kwargs):
            seen.append(kwargs[key])
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(maths, "parse", spy(maths.parse, "parsing_timeout"))
    monkeypatch.setattr(maths, "verify", spy(maths.verify, "timeout_seconds"))
    assert is_correct("\\boxed{\\frac{1}{2}}", "\\sqrt{2}/\\sqrt{8}") is True
    assert len(seen) >= 3 and set(seen) == {5}  # never None or 0, which turn the timeout off


def test_math_verify_bomb_is_judged_wrong_within_its_timeout():
    # 9^(9^(9^9)) cannot be compared in time; math-verify answers its timeout with "no match",
    # so the row is wrong (its own fault) and the call does not fail. The dump guards against
    # a hang (math-verify's signal.alarm not firing) killing CI silently.
    faulthandler.dump_traceback_later(120, exit=True)
    try:
        assert is_correct("\\boxed{9^{9^{9^{9}}}}", "10") is False
    finally:
        faulthandler.cancel_dump_traceback_later()


def test_math_verify_errors_propagate_off_the_main_thread():
    # off the main thread math-verify's signal.alarm timeout cannot work: the error must
    # reach the reward runner, not become a silent 0.0; plain numbers never need it
    outcomes = {}

    def work():
        outcomes["numbers"] = accuracy(None, ["#### 72", "#### 71"], answer=["72", "72"])
        try:
            accuracy(None, ["\\boxed{\\frac{1}{2}}"], answer=["0.5"])
        except ValueError as exc:
            outcomes["maths"] = exc

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert outcomes["numbers"] == [1.0, 0.0]
    assert "threaded environment" in str(outcomes["maths"])


# ---------------------------------------------------------------- rule 4: the reference


@pytest.mark.parametrize("reference, expected", [
    ("#### 72", "72"),
    ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 1,072", "1,072"),  # a GSM8K solution
    ("So $x = 3$ and the area is $\\boxed{\\frac{9}{2}}$. Check: $\\boxed{4}$ is wrong", "4"),  # the last box
    ("Hence $\\boxed{\\frac{9}{2}}$.", "\\frac{9}{2}"),  # a MATH / open-r1 solution
    (" \\sqrt{2} ", "\\sqrt{2}"),
    (72, "72"),
])
def test_reference_answer(reference, expected):
    assert reference_answer(reference) == expected


def test_worked_solutions_as_references():
    assert is_correct("\\boxed{4.5}", "The area is $\\frac{1}{2} \\cdot 3 \\cdot 3 = \\boxed{\\frac{9}{2}}$.")
    assert not is_correct("The area is \\boxed{3}", "The area is $\\frac{1}{2} \\cdot 3 \\cdot 3 = \\boxed{\\frac{9}{2}}$.")
    assert is_correct("The answer is 1072.", "He has 1,000 + 72 = <<1000+72=1072>>1,072 apples.\n#### 1,072")


# ---------------------------------------------------------------- interface


def test_accuracy_interface():
    assert REWARDS["accuracy"] is accuracy and run_in_of(accuracy) == "main"
    assert accuracy(None, [[{"role": "assistant", "content": "So \\boxed{42}"}], "41"], answer=["42", "42"]) == [1.0, 0.0]
    assert accuracy(None, ["42", "42"], answer=["42", None]) == [1.0, None]
    assert accuracy(None, ["42"]) == [None]


# ---------------------------------------------------------------- GSM8K gold solutions


def _gsm8k_rows() -> list[dict]:
    try:
        folder = find_gsm8k(None)
    except DataError:
        pytest.skip("GSM8K files not found (shared/data/gsm8k beside the repo)")
    return read_jsonl(folder / "train.jsonl") + read_jsonl(folder / "test.jsonl")


def test_every_gsm8k_gold_solution_is_correct(no_math_verify):
    # the numeric fast path settles every row (no_math_verify), which keeps 8.8k rows fast
    rows = _gsm8k_rows()
    assert len(rows) > 8000
    wrong = [row["_line"] for row in rows
             if not (is_correct(row["answer"], gsm8k_answer(row["answer"])) and is_correct(row["answer"], row["answer"]))]
    assert wrong == []
