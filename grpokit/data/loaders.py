"""Loading rows from a recipe's ``data`` section: built-in tasks, GSM8K, data files, weighted mixes.

Every error names the file and line (or row), and what to change. Every row carries the name
of its source in ``data_source`` (verl's column), unless the data has that column already.

A vision-language row (an ``image`` or ``images`` column, TRL's names) leaves here with
``images``: a list of absolute paths or encoded bytes (``images.image_refs``; relative paths
are read from the data file's folder), every image checked readable and the prompt's image
placeholders counted against them, so a bad image fails at load time with its file:line.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from grpokit.config import DATA_FILE_SUFFIXES, source_name
from grpokit.data.chat import check_messages
from grpokit.data.episodes import absolute_step_images
from grpokit.data.images import check_images, count_placeholders, image_refs, with_image_blocks
from grpokit.data.sources import FORMATS, read_saved, read_table
from grpokit.data.tasks import TASKS, make_task
from grpokit.data.visual_tasks import VISUAL_TASKS, make_visual_task
from grpokit.errors import DataError
from grpokit.jsonio import JsonLineError, read_jsonl_lines

DEFAULT_TASK_SIZE = 2000
JSON_SUFFIXES = (".jsonl", ".json")
TABLE_SUFFIXES = (".csv", ".parquet")


def read_json_lines(path: str | Path, what: str = "data file") -> list[tuple[int, dict]]:
    """``(line, object)`` pairs of a JSON-lines file, or for a ``.json`` file whose first non-blank
    character is ``[``, of a JSON array of objects (the line each element starts on); every failure is
    a DataError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found (relative paths are read from the working directory, "
                        "else from the recipe's folder)")
    try:
        if path.suffix.lower() == ".json" and _first_char(path) == "[":
            return _read_json_array(path)
        return read_jsonl_lines(path)
    except JsonLineError as exc:
        raise DataError(str(exc)) from None
    except UnicodeDecodeError as exc:  # exc.object is the whole file, exc.start the offset in it
        line = exc.object.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {exc.start} of the file); re-encode the file as UTF-8") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    except MemoryError:
        size = path.stat().st_size / 2**30
        raise DataError(f"{path}: the {what} ({size:.1f} GiB) does not fit in memory; grpokit reads training data "
                        "whole: use a smaller file (data.train_size also limits the rows used)") from None


def _first_char(path: Path) -> str:
    """The first character that is not JSON whitespace (after a UTF-8 byte-order mark), or ''."""
    with path.open("rb") as file:
        head = file.read(3).removeprefix(b"\xef\xbb\xbf")
        while True:
            head = head.lstrip(b" \t\r\n")
            if head:
                return chr(head[0])
            head = file.read(4096)
            if not head:
                return ""


