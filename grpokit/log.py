"""Run logging: metrics.jsonl and samples.jsonl always, experiment trackers beside them on request.

JSONL is the run directory's record and the report's input. TensorBoard, Weights & Biases
and MLflow are views fed from the same rows (``logging.sinks``). Each tracker is an
optional extra whose library is imported only when the recipe selects it; a tracker that
cannot start is a setup error (raised before any compute is spent), and a tracker that
breaks mid-run is switched off with one warning, because a dashboard must never cost a
training run. See docs/logging.md for how each tracker names things.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import numbers
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol
from urllib.parse import urlparse

from PIL import Image

from grpokit.config import flatten  # noqa: F401 - MLflow params are the flattened recipe
from grpokit.errors import RecipeError, RunDirError

if TYPE_CHECKING:
    from grpokit.config import LoggingConfig

log = logging.getLogger(__name__)


class MetricsSink(Protocol):
    def log(self, row: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class JsonlSink:
    """Append one JSON object per line and flush, so a crash loses at most the line in flight."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:  # O_NOFOLLOW: a link planted in a run directory must not make the run append elsewhere
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise RunDirError(f"{self.path} is a symbolic link; a run directory's logs are written in place, "
                              "never through a link: remove the link") from None
        self._handle = os.fdopen(fd, "a", encoding="utf-8")

    def log(self, row: dict[str, Any]) -> None:
        self._handle.write(json.dumps(json_ready(row), ensure_ascii=False) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


class TrackerSink(Protocol):
    """A dashboard fed beside the JSONL files. ``from_run`` is the one constructor RunLogger
    calls, so adding a tracker is one class and one registry entry, never a branch."""

    package: str
    """The pip distribution that provides the tracker (named in the install hint)."""

    @classmethod
    def from_run(cls, run_dir: Path, run_name: str, cfg: LoggingConfig, config: dict | None) -> TrackerSink: ...
    def log_scalars(self, step: int, scalars: dict[str, float]) -> None: ...
    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None: ...
    def close(self, failed: bool = False) -> None: ...


# ---- helpers the three trackers share ----------------------------------------------------

def is_finite_number(value: Any) -> bool:
    """True for int/float values a chart can plot (bools are flags, not metrics)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def tracker_scalars(row: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl row as tracker scalars: ``{"step": 3, "kind": "eval", "accuracy": 0.5}``
    -> ``{"eval/accuracy": 0.5}``. None, NaN and infinity are left out: JSONL keeps them as null."""
    kind = row["kind"]
    return {f"{kind}/{key}": float(value) for key, value in row.items()
            if key not in ("step", "kind") and is_finite_number(value)}


def sanitise_key(name: str, disallowed: re.Pattern[str]) -> str:
    """Make a metric name acceptable to one tracker: ``pass@5`` -> ``pass_at_5`` (readable, not
    ``pass_5``), then every character the tracker rejects -> ``_``."""
    return disallowed.sub("_", name.replace("@", "_at_"))


def json_ready(value: Any) -> Any:
    """``value`` as ``json.dumps`` can write it, recursively: NaN/infinity as None (``json.dumps``
    would write the invalid ``NaN``), raw bytes, which in a row are an encoded image (the built-in
    visual tasks, Parquet image columns), as ``bytes_label`` (``json.dumps`` would raise), and a
    decoded image (a multi-turn observation's) as ``<image: WxH>``.
    The one place every JSON writer of rows (run logs, ``grpokit data`` outputs) goes through."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes_label(value)
    if isinstance(value, Image.Image):  # an environment's observation image, in a trajectory
        return f"<image: {value.width}x{value.height}>"
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


BYTES_LABEL = re.compile(r"<image: \d+ bytes>")


def bytes_label(value: bytes | bytearray | memoryview) -> str:
    """A short stand-in for an encoded image in JSON, ``"<image: 1234 bytes>"``: a log line stays
    readable and small (base64 of every image would bloat samples.jsonl), and a reader that finds
    it where an image belongs is told what was there (``BYTES_LABEL`` matches it). A path string
    is written as it is."""
    return f"<image: {memoryview(value).nbytes} bytes>"


def as_text(value: Any) -> str:
    """A prompt or answer as one string: chat prompts become ``role: content`` lines."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
        return "\n".join(f"{m.get('role', '?')}: {m['content']}" for m in value)
    return json.dumps(value, ensure_ascii=False)


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_|])")


