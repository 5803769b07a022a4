"""Data sources read through Hugging Face ``datasets``: CSV, Parquet, and save_to_disk folders.

``datasets`` is imported only when such a source is used. Errors name the file (and the split
of a DatasetDict) and say what the file must be; a bad row is named later by its row number.
JSON and JSON lines are read by ``grpokit.data.loaders`` itself, so their errors name ``file:line``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from grpokit.errors import DataError

# the splits of a DatasetDict folder, by role: grpokit trains on the first and holds out from the second
TRAIN_SPLIT = "train"
HELD_OUT_SPLITS = ("test", "validation")
FORMATS = ".jsonl, .json, .csv, .parquet, or a folder written by datasets' save_to_disk"


# ------------------------------------------------------------------ through Hugging Face datasets


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars or warnings from ``datasets`` while reading: a failure becomes our own one-line message."""
    import datasets

    bars_were_off, verbosity = datasets.are_progress_bars_disabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield datasets
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars_were_off:
            datasets.enable_progress_bars()


def _cause(exc: BaseException) -> str:
    """The innermost reason: ``datasets`` wraps a pandas or Arrow error in DatasetGenerationError."""
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def read_table(path: str | Path, prompt_field: str) -> list[dict]:
    """Rows of a .csv or .parquet file, read with ``datasets.load_dataset(format, data_files=...)``."""
    path = Path(path)
    kind = path.suffix.lower().lstrip(".")
    if not path.is_file():
        raise DataError(f"{path}: data file not found (relative paths are read from the working directory, "
                        "else from the recipe's folder)")
    how = {"csv": "a CSV file with a header row, comma-separated, quoted where a field holds a comma or newline",
           "parquet": "a Parquet file, e.g. written by pandas.DataFrame.to_parquet or datasets.Dataset.to_parquet"}[kind]
    with _quiet_datasets() as datasets:
        try:
            table = datasets.load_dataset(kind, data_files=str(path), split="train")
        except MemoryError:
            raise DataError(f"{path}: does not fit in memory; use a smaller file") from None
        except Exception as exc:  # pandas' ParserError, Arrow's ArrowInvalid, datasets' own: all "cannot read it"
            raise DataError(f"{path}: cannot read it as {kind.upper()} ({_cause(exc)}); it must be {how}") from None
    return _rows_of(table, str(path), prompt_field)


def read_saved(path: str | Path, prompt_field: str) -> tuple[list[dict], list[dict] | None, str]:
    """``(train rows, held-out rows or None, the held-out split's name)`` of a folder written by
    ``Dataset.save_to_disk`` (no held-out split: None) or ``DatasetDict.save_to_disk`` (its "train"
    split, and its "test" or else "validation" split when there is one)."""
    path = Path(path)
    with _quiet_datasets() as datasets:
        try:
            saved = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise DataError(f"{path}: a folder, but not one written by datasets' save_to_disk (it has no "
                            "dataset_info.json or dataset_dict.json); point data.source at a data file "
                            f"({FORMATS})") from None
        except Exception as exc:
            raise DataError(f"{path}: cannot read the saved dataset ({_cause(exc)}); write it again with "
                            "Dataset.save_to_disk or DatasetDict.save_to_disk") from None
    if isinstance(saved, datasets.Dataset):
        return _rows_of(saved, str(path), prompt_field), None, ""
    splits = list(saved)
    if TRAIN_SPLIT not in splits:
        raise DataError(f"{path}: a DatasetDict with the splits {splits}; grpokit trains on the split named "
                        f"{TRAIN_SPLIT!r} (and holds out from {' or '.join(map(repr, HELD_OUT_SPLITS))}): rename one, "
                        "e.g. DatasetDict(train=dd['mine'], test=dd['other']).save_to_disk(...)")
    held_name = next((name for name in HELD_OUT_SPLITS if name in splits), "")
    train = _rows_of(saved[TRAIN_SPLIT], f"{path} [{TRAIN_SPLIT}]", prompt_field)
    held = _rows_of(saved[held_name], f"{path} [{held_name}]", prompt_field) if held_name else None
    return train, held, held_name


def _rows_of(table, where: str, prompt_field: str) -> list[dict]:
    if prompt_field not in table.column_names:
        raise DataError(f"{where}: no column {prompt_field!r} (its columns: {', '.join(table.column_names) or 'none'}); "
                        "set data.prompt_field to the column holding the prompt, or rename that column")
    return table.to_list()
