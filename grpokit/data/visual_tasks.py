"""Built-in visual tasks: seeded images of one coloured shape, with exact one-word answers.

They let a vision-language recipe run with no image files, and, like the text tasks in
``tasks.py``, their answers are unambiguous, so a reward can check them. Rows follow TRL's
conversational VLM format; the image travels as PNG bytes so a row stays a few kilobytes and
is decoded only when a batch needs it.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from typing import Callable

from PIL import Image, ImageChops, ImageDraw

from grpokit.data.tasks import Row, split_generated
from grpokit.errors import DataError

RGB = tuple[int, int, int]

# Far apart from each other and from the light background, so a small model (or a resize) cannot
# confuse them; names are the exact answers a reward compares against.
PALETTE: dict[str, RGB] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 0),
    "purple": (140, 40, 170),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

COLOUR_QUESTION = "What colour is the shape? Answer with one word."
SHAPE_QUESTION = "Which shape is this: circle, square or triangle? Answer with one word."
CAPTION_QUESTION = "Describe the image."

# The background stays within [TINT_LOW, TINT_HIGH + 2 * NOISE]: light, and never a palette colour.
TINT_LOW, TINT_HIGH, NOISE = 225, 245, 4


@dataclass(frozen=True)
class ShapeFacts:
    """What was drawn, so a test (or a reward) can check an answer against the pixels."""

    colour: str
    shape: str
    centre: tuple[int, int]
    extent: int


def background(rng: random.Random, size: int, noise: int = NOISE) -> Image.Image:
    """A light random tint with per-pixel jitter: no two images share bytes, so dedupe by image is
    meaningful, and a model cannot key on a fixed background."""
    tint = tuple(rng.randint(TINT_LOW, TINT_HIGH) for _ in range(3))
    base = Image.new("RGB", (size, size), tint)
    if noise <= 0:
        return base
    table = bytes(b % (2 * noise + 1) for b in range(256))
    jitter = Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3).translate(table))
    return ImageChops.add(base, jitter)


def placement(rng: random.Random, size: int) -> tuple[int, int, int]:
    """``(x0, y0, extent)``: a side of 30-70 % of the image, placed wholly inside it, so the shape
    is never cropped into something ambiguous."""
    extent = rng.randint(-(-3 * size // 10), 7 * size // 10)
    return rng.randint(0, size - extent), rng.randint(0, size - extent), extent


def draw_shape(image: Image.Image, shape: str, x0: int, y0: int, extent: int, rgb: RGB) -> None:
    """Fill without antialiasing or outline, so every shape pixel is exactly the palette colour."""
    draw = ImageDraw.Draw(image)
    x1, y1 = x0 + extent - 1, y0 + extent - 1
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=rgb)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=rgb)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {list(SHAPES)}")


def render_shapes(rng: random.Random, size: int = 48) -> tuple[Image.Image, ShapeFacts]:
    """One shape on a light background; the facts say what it is and where its centre pixel lies
    (inside every shape: the bounding box's centre is inside a circle, square and upright triangle)."""
    if size < 16:
        raise ValueError(f"image size {size} is too small to tell the shapes apart; use 16 or more")
    colour = rng.choice(list(PALETTE))
    shape = rng.choice(SHAPES)
    x0, y0, extent = placement(rng, size)
    image = background(rng, size)
    draw_shape(image, shape, x0, y0, extent, PALETTE[colour])
    return image, ShapeFacts(colour, shape, (x0 + extent // 2, y0 + extent // 2), extent)


def png_bytes(image: Image.Image) -> bytes:
    """Lossless, so the palette colours survive exactly; compact, so rows stay small."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def vlm_row(question: str, png: bytes, answer: str, labels: list[str]) -> Row:
    """TRL's conversational VLM row: the image placeholder precedes the question, as chat templates
    of vision models expect, and ``images`` holds one image per placeholder."""
    content = [{"type": "image"}, {"type": "text", "text": question}]
    return {"prompt": [{"role": "user", "content": content}], "images": [png], "answer": answer,
            "labels": list(labels)}


def shape_colour(rng: random.Random) -> Row:
    """"What colour is the shape?": one of the palette's names."""
    image, facts = render_shapes(rng)
    return vlm_row(COLOUR_QUESTION, png_bytes(image), facts.colour, list(PALETTE))


def shape_kind(rng: random.Random) -> Row:
    """"Which shape is this?": circle, square or triangle, whatever its colour."""
    image, facts = render_shapes(rng)
    return vlm_row(SHAPE_QUESTION, png_bytes(image), facts.shape, list(SHAPES))


def shape_caption(rng: random.Random) -> Row:
    """"Describe the image." answered by a sentence naming the colour and the shape: the image-text
    pairs a new vision encoder and connector are aligned on before a question is asked (LLaVA's and
    SmolVLM's first stage). Rows carry the reply as ``completion``, so ``grpokit sft`` trains on them."""
    image, facts = render_shapes(rng)
    caption = f"The image shows a {facts.colour} {facts.shape} on a light background."
    return {**vlm_row(CAPTION_QUESTION, png_bytes(image), caption, []), "completion": caption}


VISUAL_TASKS: dict[str, Callable[[random.Random], Row]] = {
    "shape_colour": shape_colour,
    "shape_kind": shape_kind,
    "shape_caption": shape_caption,
}


def make_visual_task(name: str, train_size: int, eval_size: int, seed: int) -> tuple[list[Row], list[Row]]:
    """Disjoint train and held-out rows, as ``make_task``; the question text is the same for every
    row, so the image bytes are what must not repeat: no held-out image appears in training."""
    if name not in VISUAL_TASKS:
        raise DataError(f"unknown built-in visual task {name!r}; choose one of {sorted(VISUAL_TASKS)}")
    return split_generated(VISUAL_TASKS[name], train_size, eval_size, seed, key=lambda row: row["images"][0],
                           what=f"visual task {name!r} has fewer than {eval_size} distinct images")
