"""Run logging: JSONL plus TensorBoard, W&B (offline) and MLflow, each read back with the
tracker library's own reader from files written under tmp_path. Fakes appear only where
the behaviour under test is RunLogger's (a tracker that breaks mid-run)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from grpokit import log as grpolog
from grpokit.config import LoggingConfig
from grpokit.errors import RecipeError
from grpokit.log import RunLogger, flatten, samples_markdown

NAN, INF = float("nan"), float("inf")
TRAIN_1 = {"step": 1, "kind": "train", "reward": 0.25, "rewards/accuracy": 0.5, "rewards/math-verify": 0.125,
           "pass@5": 0.75, "reward_time_s/answer_match": 0.0625, "curriculum/stage": 1,
           "dynamic_sampling/extra_rounds": 2, "kl": NAN, "grad_norm": INF, "note": None, "resumed": True}
TRAIN_2 = {**TRAIN_1, "step": 2, "reward": 0.5, "pass@5": 1.0, "curriculum/stage": 2, "kl": 0.01}
EVAL_2 = {"step": 2, "kind": "eval", "accuracy": 0.6, "reward": 0.55, "num_examples": 10, "rewards/accuracy": 0.6}
SAMPLES = [
    {"prompt": "What is 2+3?", "completion": "It is | 5\nso <answer>5</answer>", "answer": "5", "reward": 1.0,
     "rewards": {"accuracy": 1.0, "format": None}},
    {"prompt": [{"role": "user", "content": "7*6?"}], "completion": "maybe \\frac{84}{2}", "answer": 42,
     "reward": NAN, "rewards": {"accuracy": 0.0, "format": 0.5}},
]
RECIPE = {"model": {"path": "tiny", "lora": {"r": 16}}, "rewards": [{"name": "accuracy", "weight": 1.0}],
          "training": {"learning_rate": 1e-5}, "data": {"system_prompt": "x" * 7000},
          "logging": {"sinks": ["mlflow"], "run_name": None}}


def write_run(run_dir: Path, sinks: list[str], **cfg) -> RunLogger:
    """What the trainer logs in a two-step run: train, train, samples and eval at step 2."""
    logger = RunLogger(run_dir, LoggingConfig(sinks=sinks, project="grpokit-test", **cfg), RECIPE)
    logger.metrics(TRAIN_1)
    logger.metrics(TRAIN_2)
    logger.samples(2, SAMPLES)
    logger.metrics(EVAL_2)
    logger.close()
    return logger


# ---- RunLogger and JSONL -------------------------------------------------------------------

class RecordingSink:
    """Stands in for a tracker that works: records every call."""

    package = "recording"
    calls: list[tuple] = []

    @classmethod
    def from_run(cls, run_dir, run_name, cfg, config):
        cls.calls.append(("open", run_name, config))
        return cls()

    def log_scalars(self, step, scalars):
        self.calls.append(("scalars", step, scalars))

    def log_samples(self, step, rows):
        self.calls.append(("samples", step, rows))

    def close(self, failed=False):
        self.calls.append(("close", failed))


class BrokenSink(RecordingSink):
    """A tracker whose server went away after the run started."""

    calls: list[tuple] = []

    def log_scalars(self, step, scalars):
        raise ConnectionError("tracking server unreachable")


def test_jsonl_lines_are_the_rows_with_step_first_and_non_finite_as_null(tmp_path):
    run_dir = tmp_path / "run"
    write_run(run_dir, [])
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics == [{k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in row.items()}
                       for row in (TRAIN_1, TRAIN_2, EVAL_2)]
    assert metrics[0]["kl"] is None and metrics[0]["grad_norm"] is None and metrics[1]["kl"] == 0.01
    lines = (run_dir / "samples.jsonl").read_text().splitlines()
    samples = [json.loads(line) for line in lines]
    assert [list(s)[0] for s in samples] == ["step", "step"]
    assert samples[0] == {"step": 2, **SAMPLES[0]}
    assert samples[1]["reward"] is None and samples[1]["prompt"] == SAMPLES[1]["prompt"]


def test_trackers_get_finite_numbers_as_kind_slash_key(tmp_path, monkeypatch):
    RecordingSink.calls = []
    monkeypatch.setitem(grpolog.TRACKERS, "mlflow", RecordingSink)
    write_run(tmp_path / "run", ["mlflow"])
    opened, first, second, samples, eval_, closed = RecordingSink.calls
    assert opened == ("open", "run", RECIPE)  # run name defaults to the run directory's name
    assert first == ("scalars", 1, {
        "train/reward": 0.25, "train/rewards/accuracy": 0.5, "train/rewards/math-verify": 0.125, "train/pass@5": 0.75,
        "train/reward_time_s/answer_match": 0.0625, "train/curriculum/stage": 1.0,
        "train/dynamic_sampling/extra_rounds": 2.0})  # no NaN kl, inf grad_norm, None note or bool flag
    assert second[1] == 2 and second[2]["train/kl"] == 0.01
    assert samples == ("samples", 2, SAMPLES)
    assert eval_ == ("scalars", 2, {"eval/accuracy": 0.6, "eval/reward": 0.55, "eval/num_examples": 10.0,
                                    "eval/rewards/accuracy": 0.6})
    assert closed == ("close", False)


def test_a_tracker_that_breaks_is_switched_off_after_one_warning(tmp_path, monkeypatch, caplog):
    RecordingSink.calls, BrokenSink.calls = [], []
    monkeypatch.setitem(grpolog.TRACKERS, "tensorboard", BrokenSink)
    monkeypatch.setitem(grpolog.TRACKERS, "mlflow", RecordingSink)
    with caplog.at_level(logging.WARNING, logger="grpokit.log"):
        logger = write_run(tmp_path / "run", ["tensorboard", "mlflow"], run_name="named")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and '"tensorboard"' in warnings[0] and "tracking server unreachable" in warnings[0]
    assert logger.trackers == ()  # closed
    assert [c[0] for c in BrokenSink.calls] == ["open", "close"] and BrokenSink.calls[1] == ("close", True)
    assert [c[:2] for c in RecordingSink.calls] == [("open", "named"), ("scalars", 1), ("scalars", 2),
                                                    ("samples", 2), ("scalars", 2), ("close", False)]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3


def test_close_is_idempotent_and_a_raising_block_closes_failed(tmp_path, monkeypatch):
    RecordingSink.calls = []
    monkeypatch.setitem(grpolog.TRACKERS, "wandb", RecordingSink)
    with pytest.raises(RuntimeError), RunLogger(tmp_path / "run", LoggingConfig(sinks=["wandb"])) as logger:
        logger.metrics(TRAIN_1)
        raise RuntimeError("out of memory")
    logger.close()
    assert RecordingSink.calls[-1] == ("close", True) and [c[0] for c in RecordingSink.calls].count("close") == 1


@pytest.mark.parametrize("sink, modules, package", [
    ("wandb", ["wandb"], "wandb"),
    ("mlflow", ["mlflow"], "mlflow-skinny"),
    ("tensorboard", ["torch.utils.tensorboard", "tensorboard"], "tensorboard"),
])
def test_a_missing_tracker_package_names_the_extra_to_install(tmp_path, monkeypatch, sink, modules, package):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # what `import` sees when the package is absent
    with pytest.raises(RecipeError, match=re.escape(
            f'logging.sinks: "{sink}" needs the {package} package: pip install "grpokit[{sink}]"')):
        RunLogger(tmp_path / "run", LoggingConfig(sinks=[sink]))


def test_a_tracker_that_cannot_start_fails_before_training_and_closes_the_others(tmp_path, monkeypatch):
    class Unstartable(RecordingSink):
        @classmethod
        def from_run(cls, *args):
            raise ValueError("bad tracking uri")

    RecordingSink.calls = []
    monkeypatch.setitem(grpolog.TRACKERS, "tensorboard", RecordingSink)
    monkeypatch.setitem(grpolog.TRACKERS, "mlflow", Unstartable)
    with pytest.raises(RecipeError, match='"mlflow" could not start: ValueError: bad tracking uri'):
        RunLogger(tmp_path / "run", LoggingConfig(sinks=["tensorboard", "mlflow"]))
    assert RecordingSink.calls[-1] == ("close", True)


def test_flatten_dots_sections_and_indexes_lists_of_sections():
    assert flatten(RECIPE | {"data": {"system_prompt": "s", "columns": ["a", "b"]}, "empty": {}}) == {
        "model.path": "tiny", "model.lora.r": 16, "rewards.0.name": "accuracy", "rewards.0.weight": 1.0,
        "training.learning_rate": 1e-5, "data.system_prompt": "s", "data.columns": ["a", "b"],
        "logging.sinks": ["mlflow"], "logging.run_name": None, "empty": {}}


# ---- TensorBoard ---------------------------------------------------------------------------

def test_tensorboard_event_files_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.text.text_plugin import text_array_to_html

    run_dir = tmp_path / "run"
    write_run(run_dir, ["tensorboard"])
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()

    def series(tag):
        return [(e.step, pytest.approx(e.value)) for e in events.Scalars(tag)]

    assert series("train/reward") == [(1, 0.25), (2, 0.5)]
    assert series("train/pass@5") == [(1, 0.75), (2, 1.0)]  # TensorBoard tags take any character
    assert series("train/rewards/math-verify") == [(1, 0.125), (2, 0.125)]
    assert series("train/curriculum/stage") == [(1, 1.0), (2, 2.0)]
    assert series("train/kl") == [(2, 0.01)]  # step 1's NaN was not sent
    assert series("eval/accuracy") == [(2, 0.6)]
    assert "train/grad_norm" not in events.Tags()["scalars"]

    (text,) = events.Tensors("samples/text_summary")
    assert text.step == 2
    html = text_array_to_html(np.array(text.tensor_proto.string_val[0]), enable_markdown=True)
    rows = re.findall(r"<tr>(.*?)</tr>", html, flags=re.S)
    cells = [re.findall(r"<t[dh]>(.*?)</t[dh]>", row, flags=re.S) for row in rows]
    assert [len(c) for c in cells] == [4, 4, 4]  # header + 2 samples: the | in a completion stayed inside its cell
    assert cells[1][1] == "It is | 5<br>so &lt;answer&gt;5&lt;/answer&gt;"
    assert cells[2] == ["user: 7*6?", "maybe \\frac{84}{2}", "42", ""]
    (recipe,) = events.Tensors("recipe/text_summary")
    assert '"r": 16' in recipe.tensor_proto.string_val[0].decode()


def test_samples_markdown_escapes_what_would_break_the_table():
    table = samples_markdown([{"prompt": "a|b", "completion": "x\r\ny*z_`", "answer": None, "reward": 0.123456}])
    assert table.splitlines()[2] == r"| a\|b | x<br>y\*z\_\` |  | 0.1235 |"


# ---- MLflow --------------------------------------------------------------------------------

def test_mlflow_run_reads_back_from_the_file_store(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run 1"  # a space: the default store URI must be a proper (quoted) file URI
    write_run(run_dir, ["mlflow"])
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ  # the opt-in did not leak

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what any reader of a file store must set
    client = MlflowClient((run_dir / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("grpokit-test")
    (run,) = client.search_runs([experiment.experiment_id])
    run_id = run.info.run_id
    assert run.info.run_name == "run 1" and run.info.status == "FINISHED"

    def history(key):
        return [(m.step, pytest.approx(m.value)) for m in client.get_metric_history(run_id, key)]

    assert history("train/reward") == [(1, 0.25), (2, 0.5)]
    assert history("train/pass_at_5") == [(1, 0.75), (2, 1.0)]  # '@' is not allowed in MLflow keys
    assert history("train/rewards/math-verify") == [(1, 0.125), (2, 0.125)]
    assert history("train/reward_time_s/answer_match") == [(1, 0.0625), (2, 0.0625)]
    assert history("train/dynamic_sampling/extra_rounds") == [(1, 2.0), (2, 2.0)]
    assert history("train/kl") == [(2, 0.01)]
    assert history("eval/accuracy") == [(2, 0.6)]
    assert "train/grad_norm" not in run.data.metrics

    params = run.data.params
    assert params["model.lora.r"] == "16" and params["rewards.0.name"] == "accuracy"
    assert params["logging.sinks"] == '["mlflow"]' and params["logging.run_name"] == "null"
    assert params["data.system_prompt"] == "x" * 6000  # cut to MLflow's value limit
    assert {a.path for a in client.list_artifacts(run_id)} == {"recipe.json", "samples"}
    assert [a.path for a in client.list_artifacts(run_id, "samples")] == ["samples/step-2.json"]
    samples = json.loads(Path(client.download_artifacts(run_id, "samples/step-2.json", str(tmp_path))).read_text())
    assert samples[0] == {"step": 2, **SAMPLES[0]} and samples[1]["reward"] is None
    recipe = json.loads(Path(client.download_artifacts(run_id, "recipe.json", str(tmp_path))).read_text())
    assert recipe == RECIPE


def test_mlflow_run_of_a_failed_training_ends_failed(tmp_path):
    from mlflow import MlflowClient

    uri = (tmp_path / "store").resolve().as_uri()
    with pytest.raises(KeyboardInterrupt), RunLogger(tmp_path / "run", LoggingConfig(
            sinks=["mlflow"], mlflow_tracking_uri=uri, run_name="crashed")) as logger:
        logger.metrics(TRAIN_1)
        raise KeyboardInterrupt
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("grpokit").experiment_id])
    assert run.info.run_name == "crashed" and run.info.status == "FAILED"


def test_mlflow_limits_match_the_installed_mlflow():
    from mlflow.utils import validation

    sink = grpolog.MlflowSink
    assert (sink.MAX_PARAM_VALUE, sink.PARAMS_PER_BATCH, sink.METRICS_PER_BATCH) == (
        validation.MAX_PARAM_VAL_LENGTH, validation.MAX_PARAMS_TAGS_PER_BATCH, validation.MAX_METRICS_PER_BATCH)
    for key in ("train/pass@5", "eval/rewards/a:b", "train/x|y"):
        assert validation.validate_param_and_metric_name(grpolog.sanitise_key(key, sink.DISALLOWED))


# ---- Weights & Biases (offline) ------------------------------------------------------------

@pytest.fixture
def wandb_home(tmp_path, monkeypatch):
    """Keep wandb's caches, config and staging under tmp_path, and its mode ours to choose."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))


