"""Episode schema (file:line + field-path errors) and the prompt / SFT converters, on hand-checked fixtures."""

import json
from pathlib import Path

import pytest

from grpokit.data.episodes import (
    Action, episodes_to_prompts, episodes_to_sft, load_episodes, render_action, step_messages,
)
from grpokit.errors import DataError

from conftest import run_cli

FIXTURES = Path(__file__).parent / "fixtures" / "episodes"
SMALL = FIXTURES / "small.jsonl"

GOOD = {"episode_id": "a", "instruction": "do it", "success": True,
        "steps": [{"index": i, "observation": {"text": f"o{i}"}, "action": {"type": "t"}} for i in range(3)]}


def write_lines(path, *objects):
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objects))
    return path


def with_step(step_index, **changes):
    episode = json.loads(json.dumps(GOOD))
    episode["steps"][step_index].update(changes)
    return episode


@pytest.mark.parametrize("episode, message", [
    (with_step(2, action={"type": 5}), r"e.jsonl:2: steps\.2\.action\.type: Input should be a valid string \(got 5\)$"),
    ({k: v for k, v in GOOD.items() if k != "success"}, r"e.jsonl:2: success: Field required$"),
    ({**GOOD, "success": "yes"}, r"e.jsonl:2: success: Input should be a valid boolean \(got 'yes'\)$"),
    ({**{k: v for k, v in GOOD.items() if k != "success"}, "sucess": True},
     r"e.jsonl:2: success: Field required \(and 1 more\)$"),
    (with_step(1, observation={"txt": "o1"}), r"e.jsonl:2: steps\.1\.observation\.txt: Extra inputs are not permitted"),
    (with_step(0, reward="0.5"), r"e.jsonl:2: steps\.0\.reward: Input should be a valid number"),
    (with_step(2, index=3), r"e.jsonl:2: steps\.2\.index: is 3, expected 2 \(steps must be listed in index order"),
    ({**GOOD, "steps": [GOOD["steps"][1], GOOD["steps"][0]]}, r"e.jsonl:2: steps\.0\.index: is 1, expected 0"),
])
def test_schema_errors_name_line_and_field_path(tmp_path, episode, message):
    path = write_lines(tmp_path / "e.jsonl", {**GOOD, "episode_id": "first"}, episode)
    with pytest.raises(DataError, match=message):
        load_episodes(path)


def test_file_level_errors(tmp_path):
    path = write_lines(tmp_path / "e.jsonl", GOOD, "", '{"episode_id": ')
    with pytest.raises(DataError, match=r"e.jsonl:3: not valid JSON"):
        load_episodes(path)
    write_lines(path, GOOD, "[1, 2]")
    with pytest.raises(DataError, match=r"e.jsonl:2: expected a JSON object, got list"):
        load_episodes(path)
    write_lines(path, GOOD, {**GOOD, "instruction": "other"})
    with pytest.raises(DataError, match=r"e.jsonl:2: episode_id 'a' is already used on line 1"):
        load_episodes(path)
    path.write_bytes(b'{"episode_id": "\xff"}\n')
    with pytest.raises(DataError, match=r"e.jsonl:1: not valid UTF-8 \(byte 16 of the file\)"):
        load_episodes(path)
    path.write_text("\n")
    with pytest.raises(DataError, match="no episodes"):
        load_episodes(path)
    with pytest.raises(DataError, match="missing.jsonl: file not found"):
        load_episodes(tmp_path / "missing.jsonl")


def test_zero_steps_and_missing_rewards_are_valid():
    episodes = load_episodes(SMALL)
    assert [e.episode_id for e in episodes] == ["e1", "e2", "e3", "e4"]
    assert episodes[2].steps == [] and episodes[2].metadata == {"note": "solved without acting"}
    assert episodes[2].final_reward is None and episodes[1].steps[0].reward is None
    assert episodes[1].final_reward == 0.0 and isinstance(episodes[1].final_reward, float)
    assert episodes[3].where == f"{SMALL}:4"


def test_render_action_uses_text_else_type_and_sorted_json_args():
    assert render_action(Action(type="click", args={"y": 2, "x": 1})) == 'click({"x": 1, "y": 2})'
    assert render_action(Action(type="done")) == "done({})"
    assert render_action(Action(type="click", args={"x": 1}, text="tap x")) == "tap x"
    assert render_action(Action(type="type", args={"text": "é"})) == 'type({"text": "é"})'


