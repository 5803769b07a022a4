"""Images in vision-language rows, in TRL's format: checked when the data is read, decoded per batch.

A row carries ``image`` (one) or ``images`` (a list). Each image is a file path (relative to the
data file's folder), raw encoded bytes, or ``{"bytes": ..., "path": ...}`` as Parquet and HF
``datasets`` store an undecoded Image feature. Rows keep these light references, not decoded
pixels, so a large dataset loads without holding every image in memory; ``open_images`` decodes
them when a batch needs them.

A prompt says where its images go either with ``<image>`` placeholders in a string, or with
``{"type": "image"}`` blocks in chat messages. A prompt with no placeholder at all gets its
images placed as TRL's ``trl.data_utils.prepare_multimodal_messages`` places them (before the
text of the first user message whose content is a string), so a grpokit prompt and the same
prompt given to TRL render alike.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Union

from PIL import Image

from grpokit.errors import DataError
from grpokit.log import BYTES_LABEL

ImageRef = Union[str, bytes]
PLACEHOLDER = "<image>"
_ROLES = ("system", "user", "assistant", "tool")


# --- image references ---------------------------------------------------------------------------

def image_refs(row: dict, where: str, base_dir: Path) -> list[ImageRef]:
    """The row's images as absolute paths or bytes, so later stages never re-derive the data
    file's folder or tell the storage formats apart. A ``None`` value counts as no image, as
    ``datasets`` writes a missing Image cell."""
    single, many = row.get("image"), row.get("images")
    if single is not None and many is not None:
        raise DataError(f"{where}: the row has both 'image' and 'images'; keep one (put every image in "
                        f"'images' as a list, or a single one in 'image')")
    if single is not None:
        return [_ref(single, where, "'image'", base_dir)]
    if many is None:
        return []
    if not isinstance(many, (list, tuple)):
        raise DataError(f"{where}: 'images' must be a list of images (paths, bytes or {{'bytes', 'path'}} "
                        f"dicts), got {type(many).__name__}; use 'image' for a single one")
    return [_ref(item, where, f"'images'[{i}]", base_dir) for i, item in enumerate(many)]


def _ref(value: Any, where: str, name: str, base_dir: Path) -> ImageRef:
    """One image as a path or bytes; a dict gives its bytes first, as ``datasets`` decodes it."""
    if isinstance(value, dict):
        return _dict_ref(value, where, name, base_dir)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _bytes_ref(value, where, name)
    if isinstance(value, (str, os.PathLike)):
        return _path_ref(value, where, name, base_dir)
    raise DataError(f"{where}: {name} must be a file path, encoded image bytes or a {{'bytes': ..., "
                    f"'path': ...}} dict, got {type(value).__name__}")


def _dict_ref(value: dict, where: str, name: str, base_dir: Path) -> ImageRef:
    if value.get("bytes") is not None:
        return _bytes_ref(value["bytes"], where, f"{name}['bytes']")
    if value.get("path") is not None:
        return _path_ref(value["path"], where, f"{name}['path']", base_dir)
    raise DataError(f"{where}: {name} is a dict with neither 'bytes' nor 'path' set; give the encoded "
                    f"image as 'bytes' or its file as 'path'")


def _bytes_ref(value: Any, where: str, name: str) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise DataError(f"{where}: {name} must be encoded image bytes, got {type(value).__name__}")
    if not value:
        raise DataError(f"{where}: {name} is empty bytes; give the encoded image file's contents")
    return bytes(value)


def _path_ref(value: Any, where: str, name: str, base_dir: Path) -> str:
    if not isinstance(value, (str, os.PathLike)):
        raise DataError(f"{where}: {name} must be a file path, got {type(value).__name__}")
    if not str(value):
        raise DataError(f"{where}: {name} is an empty path; give the image file's path, relative to the "
                        f"data file's folder or absolute")
    if BYTES_LABEL.fullmatch(str(value)):
        raise DataError(f"{where}: {name} is {str(value)!r}, the stand-in grpokit writes in JSON for image "
                        f"bytes, not an image: this file was written from rows whose images were bytes; read "
                        f"the original data (Parquet, a saved dataset, builtin:<task>) or save the images as files")
    path = Path(value)
    return str(path if path.is_absolute() else (Path(base_dir) / path).absolute())


def _describe(ref: ImageRef) -> str:
    return ref if isinstance(ref, str) else f"<{len(ref)} bytes>"


def _source(ref: ImageRef) -> str | io.BytesIO:
    return ref if isinstance(ref, str) else io.BytesIO(ref)


def check_images(refs: list[ImageRef], where: str) -> None:
    """Every image readable, so a missing or corrupt file fails at load time with its row, not
    mid-run inside the processor. ``verify`` reads headers and checksums without decoding pixels."""
    for index, ref in enumerate(refs):
        if isinstance(ref, str) and not os.path.isfile(ref):
            what = "is a folder, not a file" if os.path.isdir(ref) else "does not exist"
            raise DataError(f"{where}: image {index} ({ref}) {what}; fix the path (relative paths are "
                            f"relative to the data file's folder) or drop the row")
        try:
            with Image.open(_source(ref)) as image:
                image.verify()
        except Exception as exc:  # PIL raises many types (OSError, SyntaxError, struct.error...) for bad data
            raise DataError(f"{where}: image {index} ({_describe(ref)}) is not a readable image "
                            f"({type(exc).__name__}: {exc}); replace it with a valid PNG/JPEG/... file "
                            f"or drop the row") from exc


def open_images(refs: list[ImageRef]) -> list[Image.Image]:
    """Decoded RGB images for one batch; RGB because processors expect three channels and a
    palette or alpha image would otherwise reach them in a mode they mishandle."""
    return [_open_rgb(index, ref) for index, ref in enumerate(refs)]


def _open_rgb(index: int, ref: ImageRef) -> Image.Image:
    try:
        with Image.open(_source(ref)) as image:
            image.load()
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")  # PIL warns when a transparent palette goes straight to RGB
            return image.convert("RGB")
    except Exception as exc:  # the file may have changed since check_images passed it
        raise DataError(f"image {index} ({_describe(ref)}) could not be decoded ({type(exc).__name__}: "
                        f"{exc}); it passed the load-time check, so it was probably changed since") from exc


def block_image(block: dict, where: str) -> Image.Image:
    """The image an image block carries (``{"type": "image", "image": ...}``, as an environment's
    observation gives it): a decoded PIL image, a file path, encoded bytes or ``{"bytes", "path"}``;
    RGB, as ``open_images`` gives it."""
    value = block.get("image", block.get("path"))
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (str, bytes)):
        check_images([value], where)
        return open_images([value])[0]
    raise DataError(f"{where}: an image block must carry its image under 'image' (a PIL image, a file path or "
                    f"encoded bytes), got {type(value).__name__}")


def encoded(image: Image.Image) -> bytes:
    """A decoded image as PNG bytes: the reference a row keeps (rows hold references, not pixels)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --- prompts --------------------------------------------------------------------------------------

