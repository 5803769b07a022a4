"""Text rewards on fixed completions with hand-checked values."""


import pytest

from grpokit.errors import RewardError
from grpokit.rewards.builtin import format_regex
from grpokit.rewards.registry import REWARDS
from grpokit.rewards.maths import accuracy
from grpokit.rewards.text import cosine_length, label, length, repetition, tags, two_line_verdict


def chat(text):
    return [{"role": "assistant", "content": text}]


def test_every_text_reward_is_registered():
    for name, fn in [("accuracy", accuracy), ("label", label), ("tags", tags), ("two_line_verdict", two_line_verdict),
                     ("length", length), ("cosine_length", cosine_length), ("repetition", repetition)]:
        assert REWARDS[name] is fn
    assert REWARDS["format"] is format_regex


# ---------------------------------------------------------------- accuracy

GSM8K_SOLUTION = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = <<48+24=72>>72 clips.\n#### 72"


@pytest.mark.parametrize(
    "completion, reference, expected",
    [
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),  # math-verify: LaTeX fraction equals the decimal
        ("$\\frac{3}{4}$", "0.75", 1.0),
        ("1,000", "1000", 1.0),  # thousands separator
        ("The answer is 72.", "#### 72", 1.0),  # GSM8K reference
        ("The answer is 72.", GSM8K_SOLUTION, 1.0),  # the whole GSM8K solution: only "72" after ####
        ("The answer is 72.", "72", 1.0),
        ("\\boxed{\\sqrt 2}", "\\sqrt{2}", 1.0),  # a bare LaTeX reference is wrapped in $…$
        ("\\boxed{(1,2)}", "(1, 2)", 1.0),  # unwrapped, math-verify would read the reference as 2
        ("She pays 18 dollars", "\\$18", 1.0),  # "\$" is a price, not maths markup
        ("答案：72元", "72", 1.0),  # math-verify finds nothing; the last-number fallback does
        ("🙂 答案是 2。", "2", 1.0),
        ("The answer is 73.", "72", 0.0),
        ("\\boxed{5}. Check: 5+1=6", "6", 0.0),  # a boxed answer is not rescued by a later number
        ("", "5", 0.0),
        ("no number here", "5", 0.0),
    ],
)
def test_accuracy_math_verify_cases(completion, reference, expected):
    assert accuracy(None, [completion], answer=[reference]) == [expected]


def test_accuracy_chat_completion_and_missing_answer():
    assert accuracy(None, [chat("So \\boxed{42}")], answer=["42"]) == [1.0]
    assert accuracy(None, ["42", "42"], answer=["42", None]) == [1.0, None]
    assert accuracy(None, ["42"]) == [None]


# ---------------------------------------------------------------- label


def test_label_first_word_without_labels():
    completions = ["Yes, because it rains.", "  ＹＥＳ！", "no", "", "✅ Yes", "Answer: yes", "Not sure.\nmaybe", chat("YES.")]
    answers = ["yes", "yes", "yes", "yes", "yes", "yes", "not sure", "Yes"]
    assert label(None, completions, answer=answers) == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    assert label(None, ["yes"]) == [None]
    assert label(None, ["yes", "yes"], answer=["yes", None]) == [1.0, None]


def test_label_with_allowed_labels():
    labels = ["正确", "错误"]
    completions = ["正确。理由：计算无误", "错误！", "正确：", "不知道", "\n\n错误\n正确"]
    assert label(None, completions, answer=["正确", "正确", "正确", "正确", "错误"], labels=labels) == [
        1.0, 0.0, 1.0, 0.0, 1.0,
    ]
    # the longest allowed label at the start wins, whatever its place in the list
    labels = ["not", "not sure", "sure"]
    completions = ["Not sure, it depends", "Not sure", "not at all", "Surely not"]
    assert label(None, completions, answer=["not sure", "not", "not", "sure"], labels=labels) == [1.0, 0.0, 1.0, 0.0]


def test_label_takes_each_rows_own_labels_from_a_data_column():
    """The built-in visual tasks carry their allowed labels per row; the reward reads them per row."""
    palette = ["red", "green", "blue"]
    completions = ["Red.", "The shape is red", "blue circle", "Green"]
    assert label(None, completions, answer=["red", "red", "blue", None], labels=[palette] * 4) == [1.0, 0.0, 1.0, None]
    assert label(None, ["not sure"], answer=["not"], labels=[["not", "not sure"]]) == [0.0]
    assert label(None, ["red"], labels=[palette]) == [None]
    from grpokit.rewards.text import two_line_verdict

    replies = ["pass\nReason: clean", "ok\nReason: clean"]
    assert two_line_verdict(None, replies, verdicts=[["pass", "fail"], ["ok"]]) == [1.0, 1.0]
    assert two_line_verdict(None, replies, verdicts=["pass", "fail"]) == [1.0, 0.0]


# ---------------------------------------------------------------- tags


def test_tags_pairs_order_and_nesting():
    completions = [
        "<think>t</think>\n<answer>a</answer>",  # both: 1.0
        "<answer>a</answer><think>t</think>",  # reversed: one pair in order
        "<think><answer>a</answer></think>",  # nested: one pair
        "<think>t</think><think>u</think><answer>a</answer>",  # think twice: only answer counts
        "</think>t<think><answer>a",  # closing before opening, answer never closed
        "",
        chat("<think>思考 🤔</think><answer>42</answer>"),
    ]
    assert tags(None, completions) == [1.0, 0.5, 0.5, 0.5, 0.0, 0.0, 1.0]
    assert tags(None, completions, require_order=False) == [1.0, 1.0, 1.0, 0.5, 0.0, 0.0, 1.0]


