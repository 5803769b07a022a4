"""The built-in visual tasks: seeded, decodable, truthful answers, and held-out images never train."""

from __future__ import annotations

import io
import random

import pytest
from PIL import Image

from grpokit.data.visual_tasks import (PALETTE, SHAPES, VISUAL_TASKS, make_visual_task, png_bytes, render_shapes,
                                       shape_colour, shape_kind)
from grpokit.errors import DataError


def decode(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


@pytest.mark.parametrize("name", sorted(VISUAL_TASKS))
def test_same_seed_gives_identical_bytes(name):
    first = make_visual_task(name, 20, 8, seed=3)
    assert make_visual_task(name, 20, 8, seed=3) == first
    assert make_visual_task(name, 20, 8, seed=4)[0][0]["images"] != first[0][0]["images"]


@pytest.mark.parametrize("size", [48, 32])
def test_png_decodes_to_rgb_of_the_requested_size(size):
    image, _ = render_shapes(random.Random(0), size=size)
    decoded = decode(png_bytes(image))
    assert decoded.format == "PNG" and decoded.mode == "RGB" and decoded.size == (size, size)


@pytest.mark.parametrize("generate", [shape_colour, shape_kind])
def test_rows_follow_trls_conversational_vlm_format(generate):
    row = generate(random.Random(0))
    assert set(row) == {"prompt", "images", "answer", "labels"}
    [message] = row["prompt"]
    assert message["role"] == "user"
    assert [part["type"] for part in message["content"]] == ["image", "text"]
    assert len(row["images"]) == 1 and isinstance(row["images"][0], bytes)
    assert row["answer"] in row["labels"]
    assert decode(row["images"][0]).size == (48, 48)


@pytest.mark.parametrize("seed", range(50))
def test_the_answer_is_the_colour_at_the_shapes_centre(seed):
    """The row's answer and the pixels agree: the centre pixel is exactly the answer's palette colour."""
    _, facts = render_shapes(random.Random(seed))
    row = shape_colour(random.Random(seed))  # renders the same image from the same rng state
    pixels = decode(row["images"][0])
    assert row["answer"] == facts.colour
    assert pixels.getpixel(facts.centre) == PALETTE[row["answer"]]
    assert shape_kind(random.Random(seed))["answer"] == facts.shape


def test_only_the_answers_palette_colour_is_drawn():
    """No other palette colour (nor the background) can be mistaken for the answer."""
    for seed in range(20):
        row = shape_colour(random.Random(seed))
        colours = {rgb for _, rgb in decode(row["images"][0]).getcolors(maxcolors=48 * 48)}
        assert colours & set(PALETTE.values()) == {PALETTE[row["answer"]]}


@pytest.mark.parametrize("name", sorted(VISUAL_TASKS))
def test_held_out_images_never_appear_in_training(name):
    train, held_out = make_visual_task(name, 150, 50, seed=7)
    assert len(train) == 150 and len(held_out) == 50
    held_images = {row["images"][0] for row in held_out}
    assert len(held_images) == 50
    assert not held_images & {row["images"][0] for row in train}


def test_every_colour_and_shape_occurs_in_200_rows():
    train, _ = make_visual_task("shape_colour", 200, 1, seed=0)
    assert {row["answer"] for row in train} == set(PALETTE)
    train, _ = make_visual_task("shape_kind", 200, 1, seed=0)
    assert {row["answer"] for row in train} == set(SHAPES)


def test_unknown_task_names_the_choices():
    with pytest.raises(DataError, match="shape_colour.*shape_kind"):
        make_visual_task("nope", 1, 1, 0)
