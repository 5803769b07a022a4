"""Rewards on fixed completions, the registry and the weighted sum."""

import pytest

from grpokit.config import RewardSpec
from grpokit.errors import RewardError
from grpokit.rewards import RewardSet, register, resolve_reward
from grpokit.rewards.builtin import answer_match, format_regex


def test_answer_match_lenient_and_strict_readings():
    completions = ["45 is larger than 12.", "The answer is 45", "12", "no number", "45.0"]
    answers = ["45"] * 5
    assert answer_match(None, completions, answer=answers, extract="first_number") == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert answer_match(None, ["It is 12, not 45", "1,234"], answer=["45", "1234"], extract="last_number") == [1.0, 1.0]
    assert answer_match(None, ["Yes."], answer=["yes"], extract="exact") == [1.0]
    assert answer_match(None, ["Yes, because", "no"], answer=["yes", "yes"], extract="first_word") == [1.0, 0.0]
    # conversational completions (TRL's message-list form) read the assistant content
    assert answer_match(None, [[{"role": "assistant", "content": "7"}]], answer=["7"]) == [1.0]
    assert answer_match(None, ["7"]) == [None]


def test_format_regex_full_match():
    assert format_regex(None, [" 42 ", "42 apples", "x"], pattern=r"-?\d+") == [1.0, 0.0, 0.0]


def test_rewardset_weights_and_none_and_column_filtering():
    def only_prompts(prompts, completions):
        return [None, 0.5]

    register("test_only_prompts")(only_prompts)
    specs = [
        RewardSpec(name="answer_match", weight=2.0, args={"extract": "first_number"}),
        RewardSpec(name="test_only_prompts", weight=1.0),
    ]
    total, parts = RewardSet(specs)(["p", "p"], ["3", "4"], {"answer": ["3", "3"]})
    assert total.tolist() == [2.0, 0.5]
    assert parts == {"answer_match": [1.0, 0.0], "test_only_prompts": [None, 0.5]}
    with pytest.raises(RewardError, match="registered twice"):
        register("test_only_prompts")(only_prompts)


def test_resolve_reward_errors_name_the_problem():
    with pytest.raises(RewardError, match="unknown reward 'nope'.*answer_match"):
        resolve_reward("nope")
    with pytest.raises(RewardError, match=r"no module 'no_such_mod' in the installed packages or in the folders searched \(/elsewhere, "):
        resolve_reward("no_such_mod:fn", ["/elsewhere"])
    with pytest.raises(RewardError, match="has no function 'nothing'"):
        resolve_reward("json:nothing")
    assert resolve_reward("grpokit.rewards.builtin:format_regex") is format_regex
