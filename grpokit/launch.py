"""``grpokit launch slurm``: an sbatch script that trains one recipe on N nodes of G GPUs.

The script is meant to be read before it is submitted, so every choice sits on its own line
with a comment saying why. Slurm starts one task per node; each task runs ``torchrun``, which
starts the node's G processes of ``grpokit train`` and joins the nodes through a c10d
rendezvous hosted on the job's first node. Nothing here talks to Slurm: ``render_slurm_script``
turns a recipe path and options into text, ``write_script`` puts it in a file.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from grpokit.errors import LaunchError, RecipeError

# Slurm's --time as this command takes it: [days-]hours:minutes:seconds
_TIME = re.compile(r"^(?:(\d+)-)?(\d+):([0-5]\d):([0-5]\d)$")
# a value that lands on an #SBATCH line: no spaces, quotes or newlines that would change the line
_SBATCH_WORD = re.compile(r"^[A-Za-z0-9_.,:+-]+$")
_SBATCH_PATH = re.compile(r"^[A-Za-z0-9_.,:+@=~/-]+$")


@dataclass
class SlurmOptions:
    """What the job asks Slurm for, and what it runs."""

    nodes: int
    """Machines in the job (#SBATCH --nodes, torchrun --nnodes)."""
    gpus_per_node: int
    """GPUs on each machine, one training process each (#SBATCH --gpus-per-node, torchrun --nproc-per-node)."""
    partition: str | None = None
    """Slurm partition (queue); None: the cluster's default."""
    time: str | None = None
    """Wall-clock limit as [D-]HH:MM:SS; None: the partition's default."""
    account: str | None = None
    """Account the GPU hours are charged to; None: your default account."""
    cpus_per_task: int | None = None
    """CPU cores per node's task (shared by its G processes); None: the cluster's default."""
    port: int = 29500
    """TCP port of the rendezvous on the first node."""
    overrides: list[str] = field(default_factory=list)
    """``--set KEY=VALUE`` overrides passed on to ``grpokit train``."""
    resume: bool = False
    """Pass ``--resume`` to ``grpokit train``: the job continues the run in training.output_dir from its last
    complete checkpoint (or starts it), so the same script can be submitted again after a time limit."""
    workdir: Path | None = None
    """Folder the job runs in (#SBATCH --chdir); None: the current directory."""


def check_options(options: SlurmOptions) -> None:
    """Refuse a request Slurm or torchrun would reject later, after the job waited in the queue."""
    if options.nodes < 1:
        raise LaunchError(f"--nodes {options.nodes}: a job needs at least 1 node")
    if options.gpus_per_node < 1:
        raise LaunchError(f"--gpus-per-node {options.gpus_per_node}: each node needs at least 1 GPU "
                          "(on CPUs, run `grpokit train` or `accelerate launch --cpu` instead; docs/scaling.md)")
    if options.cpus_per_task is not None and options.cpus_per_task < 1:
        raise LaunchError(f"--cpus-per-task {options.cpus_per_task}: give at least 1, or leave it out for the "
                          "cluster's default")
    if not 1024 <= options.port <= 65535:
        raise LaunchError(f"--port {options.port}: pick an unprivileged TCP port, 1024 to 65535")
    if options.time is not None and not _TIME.match(options.time):
        raise LaunchError(f"--time {options.time!r}: write the limit as HH:MM:SS or D-HH:MM:SS, e.g. --time 12:00:00")
    for flag, value in (("--partition", options.partition), ("--account", options.account)):
        if value is not None and not _SBATCH_WORD.match(value):
            raise LaunchError(f"{flag} {value!r}: a Slurm name has no spaces, quotes or newlines "
                              "(letters, digits and _ . , : + - only)")


def render_slurm_script(recipe: str | Path, options: SlurmOptions) -> str:
    """The sbatch script for ``recipe`` with ``options``. Reads and validates the recipe (with the
    overrides) so a typo fails now rather than on the cluster; writes nothing."""
    check_options(options)
    from grpokit.config import load_recipe

    recipe_path = Path(recipe).resolve()
    loaded = load_recipe(recipe, options.overrides)
    if loaded.model.device == "cpu":
        raise RecipeError(f"{recipe}: model.device is 'cpu', so the job's GPUs would sit idle; "
                          "add --set model.device=auto (or remove model.device from the recipe)")
    world = options.nodes * options.gpus_per_node
    P = loaded.training.prompts_per_step
    if P < world:  # the trainer refuses it too, but only once the job has waited in the queue
        raise RecipeError(f"{recipe}: training.prompts_per_step = {P} is the global batch, split in whole groups "
                          f"over {world} processes: raise it to at least {world} (--set training.prompts_per_step="
                          f"{world}) or ask for fewer nodes or GPUs")
    workdir = (options.workdir or Path.cwd()).resolve()
    if not _SBATCH_PATH.match(str(workdir)):
        raise LaunchError(f"{workdir}: the job's folder goes on an #SBATCH --chdir line, which cannot hold spaces, "
                          "quotes or newlines; run `grpokit launch` from a folder whose path has none")
    output_dir = workdir / loaded.training.output_dir
    name = "grpokit-" + re.sub(r"[^A-Za-z0-9_.-]", "-", recipe_path.stem)  # one word on its #SBATCH line

    sbatch = [
        (f"--job-name={name}", "the name squeue shows, and %x in the log file's name"),
        (f"--nodes={options.nodes}", f"{options.nodes} machine(s), {world} training process(es) in all"),
        ("--ntasks-per-node=1", "one task per node: torchrun in it starts the per-GPU processes"),
        (f"--gpus-per-node={options.gpus_per_node}", "one training process per GPU"),
    ]
    if options.cpus_per_task is not None:
        sbatch.append((f"--cpus-per-task={options.cpus_per_task}",
                       f"CPU cores for the node's {options.gpus_per_node} process(es): tokenising, rewards"))
    if options.partition is not None:
        sbatch.append((f"--partition={options.partition}", "the queue to run in"))
    if options.account is not None:
        sbatch.append((f"--account={options.account}", "who the GPU hours are charged to"))
    if options.time is not None:
        sbatch.append((f"--time={options.time}", "Slurm stops the job after this long; the run continues from "
                       "its last checkpoint with `grpokit train --resume` (`grpokit launch --resume`)"))
    sbatch += [
        (f"--chdir={workdir}", "run where `grpokit launch` ran: relative paths in the recipe "
         "and --set (training.output_dir, data files) mean the same here"),
        ("--output=%x-%j.out", "every node's output in one file in that folder: <job name>-<job id>.out "
         "(Slurm creates no folders for it)"),
    ]

    lines = [
        "#!/bin/bash",
        f"# Train {_one_line(recipe_path)} with GRPO on {options.nodes} node(s) x {options.gpus_per_node} GPU(s).",
        "# Written by `grpokit launch slurm`; read it, change what you need, then submit it with sbatch.",
        "# Activate the Python environment that has grpokit and torchrun before sbatch: the job",
        "# inherits your environment (Slurm's default --export=ALL).",
    ]
    for flag, why in sbatch:
        lines += [f"# {why}", f"#SBATCH {flag}"]
    srun = ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--label"]
    if options.cpus_per_task is not None:
        srun.append(f"--cpus-per-task={options.cpus_per_task}")
    train = ["-m", "grpokit", "train", str(recipe_path)]
    for assignment in options.overrides:
        train += ["--set", assignment]
    if options.resume:
        train.append("--resume")
    lines += [
        "",
        "set -eu",
        ': "${SLURM_JOB_ID:?submit this script with sbatch; it reads the job Slurm allocates}"',
        "",
        "# The first node of the allocation hosts the rendezvous; every node's torchrun finds it there.",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        "",
        "# A rank that dies makes the others' pending NCCL collective fail instead of waiting forever,",
        "# so the job ends with an error rather than holding its GPUs until --time runs out.",
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
        "# the same switch under its name before PyTorch 2.2",
        "export NCCL_ASYNC_ERROR_HANDLING=1",
        "# (NCCL_DEBUG=INFO in the environment prints how NCCL connects the nodes, when they fail to.)",
    ]
    if options.cpus_per_task is not None:
        threads = max(1, options.cpus_per_task // options.gpus_per_node)
        lines += [
            "# torchrun sets 1 thread per process when several share a node; share its cores among them",
            f"export OMP_NUM_THREADS={threads}",
        ]
    lines += [
        "",
        f"# The run directory ({_one_line(output_dir)}) is written by rank 0 alone: recipe.yaml, metrics.jsonl,",
        "# samples.jsonl, checkpoints/. Each line of the log starts with its node's task number (--label).",
        "#",
        "# srun: one torchrun per node; --kill-on-bad-exit ends every node's task when one fails.",
        "#   torchrun --nnodes/--nproc-per-node: the job's shape, the same on every node.",
        "#   --rdzv-backend c10d: torchrun's own rendezvous, a TCP store run by the torchrun on the first",
        "#     node; no etcd server to set up, and nodes may start in any order.",
        "#   --rdzv-endpoint: that node and port (change the port if another job there uses it).",
        "#   --rdzv-id: the job id, so two jobs that share a first node never join each other.",
        "#   grpokit train: the recipe, with the --set overrides given to `grpokit launch`"
        + (" (--resume: continue the run from its last checkpoint, or start it)." if options.resume else "."),
        " ".join(srun) + " \\",
        "  torchrun \\",
        f"    --nnodes {options.nodes} \\",
        f"    --nproc-per-node {options.gpus_per_node} \\",
        "    --rdzv-backend c10d \\",
        f'    --rdzv-endpoint "$head_node:{options.port}" \\',
        '    --rdzv-id "$SLURM_JOB_ID" \\',
        "    " + shlex.join(train),
        "",
    ]
    return "\n".join(lines)


def _one_line(value) -> str:
    """``value`` for a comment line: a newline in a path must not end the comment and start a command."""
    return str(value).replace("\n", "\\n").replace("\r", "\\r")


def default_script_path(recipe: str | Path) -> Path:
    """Where the script goes without --out: ``<recipe name>.sbatch`` in the current directory."""
    return Path(f"{Path(recipe).stem}.sbatch")


def write_script(text: str, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``text`` to ``out``; an existing file is replaced only with ``overwrite``."""
    path = Path(out)
    if path.is_dir():
        raise LaunchError(f"--out {path}: is a folder; name the script file, e.g. --out {path / 'train.sbatch'}")
    if path.exists() and not overwrite:
        raise LaunchError(f"{path} already exists; pass --overwrite to replace it, or --out another file")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