def _read_json_array(path: Path) -> list[tuple[int, dict]]:
    """A JSON array of objects, element by element, so a bad element is named by the line it starts on."""
    text = path.read_bytes().decode("utf-8").removeprefix("\ufeff")
    decoder, rows = json.JSONDecoder(), []
    pos = _skip_space(text, text.index("[") + 1)
    line, counted = 1, 0  # the line of `pos`, counted incrementally (a recount per element is quadratic)
    if text.startswith("]", pos):
        pos = _skip_space(text, pos + 1)
    else:
        while True:
            line, counted = line + text.count("\n", counted, pos), pos
            try:
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise JsonLineError(path, exc.lineno, f"not a valid JSON array ({exc.msg}, column {exc.colno}); "
                                                      "fix the file, or write one JSON object per line") from None
            except RecursionError:
                raise JsonLineError(path, line, "not valid JSON (nested too deeply)") from None
            except ValueError as exc:  # e.g. an integer of over 4300 digits
                raise JsonLineError(path, line, f"not valid JSON ({exc})") from None
            if not isinstance(value, dict):
                raise JsonLineError(path, line, f"element {len(rows) + 1} of the array is a {type(value).__name__}; "
                                                "each row must be a JSON object such as {\"prompt\": \"...\"}")
            rows.append((line, value))
            pos = _skip_space(text, end)
            if text.startswith(",", pos):
                pos = _skip_space(text, pos + 1)
                continue
            if text.startswith("]", pos):
                pos = _skip_space(text, pos + 1)
                break
            raise JsonLineError(path, line + text.count("\n", counted, pos), "not a valid JSON array (expected ',' or ']' after an element"
                                          f"{', got the end of the file' if pos >= len(text) else ''}); fix the file")
    if pos < len(text):
        raise JsonLineError(path, text.count("\n", 0, pos) + 1, "not a valid JSON array (text after the closing ']')")
    return rows


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSON-lines file (or a ``.json`` JSON array of objects); each row remembers its line
    (``_line``) for later errors."""
    return [{**row, "_line": lineno} for lineno, row in read_json_lines(path)]


IMAGE_COLUMNS = ("image", "images")


def _normalise(rows: list[dict], source: str, prompt_field: str, answer_field: str,
               base_dir: str | Path = ".") -> list[dict]:
    """Rename the recipe's prompt column to ``prompt`` and give its answer column as ``answer`` too (keeping
    the original name, so open-r1's ``solution`` reaches functions that ask for it); check every prompt,
    and every image against ``base_dir`` (the folder relative image paths are read from)."""
    out = []
    for index, row in enumerate(rows):
        # JSON rows know their line; a table's rows are counted from 1 after the header
        where = f"{source}:{row.pop('_line')}" if "_line" in row else f"{source}: row {index + 1}"
        prompt = row.get(prompt_field)
        if prompt_field not in row:
            raise DataError(f"{where}: row has no {prompt_field!r} field (a string or a list of chat messages); set data.prompt_field")
        if not isinstance(prompt, (str, list)) or not prompt:
            raise DataError(f"{where}: {prompt_field!r} is {prompt!r:.40}; expected a non-empty string or list of chat messages")
        if isinstance(prompt, list):
            check_messages(prompt, where, prompt_field)
        images = _checked_images(row, prompt, where, base_dir)
        item: dict[str, Any] = {k: v for k, v in row.items() if k != prompt_field and k not in IMAGE_COLUMNS}
        item["prompt"] = prompt
        if answer_field in row:
            item["answer"] = row[answer_field]
        if images:
            item["images"] = images
        if "steps" in item and "episode_id" in item:  # an episode (the replay environment's row): its screenshots
            item["steps"] = absolute_step_images(item["steps"], Path(base_dir), where)
        out.append(item)
    if not out:
        raise DataError(f"{source}: the dataset is empty")
    return out


def _checked_images(row: dict, prompt: str | list, where: str, base_dir: str | Path) -> list:
    """The row's image references, each readable, with the prompt asking for exactly that many.

    The prompt is only checked: it stays as the user wrote it, and the encoder places its images
    (``with_image_blocks``) when it renders them. A row with no image column is a text row, where a
    literal ``<image>`` in a string is just text; an image block in its chat messages is refused,
    since nothing could fill it."""
    if not any(column in row for column in IMAGE_COLUMNS):
        if isinstance(prompt, list) and count_placeholders(prompt):
            with_image_blocks(prompt, 0, where)  # raises: the placeholder count against zero images
        return []
    refs = image_refs(row, where, Path(base_dir))
    check_images(refs, where)
    with_image_blocks(prompt, len(refs), where)
    return refs


def gsm8k_answer(solution: str) -> str:
    """GSM8K solutions end with ``#### <number>``; the number is the reference answer."""
    return solution.rsplit("####", 1)[-1].strip().replace(",", "")


def find_gsm8k(path: str | None) -> Path:
    """Where the GSM8K files are: ``data.path``, $GRPOKIT_GSM8K_DIR, or shared/data/gsm8k beside the repo."""
    candidates = [Path(p) for p in (path, os.environ.get("GRPOKIT_GSM8K_DIR")) if p]
    here = Path.cwd().resolve()
    candidates += [base / "shared" / "data" / "gsm8k" for base in (here, *here.parents)]
    for candidate in candidates:
        if (candidate / "train.jsonl").is_file():
            return candidate
    raise DataError("GSM8K files not found: set data.path to a directory holding train.jsonl and test.jsonl")


def _load_gsm8k(path: str | None) -> tuple[list[dict], list[dict]]:
    folder = find_gsm8k(path)
    splits = []
    for name in ("train", "test"):
        rows = read_jsonl(folder / f"{name}.jsonl")
        for row in rows:
            if "question" not in row or "answer" not in row:
                raise DataError(f"{folder / name}.jsonl:{row['_line']}: a GSM8K row needs 'question' and 'answer'")
            row["solution"] = row["answer"]
            row["answer"] = gsm8k_answer(row["answer"])
        splits.append(_normalise(rows, str(folder / f"{name}.jsonl"), "question", "answer"))
    return splits[0], splits[1]


def _split_off(rows: list[dict], eval_size: int, seed: int, source: str) -> tuple[list[dict], list[dict]]:
    if eval_size >= len(rows):
        raise DataError(f"{source}: {len(rows)} rows cannot give {eval_size} held-out rows and a training set; lower data.eval_size")
    shuffled = rows[:]
    random.Random(seed).shuffle(shuffled)
    return shuffled[eval_size:], shuffled[:eval_size]


def _sample_held_out(test: list[dict], eval_size: int, seed: int) -> list[dict]:
    """Held-out rows from a separate test split: a seeded sample of eval_size of them (all, if fewer)."""
    return random.Random(seed).sample(test, min(eval_size, len(test)))


