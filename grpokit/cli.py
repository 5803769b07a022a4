"""The ``grpokit`` command: one subcommand per job, each a thin shell over a library call.

Errors grpokit raises on purpose print as one message and exit 2; ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

from grpokit.errors import GrpokitError


def _progress_bar(total: int):
    """A rich progress bar with the step's reward, KL and seconds per step."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(), TimeRemainingColumn(),
    )
    task = bar.add_task("train", total=total, stats="")

    def update(step: int, stats: dict) -> None:
        text = f"reward {stats['reward']:.3f}  kl {stats['kl']:.4f}  {stats['step_time_s']:.1f} s/step"
        bar.update(task, completed=step, stats=text)

    return bar, update


def cmd_train(args) -> int:
    from rich.console import Console

    from grpokit.config import load_recipe
    from grpokit.train import dry_run, train

    recipe = load_recipe(args.recipe, args.set)
    if args.nproc and not args.dry_run:  # a dry run samples once: one process is enough
        return launch_processes(args)
    console = Console()
    main_process = launched_rank() == 0
    if not main_process:  # rank 0 speaks for the run; the others say only what goes wrong
        import logging

        logging.getLogger().setLevel(logging.WARNING)
    if args.dry_run:
        plan = dry_run(recipe)
        console.print(f"[bold]plan[/bold] for {args.recipe}")
        for key, value in plan.items():
            if key != "samples":
                console.print(f"  {key}: {value}")
        console.print(f"  steps: {recipe.training.max_steps} x {recipe.training.prompts_per_step} prompts x "
                      f"{recipe.rollout.num_generations} generations -> {recipe.training.output_dir}")
        for sample in plan["samples"][:4]:
            console.print(f"  sample: {sample['completion']!r}  reward {sample['reward']:.2f}")
        console.print("[green]dry run OK[/green]: nothing was written")
        return 0
    if not main_process:
        train(recipe, overwrite=args.overwrite, resume=args.resume)
        return 0
    if recipe.logging.progress and sys.stderr.isatty():
        import logging

        from rich.logging import RichHandler

        bar, update = _progress_bar(recipe.training.max_steps)
        # log lines go through the bar's console, above the bar instead of through it
        logging.basicConfig(level=logging.INFO, format="%(message)s", force=True,
                            handlers=[RichHandler(console=bar.console, show_path=False)])
        with bar:
            run_dir = train(recipe, overwrite=args.overwrite, resume=args.resume, progress=update)
    else:
        def update(step: int, stats: dict) -> None:
            print(f"step {step}/{recipe.training.max_steps}  reward {stats['reward']:.3f}  kl {stats['kl']:.4f}  "
                  f"{stats['step_time_s']:.1f} s/step", flush=True)
        run_dir = train(recipe, overwrite=args.overwrite, resume=args.resume, progress=update)
    status = json.loads((run_dir / "run.json").read_text())
    if status["status"] == "stopped":
        console.print(f"stopped by {status['stop_signal']} after step {status['steps']}; checkpoint written. "
                      "Continue with:", markup=False, highlight=False)
        print(resume_command(args), flush=True)  # plain: one line to copy, never wrapped or marked up
        return 0
    _print_before_after(console, run_dir)
    return 0


def launched_rank() -> int:
    """This process's rank under a launcher (torchrun, accelerate launch); 0 without one."""
    import os

    return int(os.environ.get("RANK", "0"))