def markdown_cell(value: Any) -> str:
    """Text that stays inside one Markdown table cell and displays literally: backslashes,
    backticks, emphasis marks and ``|`` are escaped; newlines become ``<br>`` (a table row is one line)."""
    text = _MARKDOWN_SPECIAL.sub(r"\\\1", as_text(value))
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "<br>")


def samples_markdown(rows: list[dict[str, Any]]) -> str:
    """The step's samples as one Markdown table: prompt, completion, answer, reward."""
    lines = ["| prompt | completion | answer | reward |", "|---|---|---|---|"]
    for row in rows:
        reward = row.get("reward")
        shown = f"{reward:.4g}" if is_finite_number(reward) else ""
        lines.append(f"| {markdown_cell(row.get('prompt'))} | {markdown_cell(row.get('completion'))} "
                     f"| {markdown_cell(row.get('answer'))} | {shown} |")
    return "\n".join(lines)


# ---- the trackers ---------------------------------------------------------------------------

class TensorBoardSink:
    """Event files in ``<run dir>/tensorboard`` via torch's SummaryWriter, which needs only the
    ``tensorboard`` package (tensorboard's own writer has no text summaries).

    Tags are free-form strings in TensorBoard, so names go in unchanged (``train/pass@5``);
    the part before the first ``/`` groups the charts. Samples are one Markdown table per step
    under ``samples``; the recipe is a JSON code block under ``recipe`` at step 0.
    """

    package = "tensorboard"

    def __init__(self, log_dir: Path, config: dict | None = None):
        from torch.utils.tensorboard import SummaryWriter

        # flush every 10 s instead of 120: a dashboard that lags two minutes looks broken
        self._writer = SummaryWriter(str(log_dir), flush_secs=10)
        if config is not None:
            recipe = json.dumps(json_ready(config), indent=2, ensure_ascii=False)
            self._writer.add_text("recipe", "\n".join("    " + line for line in recipe.splitlines()), 0)

    @classmethod
    def from_run(cls, run_dir: Path, run_name: str, cfg: LoggingConfig, config: dict | None) -> TensorBoardSink:
        return cls(run_dir / "tensorboard", config)

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, step)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        self._writer.add_text("samples", samples_markdown(rows), step)

    def close(self, failed: bool = False) -> None:
        self._writer.close()


class WandbSink:
    """A Weights & Biases run in ``<run dir>/wandb``, offline unless WANDB_MODE says otherwise.

    Offline is the default so a recipe never uploads anything by surprise; ``wandb sync
    <run dir>/wandb/offline-run-*`` uploads later. When we choose offline we also make the run
    quiet and cheap (no console capture, no system-metrics process); when the user set
    WANDB_MODE, wandb's own defaults apply. Names keep ``/`` (W&B's chart sections) and map
    every other character outside W&B's recommended ``[A-Za-z0-9_]`` to ``_``, so metrics
    stay sortable and filterable in the UI (``train/pass@5`` -> ``train/pass_at_5``).
    """

    package = "wandb"
    DISALLOWED = re.compile(r"[^A-Za-z0-9_/]")
    OFFLINE_SETTINGS = {"mode": "offline", "silent": True, "console": "off",
                        "x_disable_stats": True, "x_disable_machine_info": True}
    SAMPLE_COLUMNS = ["step", "prompt", "completion", "answer", "reward"]

    def __init__(self, run_dir: Path, project: str, run_name: str, config: dict | None = None):
        import wandb

        self._wandb = wandb
        chosen = {} if "WANDB_MODE" in os.environ else self.OFFLINE_SETTINGS
        # create_new: each RunLogger owns its run, so two runs in one process never share one
        settings = wandb.Settings(reinit="create_new", **chosen)
        self._run = wandb.init(project=project, name=run_name, dir=str(run_dir), config=config, settings=settings)

    @classmethod
    def from_run(cls, run_dir: Path, run_name: str, cfg: LoggingConfig, config: dict | None) -> WandbSink:
        return cls(run_dir, cfg.project, run_name, config)

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self._run.log({sanitise_key(k, self.DISALLOWED): v for k, v in scalars.items()}, step=step)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        table = self._wandb.Table(columns=self.SAMPLE_COLUMNS)
        for row in rows:
            reward = row.get("reward")
            table.add_data(step, as_text(row.get("prompt")), as_text(row.get("completion")),
                           as_text(row.get("answer")), float(reward) if is_finite_number(reward) else None)
        self._run.log({"samples": table}, step=step)

    def close(self, failed: bool = False) -> None:
        self._run.finish(exit_code=1 if failed else 0)
        # The wandb-core service process outlives run.finish(); stop it unless another run in
        # this process (the user's own, say) still uses it.
        from wandb.sdk import wandb_setup

        if wandb_setup.singleton().most_recent_active_run is None:
            self._wandb.teardown()


