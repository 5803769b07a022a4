"""The open-r1 and TRL reward forms: parity with ``trl.rewards`` where TRL has the function
(TRL's own code is called, not a transcription of it), hand-computed values otherwise."""

import inspect
import math
import sys

import pytest
import torch
from trl.rewards import (get_cosine_scaled_reward, get_repetition_penalty_reward, get_soft_overlong_punishment,
                         think_format_reward)

from grpokit.algo import overlong_penalty
from grpokit.errors import RewardError
from grpokit.rewards.builtin import format_regex
from grpokit.rewards.openr1 import kimi_length, reasoning_steps, tag_count, think_answer_format, think_format
from grpokit.rewards.registry import REWARDS, run_in_of
from grpokit.rewards.text import cosine_length, repetition


def chat(text):
    return [{"role": "assistant", "content": text}]


def test_registered_names_and_where_they_run():
    expected = {"think_format": (think_format, "thread"), "think_answer_format": (think_answer_format, "thread"),
                "tag_count": (tag_count, "thread"), "reasoning_steps": (reasoning_steps, "thread"),
                "kimi_length": (kimi_length, "main"),  # math-verify's timeout needs the main thread
                "cosine_length": (cosine_length, "main"), "repetition": (repetition, "thread")}
    for name, (fn, run_in) in expected.items():
        assert REWARDS[name] is fn and run_in_of(fn) == run_in, name


def test_every_supported_argument_is_a_named_parameter():
    # recipe args are checked against named parameters; one read from **_ would be refused (or, before, ignored)
    named = {cosine_length: {"max_len", "clip", "unit", "completion_ids"},
             repetition: {"ngram_size", "max_penalty", "language", "unit", "completion_ids"},
             reasoning_steps: {"min_steps"}, kimi_length: {"answer", "relative_to", "unit", "completion_ids"}}
    for fn, names in named.items():
        assert names <= set(inspect.signature(fn).parameters), fn.__name__


# ---------------------------------------------------------------- think_format (TRL)

THINK_CASES = [
    "<think>\nThis is my reasoning.\n</think>\nThis is my answer.",
    "<think>\nThis is my reasoning.\nThis is my answer.",  # never closed
    "<think></think>",  # empty block, nothing after
    "<think>a</think><think>b</think>",  # a second <think>
    "<think>a</think>b</think>",  # a second </think> is fine
    " <think>a</think>b",  # leading space
    "\n<think>a</think>b",  # leading newline
    "x<think>a</think>",
    "<think>a\n</think>\n\ntrailing\n",
    "<THINK>a</THINK>",
    "</think><think>",
    "<think>多语言 🤔</think>答案",
    "",
]


def test_think_format_matches_trl():
    expected = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    assert think_format_reward([chat(t) for t in THINK_CASES]) == expected
    assert think_format(None, [chat(t) for t in THINK_CASES]) == expected
    assert think_format(None, THINK_CASES) == expected  # standard (string) completions too


# ---------------------------------------------------------------- think_answer_format (open-r1)

GOOD = "<think>\nreason\n</think>\n<answer>\n42\n</answer>"


def test_think_answer_format_hand_checked():
    cases = {
        GOOD: 1.0,
        GOOD + "\n": 1.0,
        GOOD + "\nP.S. anything": 1.0,  # MULTILINE: "$" matches before any newline
        GOOD + " ": 0.0,  # ... but not before a space
        " " + GOOD: 0.0,  # matched from the first character
        "\n" + GOOD: 0.0,
        "<think>\n</think>\n<answer>\n42\n</answer>": 0.0,  # an empty block needs both newlines
        "<think>\n\n</think>\n<answer>\n\n</answer>": 1.0,
        GOOD.replace("\n", "\r\n"): 0.0,
        "<think>reason</think><answer>42</answer>": 0.0,
        "<think>\na\n</think>\nb\n</think>\n<answer>\n42\n</answer>": 1.0,  # lazy .*? spans a stray </think>
        "<think>\n思考 🤔\n</think>\n<answer>\n答案\n</answer>": 1.0,
        "": 0.0,
    }
    assert think_answer_format(None, list(cases)) == list(cases.values())
    assert think_answer_format(None, [chat(GOOD)]) == [1.0]


