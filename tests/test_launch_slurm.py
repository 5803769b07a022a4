"""``grpokit launch slurm``: the sbatch script parses, asks for the right job, and runs the right command.

The end-to-end check runs the script itself with stand-ins for ``scontrol``, ``srun`` and
``torchrun`` on PATH, so what torchrun would receive (quoting of --set values included) is read
back word for word, without a cluster.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import run_cli, tiny_recipe
from grpokit.errors import LaunchError, RecipeError
from grpokit.launch import SlurmOptions, render_slurm_script


@pytest.fixture
def recipe(tiny_model_dir, tmp_path) -> Path:
    raw = tiny_recipe(tiny_model_dir, "runs/tiny", model={"device": "auto"}, training={"prompts_per_step": 32})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def bash_syntax_ok(text: str, tmp_path: Path) -> None:
    script = tmp_path / "check.sbatch"
    script.write_text(text)
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def sbatch_lines(text: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in text.splitlines() if line.startswith("#SBATCH ")]


def launch_command(text: str) -> list[str]:
    """The words of the srun ... torchrun ... command, continuation lines joined."""
    joined = text.replace("\\\n", " ")
    line = next(line for line in joined.splitlines() if line.startswith("srun "))
    return shlex.split(line)


def test_one_node(recipe, tmp_path):
    text = render_slurm_script(recipe, SlurmOptions(nodes=1, gpus_per_node=8, workdir=tmp_path))
    bash_syntax_ok(text, tmp_path)
    assert sbatch_lines(text) == [
        "--job-name=grpokit-tiny", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=8",
        f"--chdir={tmp_path.resolve()}", "--output=%x-%j.out",
    ]
    lines = text.splitlines()
    for i, line in enumerate(lines):  # every choice says why, on the line above it
        if line.startswith("#SBATCH "):
            assert lines[i - 1].startswith("# ") and len(lines[i - 1]) > 10, line
    words = launch_command(text)
    torchrun = words[words.index("torchrun"):]
    assert torchrun == ["torchrun", "--nnodes", "1", "--nproc-per-node", "8", "--rdzv-backend", "c10d",
                        "--rdzv-endpoint", "$head_node:29500", "--rdzv-id", "$SLURM_JOB_ID",
                        "-m", "grpokit", "train", str(recipe.resolve())]
    assert words[:words.index("torchrun")] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--label"]
    assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in lines
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in lines and "export NCCL_ASYNC_ERROR_HANDLING=1" in lines
    assert f"({tmp_path.resolve() / 'runs/tiny'})" in text  # where the run directory will be


def test_four_nodes_runs_torchrun_with_the_overrides_quoted(recipe, tmp_path):
    """The script, run with stand-in Slurm commands, hands torchrun exactly these words."""
    overrides = ["training.max_steps=5", "training.output_dir=runs/it's a run $HOME"]
    options = SlurmOptions(nodes=4, gpus_per_node=8, partition="gpu-long", time="1-12:00:00", account="proj_42",
                           cpus_per_task=64, port=29611, overrides=overrides, resume=True,
                           workdir=tmp_path)
    text = render_slurm_script(recipe, options)
    bash_syntax_ok(text, tmp_path)
    assert sbatch_lines(text) == [
        "--job-name=grpokit-tiny", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=64",
        "--partition=gpu-long", "--account=proj_42", "--time=1-12:00:00",
        f"--chdir={tmp_path.resolve()}", "--output=%x-%j.out",
    ]
    assert "export OMP_NUM_THREADS=8" in text.splitlines()  # 64 cores shared by 8 processes

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_ins = {
        "scontrol": 'printf "gpu-node-07\\ngpu-node-08\\ngpu-node-09\\ngpu-node-10\\n"',
        "srun": 'printf "%s\\0" "$@" > "$OUT/srun.argv"; while [ "$1" != torchrun ]; do shift; done; exec "$@"',
        "torchrun": 'printf "%s\\0" "$@" > "$OUT/torchrun.argv"; echo "$TORCH_NCCL_ASYNC_ERROR_HANDLING" > "$OUT/env"',
    }
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(tmp_path),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-node-[07-10]"}
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr

    srun = (tmp_path / "srun.argv").read_text().split("\0")[:-1]
    assert srun[:5] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1", "--label", "--cpus-per-task=64", "torchrun"]
    argv = (tmp_path / "torchrun.argv").read_text().split("\0")[:-1]
    assert argv == ["--nnodes", "4", "--nproc-per-node", "8", "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", "gpu-node-07:29611", "--rdzv-id", "4242",
                    "-m", "grpokit", "train", str(recipe.resolve()),
                    "--set", "training.max_steps=5", "--set", "training.output_dir=runs/it's a run $HOME",
                    "--resume"]
    assert (tmp_path / "env").read_text().strip() == "1"


def test_the_script_refuses_to_run_outside_a_job(recipe, tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text(render_slurm_script(recipe, SlurmOptions(nodes=1, gpus_per_node=1, workdir=tmp_path)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "submit this script with sbatch" in result.stderr


@pytest.mark.parametrize("change, message", [
    ({"nodes": 0}, r"--nodes 0: a job needs at least 1 node"),
    ({"gpus_per_node": 0}, r"--gpus-per-node 0: each node needs at least 1 GPU"),
    ({"cpus_per_task": 0}, r"--cpus-per-task 0: give at least 1"),
    ({"time": "12h"}, r"--time '12h': write the limit as HH:MM:SS or D-HH:MM:SS"),
    ({"time": "1:75:00"}, r"--time '1:75:00'"),
    ({"partition": "gpu\n#SBATCH --nodes=99"}, r"--partition .*: a Slurm name has no spaces"),
    ({"account": "my account"}, r"--account 'my account'"),
    ({"port": 80}, r"--port 80: pick an unprivileged TCP port"),
])
def test_bad_requests_are_refused(recipe, tmp_path, change, message):
    options = SlurmOptions(**{"nodes": 1, "gpus_per_node": 1, "workdir": tmp_path, **change})
    with pytest.raises(LaunchError, match=message):
        render_slurm_script(recipe, options)


@pytest.mark.parametrize("overrides, message", [
    (["training.prompts_per_step=0"], r"training.prompts_per_step"),
    (["training.no_such_field=1"], r"no_such_field"),
    (["model.device=cpu"], r"model.device is 'cpu', so the job's GPUs would sit idle; add --set model.device=auto"),
    (["training.prompts_per_step=4"], r"prompts_per_step = 4 is the global batch, split in whole groups over 8 "
                                      r"processes: raise it to at least 8"),
])
def test_a_recipe_that_does_not_validate_is_refused(recipe, tmp_path, overrides, message):
    with pytest.raises(RecipeError, match=message):
        render_slurm_script(recipe, SlurmOptions(nodes=2, gpus_per_node=4, overrides=overrides, workdir=tmp_path))


def test_a_missing_recipe_is_refused(tmp_path):
    with pytest.raises(RecipeError, match=r"missing.yaml: recipe file not found"):
        render_slurm_script(tmp_path / "missing.yaml", SlurmOptions(nodes=1, gpus_per_node=1, workdir=tmp_path))


def test_cli_writes_the_script_and_prints_how_to_submit_it(recipe, tmp_path, capsys, monkeypatch):
    out = tmp_path / "jobs" / "tiny.sbatch"
    argv = ["launch", "slurm", recipe, "--nodes", 2, "--gpus-per-node", 4, "--partition", "gpu",
            "--out", out, "--set", "training.max_steps=3"]
    monkeypatch.chdir(tmp_path)
    assert run_cli(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"wrote {out}: 2 node(s) x 4 GPU(s) = 8 training process(es). Read it, then submit it with:",
                       f"sbatch {out}"]
    text = out.read_text()
    assert text == render_slurm_script(recipe, SlurmOptions(nodes=2, gpus_per_node=4, partition="gpu",
                                                            overrides=["training.max_steps=3"], workdir=tmp_path))
    assert "--set training.max_steps=3" in text

    with pytest.raises(LaunchError, match=r"tiny.sbatch already exists; pass --overwrite"):
        run_cli(argv)
    assert run_cli([*argv, "--overwrite"]) == 0

    assert run_cli(["launch", "slurm", recipe, "--nodes", 1, "--gpus-per-node", 8]) == 0  # default: <recipe>.sbatch here
    assert (tmp_path / "tiny.sbatch").is_file()


def test_cli_prints_the_error_not_a_traceback(recipe, tmp_path, capsys):
    from grpokit.cli import main

    out = tmp_path / "never.sbatch"
    code = main(["launch", "slurm", str(recipe), "--nodes", "0", "--gpus-per-node", "8", "--out", str(out)])
    assert code == 2
    assert capsys.readouterr().err.strip() == "grpokit: error: --nodes 0: a job needs at least 1 node"
    assert not out.exists()