def read_rows(path: str | Path, prompt_field: str = "prompt", answer_field: str = "answer") -> list[dict]:
    """Every row of one data file (JSON lines, a JSON array, CSV or Parquet), normalised: the prompt
    column as ``prompt``, the answer column also as ``answer``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        rows = read_jsonl(path)
    elif suffix in TABLE_SUFFIXES:
        rows = read_table(path, prompt_field)
    else:
        raise DataError(f"{path}: unknown data format {suffix or '(no suffix)'!r}; use {FORMATS}")
    return _normalise(rows, str(path), prompt_field, answer_field, path.parent)


def read_source_rows(data) -> list[dict]:
    """Every row of ``data.source`` (one data file) in file order, named by its source: what a job that
    wants the whole file (``grpokit generate``) reads, rather than a train/held-out split."""
    return _named(read_rows(data.source, data.prompt_field, data.answer_field), source_name(data.source))


def is_data_file(source: str | None) -> bool:
    """Whether a data source names one file (rather than a built-in task, GSM8K or a saved folder)."""
    return source is not None and Path(source).suffix.lower() in DATA_FILE_SUFFIXES


def load_source(source: str, data, eval_size: int) -> tuple[list[dict], list[dict]]:
    """``(train_rows, eval_rows)`` of one source, before data.train_size and before the rows are named.

    A built-in task is generated with held-out questions apart; GSM8K and a DatasetDict folder
    with a "test" (or "validation") split hold out a seeded sample of that split; a file or a
    single saved Dataset is shuffled with data.seed and its first eval_size rows held out.
    """
    if source.startswith("builtin:"):
        return make_builtin(source.split(":", 1)[1], data.train_size or DEFAULT_TASK_SIZE, eval_size, data.seed)
    if source == "gsm8k":
        train, test = _load_gsm8k(data.path)
        return train, _sample_held_out(test, eval_size, data.seed)
    if Path(source).is_dir():
        train, test, test_name = read_saved(source, data.prompt_field)
        train = _normalise(train, f"{source} [train]" if test is not None else source, data.prompt_field,
                           data.answer_field, source)
        if test is None:
            return _split_off(train, eval_size, data.seed, source)
        test = _normalise(test, f"{source} [{test_name}]", data.prompt_field, data.answer_field, source)
        return train, _sample_held_out(test, eval_size, data.seed)
    if is_data_file(source):
        rows = read_rows(source, data.prompt_field, data.answer_field)
        return _split_off(rows, eval_size, data.seed, source)
    if not Path(source).suffix:
        raise DataError(f"data source {source!r}: no such folder or file; expected builtin:<task>, gsm8k, or {FORMATS}")
    raise DataError(f"data source {source!r}: unknown format; expected builtin:<task>, gsm8k, or {FORMATS}")


def make_builtin(name: str, train_size: int, eval_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """``(train_rows, eval_rows)`` of a built-in task, text (``tasks``) or visual (``visual_tasks``).

    Both registries are read here rather than one importing the other, because ``visual_tasks``
    builds on ``tasks``; a visual task's rows already hold ``images`` as PNG bytes."""
    if name in VISUAL_TASKS:
        return make_visual_task(name, train_size, eval_size, seed)
    if name in TASKS:
        return make_task(name, train_size, eval_size, seed)
    raise DataError(f"unknown built-in task {name!r} (data.source: builtin:{name}); choose one of "
                    f"{sorted(TASKS)} (text) or {sorted(VISUAL_TASKS)} (images)")


def _named(rows: list[dict], name: str) -> list[dict]:
    """Each row with ``data_source: name`` last, unless the row has its own ``data_source``."""
    return [row if "data_source" in row else {**row, "data_source": name} for row in rows]


def mix_sources(trains: list[list[dict]], weights: list[float], seed: int) -> list[dict]:
    """Training rows of several sources, drawn as ``datasets.interleave_datasets(parts,
    probabilities=weights / sum(weights), seed=seed, stopping_strategy="all_exhausted")`` draws them:
    each next row comes from source i with probability w_i / sum(w); each source gives its rows in
    its own order and starts again when it runs out, until every source has given every row once.

    The library interleaves tables of (source, row) indices, not the rows themselves: rows of
    different sources may have different columns and types, which an Arrow table cannot hold.
    """
    from datasets import Dataset, interleave_datasets

    total = sum(weights)
    parts = [Dataset.from_dict({"source": [i] * len(rows), "row": list(range(len(rows)))}) for i, rows in enumerate(trains)]
    mixed = interleave_datasets(parts, probabilities=[w / total for w in weights], seed=seed,
                                stopping_strategy="all_exhausted")
    return [trains[i][r] for i, r in zip(mixed["source"], mixed["row"])]


def load_splits(data) -> tuple[list[dict], list[dict]]:
    """Return ``(train_rows, eval_rows)`` for a recipe's ``data`` section (data.source, or a mix of data.sources)."""
    sources = getattr(data, "sources", None)
    if not sources:
        train, test = load_source(data.source, data, data.eval_size)
        name = source_name(data.source)
        return _named(train[: data.train_size] if data.train_size else train, name), _named(test, name)
    trains, tests = [], []
    for spec in sources:
        eval_size = data.eval_size if spec.eval_size is None else spec.eval_size
        train, test = load_source(spec.path, data, eval_size)
        trains.append(_named(train, spec.label))
        tests += _named(test, spec.label)
    train = mix_sources(trains, [spec.weight for spec in sources], data.seed)
    return (train[: data.train_size] if data.train_size else train), tests
