"""Time to accuracy: grpokit's trainer against TRL's GRPOTrainer on the demo task, side by side.

    .venv/bin/python bench/time_to_accuracy.py --json runs/time_to_accuracy/results.json

Both train recipes/demo.yaml as grpokit's loader reads it (model, data, P x G, completion limit,
sampling, rewards and weights, learning rate and schedule, beta, epsilon, LoRA), one after the
other, each in its own subprocess (bench/_tta_grpokit_worker.py, bench/_tta_trl_worker.py) so each
peak RSS is its own; TRL in its fastest configuration here (bf16, SDPA, no gradient checkpointing,
loss_type from the recipe, no vLLM). The same held-out rows are evaluated greedily by the same code
(bench/_tta_eval.py) at 0 and whenever the training clock passes a multiple of --interval-s. The
clock sums step times only (generation, reward, reference, update, optimiser, any compile time);
evaluation and model loading never count.

grpokit trains up to the recipe's max_steps (or --max-steps) or until it has held 90 % at two
evaluations in a row; TRL until the same, or until its clock passes 4 x grpokit's minutes to 90 %
(4 x grpokit's whole training time if grpokit never got there), or --trl-max-minutes.
Printed: accuracy (95 % Wilson interval) against training minutes for each, minutes to 50 % and
90 %, their ratio TRL / grpokit; the curves are drawn in one plot (--plot).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

from _tta_eval import TARGETS  # bench/ is on sys.path: this runs as a script
from step_speed import fmt, run_worker

HERE = Path(__file__).resolve().parent
SPEEDUP_BAR = 4.0  # the issue's bar: grpokit reaches 90 % in <= 1/4 of TRL's minutes
Z95 = 1.959964


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95 % Wilson score interval of k successes in n: sound at 0 and n, where the normal one collapses."""
    if n == 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    centre, half = (p + z2 / (2 * n)) / (1 + z2 / n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def overrides(args, recipe, run_dir: Path, threads: int) -> list[str]:
    """All the bench changes in the recipe: where the run goes, how long, and that grpokit's own
    evaluations and checkpoints stay out of the way (samples.jsonl logs every completion, so the
    prompts of each step can be compared with TRL's)."""
    extra = [f"training.max_steps={args.max_steps}"] if args.max_steps is not None else []
    n = recipe.training.prompts_per_step * recipe.rollout.num_generations
    return [*extra, f"training.output_dir={run_dir}", "training.eval_every=0", "training.save_every=0",
            f"training.num_threads={threads}", "logging.progress=false", "logging.samples_every=1",
            f"logging.num_samples={n}"]


def minutes_to(result: dict, accuracy: float) -> float | None:
    """Training minutes at the first evaluation at or above ``accuracy``; None if none was."""
    hit = next((e for e in result.get("evals", []) if e["accuracy"] >= accuracy), None)
    return None if hit is None else hit["seconds"] / 60


def trl_budget_s(grpokit: dict, cap_minutes: float | None) -> float | None:
    """4 x grpokit's seconds to the target (its whole training time if it never got there), capped."""
    reached = minutes_to(grpokit, TARGETS[-1])
    budget = SPEEDUP_BAR * (reached * 60 if reached is not None else grpokit.get("training_s", 0.0)) or None
    if cap_minutes is not None:
        budget = min(budget, cap_minutes * 60) if budget else cap_minutes * 60
    return budget


def summarise(result: dict) -> dict:
    """The figures the report prints for one run."""
    if "error" in result:
        return {"error": result["error"]}
    evals, times = result.get("evals", []), result.get("step_times_s", [])
    return {"minutes_to": {str(t): minutes_to(result, t) for t in TARGETS}, "training_min": result["training_s"] / 60,
            "steps": result["steps_done"], "median_s_per_step": statistics.median(times) if times else None,
            "final_accuracy": evals[-1]["accuracy"] if evals else None, "stop_reason": result.get("stop_reason"),
            "eval_s": sum(e["eval_s"] for e in evals), "cpu_pressure": result.get("cpu_pressure"),
            "between_steps_s": result.get("wall_s_without_evals", 0.0) - result["training_s"],
            "peak_rss_mb": result.get("peak_rss_mb"), "model": result.get("model", {})}


def ratio_text(gk: float | None, trl: float | None, trl_total_min: float) -> str:
    """TRL's minutes over grpokit's: exact when both got there, a lower bound when only grpokit did."""
    if gk is None:
        return "n/a (grpokit did not reach it)"
    if trl is None:
        return f"> {trl_total_min / gk:.1f}x (TRL not reached within {trl_total_min:.2f} min)"
    return f"{trl / gk:.2f}x"


def verdict(summary: dict) -> str:
    """The issue's bar, saying which of its two ways it was met, or why not."""
    gk, trl = summary.get("grpokit", {}), summary.get("trl", {})
    target = str(TARGETS[-1])
    if "error" in gk or "error" in trl:
        return "not decided: a run failed"
    gk_min, trl_min = gk["minutes_to"][target], trl["minutes_to"][target]
    if gk_min is None:
        return (f"NOT MET: grpokit did not reach {TARGETS[-1]:.0%} within its {gk['steps']} steps "
                f"({gk['training_min']:.2f} min)")
    if trl_min is not None:
        ratio = trl_min / gk_min
        return (f"{'MET' if ratio >= SPEEDUP_BAR else 'NOT MET'}: TRL needed {trl_min:.2f} min, grpokit {gk_min:.2f} "
                f"min ({ratio:.2f}x, bar {SPEEDUP_BAR:.0f}x)")
    if trl["training_min"] >= SPEEDUP_BAR * gk_min - 1e-9:
        return (f"MET: TRL never reached {TARGETS[-1]:.0%} within {SPEEDUP_BAR:.0f}x grpokit's {gk_min:.2f} min "
                f"(it trained {trl['training_min']:.2f} min, final accuracy {trl['final_accuracy']:.1%})")
    return (f"not decided: TRL stopped ({trl['stop_reason']}) after {trl['training_min']:.2f} min, before "
            f"{SPEEDUP_BAR:.0f}x grpokit's {gk_min:.2f} min, without reaching {TARGETS[-1]:.0%}")


def settings_line(recipe, args, eval_rows: int, threads: int, train_rows: int) -> str:
    m, r, a, t = recipe.model, recipe.rollout, recipe.algorithm, recipe.training
    lora = f"LoRA r={m.lora.r} alpha={m.lora.alpha:g} {m.lora.target_modules}" if m.lora else "full fine-tuning"
    rewards = " + ".join(f"{s.weight:g} x {s.name}({', '.join(f'{k}={v}' for k, v in s.args.items())})"
                         for s in recipe.rewards)
    return (f"recipe {args.recipe}: model {m.path} ({m.dtype}, {lora}); data {recipe.data.label} "
            f"({train_rows} training rows, seed {recipe.data.seed}); P={t.prompts_per_step} x G={r.num_generations}, "
            f"<= {r.max_completion_length} new tokens, T={r.temperature:g}, top_p={r.top_p:g}, top_k={r.top_k}; "
            f"beta={a.beta:g}, epsilon={a.epsilon:g}, loss {a.loss_type}, advantage {a.advantage}; rewards {rewards}; "
            f"lr {t.learning_rate:g}, {t.warmup_steps} warm-up steps then {t.lr_schedule} over {t.max_steps} steps "
            f"(grpokit's lr_factor for both); grpokit max_steps {t.max_steps}; held-out: the first {eval_rows} of the "
            f"recipe's {recipe.data.eval_size} rows, greedy, scored by {recipe.accuracy_reward} (>= 1 is correct); "
            f"evaluations every {args.interval_s:g} s of training clock; {threads} torch threads.")


def report(args, recipe, results: dict, summary: dict, eval_rows: int, threads: int, train_rows: int) -> None:
    versions = {k: v for r in results.values() for k, v in r.get("versions", {}).items()}
    print(f"\n## Time to accuracy: grpokit vs TRL {versions}\n")
    print(settings_line(recipe, args, eval_rows, threads, train_rows))
    print("Same in both runs by construction: the model directory, the training rows in grpokit's draw order (its "
          "seeded shuffle and next_prompts, epoch reshuffles included; TRL's shuffling off), P x G, the completion "
          "limit, T / top_p / top_k, each reward as grpokit builds and calls it (RewardComponent) with the recipe's "
          "weights, the learning rate step by step (grpokit's lr_factor), beta, epsilon, loss type, advantage "
          "scaling, LoRA, max_grad_norm, weight decay, seed; the held-out rows and the evaluation code. Not the same: "
          "the random streams of sampling, the attention kernel and buffer dtypes (below), the optimiser kernel "
          "(AdamW either way), and grpokit samples from a merged bf16 copy of the model it trains, TRL from the model "
          "itself.")
    print("Conventions: training minutes = the sum of step times (generation + reward + reference + update + "
          "optimiser, compile time included), from the first step's start; evaluation and model loading are "
          "excluded. An evaluation follows the first step after each mark, so a figure's minutes are those of "
          "that step's end. Minutes to X % = the first evaluation at or above X %.")
    for label, r in results.items():
        if "error" in r:
            print(f"\n**{label} FAILED**: {r['error']}\n```\n{(r.get('traceback') or '').strip()[-3000:]}\n```")
    for label, r in results.items():
        if r.get("evals"):
            print(f"\n### {label}\n\n| training min | step | accuracy | 95 % Wilson |\n|---|---|---|---|")
            for e in r["evals"]:
                lo, hi = wilson(e["num_correct"], e["num_examples"])
                print(f"| {e['seconds'] / 60:.2f} | {e['step']} | {e['accuracy']:.1%} ({e['num_correct']}/"
                      f"{e['num_examples']}) | {lo:.1%} - {hi:.1%} |")
    print("\n| run | minutes to 50 % | minutes to 90 % | steps | training min | s/step (median) | final accuracy "
          "| stopped because | CPU pressure | peak RSS MB |\n|---|---|---|---|---|---|---|---|---|---|")
    for label, s in summary.items():
        if "error" in s:
            print(f"| {label} | failed | | | | | | | | |")
            continue
        reached = [fmt(s["minutes_to"][str(t)], ".2f") if s["minutes_to"][str(t)] is not None
                   else f"not reached within {s['training_min']:.2f} min" for t in TARGETS]
        print(f"| {label} | {reached[0]} | {reached[1]} | {s['steps']} | {s['training_min']:.2f} | "
              f"{fmt(s['median_s_per_step'], '.2f')} | {fmt(s['final_accuracy'], '.1%')} | {s['stop_reason']} | "
              f"{fmt(100 * s['cpu_pressure'] if s['cpu_pressure'] is not None else None, '.0f', ' %')} | "
              f"{fmt(s['peak_rss_mb'], '.0f')} |")
    gk, trl = summary.get("grpokit", {}), summary.get("trl", {})
    if "minutes_to" in gk and "minutes_to" in trl:
        print("\nRatio TRL / grpokit: " + "; ".join(
            f"to {t:.0%}: {ratio_text(gk['minutes_to'][str(t)], trl['minutes_to'][str(t)], trl['training_min'])}"
            for t in TARGETS))
    print(f"\n**Bar** (grpokit reaches {TARGETS[-1]:.0%} in <= 1/{SPEEDUP_BAR:.0f} of TRL's minutes): "
          f"{verdict(summary)}")
    checks(results, summary)


def same_per_step(results: dict, key: str, equal) -> str:
    """Whether ``key`` agreed at every step both runs took."""
    a, b = (results.get(x, {}).get("steps") or [] for x in ("grpokit", "trl"))
    n = min(len(a), len(b))
    if not n:
        return "n/a"
    differ = [i + 1 for i in range(n) if not equal(a[i].get(key), b[i].get(key))]
    return f"yes (all {n})" if not differ else f"NO at steps {differ[:10]} of {n}"


def close(x, y) -> bool:
    return x is not None and y is not None and abs(x - y) <= 1e-9 + 1e-6 * abs(x)


def checks(results: dict, summary: dict) -> None:
    """What matched between the two runs and what could make the minutes incomparable."""
    notes = [f"same prompts at every step both ran: {same_per_step(results, 'prompts', lambda x, y: x == y)}",
             f"same learning rate at every step both ran: {same_per_step(results, 'lr', close)}"]
    for label, s in summary.items():
        if "error" in s:
            continue
        r = results[label]
        start = r["evals"][0]["accuracy"] if r.get("evals") else None
        facts = s["model"]
        notes.append(f"{label}: accuracy before training {fmt(start, '.1%')}; attention "
                     f"{facts.get('attn_implementation')}, weights {facts.get('frozen_dtypes')} + adapters "
                     f"{facts.get('trainable_dtypes')}, buffers {facts.get('buffer_dtypes')}; "
                     f"{len(r.get('evals', []))} evaluations took {s['eval_s']:.0f} s (off the clock); "
                     f"{s['between_steps_s']:.1f} s of wall time between steps (logging, data; off the clock)"
                     + (f"; TRL budget {r['budget_s'] / 60:.2f} min" if r.get("budget_s") else ""))
        if (s["cpu_pressure"] or 0) > 0.05:
            notes.append(f"{label}: other processes competed for the CPUs ({100 * s['cpu_pressure']:.0f} % stall): "
                         "noisy.")
    print("\nChecks:\n" + "\n".join(f"- {x}" for x in notes))


def plot(results: dict, path: Path) -> bool:
    """Accuracy against training minutes for both runs, with their Wilson bands and the 50 / 90 % lines."""
    from matplotlib.ticker import MaxNLocator

    from grpokit.report.plots import _figure, _save  # the house style of grpokit's report plots

    runs = {label: r["evals"] for label, r in results.items() if r.get("evals")}
    if not runs:
        return False
    fig, (ax,) = _figure()
    ax.xaxis.set_major_locator(MaxNLocator())  # minutes, not steps: fractions allowed
    for i, (label, evals) in enumerate(runs.items()):
        minutes = [e["seconds"] / 60 for e in evals]
        bands = [wilson(e["num_correct"], e["num_examples"]) for e in evals]
        reached = minutes_to(results[label], TARGETS[-1])
        label += f" ({TARGETS[-1]:.0%} at {reached:.2f} min)" if reached is not None else f" (no {TARGETS[-1]:.0%})"
        ax.plot(minutes, [100 * e["accuracy"] for e in evals], color=f"C{i}", marker="o", markersize=3, label=label)
        ax.fill_between(minutes, [100 * lo for lo, _ in bands], [100 * hi for _, hi in bands], color=f"C{i}",
                        alpha=0.15)
    for target in TARGETS:
        ax.axhline(100 * target, color="grey", linestyle="--", linewidth=0.8)
    ax.set(title="Held-out greedy accuracy against training time (band: 95% Wilson)", xlabel="training minutes",
           ylabel="accuracy (%)", ylim=(0, 100))
    ax.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(fig, path)
    return True


def parse(argv):
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(HERE.parent / "recipes" / "demo.yaml"))
    p.add_argument("--max-steps", type=int, default=None, help="grpokit's steps at most (default: the recipe's)")
    p.add_argument("--interval-s", type=float, default=30.0, help="evaluate each time the clock passes a multiple")
    p.add_argument("--eval-size", type=int, default=None, help="held-out rows (default: all the recipe's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in both workers (default: torch's)")
    p.add_argument("--trl-max-minutes", type=float, default=None, help="cap on TRL's training clock")
    p.add_argument("--trl-max-steps", type=int, default=None, help="TRL's steps at most (default: 20 x grpokit's)")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per worker")
    p.add_argument("--out", default="runs/time_to_accuracy", help="worker logs and run dirs")
    p.add_argument("--json", default=None, help="write every raw number here")
    p.add_argument("--plot", default="runs/time_to_accuracy/curves.png", help="the curves, as PNG")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch

    from grpokit.config import load_recipe
    from grpokit.data import load_splits

    threads = args.threads or torch.get_num_threads()
    out = Path(args.out)
    recipe = load_recipe(args.recipe, [f"training.max_steps={args.max_steps}"] if args.max_steps is not None else [])
    eval_rows = min(args.eval_size or recipe.data.eval_size, recipe.data.eval_size)
    base = {"recipe": str(Path(args.recipe).resolve()), "threads": threads, "interval_s": args.interval_s,
            "eval_size": eval_rows}
    results = {"grpokit": run_worker("_tta_grpokit_worker.py", {
        **base, "label": "grpokit", "overrides": overrides(args, recipe, out / "grpokit", threads)}, out, args.timeout)}
    if "error" in results["grpokit"] and args.trl_max_minutes is None:
        results["trl"] = {"label": "trl",
                          "error": "not run: grpokit failed, so there is no budget (give --trl-max-minutes)"}
    else:
        results["trl"] = run_worker("_tta_trl_worker.py", {
            **base, "label": "trl", "overrides": overrides(args, recipe, out / "trl", threads),
            "budget_s": trl_budget_s(results["grpokit"], args.trl_max_minutes),
            "max_steps": args.trl_max_steps or 20 * recipe.training.max_steps}, out, args.timeout)
    summary = {label: summarise(r) for label, r in results.items()}
    report(args, recipe, results, summary, eval_rows, threads, len(load_splits(recipe.data)[0]))
    if args.plot and plot(results, Path(args.plot)):
        print(f"\nCurves: {args.plot}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "threads": threads, "summary": summary,
                                               "raw": results}, indent=1))
    return 0 if all("error" not in s for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