def test_format_with_the_same_pattern_is_not_the_same_reward():
    # why think_format and think_answer_format are built-ins: `format` strips the reply and
    # matches it whole, so leading whitespace passes there and trailing text fails there
    trl_pattern = r"<think>(?!.*<think>)(.*?)</think>.*"
    assert format_regex(None, [" <think>a</think>b"], pattern=trl_pattern) == [1.0]
    assert think_format(None, [" <think>a</think>b"]) == [0.0]
    openr1_pattern = r"<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>"
    differ = ["\n" + GOOD, GOOD + "  ", GOOD + "\nP.S."]
    assert format_regex(None, differ, pattern=openr1_pattern) == [1.0, 1.0, 0.0]
    assert think_answer_format(None, differ) == [0.0, 0.0, 1.0]
    assert format_regex(None, [GOOD], pattern=openr1_pattern) == think_answer_format(None, [GOOD]) == [1.0]


# ---------------------------------------------------------------- tag_count


def test_tag_count_quarter_per_tag_present_once():
    completions = [
        GOOD,  # all four
        "<think>\na</think>\n<answer>\nb</answer>",  # "<think>\n" and "\n<answer>\n" only
        "<think>\na\n</think>\n<think>\nb\n</think>\n<answer>\nc\n</answer>",  # think tags twice: 0 for both
        "\n<answer>\nx\n</answer><think>\ny\n</think>\n",  # order is not checked
        "<think>a</think><answer>b</answer>",  # no newlines: none
        "",
        chat(GOOD),
    ]
    assert tag_count(None, completions) == [1.0, 0.5, 0.5, 1.0, 0.0, 0.0, 1.0]


# ---------------------------------------------------------------- reasoning_steps


def test_reasoning_steps_counts_open_r1_markers():
    completions = [
        "Step 1: a\nStep 2: b\nStep 3: c",  # 3 -> 1.0
        "1. a\n2. b\n3. c",  # "^\d+\." only at the very start (no MULTILINE): 1 -> 1/3
        "intro\n1. a",  # 0
        "First, x. Second, y.",  # 2 -> 2/3
        "first, x",  # case as written: 0
        "- a\n- b\n- c",  # the first "-" has no newline before it: 2 -> 2/3
        "\n* a\n* b\n* c\n- d",  # 4, capped at 1.0
        "Step 10: a",  # 1
        "",
        chat("Next, go. Finally, stop. Step 7: done"),  # 3 -> 1.0
    ]
    assert reasoning_steps(None, completions) == pytest.approx([1.0, 1 / 3, 0.0, 2 / 3, 0.0, 2 / 3, 1.0, 1 / 3, 0.0, 1.0])
    assert reasoning_steps(None, ["Step 1: Step 2:"], min_steps=4) == [0.5]
    assert reasoning_steps(None, ["Next, go"], min_steps=1) == [1.0]
    with pytest.raises(RewardError, match="min_steps"):
        reasoning_steps(None, ["x"], min_steps=0)


# ---------------------------------------------------------------- kimi_length


def test_kimi_length_relative_to_the_batch():
    # lengths 2, 4, 2, 10, 10 -> min 2, max 10: lambda = 0.5 - (n - 2) / 8
    completions = ["42", "  42", "41", "        41", chat("        42")]
    values = kimi_length(None, completions, answer=["42"] * 5)
    # correct n=2: 0.5; correct n=4: 0.25; wrong n=2: min(0, 0.5) = 0; wrong n=10: -0.5; correct n=10: -0.5
    assert values == pytest.approx([0.5, 0.25, 0.0, -0.5, -0.5])


