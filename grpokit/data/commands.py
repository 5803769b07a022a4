"""``grpokit data ...``: validate episodes, convert them to prompts, SFT samples or preference
pairs, and split a dataset by a column. Each subcommand is a thin shell over a library call,
writes its output atomically and prints what it wrote with what it skipped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from grpokit.errors import DataError


def _counts(skipped: dict[str, int]) -> str:
    return ", ".join(f"{name.replace('_', ' ')} {n}" for name, n in skipped.items())


def _write(out: str, rows: list[dict], what: str, skipped: dict[str, int], inputs: list[str]) -> None:
    from grpokit.data.episodes import check_outputs, write_jsonl

    if not rows:
        raise DataError(f"no {what} to write to {out}; nothing written (skipped or dropped: {_counts(skipped)})")
    check_outputs([out], inputs=inputs)
    write_jsonl(out, rows)
    print(f"wrote {out}: {len(rows)} {what} (skipped or dropped: {_counts(skipped)})")


def cmd_data_validate(args) -> int:
    from grpokit.data.episodes import has_observation, load_episodes

    episodes = load_episodes(args.episodes)
    steps = sum(len(e.steps) for e in episodes)
    wins = sum(e.success for e in episodes)
    print(f"{args.episodes}: valid; {len(episodes)} episodes, {steps} steps, success rate "
          f"{100 * wins / len(episodes):.1f}% ({wins}/{len(episodes)})")
    print(f"  episodes without steps {sum(not e.steps for e in episodes)}, steps without observation "
          f"{sum(not has_observation(s) for e in episodes for s in e.steps)}, episodes without final_reward "
          f"{sum(e.final_reward is None for e in episodes)}")
    return 0


def cmd_data_prompts(args) -> int:
    from grpokit.data.episodes import episodes_to_prompts, load_episodes

    rows, skipped = episodes_to_prompts(load_episodes(args.episodes), history=args.history, system=args.system)
    _write(args.out, rows, "prompts", skipped, [args.episodes])
    return 0


def cmd_data_sft(args) -> int:
    from grpokit.data.episodes import episodes_to_sft, load_episodes

    rows, skipped = episodes_to_sft(load_episodes(args.episodes), only_successful=not args.all,
                                    history=args.history, system=args.system)
    _write(args.out, rows, "SFT samples", skipped, [args.episodes])
    return 0


def cmd_data_pairs(args) -> int:
    from grpokit.data.episodes import load_episodes
    from grpokit.data.pairs import pairs_from_comparator, pairs_from_feedback, pairs_from_runs

    options = {"history": args.history, "system": args.system}
    if args.runs:
        if args.episodes:
            raise DataError(f"--runs takes the two run files; drop the extra EPISODES argument {args.episodes!r}")
        inputs = list(args.runs)
        rows, skipped = pairs_from_runs(load_episodes(args.runs[0]), load_episodes(args.runs[1]), **options)
    else:
        if not args.episodes:
            mode = "--feedback" if args.feedback else "--comparator"
            raise DataError(f"{mode} needs the EPISODES.jsonl file as an argument")
        inputs = [args.episodes]
        episodes = load_episodes(args.episodes)
        if args.feedback:
            inputs.append(args.feedback)
            rows, skipped = pairs_from_feedback(episodes, args.feedback, **options)
        else:
            rows, skipped = pairs_from_comparator(episodes, args.comparator, **options)
    _write(args.out, rows, "pairs", skipped, inputs)
    return 0


def cmd_data_split(args) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from grpokit.data.split import write_split

    report = write_split(args.input, args.by, args.out[0], args.out[1], quantiles=args.quantiles, ratio=args.ratio,
                         seed=args.seed, plot=args.plot, overwrite=args.overwrite)
    table = Table(title=escape(f"{Path(args.input).name} split by {args.by!r} ({report['kind']}, seed {args.seed})"))
    for column in ("stratum", "rows", Path(args.out[0]).name, Path(args.out[1]).name):
        table.add_column(column, justify="left" if column == "stratum" else "right")
    for s in report["strata"]:
        table.add_row(escape(s["stratum"]), str(s["rows"]), str(s["first"]), str(s["second"]))  # values are data, not markup
    table.add_row("total", str(report["rows"]), str(report["first"]), str(report["second"]), style="bold")
    console = Console()
    console.print(table)
    if report["edges"] is not None:
        console.print(f"bin edges: {', '.join(f'{e:.6g}' for e in report['edges'])}")
    paths = report["paths"]
    print(f"wrote {paths['first']}: {report['first']} rows; {paths['second']}: {report['second']} rows; "
          f"plot {paths['plot']}")
    return 0


def _add_prompt_options(parser: argparse.ArgumentParser, history: int) -> None:
    parser.add_argument("--history", type=int, default=history, metavar="K",
                        help=f"earlier steps (observation and action) shown before the current one (default {history})")
    parser.add_argument("--system", metavar="TEXT", help="a system message at the start of every prompt")


def add_data_commands(subparsers) -> None:
    """Register ``grpokit data {validate,prompts,sft,pairs,split}`` on the CLI's subparsers."""
    data = subparsers.add_parser("data", help="check agent episodes; turn them into prompts, SFT samples or "
                                              "preference pairs; split a dataset by a column")
    sub = data.add_subparsers(dest="data_command", required=True)

    validate = sub.add_parser("validate", help="validate an episodes file and print its counts")
    validate.add_argument("episodes", metavar="EPISODES.jsonl")
    validate.set_defaults(func=cmd_data_validate)

    prompts = sub.add_parser("prompts", help="one GRPO prompt per step; the recorded action is the 'answer' column")
    prompts.add_argument("episodes", metavar="EPISODES.jsonl")
    prompts.add_argument("--out", required=True, metavar="FILE.jsonl")
    _add_prompt_options(prompts, history=2)
    prompts.set_defaults(func=cmd_data_prompts)

    sft = sub.add_parser("sft", help="one chat sample per step of the successful episodes (TRL's 'messages' format)")
    sft.add_argument("episodes", metavar="EPISODES.jsonl")
    sft.add_argument("--out", required=True, metavar="FILE.jsonl")
    sft.add_argument("--all", action="store_true", help="include unsuccessful episodes too")
    _add_prompt_options(sft, history=2)
    sft.set_defaults(func=cmd_data_sft)

    pairs = sub.add_parser("pairs", help="preference pairs (TRL's prompt/chosen/rejected) from two runs, human "
                                         "feedback, or a comparator of episodes")
    mode = pairs.add_mutually_exclusive_group(required=True)
    mode.add_argument("--runs", nargs=2, metavar=("EARLIER.jsonl", "LATER.jsonl"),
                      help="two runs of the same tasks; the better episode's action is chosen")
    mode.add_argument("--feedback", metavar="FEEDBACK.jsonl",
                      help="lines {episode_id, step, score, alternative?}; higher score is chosen")
    mode.add_argument("--comparator", metavar="success|shorter|module:function",
                      help="rank episodes of the same instruction; the preferred one's actions are chosen")
    pairs.add_argument("episodes", nargs="?", metavar="EPISODES.jsonl", help="the episodes (with --feedback or --comparator)")
    pairs.add_argument("--out", required=True, metavar="PAIRS.jsonl")
    _add_prompt_options(pairs, history=0)
    pairs.set_defaults(func=cmd_data_pairs)

    split = sub.add_parser("split", help="split a JSONL file in two with the same distribution of a column")
    split.add_argument("input", metavar="IN.jsonl")
    split.add_argument("--by", required=True, metavar="COLUMN", help="numeric: quantile bins; otherwise: one stratum per value")
    split.add_argument("--quantiles", type=int, default=4, help="bins for a numeric column (default 4)")
    split.add_argument("--ratio", type=float, default=0.5, help="share of each stratum in the first output (default 0.5)")
    split.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    split.add_argument("--out", nargs=2, required=True, metavar=("A.jsonl", "B.jsonl"))
    split.add_argument("--plot", metavar="PNG", help="histogram of the column in both parts (default: beside A, <A>.split.png)")
    split.add_argument("--overwrite", action="store_true", help="replace existing output files")
    split.set_defaults(func=cmd_data_split)