def wandb_records(run_file: Path) -> list[dict]:
    """The .wandb transaction log, decoded by wandb's own reader: wandb 0.31 dropped the Python
    DataStore, and `wandb leet inspect --json` (wandb-core) prints one record per line."""
    done = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_file)],
                          capture_output=True, text=True, timeout=60, check=True)
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_wandb_offline_runs_read_back_from_the_transaction_log(tmp_path, wandb_home):
    for name in ("first", "second"):  # two runs in one process: each its own run, both finished
        write_run(tmp_path / name, ["wandb"])
    for name in ("first", "second"):
        (offline,) = (tmp_path / name / "wandb").glob("offline-run-*")
        (run_file,) = offline.glob("run-*.wandb")
        records = wandb_records(run_file)
        (run,) = [r["run"] for r in records if r["type"] == "run"]
        assert run["display_name"] == name and run["project"] == "grpokit-test"
        assert run["config"]["update"]["model"] == {"path": "tiny", "lora": {"r": 16}}
        history = {r["history"]["step"]["num"]: r["history"]["item"] for r in records if r["type"] == "history"}
        assert set(history) == {1, 2}
        assert history[1]["train/reward"] == 0.25 and history[2]["train/reward"] == 0.5
        assert history[1]["train/pass_at_5"] == 0.75 and history[1]["train/rewards/math_verify"] == 0.125
        assert history[1]["train/reward_time_s/answer_match"] == 0.0625
        assert history[2]["train/curriculum/stage"] == 2 and history[2]["train/dynamic_sampling/extra_rounds"] == 2
        assert "train/kl" not in history[1] and history[2]["train/kl"] == 0.01
        assert history[2]["eval/accuracy"] == 0.6  # eval and train rows of one step share a history row
        assert history[2]["samples._type"] == "table-file"
        table = json.loads((offline / "files" / history[2]["samples.path"]).read_text())
        assert table["columns"] == ["step", "prompt", "completion", "answer", "reward"]
        assert table["data"] == [[2, "What is 2+3?", SAMPLES[0]["completion"], "5", 1.0],
                                 [2, "user: 7*6?", "maybe \\frac{84}{2}", "42", None]]
        assert [r["exit"]["exit_code"] for r in records if r["type"] == "exit"] == [0]


