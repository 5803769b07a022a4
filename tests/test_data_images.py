"""Vision-language rows: image references, load-time checks, placeholders and TRL's placement."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from grpokit.data.images import (check_images, count_placeholders, image_refs, message_text, open_images,
                                 with_image_blocks)
from grpokit.errors import DataError

WHERE = "data.jsonl:12"


def png_bytes(mode: str = "RGB", size: tuple[int, int] = (4, 3)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: Path, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(mode))
    return path


# --- image_refs -----------------------------------------------------------------------------------

def test_relative_paths_resolve_against_the_data_folder_and_absolute_ones_stay(tmp_path):
    absolute = write_png(tmp_path / "elsewhere" / "b.png")
    refs = image_refs({"images": ["imgs/a.png", str(absolute)]}, WHERE, tmp_path)
    assert refs == [str(tmp_path / "imgs" / "a.png"), str(absolute)]
    assert all(Path(r).is_absolute() for r in refs)


def test_relative_base_dir_still_gives_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (ref,) = image_refs({"image": "a.png"}, WHERE, Path("data"))
    assert ref == str(tmp_path / "data" / "a.png")


def test_single_image_bytes_and_datasets_dicts():
    data = png_bytes()
    assert image_refs({"image": data}, WHERE, Path("/d")) == [data]
    assert image_refs({"images": [{"bytes": data, "path": "ignored.png"}]}, WHERE, Path("/d")) == [data]
    assert image_refs({"images": [{"bytes": None, "path": "x.png"}]}, WHERE, Path("/d")) == ["/d/x.png"]
    assert image_refs({"prompt": "no images"}, WHERE, Path("/d")) == []
    assert image_refs({"image": None}, WHERE, Path("/d")) == []


def test_both_keys_are_refused():
    with pytest.raises(DataError, match=rf"^{WHERE}: the row has both 'image' and 'images'"):
        image_refs({"image": "a.png", "images": ["b.png"]}, WHERE, Path("/d"))


@pytest.mark.parametrize("row, fragment", [
    ({"images": [1]}, r"'images'\[0\] must be a file path"),
    ({"images": "a.png"}, r"'images' must be a list"),
    ({"image": {"path": None}}, r"neither 'bytes' nor 'path'"),
    ({"image": b""}, r"'image' is empty bytes"),
    ({"images": ["a.png", ""]}, r"'images'\[1\] is an empty path"),
])
def test_bad_refs_name_the_row_and_the_image(row, fragment):
    with pytest.raises(DataError, match=rf"^{WHERE}: .*{fragment}"):
        image_refs(row, WHERE, Path("/d"))


# --- check_images ---------------------------------------------------------------------------------

def test_valid_images_pass(tmp_path):
    refs = image_refs({"images": [str(write_png(tmp_path / "a.png")), png_bytes("RGBA")]}, WHERE, tmp_path)
    check_images(refs, WHERE)


def test_missing_file_names_the_index_and_path(tmp_path):
    refs = [str(write_png(tmp_path / "a.png")), str(tmp_path / "gone.png")]
    with pytest.raises(DataError) as err:
        check_images(refs, WHERE)
    message = str(err.value)
    assert message.startswith(f"{WHERE}: image 1 ") and str(tmp_path / "gone.png") in message
    assert "does not exist" in message


def test_corrupt_file_names_the_index_and_path(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(png_bytes()[:30] + b"\x00" * 40)  # a PNG header, then garbage
    with pytest.raises(DataError) as err:
        check_images([str(bad)], WHERE)
    message = str(err.value)
    assert message.startswith(f"{WHERE}: image 0 ") and str(bad) in message
    assert "not a readable image" in message


def test_non_image_bytes_are_refused():
    with pytest.raises(DataError, match=rf"^{WHERE}: image 0 \(<11 bytes>\) is not a readable image"):
        check_images([b"hello world"], WHERE)


# --- prompts --------------------------------------------------------------------------------------

def test_count_placeholders_in_strings_and_messages():
    assert count_placeholders("<image><image> compare them") == 2
    assert count_placeholders("no images") == 0
    assert count_placeholders([
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]},
        {"role": "assistant", "content": "plain"},
    ]) == 2


def test_string_placeholders_become_blocks_in_place():
    assert with_image_blocks("<image><image>Compare <image> with them", 3, WHERE) == [{"role": "user", "content": [
        {"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare "},
        {"type": "image"}, {"type": "text", "text": " with them"},
    ]}]


def test_message_blocks_are_kept_and_string_content_becomes_blocks():
    prompt = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "image"}]},
    ]
    assert with_image_blocks(prompt, 1, WHERE) == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "image"}]},
    ]
    assert prompt[0]["content"] == "Be brief."  # the row itself is untouched


NO_PLACEHOLDER_PROMPTS = [
    [{"role": "user", "content": "What is in the picture?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe."},
     {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "And the colour?"}],
    [{"role": "user", "content": [{"type": "text", "text": "already blocks"}]},
     {"role": "user", "content": "first string user turn"}],
]


@pytest.mark.parametrize("prompt", NO_PLACEHOLDER_PROMPTS)
@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_no_placeholder_insertion_matches_trl(prompt, n_images):
    from trl.data_utils import prepare_multimodal_messages

    trl = prepare_multimodal_messages(prompt, images=[f"img{i}" for i in range(n_images)])
    for message in trl:  # TRL fills its blocks with the images; ours stay placeholders until a batch
        for part in message["content"]:
            part.pop("image", None)
    assert with_image_blocks(prompt, n_images, WHERE) == trl


def test_string_prompt_without_placeholders_matches_trl():
    from trl.data_utils import prepare_multimodal_messages

    trl = prepare_multimodal_messages([{"role": "user", "content": "Describe."}], images=["a"])
    trl[0]["content"][0].pop("image")
    assert with_image_blocks("Describe.", 1, WHERE) == trl


@pytest.mark.parametrize("prompt, n_images, text", [
    ("<image><image>Compare", 1, "the prompt has 2 image placeholders but the row has 1 image"),
    ([{"role": "user", "content": [{"type": "image"}]}], 2, "the prompt has 1 image placeholder but the row has 2"),
    ("<image>What?", 0, "the prompt has 1 image placeholder but the row has 0 images"),
])
def test_count_mismatch_is_an_error(prompt, n_images, text):
    with pytest.raises(DataError, match=rf"^{WHERE}: {text}"):
        with_image_blocks(prompt, n_images, WHERE)


def test_images_with_nowhere_to_go_and_bad_blocks_are_errors():
    with pytest.raises(DataError, match=rf"^{WHERE}: .*no user message with string content"):
        with_image_blocks([{"role": "user", "content": [{"type": "text", "text": "x"}]}], 1, WHERE)
    with pytest.raises(DataError, match=rf"^{WHERE}: prompt\[0\]\['content'\]\[0\] is not a content block"):
        with_image_blocks([{"role": "user", "content": [{"type": "video"}]}], 0, WHERE)
    with pytest.raises(DataError, match=rf"^{WHERE}: prompt\[0\] is not a chat message"):
        with_image_blocks([{"role": "robot", "content": "x"}], 0, WHERE)


def test_message_text():
    assert message_text("plain") == "plain"
    assert message_text([{"type": "image"}, {"type": "text", "text": "Compare "}, {"type": "image"},
                         {"type": "text", "text": "them"}]) == "Compare them"
    assert message_text(None) == ""


# --- open_images ----------------------------------------------------------------------------------

def test_open_images_gives_rgb_for_palette_and_rgba(tmp_path):
    palette = Image.new("P", (4, 3))
    palette.putpalette([255, 0, 0] * 256)
    palette.info["transparency"] = 0
    palette_path = tmp_path / "p.png"
    palette.save(palette_path, transparency=0)
    with Image.open(palette_path) as check:
        assert check.mode == "P"
    images = open_images([str(palette_path), png_bytes("RGBA"), png_bytes("L")])
    assert [(im.mode, im.size) for im in images] == [("RGB", (4, 3))] * 3
    assert images[0].getpixel((0, 0)) == (255, 0, 0)


def test_open_images_names_an_image_that_broke_after_the_check(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"image 0 \(.*a\.png\) could not be decoded"):
        open_images([str(path)])