def test_tags_longest_chain_and_custom_tags():
    text = "<b>1</b><c>2</c><a>3</a>"
    assert tags(None, [text], tags=("a", "b", "c")) == [pytest.approx(2 / 3)]  # b, c in order; a is late
    assert tags(None, ["<answer>x</answer>"], tags="answer") == [1.0]
    with pytest.raises(RewardError, match="at least one tag"):
        tags(None, ["x"], tags=())


# ---------------------------------------------------------------- two_line_verdict


def test_two_line_verdict_shapes():
    completions = [
        "Correct\nReason: the sum is right.",
        "correct.  \nReason:the sum is right\n\n  \n",  # trailing spaces and empty lines dropped
        "正确。\nReason：计算无误",  # full-width colon and full stop
        "Incorrect!\nReason : off by one",
        "Correct\nReason:",  # nothing after the colon
        "Correct\nReason:   ",
        "Correct\nBecause it adds up",
        "Correct\n\nReason: blank line in between",
        "Correct\nReason: one\nmore",
        "Maybe\nReason: unsure",  # not an allowed verdict
        "",
        chat("INCORRECT\nreason: 2+2 is 4"),
    ]
    expected = [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert two_line_verdict(None, completions, verdicts=["correct", "incorrect", "正确"]) == expected


def test_two_line_verdict_without_verdicts_and_other_prefix():
    completions = ["Maybe\nReason: unsure", "Reason: a\nReason: b", "  \nReason: x"]
    assert two_line_verdict(None, completions) == [1.0, 0.0, 0.0]
    assert two_line_verdict(None, ["Yes\nBecause it rains", "Yes\nBecause"], reason_prefix="Because") == [1.0, 0.0]
    assert two_line_verdict(None, ["是\n理由：下雨"], reason_prefix="理由：") == [1.0]


# ---------------------------------------------------------------- length


def test_length_trapezoid_in_words_and_chars():
    words = ["", "a b", "a b c d", "w " * 10, "w " * 15, "w " * 20, "w " * 25, chat("a b c d e")]
    # min 4, max 10: n/4 below, 1 inside, 2 - n/10 above, 0 from 20 on
    assert length(None, words, min_len=4, max_len=10) == [0.0, 0.5, 1.0, 1.0, 0.5, 0.0, 0.0, 1.0]
    chars = ["", "ab", "abcd", "你好！😀", "x" * 12]
    assert length(None, chars, min_len=4, max_len=8, unit="chars") == [0.0, 0.5, 1.0, 1.0, 0.5]
    assert length(None, ["abc"], min_len=0, max_len=3, unit="chars") == [1.0]
    with pytest.raises(RewardError, match="unit"):
        length(None, ["a"], unit="tokens")
    with pytest.raises(RewardError, match="min_len <= max_len"):
        length(None, ["a"], min_len=5, max_len=4)


# ---------------------------------------------------------------- cosine_length


def test_cosine_length_by_correctness_and_length():
    # max_len 36: p = n/36; r = lo + 0.5 (hi - lo)(1 + cos(pi p))
    short, long_ = "answer is 42", "so the answer must be 42"
    assert (len(short), len(long_)) == (12, 24)
    very_long = "answer is 42. " * 4 + "42"  # 58 chars > max_len: clipped to p = 1
    completions = [short, long_, short.replace("42", "41"), long_.replace("42", "41"), very_long, "", chat(short)]
    values = cosine_length(None, completions, answer=["42"] * 7, max_len=36)
    # correct (lo, hi) = (0.5, 1.0): p = 1/3, cos = 0.5 -> 0.5 + 0.25 * 1.5 = 0.875
    #                                p = 2/3, cos = -0.5 -> 0.5 + 0.25 * 0.5 = 0.625
    # wrong (lo, hi) = (-0.5, -1.0): p = 1/3 -> -0.5 - 0.25 * 1.5 = -0.875; p = 2/3 -> -0.625
    # past max_len: lo = 0.5; empty (wrong, p = 0): hi = -1.0
    assert values == pytest.approx([0.875, 0.625, -0.875, -0.625, 0.5, -1.0, 0.875])
    assert cosine_length(None, ["42"]) == [None]
    custom = cosine_length(None, ["x" * 18], answer=["42"], max_len=36, min_value_wrong=-2.0, max_value_wrong=0.0)
    assert custom == pytest.approx([-1.0])  # midpoint of -2.0 and 0.0


# ---------------------------------------------------------------- repetition


def test_repetition_ngram_penalty():
    completions = [
        "a b c a b c",  # 4 trigrams, 3 unique -> -(1 - 3/4) = -0.25
        "Go go GO go",  # lower-cased: 2 trigrams, 1 unique -> -0.5
        "the cat sat on the mat",  # no repeats
        "hi there",  # fewer words than ngram_size
        "",
        "哈 哈 哈 😀 😀 😀",  # 4 trigrams, all distinct
        chat("x x x x x"),  # 3 trigrams, 1 unique -> -2/3
    ]
    assert repetition(None, completions) == pytest.approx([-0.25, -0.5, 0.0, 0.0, 0.0, 0.0, -2 / 3])
    assert repetition(None, ["a a a"], ngram_size=1, max_penalty=-2.0) == pytest.approx([-2 * (1 - 1 / 3)])
    with pytest.raises(RewardError, match="max_penalty"):
        repetition(None, ["a"], max_penalty=0.5)
