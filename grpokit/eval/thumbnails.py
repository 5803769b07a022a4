"""Small copies of held-out images beside the eval files, so a report can show what the model saw.

An eval file names each sample's images by a key (a hash of the image's bytes, or of its path),
never by the bytes themselves: eval JSON stays small, the same image evaluated at every step is
stored once, and the report pairs a before and an after reply by prompt *and* image (a visual
task asks one question of many images).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from grpokit.data.images import ImageRef, open_images

THUMBNAIL_SIDE = 96  # pixels of the longer side; enough to see a shape or a screenshot's layout


def image_key(ref: ImageRef) -> str:
    """A short, stable name for one image reference."""
    data = ref if isinstance(ref, bytes) else str(ref).encode()
    return hashlib.sha1(data).hexdigest()[:16]


def write_thumbnails(rows: list[dict], folder: Path) -> int:
    """A PNG thumbnail ``<key>.png`` in ``folder`` of every image of ``rows`` not stored yet; how many
    were written. Each lands under a temporary name first, so a reader never sees half a file."""
    written = 0
    for row in rows:
        refs = row.get("images") or []
        missing = [ref for ref in refs if not (folder / f"{image_key(ref)}.png").is_file()]
        if not missing:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for ref, image in zip(missing, open_images(missing)):
            image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
            target = folder / f"{image_key(ref)}.png"
            staging = target.with_suffix(f".tmp{os.getpid()}")
            image.save(staging, format="PNG")
            os.replace(staging, target)
            written += 1
    return written
