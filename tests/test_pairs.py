"""Preference pairs from two runs, human feedback and comparators, with outputs worked out by hand."""

import json
from pathlib import Path

import pytest

from grpokit.data.episodes import load_episodes
from grpokit.data.pairs import match_steps, pairs_from_comparator, pairs_from_feedback, pairs_from_runs
from grpokit.errors import DataError

from conftest import run_cli

FIXTURES = Path(__file__).parent / "fixtures" / "episodes"


def load(name):
    return load_episodes(FIXTURES / f"{name}.jsonl")


def user(text):
    return [{"role": "user", "content": text}]


def said(text):
    return [{"role": "assistant", "content": text}]


def brief(rows):
    """(chosen, rejected, episode_chosen, episode_rejected, step) of each pair."""
    return [(r["chosen"][0]["content"], r["rejected"][0]["content"], r["episode_chosen"], r["episode_rejected"],
             r["step"]) for r in rows]


def test_pairs_from_runs_better_episode_wins_at_shared_observations():
    rows, skipped = pairs_from_runs(load("earlier"), load("later"))
    # settings: the later run succeeded -> its action at "home screen" wins ("search open" vs "menu open": no match)
    # milk: both succeeded, the earlier run has the higher final_reward -> it wins at "cart"; "shop" is identical
    assert rows == [
        {"prompt": user("Open the settings\n\nCurrent observation (step 0):\nhome screen"),
         "chosen": said('click({"target": "menu"})'), "rejected": said('click({"target": "search"})'),
         "source": "runs:later", "episode_chosen": "r1", "episode_rejected": "r1", "step": 0},
        {"prompt": user("Buy milk\n\nCurrent observation (step 1):\ncart"),
         "chosen": said('click({"button": "pay"})'), "rejected": said('click({"button": "cancel"})'),
         "source": "runs:earlier", "episode_chosen": "r2", "episode_rejected": "r2", "step": 1},
    ]
    assert skipped == {"episodes_without_steps": 0, "unmatched_episodes": 2, "identical": 1, "duplicate": 0}


def test_pairs_from_runs_tie_goes_to_later_run():
    earlier, later = load("earlier")[1], load("later")[1]
    later = later.model_copy(update={"final_reward": None})  # a reward missing counts as equal
    rows, _ = pairs_from_runs([earlier], [later])
    assert brief(rows) == [('click({"button": "cancel"})', 'click({"button": "pay"})', "r2", "r2", 1)]
    assert rows[0]["source"] == "runs:later"


def episode_with_observations(texts):
    from grpokit.data.episodes import Episode

    return Episode.model_validate({"episode_id": "x", "instruction": "i", "success": True, "steps": [
        {"index": i, "observation": {"text": t}, "action": {"type": "act"}} for i, t in enumerate(texts)]})


def test_match_steps_kth_occurrence_with_kth():
    a, b = episode_with_observations(["a", "b", "a", None, "a"]), episode_with_observations(["a", "c", "a", None])
    # the 1st and 2nd "a" of each match; a's 3rd "a" has no partner; steps without observation never match
    assert [(x.index, y.index) for x, y in match_steps(a, b)] == [(0, 0), (2, 2)]


def test_pairs_from_feedback_every_higher_vs_lower_pair():
    rows, skipped = pairs_from_feedback(load("small"), FIXTURES / "feedback.jsonl", system="S")
    prompt = [{"role": "system", "content": "S"}, *user("Open the settings\n\nCurrent observation (step 0):\nhome screen")]
    assert all(row["prompt"] == prompt and row["source"] == "feedback" for row in rows)
    # at "home screen": menu 1.0 > "press home" 0.5 > search 0.0; "menu open" has a single candidate
    assert brief(rows) == [
        ('click({"target": "menu"})', "press home", "e1", "e2", 0),
        ('click({"target": "menu"})', 'click({"target": "search"})', "e1", "e2", 0),
        ("press home", 'click({"target": "search"})', "e2", "e2", 0),
    ]
    assert skipped == {"feedback_without_observation": 0, "observations_with_one_candidate": 1, "ties": 0,
                       "identical": 0, "duplicate": 0}


def test_feedback_ties_identical_texts_and_duplicates_are_dropped(tmp_path):
    feedback = tmp_path / "f.jsonl"
    feedback.write_text("\n".join(json.dumps(x) for x in [
        {"episode_id": "e1", "step": 0, "score": 1},
        {"episode_id": "e2", "step": 0, "score": 1},  # tie with e1's action: no pair
        {"episode_id": "e2", "step": 0, "score": 0, "alternative": 'click({"target": "menu"})'},  # same text as e1's
        {"episode_id": "e2", "step": 1, "score": 3},  # no observation: cannot be grouped
    ]) + "\n")
    rows, skipped = pairs_from_feedback(load("small"), feedback)
    # e1 menu (1) > alt menu (0): identical; e2 search (1) > alt menu (0): kept
    assert brief(rows) == [('click({"target": "search"})', 'click({"target": "menu"})', "e2", "e2", 0)]
    assert skipped == {"feedback_without_observation": 1, "observations_with_one_candidate": 0, "ties": 1,
                       "identical": 1, "duplicate": 0}