def _is_image_block(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "image"


def count_placeholders(prompt: str | list[dict]) -> int:
    """How many images the prompt asks for. Tool messages are left out, as TRL leaves them out
    when it matches placeholders to images."""
    if isinstance(prompt, str):
        return prompt.count(PLACEHOLDER)
    return sum(sum(map(_is_image_block, message.get("content") or []))
               for message in prompt
               if isinstance(message, dict) and message.get("role") != "tool"
               and isinstance(message.get("content"), list))


def _text_block(text: str) -> dict:
    return {"type": "text", "text": text}


def _string_blocks(text: str) -> list[dict]:
    """A string with ``<image>`` placeholders as blocks in the same order; empty text between
    adjacent placeholders is dropped, since an empty text block renders as nothing. Without
    placeholders the text is one block, even when empty, as TRL makes it."""
    if PLACEHOLDER not in text:
        return [_text_block(text)]
    blocks: list[dict] = []
    for index, piece in enumerate(text.split(PLACEHOLDER)):
        if index:
            blocks.append({"type": "image"})
        if piece:
            blocks.append(_text_block(piece))
    return blocks


def check_blocks(content: list, where: str, name: str) -> list[dict]:
    """A message's block-list content checked (text and image blocks only) and copied; shared with
    ``chat.check_messages`` so a conversation is held to one rule wherever it is read."""
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if (kind == "text" and isinstance(part.get("text"), str)) or kind == "image":
            continue
        raise DataError(f"{where}: {name}[{index}] is not a content block; each must be "
                        f"{{\"type\": \"text\", \"text\": \"...\"}} or {{\"type\": \"image\"}}, got {part!r:.60}")
    return [dict(part) for part in content]


def _structured(message: Any, where: str, index: int) -> dict:
    """One message with block-list content; a copy, so the row's own prompt is never changed."""
    name = f"prompt[{index}]"
    if not (isinstance(message, dict) and message.get("role") in _ROLES):
        raise DataError(f"{where}: {name} is not a chat message; each needs a 'role' (one of "
                        f"{', '.join(_ROLES)}) and a 'content', got {message!r:.60}")
    content = message.get("content")
    if isinstance(content, str):
        return {**message, "content": [_text_block(content)]}
    if isinstance(content, list):
        return {**message, "content": check_blocks(content, where, f"{name}['content']")}
    if content is None and message["role"] == "assistant":
        return dict(message)  # an assistant turn may carry only tool_calls, as TRL allows
    raise DataError(f"{where}: {name}['content'] must be a string or a list of content blocks, "
                    f"got {type(content).__name__}")


def _insert_like_trl(prompt: list, messages: list[dict], n_images: int, where: str) -> list[dict]:
    """Images before the text of the first user message whose content is a string, which is
    where ``trl.data_utils.prepare_multimodal_messages`` puts them when no message has an image block."""
    for index, original in enumerate(prompt):
        if original.get("role") == "user" and isinstance(original.get("content"), str):
            images = [{"type": "image"} for _ in range(n_images)]
            messages[index] = {**messages[index], "content": images + messages[index]["content"]}
            return messages
    raise DataError(f"{where}: the row has {_images(n_images)} but the prompt has no image placeholder and "
                    f"no user message with string content to put them in; add {n_images} "
                    f"{{\"type\": \"image\"}} block(s) where the images belong")


def _images(n: int) -> str:
    return f"{n} image" if n == 1 else f"{n} images"


def _check_count(found: int, n_images: int, where: str) -> None:
    if found != n_images:
        noun = "placeholder" if found == 1 else "placeholders"
        raise DataError(f"{where}: the prompt has {found} image {noun} but the row has {_images(n_images)}; "
                        f"make them match (one <image> or {{\"type\": \"image\"}} block per image)")


def with_image_blocks(prompt: str | list[dict], n_images: int, where: str) -> list[dict]:
    """The prompt as chat messages holding exactly one image block per image, the form a
    processor's chat template needs. Placeholders the user wrote are kept where they are; a
    prompt without any gets TRL's placement, so both toolkits see the same conversation."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": _string_blocks(prompt)}]
        source: list = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt:
        messages = [_structured(message, where, i) for i, message in enumerate(prompt)]
        source = prompt
    else:
        raise DataError(f"{where}: 'prompt' must be a string or a non-empty list of chat messages, "
                        f"got {prompt!r:.60}")
    found = count_placeholders(messages)
    if found == 0 and n_images:
        return _insert_like_trl(source, messages, n_images, where)
    _check_count(found, n_images, where)
    return messages


def with_checked_images(row: dict, messages: list[dict], where: str, base_dir: Path) -> tuple[list[ImageRef], list[dict]]:
    """A row's image references, each readable, and its messages holding one image block per image
    (TRL's placement when they have none), for the stages that render whole conversations (SFT
    samples, preference pairs). A row without images and without content blocks is left as it is."""
    refs = image_refs(row, where, base_dir)
    if refs or any(not isinstance(m.get("content"), str) for m in messages):
        check_images(refs, where)
        messages = with_image_blocks(messages, len(refs), where)
    return refs, messages


def message_text(content: str | list[dict] | None) -> str:
    """The text of a message, for places that need plain text (rewards, logs). Text blocks are
    joined with nothing between them, as VL chat templates concatenate them when rendering."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content
                   if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str))
