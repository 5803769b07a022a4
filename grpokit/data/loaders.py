"""Loading rows from a recipe's ``data`` section: built-in tasks, JSONL files, GSM8K.

Every error names the file and line, and what to change.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

from grpokit.data.tasks import make_task
from grpokit.errors import DataError
from grpokit.jsonio import JsonLineError, read_jsonl_lines

DEFAULT_TASK_SIZE = 2000


def read_json_lines(path: str | Path, what: str = "data file") -> list[tuple[int, dict]]:
    """``(line, object)`` pairs of a JSON-lines file; every failure is a DataError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    try:
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


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSON-lines file; each row remembers its line (``_line``) for later errors."""
    return [{**row, "_line": lineno} for lineno, row in read_json_lines(path)]


def _check_messages(prompt: list, where: str, prompt_field: str) -> None:
    """A list prompt is a chat: each message an object with a string role and a string content
    (checked here, since the chat template would otherwise fail mid-run on a bad row)."""
    for index, message in enumerate(prompt):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise DataError(f"{where}: {prompt_field}[{index}] is not a chat message; each needs a string 'role' "
                            f"and a string 'content' (e.g. {{\"role\": \"user\", \"content\": \"...\"}}), got {message!r:.60}")


def _normalise(rows: list[dict], source: str, prompt_field: str, answer_field: str) -> list[dict]:
    """Rename the recipe's prompt column to ``prompt`` and give its answer column as ``answer`` too (keeping
    the original name, so open-r1's ``solution`` reaches functions that ask for it); check every prompt."""
    out = []
    for index, row in enumerate(rows):
        where = f"{source}:{row.pop('_line', index + 1)}"
        prompt = row.get(prompt_field)
        if prompt_field not in row:
            raise DataError(f"{where}: row has no {prompt_field!r} field (a string or a list of chat messages); set data.prompt_field")
        if not isinstance(prompt, (str, list)) or not prompt:
            raise DataError(f"{where}: {prompt_field!r} is {prompt!r:.40}; expected a non-empty string or list of chat messages")
        if isinstance(prompt, list):
            _check_messages(prompt, where, prompt_field)
        item: dict[str, Any] = {k: v for k, v in row.items() if k != prompt_field}
        item["prompt"] = prompt
        if answer_field in row:
            item["answer"] = row[answer_field]
        out.append(item)
    if not out:
        raise DataError(f"{source}: the dataset is empty")
    return out


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


def load_splits(data) -> tuple[list[dict], list[dict]]:
    """Return ``(train_rows, eval_rows)`` for a recipe's ``data`` section."""
    source = data.source
    if source.startswith("builtin:"):
        return make_task(source.split(":", 1)[1], data.train_size or DEFAULT_TASK_SIZE, data.eval_size, data.seed)
    if source == "gsm8k":
        train, test = _load_gsm8k(data.path)
        test = random.Random(data.seed).sample(test, min(data.eval_size, len(test)))
    elif source.endswith((".jsonl", ".json")):
        rows = _normalise(read_jsonl(source), source, data.prompt_field, data.answer_field)
        train, test = _split_off(rows, data.eval_size, data.seed, source)
    else:
        raise DataError(f"data.source {source!r}: expected builtin:<task>, gsm8k, or a .jsonl file")
    if data.train_size:
        train = train[: data.train_size]
    return train, test