@contextmanager
def _file_store_allowed(tracking_uri: str) -> Iterator[None]:
    """MLflow >= 3.7 refuses its file store unless MLFLOW_ALLOW_FILE_STORE=true (a database
    store needs SQLAlchemy, which mlflow-skinny lacks). Opt in only while our client builds its
    store (MLflow caches stores per URI), and only if the user has not decided themselves."""
    if urlparse(tracking_uri).scheme not in ("", "file") or "MLFLOW_ALLOW_FILE_STORE" in os.environ:
        yield
        return
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class MlflowSink:
    """An MLflow run through the client API (no global ``mlflow.start_run`` state, so nothing
    leaks between runs in one process).

    Default store: ``file://<run dir>/mlruns``. Experiment = ``logging.project``. Names keep
    MLflow's allowed characters (letters, digits, ``_ - . /`` and space; ``:`` is left out
    because Windows rejects it) and map the rest to ``_`` (``pass@5`` -> ``pass_at_5``). The
    recipe becomes flat params (``model.lora.r``) plus a ``recipe.json`` artifact; samples are
    ``samples/step-<N>.json`` artifacts. The run ends FINISHED, or FAILED when training raised.
    """

    package = "mlflow-skinny"
    DISALLOWED = re.compile(r"[^\w./\- ]")
    # limits from mlflow.utils.validation (3.17); tests check they still match the installed MLflow
    MAX_PARAM_VALUE = 6000
    PARAMS_PER_BATCH = 100
    METRICS_PER_BATCH = 1000

    def __init__(self, tracking_uri: str, project: str, run_name: str, config: dict | None = None):
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param

        self._metric, self._param = Metric, Param
        with _file_store_allowed(tracking_uri):
            self._client = MlflowClient(tracking_uri)
        experiment = self._client.get_experiment_by_name(project)
        experiment_id = experiment.experiment_id if experiment else self._client.create_experiment(project)
        self._run_id = self._client.create_run(experiment_id, run_name=run_name).info.run_id
        if config is not None:
            try:
                self._log_config(config)
            except Exception:
                self.close(failed=True)  # RunLogger never gets this sink to close: don't leave a RUNNING run
                raise

    @classmethod
    def from_run(cls, run_dir: Path, run_name: str, cfg: LoggingConfig, config: dict | None) -> MlflowSink:
        uri = cfg.mlflow_tracking_uri or (run_dir / "mlruns").resolve().as_uri()
        return cls(uri, cfg.project, run_name, config)

    def _log_config(self, config: dict) -> None:
        params = [self._param(self._key(key), self._param_value(value)) for key, value in flatten(config).items()]
        for chunk in _chunks(params, self.PARAMS_PER_BATCH):
            self._client.log_batch(self._run_id, params=chunk)
        self._client.log_text(self._run_id, json.dumps(json_ready(config), indent=2, ensure_ascii=False), "recipe.json")

    def _key(self, name: str) -> str:
        return sanitise_key(name, self.DISALLOWED)

    def _param_value(self, value: Any) -> str:
        """Strings as they are, everything else as JSON (``true``, ``null``, ``["a"]``, as in
        recipe.json), cut to MLflow's value limit (the full recipe is the artifact)."""
        text = value if isinstance(value, str) else json.dumps(json_ready(value), ensure_ascii=False)
        return text[:self.MAX_PARAM_VALUE]

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        timestamp_ms = int(time.time() * 1000)
        metrics = [self._metric(self._key(k), v, timestamp_ms, step) for k, v in scalars.items()]
        for chunk in _chunks(metrics, self.METRICS_PER_BATCH):
            self._client.log_batch(self._run_id, metrics=chunk)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        lines = json_ready([{"step": step, **row} for row in rows])
        self._client.log_text(self._run_id, json.dumps(lines, indent=2, ensure_ascii=False), f"samples/step-{step}.json")

    def close(self, failed: bool = False) -> None:
        self._client.set_terminated(self._run_id, "FAILED" if failed else "FINISHED")