def test_kimi_length_relative_to_each_group():
    prompts = ["p", "p", "q", "q"]
    completions = ["42", "    42", "41", "        41"]  # p: lengths 2, 6; q: 2, 10
    answers = ["42"] * 4
    # group p: lambda = 0.5, -0.5 (both correct); group q: wrong, lambda = 0.5 -> 0, -0.5 -> -0.5
    assert kimi_length(prompts, completions, answer=answers, relative_to="group") == pytest.approx([0.5, -0.5, 0.0, -0.5])
    # over the batch (min 2, max 10) the 6-character reply sits at lambda = 0.0 instead
    assert kimi_length(prompts, completions, answer=answers) == pytest.approx([0.5, 0.0, 0.0, -0.5])
    chats = [[{"role": "user", "content": "p"}]] * 2  # chat prompts group by equality too
    assert kimi_length(chats, ["42", "    42"], answer=["42", "42"], relative_to="group") == pytest.approx([0.5, -0.5])


def test_kimi_length_missing_references_equal_lengths_and_tokens():
    # the row without a reference is None and its length does not set the scale
    assert kimi_length(None, ["42", "x" * 20], answer=["42", None]) == [0.0, None]
    assert kimi_length(None, ["42", "41"], answer=["42", "42"]) == [0.0, 0.0]  # no spread
    assert kimi_length(None, ["42"]) == [None]
    assert kimi_length(None, []) == []
    # tokens: lengths 1 and 3 -> 0.5 and -0.5 whatever the text lengths
    assert kimi_length(None, ["       42", "42"], answer=["42", "42"], unit="tokens",
                       completion_ids=[[7], [1, 2, 3]]) == pytest.approx([0.5, -0.5])
    with pytest.raises(RewardError, match="relative_to must be one of"):
        kimi_length(None, ["42"], answer=["42"], relative_to="prompt")
    with pytest.raises(RewardError, match="groups completions by their prompt"):
        kimi_length(None, ["42"], answer=["42"], relative_to="group")
    with pytest.raises(RewardError, match="completion_ids"):
        kimi_length(None, ["42"], answer=["42"], unit="tokens")


# ---------------------------------------------------------------- cosine_length


def test_cosine_length_in_tokens_matches_trl():
    max_len = 20
    texts = [r"\boxed{42}", r"So \boxed{41}"] * 4 + [r"\boxed{42}", r"\boxed{7}"]
    # 0, 5, 10 and 15 tokens, max_len, and past it (TRL clips there too)
    ids = [[1] * n for n in (0, 0, 5, 5, 10, 10, 15, 15, 20, 31)]
    completions = [chat(t) for t in texts]
    trl = get_cosine_scaled_reward(max_len=max_len)(completions, solution=["42"] * 10, completion_ids=ids)
    ours = cosine_length(None, completions, answer=["42"] * 10, max_len=max_len, unit="tokens", completion_ids=ids)
    assert ours == pytest.approx(trl, abs=1e-12)
    assert trl[:2] == [1.0, -1.0] and trl[-2:] == pytest.approx([0.5, -0.5])  # the inputs reach both ends
    custom = dict(min_value_wrong=-2.0, max_value_wrong=0.0, min_value_correct=0.2, max_value_correct=3.0)
    trl = get_cosine_scaled_reward(max_len=max_len, **custom)(completions, solution=["42"] * 10, completion_ids=ids)
    ours = cosine_length(None, completions, answer=["42"] * 10, max_len=max_len, unit="tokens", completion_ids=ids,
                         **custom)
    assert ours == pytest.approx(trl, abs=1e-12)


def test_cosine_length_unclipped_is_open_r1():
    correct, wrong = "." * 44 + r"\boxed{42}", "." * 62 + r"\boxed{41}"  # 54 and 72 characters
    assert (len(correct), len(wrong)) == (54, 72)
    # clipped (default): p = 1 -> lo; unclipped: p = 1.5 (cos = 0) and p = 2 (cos = 1)
    assert cosine_length(None, [correct, wrong], answer=["42", "42"], max_len=36) == pytest.approx([0.5, -0.5])
    values = cosine_length(None, [correct, wrong], answer=["42", "42"], max_len=36, clip=False)
    assert values == pytest.approx([0.5 + 0.25 * (1 + math.cos(1.5 * math.pi)), -1.0])
    assert values[0] == pytest.approx(0.75)
    with pytest.raises(RewardError, match="one of"):
        cosine_length(None, ["x"], answer=["1"], unit="bytes")
    with pytest.raises(RewardError, match="completion_ids"):
        cosine_length(None, ["x"], answer=["1"], unit="tokens")
    with pytest.raises(RewardError, match="max_len"):
        cosine_length(None, ["x"], answer=["1"], max_len=0)


