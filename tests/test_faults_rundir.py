"""The run directory under faults (issue #14: items 5, 7, 8, 11, 12).

- a lock: a second process (train, --resume, --overwrite) refuses at once, before the model
  loads, naming the holder's pid; a killed holder's lock dies with it;
- SIGTERM outside the step loop: during the step-0 eval the run stops with a step-0
  checkpoint and exit 0; during the final eval or checkpoint the run still finishes;
- the printed resume command, run as printed, resumes that very run (every --set kept);
- messages, not tracebacks: a full disk while checkpointing, an output_dir under a file or on
  a read-only filesystem (found before the model loads, and by --dry-run), a pickled adapter;
- untrusted run directories: report.md and plots are replaced, never written through a link;
  ``checkpoints/latest`` may only name a plain step-N inside checkpoints/; a copied run
  resumes at its new place.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from grpokit.cli import main
from grpokit.config import recipe_from_dict
from grpokit.errors import ModelError, RunDirError
from grpokit.models.checkpoint import latest_checkpoint, load_checkpoint, load_checkpoint_policy
from grpokit.report import write_report
from grpokit.train import train

from test_faults import faulty_recipe, sigkill, start_child, wait_for
from test_report import make_run

pytestmark = pytest.mark.slow
TESTS = str(Path(__file__).parent)


def small_recipe(model_dir, out_dir, **training) -> dict:
    """The fault recipe (LoRA, reference, normaliser, replay), two steps, a checkpoint after each."""
    return faulty_recipe(model_dir, out_dir, training={"max_steps": 2, "save_every": 1, **training})


def write_recipe(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def run_info(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def error_line(capsys) -> str:
    """The one ``grpokit: error:`` line of a refused command (no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("grpokit: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the model is loaded: a refusal must come before it."""
    import grpokit.train.run as run

    def load_policy(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(run, "load_policy", load_policy)


# ============================================================================ item 5: one process per run dir


def test_a_live_run_holds_its_directory_against_train_resume_and_overwrite(tiny_model_dir, tmp_path, capsys,
                                                                            monkeypatch, no_model_load):
    raw = small_recipe(tiny_model_dir, tmp_path / "run", max_steps=4)
    child, flag = start_child(tmp_path, raw, "step", freeze_step=2)  # alive, frozen in step 2, holding the run
    try:
        wait_for(flag, child)
        run_dir = tmp_path / "run"
        before = snapshot(run_dir)
        recipe_path = write_recipe(tmp_path / "recipe.yaml", raw)
        for mode in ([], ["--resume"], ["--overwrite"]):
            assert main(["train", str(recipe_path), *mode]) == 2, mode
            message = error_line(capsys)
            assert f"{run_dir} is in use by another grpokit process (pid {child.pid}" in message, message
            assert f"kill -TERM {child.pid}" in message and "training.output_dir" in message
        assert snapshot(run_dir) == before  # --overwrite deleted nothing, --resume appended nothing
    finally:
        sigkill(child)
    # the kernel drops a dead holder's lock: the run resumes (the lock file left behind is no obstacle)
    monkeypatch.undo()
    assert main(["train", str(recipe_path), "--resume"]) == 0
    info = run_info(run_dir)
    assert info["status"] == "finished" and info["resumed"][0]["from_step"] == 1
    assert not (run_dir / ".lock").exists()  # a run that ended leaves no lock file


# ============================================================================ item 7: signals outside the step loop


SIGNAL_IN_EVAL = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import conftest  # the toy rewards
    import grpokit.train.grpo as grpo
    from grpokit.cli import main
    original = grpo.evaluate
    def evaluate(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # lands while the step-0 evaluation runs
        return original(*args, **kwargs)
    grpo.evaluate = evaluate
    sys.exit(main(["train", {recipe!r}]))
""")


def test_sigterm_during_the_step0_eval_stops_with_a_step0_checkpoint_and_exit_zero(tiny_model_dir, tmp_path):
    raw = small_recipe(tiny_model_dir, tmp_path / "run")
    recipe_path = write_recipe(tmp_path / "recipe.yaml", raw)
    script = tmp_path / "child.py"
    script.write_text(SIGNAL_IN_EVAL.format(tests=TESTS, recipe=str(recipe_path)))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    run_dir = tmp_path / "run"
    info = run_info(run_dir)
    assert info["status"] == "stopped" and info["steps"] == 0 and info["stop_signal"] == "SIGTERM"
    assert latest_checkpoint(run_dir / "checkpoints").name == "step-0"
    assert (run_dir / "eval" / "step-0.json").is_file()

    # resumed from step 0, the run ends exactly where one never stopped ends
    assert main(["train", str(recipe_path), "--resume"]) == 0
    info = run_info(run_dir)
    assert info["status"] == "finished" and info["resumed"][0]["from_step"] == 0
    straight = train(recipe_from_dict(small_recipe(tiny_model_dir, tmp_path / "straight")))
    a, b = (load_file(d / "checkpoints" / "step-2" / "adapter_model.safetensors") for d in (straight, run_dir))
    assert all(torch.equal(a[k], b[k]) for k in a)


class _Killed(Exception):
    """What SIGTERM does while no graceful handler is installed (instead of killing pytest)."""


@pytest.fixture
def sigterm_raises():
    def handler(signum, frame):
        raise _Killed

    previous = signal.signal(signal.SIGTERM, handler)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("where", ["final_eval", "final_checkpoint"])
def test_sigterm_during_the_final_eval_or_checkpoint_still_finishes_the_run(tiny_model_dir, tmp_path, monkeypatch,
                                                                            sigterm_raises, where):
    import grpokit.train.grpo as grpo

    original_eval, original_save, sent = grpo.evaluate, torch.save, []

    def signal_once():
        if not sent:  # a second signal would mean "abort now"
            sent.append(1)
            os.kill(os.getpid(), signal.SIGTERM)

    def evaluate(policy, rows, rewards, settings, step, world=None):
        if where == "final_eval" and step == 2:
            signal_once()
        return original_eval(policy, rows, rewards, settings, step)

    def save(value, path, *args, **kwargs):
        if where == "final_checkpoint" and ".step-2." in str(path):
            signal_once()  # inside the final checkpoint's write
        return original_save(value, path, *args, **kwargs)

    monkeypatch.setattr(grpo, "evaluate", evaluate)
    monkeypatch.setattr(torch, "save", save)
    run_dir = train(recipe_from_dict(small_recipe(tiny_model_dir, tmp_path / "run")))
    info = run_info(run_dir)
    assert info["status"] == "finished" and info["steps"] == 2
    assert latest_checkpoint(run_dir / "checkpoints").name == "step-2"
    assert (run_dir / "eval" / "step-2.json").is_file() and sent


# ============================================================================ item 8: the printed resume command


def test_the_printed_resume_command_resumes_that_run(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import grpokit.train.grpo as grpo

    raw = small_recipe(tiny_model_dir, tmp_path / "default-dir")
    recipe_path = write_recipe(tmp_path / "my recipe.yaml", raw)
    run_dir = tmp_path / "my run"
    original, calls = grpo.policy_update, []

    def update(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # inside step 1: the run stops after it
        return original(*args, **kwargs)

    monkeypatch.setattr(grpo, "policy_update", update)
    overrides = ["--set", f"training.output_dir={run_dir}", "--set", "training.max_steps=3"]
    assert main(["train", str(recipe_path), *overrides]) == 0
    out = capsys.readouterr().out
    assert run_info(run_dir)["status"] == "stopped"
    command = out.split("Continue with:", 1)[1].strip().splitlines()[0]
    argv = shlex.split(command)
    assert argv[0].endswith("grpokit") and argv[1:] == ["train", str(recipe_path), *overrides, "--resume"]
    assert main(argv[1:]) == 0  # run as printed
    info = run_info(run_dir)
    assert info["status"] == "finished" and info["steps"] == 3 and info["resumed"][0]["from_step"] == 1
    assert not (tmp_path / "default-dir").exists()


# ============================================================================ item 11: messages, not tracebacks


TORCH_SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 4352 vs 4243"  # torch's own words


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), RuntimeError(TORCH_SHORT_WRITE)],
                         ids=["ENOSPC", "torch-writer"])
def test_a_full_disk_while_checkpointing_says_so_and_keeps_the_previous_checkpoint(tiny_model_dir, tmp_path, capsys,
                                                                                   monkeypatch, failure):
    original = torch.save

    def save(value, path, *args, **kwargs):
        if ".step-2." in str(path):
            raise failure
        return original(value, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    recipe_path = write_recipe(tmp_path / "recipe.yaml", small_recipe(tiny_model_dir, tmp_path / "run"))
    assert main(["train", str(recipe_path)]) == 2
    message = error_line(capsys)
    assert "no space left on device" in message and "step-1 is intact" in message and "--resume" in message
    checkpoints = tmp_path / "run" / "checkpoints"
    assert latest_checkpoint(checkpoints).name == "step-1" and not list(checkpoints.glob(".step-*"))
    assert run_info(tmp_path / "run")["status"] == "failed"


def test_an_output_dir_under_a_file_is_refused_before_the_model_loads_and_by_dry_run(tiny_model_dir, tmp_path, capsys,
                                                                                    no_model_load):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for output_dir in (blocker / "run", blocker):
        recipe_path = write_recipe(tmp_path / "recipe.yaml", small_recipe(tiny_model_dir, output_dir))
        for mode in ([], ["--dry-run"], ["--resume"]):
            assert main(["train", str(recipe_path), *mode]) == 2, (output_dir, mode)
            message = error_line(capsys)
            assert f"{blocker} is a file, not a directory" in message and "training.output_dir" in message, message
    assert blocker.read_text() == "not a directory"


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory writes to which fail: a read-only tmpfs as root (which ignores permissions), else mode 555."""
    directory = tmp_path / "read-only"
    directory.mkdir()
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(directory)],
                                 capture_output=True)
        if mounted.returncode != 0:
            pytest.skip("needs a read-only filesystem: cannot mount one here")
        yield directory, "read-only file system"
        subprocess.run(["umount", str(directory)], check=True)
    else:
        directory.chmod(0o555)
        yield directory, "permission denied"
        directory.chmod(0o755)


def test_a_read_only_output_dir_is_refused_before_the_model_loads_and_by_dry_run(tiny_model_dir, tmp_path, capsys,
                                                                                 read_only_dir, no_model_load):
    directory, why = read_only_dir
    for output_dir in (directory / "run", directory):
        recipe_path = write_recipe(tmp_path / "recipe.yaml", small_recipe(tiny_model_dir, output_dir))
        for mode in ([], ["--dry-run"]):
            assert main(["train", str(recipe_path), *mode]) == 2, (output_dir, mode)
            message = error_line(capsys)
            assert f"cannot write to {output_dir}" in message and why in message, message
            assert "training.output_dir" in message


@pytest.fixture
def finished_lora_run(tiny_model_dir, tmp_path):
    raw = small_recipe(tiny_model_dir, tmp_path / "run", max_steps=1)
    return train(recipe_from_dict(raw)), raw


def test_a_checkpoint_with_only_a_pickled_adapter_is_refused_with_how_to_convert(finished_lora_run, tmp_path, capsys,
                                                                               monkeypatch):
    run_dir, raw = finished_lora_run
    checkpoint = run_dir / "checkpoints" / "step-1"
    weights = load_file(checkpoint / "adapter_model.safetensors")
    (checkpoint / "adapter_model.safetensors").unlink()
    torch.save(weights, checkpoint / "adapter_model.bin")
    expected = r"adapter_model.bin is a pickle file.*grpokit never loads pickles.*adapter_model.safetensors"
    with pytest.raises(ModelError, match=expected):
        load_checkpoint(checkpoint)
    model_cfg = recipe_from_dict(raw).model
    with pytest.raises(ModelError, match=expected):
        load_checkpoint_policy(checkpoint, model_cfg)

    import grpokit.train.run as run

    monkeypatch.setattr(run, "load_policy", lambda *a, **k: pytest.fail("--resume loaded the model first"))
    raw["training"]["max_steps"] = 2
    assert main(["train", str(write_recipe(tmp_path / "recipe.yaml", raw)), "--resume"]) == 2
    message = error_line(capsys)
    assert "adapter_model.bin is a pickle file" in message and "save_file" in message
    # the same checkpoint as model.adapter (an SFT warm start merged before training): refused, not unpickled
    from grpokit.models.loading import merge_adapter

    with pytest.raises(ModelError, match=expected):
        merge_adapter(object(), str(checkpoint))


# ============================================================================ item 12: untrusted run directories


def test_report_replaces_links_instead_of_writing_through_them(tmp_path):
    run = make_run(tmp_path)
    victim, victim_png = tmp_path / "victim.md", tmp_path / "victim.png"
    victim.write_text("precious")
    victim_png.write_bytes(b"precious")
    (run / "report.md").symlink_to(victim)
    (run / "plots").mkdir()
    (run / "plots" / "reward.png").symlink_to(victim_png)
    report = write_report(run)
    assert victim.read_text() == "precious" and victim_png.read_bytes() == b"precious"
    assert not report.is_symlink() and report.read_text().startswith("# Training report")
    assert not (run / "plots" / "reward.png").is_symlink()
    assert oct(report.stat().st_mode & 0o777) != oct(0o600)  # readable by others, as a plain write would be

    # a plots directory that is a link to elsewhere is refused, and nothing is written there
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(run / "plots")
    (run / "plots").symlink_to(elsewhere)
    with pytest.raises(RunDirError, match="plots is a symbolic link"):
        write_report(run)
    assert not any(elsewhere.iterdir())


def test_resume_refuses_a_latest_or_a_file_that_leads_outside_the_run(finished_lora_run, tmp_path, capsys):
    run_dir, raw = finished_lora_run
    raw["training"]["max_steps"] = 2
    recipe_path = write_recipe(tmp_path / "recipe.yaml", raw)
    outside = tmp_path / "outside"
    shutil.copytree(run_dir / "checkpoints" / "step-1", outside / "step-1")
    (outside / "metrics.jsonl").write_text("")
    checkpoints = run_dir / "checkpoints"
    (checkpoints / "step-7").symlink_to(outside / "step-1")
    before = snapshot(outside)
    for pointer in (str(outside / "step-1"), "../../outside/step-1", "step-7"):
        (checkpoints / "latest").write_text(pointer + "\n")
        assert main(["train", str(recipe_path), "--resume"]) == 2, pointer
        message = error_line(capsys)
        assert "checkpoints/latest" in message and "step-N" in message, message
    (checkpoints / "step-7").unlink()
    (checkpoints / "latest").write_text("step-1\n")
    (run_dir / "metrics.jsonl").unlink()
    (run_dir / "metrics.jsonl").symlink_to(outside / "metrics.jsonl")
    assert main(["train", str(recipe_path), "--resume"]) == 2
    assert "metrics.jsonl is a symbolic link" in error_line(capsys)
    assert snapshot(outside) == before and not (tmp_path / "run.json").exists()


def test_a_copied_run_directory_resumes_at_its_new_place(finished_lora_run, tmp_path, capsys):
    run_dir, _ = finished_lora_run
    copy = tmp_path / "moved" / "copy"
    shutil.copytree(run_dir, copy)
    before = snapshot(run_dir)
    # the copy's own resolved recipe, pointed at the copy: the natural way to go on with a moved run
    argv = ["train", str(copy / "recipe.yaml"), "--set", f"training.output_dir={copy}", "--set", "training.max_steps=2",
            "--resume"]
    assert main(argv) == 0, capsys.readouterr().err
    info = run_info(copy)
    assert info["status"] == "finished" and info["steps"] == 2 and info["resumed"][0]["from_step"] == 1
    assert latest_checkpoint(copy / "checkpoints").name == "step-2"
    assert yaml.safe_load((copy / "recipe.yaml").read_text())["training"]["output_dir"] == str(copy)
    assert snapshot(run_dir) == before  # the original was not touched


@pytest.mark.parametrize("stage, recipe", [("sft", "recipes/sft-demo.yaml"), ("reward-model", "recipes/reward-model-demo.yaml")])
def test_the_supervised_stages_take_the_run_directory_lock_too(tmp_path, capsys, monkeypatch, stage, recipe):
    from grpokit.train.rundir import RunLock

    import grpokit.train.supervised as supervised

    def no_fit(*args, **kwargs):
        raise AssertionError("the stage trained although another process holds its run directory")

    monkeypatch.setattr(supervised, "fit", no_fit)
    out = tmp_path / "out"
    with RunLock(out):
        assert main([stage, str(Path(__file__).resolve().parents[1] / recipe), "--set",
                     f"training.output_dir={out}"]) == 2
    assert f"{out} is in use by another grpokit process (pid {os.getpid()}" in error_line(capsys)


def test_logs_are_never_appended_through_a_link(tmp_path):
    from grpokit.log import JsonlSink

    target = tmp_path / "elsewhere.txt"
    target.write_text("precious\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").symlink_to(target)
    with pytest.raises(RunDirError, match="metrics.jsonl is a symbolic link"):
        JsonlSink(tmp_path / "run" / "metrics.jsonl")
    assert target.read_text() == "precious\n"
    sink = JsonlSink(tmp_path / "run" / "samples.jsonl")  # an ordinary file is appended as before
    sink.log({"step": 1})
    sink.close()
    assert (tmp_path / "run" / "samples.jsonl").read_text() == '{"step": 1}\n'
