"""Vision-language rows through the loaders: every format leaves with ``images`` (absolute paths or
bytes), each image checked and counted against the prompt at load time, errors at file:line;
built-in visual tasks, episodes' screenshots, and image bytes in the JSON writers."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from grpokit.config import DataConfig
from grpokit.data.chat import check_messages
from grpokit.data.episodes import episodes_to_sft, load_episodes, write_jsonl
from grpokit.data.images import open_images, with_image_blocks
from grpokit.data.loaders import load_source, load_splits, read_rows
from grpokit.data.pairs import pairs_from_runs
from grpokit.errors import DataError
from grpokit.log import JsonlSink

QUESTION = "What colour is the shape?"
BLOCKS = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """datasets' Arrow copies of the test files go to tmp_path, not to ~/.cache/huggingface."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def png(colour=(200, 30, 30), size=(6, 5)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png(colour))
    return path


def write_lines(path: Path, *rows: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def colour_of(ref) -> tuple:
    return open_images([ref])[0].getpixel((0, 0))


# --- JSON lines -----------------------------------------------------------------------------------

def test_jsonl_image_and_images_resolve_beside_the_file_and_prompts_stay_as_written(tmp_path, monkeypatch):
    write_png(tmp_path / "data" / "imgs" / "a.png")
    write_png(tmp_path / "data" / "imgs" / "b.png", (30, 30, 200))
    path = write_lines(tmp_path / "data" / "d.jsonl",
                       {"prompt": "<image>What is it?", "image": "imgs/a.png", "answer": "red"},
                       {"prompt": BLOCKS, "images": ["imgs/b.png"], "answer": "blue"},
                       {"prompt": "<image> then <image>", "images": ["imgs/a.png", "imgs/b.png"]},
                       {"prompt": "plain text", "images": []})
    monkeypatch.chdir(tmp_path)  # relative to the data file's folder, not the working directory
    rows = read_rows(path)
    assert [row.get("images") for row in rows] == [
        [str(tmp_path / "data" / "imgs" / "a.png")], [str(tmp_path / "data" / "imgs" / "b.png")],
        [str(tmp_path / "data" / "imgs" / "a.png"), str(tmp_path / "data" / "imgs" / "b.png")], None]
    assert all("image" not in row for row in rows) and "images" not in rows[3]
    assert rows[0]["prompt"] == "<image>What is it?" and rows[1]["prompt"] == BLOCKS
    assert colour_of(rows[1]["images"][0]) == (30, 30, 200)
    assert with_image_blocks(rows[2]["prompt"], 2, "x")[0]["content"] == [
        {"type": "image"}, {"type": "text", "text": " then "}, {"type": "image"}]


def test_text_rows_keep_a_literal_placeholder_but_an_image_block_needs_an_image(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", {"prompt": "What does <image> mean in HTML?", "answer": "nothing"})
    assert read_rows(path)[0] == {"prompt": "What does <image> mean in HTML?", "answer": "nothing"}
    write_lines(path, {"prompt": "fine"}, {"prompt": BLOCKS})
    with pytest.raises(DataError, match=r"d.jsonl:2: the prompt has 1 image placeholder but the row has 0 images"):
        read_rows(path)


@pytest.mark.parametrize("bad, message", [
    ({"image": "missing.png"}, r"d.jsonl:2: image 0 \(.*missing.png\) does not exist; fix the path"),
    ({"image": "corrupt.png"}, r"d.jsonl:2: image 0 \(.*corrupt.png\) is not a readable image"),
    ({"images": ["a.png", "a.png"]}, r"d.jsonl:2: the prompt has 1 image placeholder but the row has 2 images"),
    ({"image": "a.png", "images": ["a.png"]}, r"d.jsonl:2: the row has both 'image' and 'images'"),
])
def test_bad_images_are_refused_at_load_time_with_file_and_line(tmp_path, bad, message):
    write_png(tmp_path / "a.png")
    (tmp_path / "corrupt.png").write_bytes(png()[:40])  # a PNG cut off after its header
    path = write_lines(tmp_path / "d.jsonl", {"prompt": "<image>ok", "image": "a.png"},
                       {"prompt": "<image>which?", **bad})
    with pytest.raises(DataError, match=message):
        read_rows(path)


def test_chat_messages_take_block_lists_checked_like_images_does():
    assert check_messages(BLOCKS, "f:1", "prompt") is BLOCKS
    with pytest.raises(DataError, match=r"f:1: prompt\[0\]\['content'\]\[1\] is not a content block"):
        check_messages([{"role": "user", "content": [{"type": "image"}, {"type": "video"}]}], "f:1", "prompt")
    with pytest.raises(DataError, match=r"f:1: prompt\[0\] is not a chat message"):
        check_messages([{"role": "user", "content": 3}], "f:1", "prompt")


# --- Parquet and saved datasets ----------------------------------------------------------------------

def test_parquet_image_bytes_and_datasets_image_feature(tmp_path, monkeypatch):
    import datasets
    import pandas as pd

    frame = pd.DataFrame({"prompt": ["<image>a", "<image>b", "text only"], "image": [png(), png((0, 0, 250)), None]})
    frame.to_parquet(tmp_path / "raw.parquet")
    *rows, text = read_rows(tmp_path / "raw.parquet")
    assert [type(row["images"][0]) for row in rows] == [bytes, bytes] and colour_of(rows[1]["images"][0]) == (0, 0, 250)
    assert text == {"prompt": "text only"}  # a missing image cell: no images key

    # datasets writes an Image feature as {"bytes", "path"}: to_parquet keeps the path as given
    # (relative: read beside the Parquet file); save_to_disk embeds the bytes
    write_png(tmp_path / "shots" / "s.png", (0, 200, 0))
    monkeypatch.chdir(tmp_path)
    table = datasets.Dataset.from_dict({"prompt": ["<image>c"], "image": ["shots/s.png"]})
    table = table.cast_column("image", datasets.Image())
    table.to_parquet(str(tmp_path / "feature.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    monkeypatch.chdir(tmp_path / "shots")
    (row,) = read_rows(tmp_path / "feature.parquet")
    assert row["images"] == [str(tmp_path / "shots" / "s.png")] and "image" not in row
    train, held_out = load_source(str(tmp_path / "saved"), DataConfig(source=str(tmp_path / "saved")), 0)
    assert held_out == [] and type(train[0]["images"][0]) is bytes and colour_of(train[0]["images"][0]) == (0, 200, 0)


def test_trl_docs_vlm_grpo_dataset_loads_and_gets_trl_placement(tmp_path):
    """As TRL's GRPO VLM docs shape a dataset: a conversational ``prompt`` without any image
    placeholder (system + user string) and an ``image`` column; a DatasetDict with train/test."""
    import datasets

    def split(n, colour):
        prompt = [{"role": "system", "content": "Think, then answer."}, {"role": "user", "content": QUESTION}]
        images = [png(colour) for _ in range(n)]
        table = datasets.Dataset.from_dict({"prompt": [prompt] * n, "image": images, "solution": ["red"] * n})
        return table.cast_column("image", datasets.Image())

    datasets.DatasetDict(train=split(4, (200, 0, 0)), test=split(2, (0, 0, 200))).save_to_disk(str(tmp_path / "vlm"))
    train, held_out = load_splits(DataConfig(source=str(tmp_path / "vlm"), eval_size=2, answer_field="solution"))
    assert len(train) == 4 and len(held_out) == 2
    row = train[0]
    assert set(row) == {"prompt", "images", "solution", "answer", "data_source"} and len(row["images"]) == 1
    assert row["prompt"][1] == {"role": "user", "content": QUESTION}  # left as written
    assert with_image_blocks(row["prompt"], 1, "x")[1]["content"] == [{"type": "image"}, {"type": "text", "text": QUESTION}]
    assert colour_of(held_out[0]["images"][0]) == (0, 0, 200)


# --- built-in visual tasks ---------------------------------------------------------------------------

def test_builtin_visual_task_loads_with_png_bytes_and_disjoint_held_out_images():
    train, held_out = load_splits(DataConfig(source="builtin:shape_colour", train_size=30, eval_size=10, seed=5))
    assert len(train) == 30 and len(held_out) == 10
    assert all(type(row["images"][0]) is bytes and row["images"][0].startswith(b"\x89PNG") for row in train + held_out)
    assert not {row["images"][0] for row in train} & {row["images"][0] for row in held_out}
    assert {row["data_source"] for row in train} == {"shape_colour"}
    assert with_image_blocks(train[0]["prompt"], 1, "x") == train[0]["prompt"]
    shapes, _ = load_splits(DataConfig(source="builtin:shape_kind", train_size=5, eval_size=2))
    assert {row["answer"] for row in shapes} <= {"circle", "square", "triangle"}
    with pytest.raises(DataError, match=r"unknown built-in task 'nope'.*'larger_number'.*'shape_colour', 'shape_kind'"):
        load_splits(DataConfig(source="builtin:nope"))


# --- episodes: SFT samples and preference pairs -------------------------------------------------------

def episode(episode_id: str, action: str, success: bool) -> dict:
    return {"episode_id": episode_id, "instruction": "Open the menu", "success": success,
            "steps": [{"index": 0, "observation": {"image_path": "shots/home.png"}, "action": {"type": action}},
                      {"index": 1, "observation": {"text": "menu open"}, "action": {"type": "done"}}]}


def test_episode_screenshots_reach_sft_and_pair_rows_and_resolve_when_read_back(tmp_path, monkeypatch):
    write_png(tmp_path / "runs" / "shots" / "home.png")
    earlier = load_episodes(write_lines(tmp_path / "runs" / "earlier.jsonl", episode("a", "swipe", False)))
    later = load_episodes(write_lines(tmp_path / "runs" / "later.jsonl", episode("b", "tap", True)))
    monkeypatch.chdir(tmp_path)
    home = str(tmp_path / "runs" / "shots" / "home.png")

    sft, _ = episodes_to_sft(later, history=0)
    assert [row["images"] for row in sft] == [[home], []]
    pairs, _ = pairs_from_runs(earlier, later)
    assert [(pair["chosen"][0]["content"], pair["images"]) for pair in pairs] == [("tap({})", [home])]

    (tmp_path / "out").mkdir()
    write_jsonl(tmp_path / "out" / "sft.jsonl", sft)
    write_jsonl(tmp_path / "out" / "pairs.jsonl", pairs)
    monkeypatch.chdir(tmp_path / "out")  # paths must hold wherever the written file is read from
    read_sft = read_rows(tmp_path / "out" / "sft.jsonl", prompt_field="messages")
    assert read_sft[0]["images"] == [home] and "images" not in read_sft[1]
    # the user turn has no placeholder: its image goes before the text, as TRL places it
    assert with_image_blocks(read_sft[0]["prompt"], 1, "x")[0]["content"][0] == {"type": "image"}
    (pair,) = read_rows(tmp_path / "out" / "pairs.jsonl")
    assert pair["images"] == [home] and colour_of(pair["images"][0]) == (200, 30, 30)


# --- image bytes in the JSON writers -----------------------------------------------------------------

def test_image_bytes_are_written_as_a_short_stand_in_and_refused_when_read_back(tmp_path):
    image = png()
    rows = [{"prompt": BLOCKS, "images": [image], "meta": {"raw": image, "score": float("nan")}, "_line": 3},
            {"prompt": "<image>p", "images": ["/abs/a.png"]}]
    write_jsonl(tmp_path / "rows.jsonl", rows)
    sink = JsonlSink(tmp_path / "samples.jsonl")
    sink.log({"step": 1, **rows[0]})
    sink.close()
    label = f"<image: {len(image)} bytes>"
    first, second = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert first == {"prompt": BLOCKS, "images": [label], "meta": {"raw": label, "score": None}}
    assert second["images"] == ["/abs/a.png"]  # a path is written as it is
    assert json.loads((tmp_path / "samples.jsonl").read_text())["images"] == [label]
    with pytest.raises(DataError, match=r"rows.jsonl:1: 'images'\[0\] is '<image: \d+ bytes>', the stand-in"):
        read_rows(tmp_path / "rows.jsonl")