# ---------------------------------------------------------------- repetition


def test_repetition_in_tokens_matches_trl():
    ids = [[1, 2, 3, 4], [5, 5, 5, 5, 5], [1, 2, 1, 2, 1, 2, 1], [9], [], [3, 1, 3, 1, 4, 1, 5, 9, 2, 6]]
    for ngram_size, max_penalty in [(3, -1.0), (2, -1.0), (1, -0.5), (4, -2.0), (2, 0.0)]:
        trl = get_repetition_penalty_reward(ngram_size, max_penalty)(completion_ids=ids)
        ours = repetition(None, ["text unused"] * len(ids), ngram_size=ngram_size, max_penalty=max_penalty,
                          unit="tokens", completion_ids=ids)
        assert ours == pytest.approx(trl, abs=1e-12), (ngram_size, max_penalty)


def test_repetition_in_english_words_is_trl_formula_on_word_ids():
    # TRL counts token ids; open-r1's "en" counts lower-cased whitespace words: the same formula on word ids
    texts = ["a b c a b c", "Go go GO go", "the cat sat on the mat the cat sat", "hi there", "", "x x x x x"]
    vocab = {}
    word_ids = [[vocab.setdefault(w, len(vocab)) for w in t.lower().split()] for t in texts]
    for ngram_size in (1, 2, 3):
        trl = get_repetition_penalty_reward(ngram_size, -1.0)(completion_ids=word_ids)
        assert repetition(None, texts, ngram_size=ngram_size) == pytest.approx(trl, abs=1e-12)


def test_repetition_chinese_needs_jieba(monkeypatch):
    monkeypatch.setitem(sys.modules, "jieba", None)  # as if not installed
    with pytest.raises(RewardError, match="pip install jieba"):
        repetition(None, ["我喜欢吃苹果"], language="zh")


def test_repetition_chinese_segments_with_jieba():
    jieba = pytest.importorskip("jieba")
    text = "我喜欢吃苹果我喜欢吃苹果"
    assert list(jieba.cut(text)) == ["我", "喜欢", "吃", "苹果"] * 2
    # 8 words, 6 trigrams, 4 distinct -> -(1 - 4/6); on whitespace it is one word, no trigram
    assert repetition(None, [text, chat(text)], language="zh") == pytest.approx([-1 / 3, -1 / 3])
    assert repetition(None, [text]) == [0.0]
    # no lower-casing, and a space is a segment: Go, " ", go, " ", go, " ", go -> 7 unigrams, 3 distinct
    assert repetition(None, ["Go go go go"], language="zh", ngram_size=1) == pytest.approx([-(1 - 3 / 7)])


def test_repetition_refuses_unsupported_arguments():
    with pytest.raises(RewardError, match=r"\('en', 'zh'\)"):
        repetition(None, ["a b c"], language="fr")
    with pytest.raises(RewardError, match="applies to unit 'words'"):
        repetition(None, ["a"], language="zh", unit="tokens", completion_ids=[[1]])
    with pytest.raises(RewardError, match="'words' or 'tokens'"):
        repetition(None, ["a"], unit="chars")
    with pytest.raises(RewardError, match="ngram_size"):
        repetition(None, ["a"], ngram_size=0)
    with pytest.raises(RewardError, match="completion_ids"):
        repetition(None, ["a"], unit="tokens")


# ---------------------------------------------------------------- soft overlong punishment (not a reward here)


def test_trl_soft_overlong_punishment_is_algorithm_overlong_buffer():
    # TRL's get_soft_overlong_punishment(max_completion_len, soft_punish_cache) is grpokit's
    # algorithm.overlong_buffer = soft_punish_cache with rollout.max_completion_length, penalty 1.0
    lengths = [0, 50, 80, 81, 90, 99, 100]
    trl = get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=20)([[1] * n for n in lengths])
    ours = overlong_penalty(torch.tensor(lengths), max_length=100, buffer=20).tolist()
    assert ours == pytest.approx(trl, abs=1e-6) and trl[4] == -0.5