TRACKERS: dict[str, type[TrackerSink]] = {"tensorboard": TensorBoardSink, "wandb": WandbSink, "mlflow": MlflowSink}
"""``logging.sinks`` names -> tracker classes (tests swap entries for fakes)."""


def open_tracker(name: str, run_dir: Path, run_name: str, cfg: LoggingConfig, config: dict | None) -> TrackerSink:
    """Start one tracker, turning a missing package or a failed start into a message for people."""
    cls = TRACKERS[name]
    try:
        return cls.from_run(run_dir, run_name, cfg, config)
    except ImportError as exc:
        raise RecipeError(f'logging.sinks: "{name}" needs the {cls.package} package: pip install "grpokit[{name}]"'
                          f" (import failed: {exc})") from exc
    except Exception as exc:
        raise RecipeError(f'logging.sinks: "{name}" could not start: {type(exc).__name__}: {exc}; '
                          f"fix it or remove {name!r} from logging.sinks") from exc


def check_trackers(logging_cfg: LoggingConfig) -> None:
    """Fail before the run directory is touched when a selected tracker's package is missing."""
    import importlib

    for name in logging_cfg.sinks:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise RecipeError(f'logging.sinks: "{name}" needs the {TRACKERS[name].package} package: '
                              f'pip install "grpokit[{name}]" (import failed: {exc})') from exc


class RunLogger:
    """Everything the trainer logs goes through here: metrics.jsonl and samples.jsonl (exactly
    the lines the report reads), and the same rows to each tracker in ``logging.sinks``.

    A tracker that raises while logging is switched off after one warning; the JSONL files
    are the record, so training goes on. Use as a context manager (or call ``close``) so the
    trackers' runs end FINISHED, or FAILED when the block raised.
    """

    def __init__(self, run_dir: Path, logging_cfg: LoggingConfig, config: dict | None = None):
        self.run_dir = Path(run_dir)
        self._metrics = JsonlSink(self.run_dir / "metrics.jsonl")
        self._samples = JsonlSink(self.run_dir / "samples.jsonl")
        self._trackers: dict[str, TrackerSink] = {}
        self._closed = False
        run_name = logging_cfg.run_name or self.run_dir.name
        try:
            for name in dict.fromkeys(logging_cfg.sinks):  # a name listed twice opens once
                self._trackers[name] = open_tracker(name, self.run_dir, run_name, logging_cfg, config)
        except BaseException:
            self.close(failed=True)
            raise

    @property
    def trackers(self) -> tuple[str, ...]:
        """Names of the trackers still on."""
        return tuple(self._trackers)

    def metrics(self, row: dict[str, Any]) -> None:
        """One metrics.jsonl line (``step``, ``kind`` = train/eval, values); trackers get its
        finite numbers as ``<kind>/<key>`` at ``step``."""
        self._metrics.log(row)
        scalars = tracker_scalars(row)
        if scalars:
            self._each_tracker(lambda sink: sink.log_scalars(row["step"], scalars))

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """One samples.jsonl line per row (prompt, completion, answer, reward, rewards), ``step`` first."""
        for row in rows:
            self._samples.log({"step": step, **row})
        if rows:
            self._each_tracker(lambda sink: sink.log_samples(step, rows))

    def close(self, failed: bool = False) -> None:
        """End every tracker's run (FAILED if ``failed``) and close the files; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._each_tracker(lambda sink: sink.close(failed=failed), closing=True)
        self._metrics.close()
        self._samples.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(failed=exc_type is not None)

    def _each_tracker(self, call: Callable[[TrackerSink], None], closing: bool = False) -> None:
        for name, sink in list(self._trackers.items()):
            try:
                call(sink)
            except Exception as exc:
                log.warning('logging sink "%s" failed (%s: %s); it is off for the rest of the run, '
                            "metrics.jsonl and samples.jsonl still get everything", name, type(exc).__name__, exc)
                del self._trackers[name]
                if not closing:
                    self._close_quietly(name, sink)
        if closing:
            self._trackers.clear()

    @staticmethod
    def _close_quietly(name: str, sink: TrackerSink) -> None:
        """Release a broken tracker's files and processes; its own error was already reported."""
        try:
            sink.close(failed=True)
        except Exception as exc:
            log.debug('closing the broken sink "%s" failed too: %s', name, exc)