def test_prompts_one_row_per_step_with_history():
    rows, skipped = episodes_to_prompts(load_episodes(SMALL), history=1)
    assert skipped == {"episodes_without_steps": 1, "steps_without_observation": 1}
    assert rows == [
        {"prompt": [{"role": "user", "content": "Open the settings\n\nCurrent observation (step 0):\nhome screen"}],
         "answer": 'click({"target": "menu"})', "episode_id": "e1", "step": 0, "success": True, "reward": 0.1,
         "images": []},
        {"prompt": [{"role": "user", "content": "Open the settings\n\nStep 0 observation:\nhome screen\n"
                                                'Step 0 action:\nclick({"target": "menu"})\n\n'
                                                "Current observation (step 1):\nmenu open"}],
         "answer": "click settings", "episode_id": "e1", "step": 1, "success": True, "reward": 0.9, "images": []},
        {"prompt": [{"role": "user", "content": "Open the settings\n\nCurrent observation (step 0):\nhome screen"}],
         "answer": 'click({"target": "search"})', "episode_id": "e2", "step": 0, "success": False, "reward": None,
         "images": []},
        {"prompt": [{"role": "user", "content": "Say hello\n\nCurrent observation (step 0):\n[image]"}],
         "answer": 'type({"enter": true, "text": "héllo"})', "episode_id": "e4", "step": 0, "success": True,
         "reward": None, "images": [str((FIXTURES / "img" / "chat.png").absolute())]},  # read beside the file
    ]


def test_prompt_history_window_system_message_and_no_images_column():
    episode = load_episodes(SMALL)[0].model_copy(update={"instruction": "Go"})
    assert step_messages(episode, 1, history=0) == [{"role": "user", "content": "Go\n\nCurrent observation (step 1):\nmenu open"}]
    messages = step_messages(episode, 1, history=5, system="You operate a phone.")
    assert messages[0] == {"role": "system", "content": "You operate a phone."}
    assert messages[1]["content"].count("observation") == 2
    rows, _ = episodes_to_prompts(load_episodes(SMALL)[:2])
    assert all("images" not in row for row in rows)  # no image anywhere: no images column
    with pytest.raises(DataError, match="history must be >= 0"):
        episodes_to_prompts([episode], history=-1)


def test_sft_only_successful_by_default():
    episodes = load_episodes(SMALL)
    rows, skipped = episodes_to_sft(episodes, history=0, system="S")
    assert skipped == {"unsuccessful_episodes": 1, "episodes_without_steps": 1, "steps_without_observation": 0}
    assert [row["messages"][-1] for row in rows] == [
        {"role": "assistant", "content": 'click({"target": "menu"})'},
        {"role": "assistant", "content": "click settings"},
        {"role": "assistant", "content": 'type({"enter": true, "text": "héllo"})'},
    ]
    assert rows[1]["messages"][:2] == [{"role": "system", "content": "S"},
                                       {"role": "user", "content": "Open the settings\n\nCurrent observation (step 1):\nmenu open"}]
    rows, skipped = episodes_to_sft(episodes, only_successful=False)
    assert len(rows) == 4 and skipped == {"unsuccessful_episodes": 0, "episodes_without_steps": 1,
                                          "steps_without_observation": 1}


def test_cli_validate_prompts_sft(tmp_path, capsys):
    assert run_cli(["data", "validate", str(SMALL)]) == 0
    out = capsys.readouterr().out
    assert "4 episodes, 5 steps, success rate 75.0% (3/4)" in out
    assert "episodes without steps 1, steps without observation 1, episodes without final_reward 2" in out

    prompts = tmp_path / "prompts.jsonl"
    run_cli(["data", "prompts", str(SMALL), "--out", str(prompts), "--history", "0", "--system", "Be brief."])
    rows = [json.loads(line) for line in prompts.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 4 and rows[0]["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert capsys.readouterr().out == (f"wrote {prompts}: 4 prompts (skipped or dropped: episodes without steps 1, "
                                       "steps without observation 1)\n")

    sft = tmp_path / "sft.jsonl"
    run_cli(["data", "sft", str(SMALL), "--out", str(sft), "--all"])
    assert len(sft.read_text().splitlines()) == 4 and "4 SFT samples" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left behind


def test_cli_refuses_to_overwrite_its_input_or_write_nothing(tmp_path):
    episodes = write_lines(tmp_path / "e.jsonl", {**GOOD, "success": False})
    with pytest.raises(DataError, match="output is the input file"):
        run_cli(["data", "prompts", str(episodes), "--out", str(episodes)])
    with pytest.raises(DataError, match=r"no SFT samples to write .*unsuccessful episodes 1"):
        run_cli(["data", "sft", str(episodes), "--out", str(tmp_path / "sft.jsonl")])
    assert not (tmp_path / "sft.jsonl").exists()