@pytest.mark.parametrize("line, message", [
    ({"episode_id": "zz", "step": 0, "score": 1}, r"f.jsonl:2: episode_id 'zz' is not in the episodes file"),
    ({"episode_id": "e1", "step": 2, "score": 1}, r"f.jsonl:2: step 2: episode 'e1' has 2 steps"),
    ({"episode_id": "e1", "step": 0, "score": "high"}, r"f.jsonl:2: score: Input should be a valid number"),
    ({"episode_id": "e1", "step": 0}, r"f.jsonl:2: score: Field required"),
    ({"episode_id": "e1", "step": 0, "score": 2}, r"f.jsonl:2: the recorded action of episode 'e1' step 0 is "
                                                  r"already scored on line 1"),
])
def test_feedback_file_errors_name_the_line(tmp_path, line, message):
    feedback = tmp_path / "f.jsonl"
    feedback.write_text(json.dumps({"episode_id": "e1", "step": 0, "score": 1}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(DataError, match=message):
        pairs_from_feedback(load("small"), feedback)


def test_comparator_success_and_shorter():
    tasks = load("tasks")
    rows, skipped = pairs_from_comparator(tasks, "success")
    # c1 > c3: "home" identical, "browser" differs; c2 > c3: "home" differs; c1 vs c2: tie
    assert brief(rows) == [('type({"text": "weather"})', 'type({"text": "wether"})', "c1", "c3", 1),
                           ('open({"app": "weather"})', 'open({"app": "browser"})', "c2", "c3", 0)]
    assert {row["source"] for row in rows} == {"comparator:success"}
    assert skipped == {"episodes_without_steps": 0, "ties": 1, "episode_pairs_without_shared_observation": 0,
                       "identical": 1, "duplicate": 0}
    rows, skipped = pairs_from_comparator(tasks, "shorter")
    # only c1 and c2 both succeeded; c2 has 2 steps < 3
    assert brief(rows) == [('open({"app": "weather"})', 'open({"app": "browser"})', "c2", "c1", 0)]
    assert skipped["ties"] == 2
    _, skipped = pairs_from_comparator(load("small"), "success")
    assert skipped["episodes_without_steps"] == 1  # e3 is left out before comparing


USER_COMPARATORS = '''
def longer(a, b):
    return len(a.steps) - len(b.steps)

def broken(a, b):
    raise KeyError("oops")

def vague(a, b):
    return "a"
'''


def test_user_comparator_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_prefs.py").write_text(USER_COMPARATORS)
    monkeypatch.syspath_prepend(str(tmp_path))
    rows, skipped = pairs_from_comparator(load("tasks"), "my_prefs:longer")
    # c1 (3 steps) > c2 (2): "home" differs; c1 > c3: "browser" differs ("home" identical); c2 vs c3: tie
    assert brief(rows) == [('open({"app": "browser"})', 'open({"app": "weather"})', "c1", "c2", 0),
                           ('type({"text": "weather"})', 'type({"text": "wether"})', "c1", "c3", 1)]
    assert rows[0]["source"] == "comparator:my_prefs:longer"
    assert skipped["ties"] == 1 and skipped["identical"] == 1
    with pytest.raises(DataError, match=r"comparator 'my_prefs:broken' failed on episodes 'c1' and 'c2' \(KeyError"):
        pairs_from_comparator(load("tasks"), "my_prefs:broken")
    with pytest.raises(DataError, match=r"returned 'a' for episodes 'c1' and 'c2'; expected an int"):
        pairs_from_comparator(load("tasks"), "my_prefs:vague")
    with pytest.raises(DataError, match=r"module 'my_prefs' has no function 'nope'"):
        pairs_from_comparator(load("tasks"), "my_prefs:nope")
    with pytest.raises(DataError, match=r"no module 'no_such_prefs' in the installed packages or in the folders searched"):
        pairs_from_comparator(load("tasks"), "no_such_prefs:longer")
    with pytest.raises(DataError, match=r"unknown comparator 'best'; built-ins are \['shorter', 'success'\]"):
        pairs_from_comparator(load("tasks"), "best")


def test_cli_pairs_modes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "pairs.jsonl"
    run_cli(["data", "pairs", "--runs", str(FIXTURES / "earlier.jsonl"), str(FIXTURES / "later.jsonl"), "--out", str(out)])
    assert [json.loads(line)["source"] for line in out.read_text().splitlines()] == ["runs:later", "runs:earlier"]
    assert capsys.readouterr().out == (f"wrote {out}: 2 pairs (skipped or dropped: episodes without steps 0, "
                                       "unmatched episodes 2, identical 1, duplicate 0)\n")
    run_cli(["data", "pairs", "--feedback", str(FIXTURES / "feedback.jsonl"), str(FIXTURES / "small.jsonl"),
             "--out", str(out)])
    assert len(out.read_text().splitlines()) == 3
    (tmp_path / "cli_prefs.py").write_text(USER_COMPARATORS)
    monkeypatch.syspath_prepend(str(tmp_path))
    run_cli(["data", "pairs", "--comparator", "cli_prefs:longer", str(FIXTURES / "tasks.jsonl"), "--out", str(out),
             "--history", "1"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[1]["prompt"][0]["content"].startswith("Find the weather\n\nStep 0 observation:\nhome\n")
    with pytest.raises(DataError, match="--comparator needs the EPISODES.jsonl file"):
        run_cli(["data", "pairs", "--comparator", "success", "--out", str(out)])
    with pytest.raises(DataError, match="--runs takes the two run files"):
        run_cli(["data", "pairs", "--runs", "a", "b", "c", "--out", str(out)])
    with pytest.raises(SystemExit):  # exactly one mode
        run_cli(["data", "pairs", "--runs", "a", "b", "--comparator", "success", "--out", str(out)])
    with pytest.raises(DataError, match="no pairs to write"):
        run_cli(["data", "pairs", "--comparator", "shorter", str(FIXTURES / "small.jsonl"), "--out", str(out)])