def launch_processes(args) -> int:
    """``grpokit train --nproc N``: the same command under torchrun with N processes on this machine (torch's
    own launcher: it starts, watches and stops them; a failed process ends the others)."""
    import os
    import subprocess

    if args.nproc < 1:
        print("grpokit: error: --nproc must be at least 1", file=sys.stderr)
        return 2
    passed = [word for value in args.set for word in ("--set", value)]
    passed += [flag for flag, on in (("--overwrite", args.overwrite), ("--resume", args.resume)) if on]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               "-m", "grpokit", "train", args.recipe, *passed]
    print(f"launching: {shlex.join(command)}", flush=True)
    return subprocess.call(command, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


def resume_command(args) -> str:
    """The command that continues this run, shell-quoted: the same recipe and every --set (in order; they
    may move training.output_dir), plus --resume."""
    program = sys.argv[0] if sys.argv and Path(sys.argv[0]).name == "grpokit" else "grpokit"
    overrides = [word for value in args.set for word in ("--set", value)]
    return shlex.join([program, "train", args.recipe, *overrides, "--resume"])


def _print_before_after(console, run_dir) -> None:
    evals = sorted((run_dir / "eval").glob("step-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    if len(evals) >= 2:
        first, last = (json.loads(p.read_text()) for p in (evals[0], evals[-1]))
        console.print(f"held-out accuracy {100 * first['accuracy']:.1f}% -> {100 * last['accuracy']:.1f}% "
                      f"(step {first['step']} -> {last['step']}); run dir {run_dir}")


def cmd_report(args) -> int:
    from grpokit.report import write_report

    print(write_report(args.run_dir))
    return 0


def cmd_eval(args) -> int:
    """Evaluate a run, checkpoint or model; print a table and write eval/<name>.json."""
    from rich.console import Console
    from rich.table import Table

    from grpokit.eval.standalone import cli_overrides, run_evaluation

    overrides = args.set + cli_overrides(args.data, args.num_generations, args.k, args.temperature, args.seed)
    path, result = run_evaluation(args.model, recipe_path=args.recipe, overrides=overrides, name=args.name,
                                  limit=args.limit, out=args.out, overwrite=args.overwrite)
    table = Table(title=f"{result['model']} on {result['data']} ({result['num_examples']} held-out rows)")
    for column in ("metric", "value", "95% interval"):
        table.add_column(column)
    for label, value, interval in eval_rows(result):
        table.add_row(label, value, interval)
    Console().print(table)
    print(f"wrote {path}")
    return 0


def eval_rows(result: dict) -> list[tuple[str, str, str]]:
    """(metric, value, interval) lines of an eval result for the terminal."""
    def pct(x):
        return f"{100 * x:.1f}%"

    def span(pair):
        return f"[{pct(pair[0])}, {pct(pair[1])}]"

    rows = [("accuracy (greedy)", pct(result["accuracy"]), span(result["accuracy_interval"])),
            ("mean reward (greedy)", f"{result['reward']:.3f}", "")]
    rows += [(f"  {name}", "n/a" if value is None else f"{value:.3f}", "") for name, value in result["rewards"].items()]
    rows.append(("completion length (greedy)", f"{result['completion_length']:.1f} tokens", ""))
    sampling = result.get("sampling")
    if sampling:
        k_samples = sampling["num_generations"]
        rows += [(f"pass@{k} (of {k_samples} samples)", pct(v), span(sampling["pass_at_k_interval"][k]))
                 for k, v in sampling["pass_at_k"].items()]
        if sampling["self_bleu"] is not None:
            rows.append(("self-BLEU (lower: more diverse)", f"{sampling['self_bleu']:.3f}", ""))
        rows += [("distinct-1 / distinct-2", f"{sampling['distinct_1']:.3f} / {sampling['distinct_2']:.3f}", ""),
                 ("mean reward (sampled)", f"{sampling['reward']:.3f}", ""),
                 ("completion length (sampled)", f"{sampling['completion_length']:.1f} tokens", "")]
    return rows


def cmd_compare(args) -> int:
    from grpokit.report import write_comparison

    print(write_comparison(args.sources, args.out, args.names))
    return 0


def cmd_rewards_check(args) -> int:
    """Score given completions with a recipe's rewards: debug rewards before a long run."""
    from rich.console import Console
    from rich.table import Table

    from grpokit.config import load_recipe
    from grpokit.data import read_jsonl
    from grpokit.rewards import columns_of
    from grpokit.rewards import RewardSet, build_orchestrator

    recipe = load_recipe(args.recipe, args.set)
    rows = read_jsonl(args.completions)
    for row in rows:
        if "completion" not in row or "prompt" not in row:
            raise GrpokitError(f"{args.completions}:{row['_line']}: each line needs 'prompt' and 'completion'")
    prompts, completions = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    columns = columns_of([{k: v for k, v in r.items() if k not in ("completion", "_line")} for r in rows])
    with RewardSet.from_recipe(recipe) as rewards:
        scores = rewards.score(prompts, completions, columns)
    total_N, _ = build_orchestrator(rewards, recipe.reward_shaping).combine(scores.parts, step=args.step, update=False)
    table = Table(title=f"{len(rows)} completions scored with {args.recipe}")
    for column in ("line", "completion", *rewards.names, "total"):
        table.add_column(column)
    for i, row in enumerate(rows):
        values = [("-" if scores.parts[n][i] is None else f"{scores.parts[n][i]:.3f}") for n in rewards.names]
        table.add_row(str(row["_line"]), str(row["completion"])[:60], *values, f"{total_N[i].item():.3f}")
    console = Console()
    console.print(table)
    for name in rewards.names:
        present = [v for v in scores.parts[name] if v is not None]
        mean = f"{sum(present) / len(present):.3f}" if present else "n/a"
        console.print(f"{name}: mean {mean} over {len(present)}/{len(rows)} rows, {1000 * scores.latency_s[name]:.1f} ms"
                      + (f"  [red]failed: {scores.errors[name]}[/red]" if name in scores.errors else ""))
    return 1 if scores.errors else 0


def cmd_launch_slurm(args) -> int:
    """Write an sbatch script that trains a recipe on several GPU nodes; print where it is and how to submit it."""
    from grpokit.launch import SlurmOptions, default_script_path, render_slurm_script, write_script

    options = SlurmOptions(nodes=args.nodes, gpus_per_node=args.gpus_per_node, partition=args.partition,
                           time=args.time, account=args.account, cpus_per_task=args.cpus_per_task, port=args.port,
                           overrides=args.set, resume=args.resume)
    text = render_slurm_script(args.recipe, options)
    path = write_script(text, args.out or default_script_path(args.recipe), overwrite=args.overwrite)
    print(f"wrote {path}: {args.nodes} node(s) x {args.gpus_per_node} GPU(s) = "
          f"{args.nodes * args.gpus_per_node} training process(es). Read it, then submit it with:")
    print(shlex.join(["sbatch", str(path)]), flush=True)  # plain: one line to copy
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grpokit", description="GRPO fine-tuning from a YAML recipe.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for grpokit's own errors")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model with GRPO from a recipe")
    train.add_argument("recipe", help="path to a YAML recipe (see recipes/)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe field, e.g. --set training.max_steps=10 (repeatable)")
    train.add_argument("--dry-run", action="store_true", help="validate, load, sample once, print the plan; write nothing")
    train.add_argument("--nproc", type=int, default=0, metavar="N",
                       help="train with N processes on this machine (delegates to torchrun; see docs/scaling.md)")
    mode = train.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    mode.add_argument("--resume", action="store_true",
                      help="continue the run in training.output_dir from its latest complete checkpoint "
                           "(starts a new run when there is none yet)")
    train.set_defaults(func=cmd_train)
    report = sub.add_parser("report", help="write report.md and plots for a run directory")
    report.add_argument("run_dir", help="a run directory written by `grpokit train`")
    report.set_defaults(func=cmd_report)
    ev = sub.add_parser("eval", help="evaluate a run, checkpoint or model on held-out rows (accuracy, pass@k, diversity)")
    ev.add_argument("--model", required=True,
                    help="a run directory (its latest checkpoint), a checkpoint, a model directory, a .gguf file, "
                         "or smollm2-135m-instruct")
    ev.add_argument("--recipe", help="recipe giving data, rewards and lengths (default: the run's recipe.yaml)")
    ev.add_argument("--data", help="data source instead of the recipe's: builtin:<task>, gsm8k or a .jsonl file")
    ev.add_argument("--num-generations", type=int, metavar="K",
                    help="samples per prompt for pass@k and diversity (default: the recipe's eval.num_generations)")
    ev.add_argument("--k", type=int, nargs="+", help="the k of pass@k (default 1 5 10, those <= K)")
    ev.add_argument("--temperature", type=float, help="sampling temperature (default: the recipe's)")
    ev.add_argument("--seed", type=int, help="sampling seed (default: the recipe's training.seed)")
    ev.add_argument("--limit", type=int, help="evaluate only the first N held-out rows")
    ev.add_argument("--name", help="file name under eval/ (default: from the data and model)")
    ev.add_argument("--out", help="write the JSON here instead of <run dir or .>/eval/<name>.json")
    ev.add_argument("--overwrite", action="store_true", help="replace an existing eval file of that name")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    ev.set_defaults(func=cmd_eval)
    compare = sub.add_parser("compare", help="compare runs or eval files side by side (Markdown table + bar chart)")
    compare.add_argument("sources", nargs="+", help="run directories or eval JSON files; the first is the baseline")
    compare.add_argument("--out", default="comparison", help="directory for comparison.md and comparison.png")
    compare.add_argument("--names", nargs="+", help="column names, one per source")
    compare.set_defaults(func=cmd_compare)
    from grpokit.data.commands import add_data_commands
    from grpokit.eval.generate import add_generate_command
    from grpokit.models.assemble import add_assemble_command
    from grpokit.train.reward_model import add_reward_model_command
    from grpokit.train.sft import add_sft_command

    add_data_commands(sub)
    add_generate_command(sub)
    add_sft_command(sub)
    add_reward_model_command(sub)
    add_assemble_command(sub)
    rewards = sub.add_parser("rewards", help="work with a recipe's reward functions")
    rewards_sub = rewards.add_subparsers(dest="rewards_command", required=True)
    check = rewards_sub.add_parser("check", help="score given completions and print a per-component table")
    check.add_argument("recipe", help="path to a YAML recipe")
    check.add_argument("--completions", required=True, help="JSONL with prompt, completion and the dataset's columns")
    check.add_argument("--step", type=int, default=0, help="training step (selects the curriculum stage)")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    check.set_defaults(func=cmd_rewards_check)
    launch = sub.add_parser("launch", help="write a job script that trains a recipe on a cluster")
    launch_sub = launch.add_subparsers(dest="launch_command", required=True)
    slurm = launch_sub.add_parser("slurm", help="write an sbatch script: N nodes x G GPUs, one torchrun per node")
    slurm.add_argument("recipe", help="path to a YAML recipe; validated now, with the --set overrides")
    slurm.add_argument("--nodes", type=int, required=True, help="machines in the job")
    slurm.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per machine, one process each")
    slurm.add_argument("--partition", help="Slurm partition (default: the cluster's)")
    slurm.add_argument("--time", metavar="HH:MM:SS", help="wall-clock limit, HH:MM:SS or D-HH:MM:SS "
                       "(default: the partition's)")
    slurm.add_argument("--account", help="account charged for the job (default: yours)")
    slurm.add_argument("--cpus-per-task", type=int, metavar="C", help="CPU cores per node (default: the cluster's)")
    slurm.add_argument("--port", type=int, default=29500, help="rendezvous port on the first node (default 29500)")
    slurm.add_argument("--out", metavar="FILE", help="script path (default: <recipe name>.sbatch here)")
    slurm.add_argument("--overwrite", action="store_true", help="replace an existing script file")
    slurm.add_argument("--resume", action="store_true",
                       help="the job runs `grpokit train --resume`: resubmitting the script continues the run")
    slurm.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe field in the job's `grpokit train` (repeatable)")
    slurm.set_defaults(func=cmd_launch_slurm)
    return parser


def quiet_libraries() -> None:
    """Keep the terminal for grpokit's own progress: no per-shard bars or deprecation chatter."""
    import logging
    import os
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # bitsandbytes (the qlora extra), imported by transformers whenever it is installed, warns on AVX512-BF16
    # CPUs that it cannot fetch a faster kernel from the Hub, then uses its own: nothing a user can act on
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward"))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        code = args.func(args)
        from grpokit.distributed import launched_world_size

        if launched_world_size() > 1:
            # one of several processes, its work written: leave now, not through interpreter teardown, where
            # the process group's threads (held by FSDP's modules) can be destroyed running and abort the
            # process after a finished run ("terminate called without an active exception", SIGABRT)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    except GrpokitError as err:
        if args.debug:
            raise
        if not getattr(err, "reported_elsewhere", False):  # another rank's error is printed by rank 0
            print(f"grpokit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("grpokit: interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        if args.debug or err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        print(f"grpokit: error: {disk_message(err)}", file=sys.stderr)
        return 2


def disk_message(err: OSError) -> str:
    """A full or read-only disk is not a bug: what happened, where, what to do."""
    where = f" (writing {err.filename})" if err.filename else ""
    if err.errno == errno.EROFS:
        return (f"read-only file system{where}; write to another directory "
                "(for training: --set training.output_dir=DIR)")
    return (f"no space left on device{where}; free some space, or write to another disk, and run the command "
            "again (a training run continues from its last complete checkpoint with --resume)")


if __name__ == "__main__":
    sys.exit(main())