# ---- the trainer feeds every tracker ---------------------------------------------------------

@pytest.mark.slow
def test_a_training_run_feeds_all_three_trackers(tiny_model_dir, tmp_path, monkeypatch, wandb_home):
    """Through the real loop: the same train and eval scalars reach TensorBoard, MLflow and W&B."""
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from grpokit.config import recipe_from_dict
    from grpokit.train import train

    from conftest import tiny_recipe

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = tiny_recipe(tiny_model_dir, tmp_path / "run", training={"max_steps": 2},
                      logging={"sinks": ["tensorboard", "wandb", "mlflow"], "samples_every": 1})
    run_dir = train(recipe_from_dict(raw))
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rewards = [(r["step"], pytest.approx(r["reward"])) for r in lines if r["kind"] == "train"]
    accuracy = [(r["step"], pytest.approx(r["accuracy"])) for r in lines if r["kind"] == "eval"]

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/reward")] == rewards
    assert [(e.step, e.value) for e in events.Scalars("eval/accuracy")] == accuracy
    assert len(events.Tensors("samples/text_summary")) == 2

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient((run_dir / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("grpokit").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["training.max_steps"] == "2"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/reward")] == rewards

    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history = {r["history"]["step"]["num"]: r["history"]["item"] for r in wandb_records(run_file) if r["type"] == "history"}
    assert [(step, history[step]["train/reward"]) for step in sorted(history) if "train/reward" in history[step]] == rewards
    assert [(step, history[step]["eval/accuracy"]) for step in sorted(history) if "eval/accuracy" in history[step]] == accuracy
