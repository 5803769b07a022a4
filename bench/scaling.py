"""How cost grows: s/step and peak RSS of grpokit and TRL as G, the completion limit and the model size grow.

    .venv/bin/python bench/scaling.py --json runs/scaling/results.json
    .venv/bin/python bench/scaling.py --factors G --frameworks grpokit --steps 1 --warmup 0   # a quick look

One factor at a time from the base point (P=4 x G=8, <= 32 new tokens, a SmolLM2-135M): G in 4, 8, 16; the
completion limit in 32, 64, 128; the model SmolLM2-135M's architecture, then SmolLM2-360M's. That is 6 distinct
configurations (the base shared), each run by grpokit (bf16) and by TRL (bf16, gradient checkpointing off: its
fastest configuration in bench/step_speed.py), each in its own subprocess with step_speed's workers and work
(same prompts in the same order, LoRA r=16 all-linear, beta=0.04, one optimiser step per generation batch).
The full run takes roughly half an hour on the project's 2-core CPU (an estimate, TRL's runs are ~3/4 of it).

Why random weights (--weights random, the default): neither framework can be told the same way to ignore EOS
(TRL takes GenerationConfig keywords such as min_new_tokens through GRPOConfig.generation_kwargs; grpokit's
rollout section has no such key), and the trained 135M ends its answers at ~24 tokens, so a larger limit would
add no work. Seeded random weights, in bf16, with the embedded model's tokenizer, write junk that almost never
hits EOS: every completion runs to the limit and each sweep changes one thing only. The text is meaningless and
nearly every reward is 0, which changes no cost: both frameworks still run the reference pass, the update and the
optimiser step. --weights trained uses the embedded 135M's own weights instead (no trained 360M is at hand).

Growth per doubling between consecutive points of a factor: (y2/y1) ** (1 / log2(x2/x1)); 2.0 is linear, 1.0
flat. The model's x is its parameter count.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_speed import (base_spec, fmt, matmul_rate, non_embedding_params, rows_in_draw_order, run_worker,  # noqa: E402
                        summarise)

BASE = {"G": 8, "limit": 32, "model": "135m"}
SWEEPS = {"G": [4, 8, 16], "limit": [32, 64, 128], "model": ["135m", "360m"]}
# LlamaConfig fields of SmolLM2-360M(-Instruct) that differ from the 135M's (vocab, tokenizer, rope: the same)
ARCHITECTURES = {"135m": {}, "360m": {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
                                      "num_attention_heads": 15, "num_key_value_heads": 5}}
FRAMEWORKS = ("grpokit", "trl")
CACHE = Path.home() / ".cache" / "grpokit" / "bench"
# step_speed's defaults for the work that does not vary here
FIXED = {"beta": 0.04, "lr": 1e-5, "full": False, "attn": None}


# ---------------------------------------------------------------- models


def build_random_model(source: str, target: str, overrides: dict, seed: int) -> None:
    """Save a seeded random-weight model with ``source``'s config (sizes overridden) and tokenizer, in bf16."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    for key, value in overrides.items():
        setattr(config, key, value)
    if hasattr(config, "_model_name_or_path"):  # the source's name, which this model is not
        delattr(config, "_model_name_or_path")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    partial = Path(target + ".partial")  # renamed into place once complete: an interrupted build is never reused
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)  # config.json (dtype bfloat16) and model.safetensors
    for f in Path(source).iterdir():  # the tokenizer, chat template and generation config, as they are
        if f.is_file() and f.name not in ("config.json", "model.safetensors"):
            shutil.copy2(f, partial / f.name)
    (partial / "built_from.json").write_text(json.dumps(recipe_of(source, overrides, seed)))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)


def recipe_of(source: str, overrides: dict, seed: int) -> dict:
    return {"source": str(source), "overrides": overrides, "seed": seed}


def random_model_dir(name: str, source: str, seed: int = 0) -> str:
    """The cached random-weight model ``name`` (built once; rebuilt if its source, sizes or seed changed).

    The build runs in a spawned process: a worker's peak RSS (ru_maxrss) starts at its parent's high-water
    mark (exec keeps it), so a model built in this process would raise every later worker's figure."""
    target = CACHE / f"smollm2-{name}-random"
    wanted = recipe_of(source, ARCHITECTURES[name], seed)
    stamp = target / "built_from.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()) == wanted):
        print(f"[scaling] building {target} (random weights, seed {seed})", file=sys.stderr, flush=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        proc = multiprocessing.get_context("spawn").Process(
            target=build_random_model, args=(str(source), str(target), ARCHITECTURES[name], seed))
        proc.start(), proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"building {target} failed (exit code {proc.exitcode})")
    return str(target)


def model_dirs(weights: str, names: set[str]) -> dict[str, str]:
    from grpokit.models import resolve_model_dir

    embedded = resolve_model_dir("smollm2-135m-instruct")
    return {n: str(embedded) if (n == "135m" and weights == "trained") else random_model_dir(n, embedded)
            for n in sorted(names)}


# ---------------------------------------------------------------- configurations and runs


def points(factors: list[str]) -> dict[str, list[dict]]:
    """Per factor, its configurations in growing order: the base point with that one factor changed."""
    return {f: [{**BASE, f: v} for v in SWEEPS[f]] for f in factors}


def key_of(point: dict) -> str:
    return f"G{point['G']}-L{point['limit']}-{point['model']}"


def point_args(args, point: dict) -> argparse.Namespace:
    """step_speed's flags for one configuration: what base_spec and summarise read."""
    return argparse.Namespace(prompts=args.prompts, generations=point["G"], max_completion_length=point["limit"],
                              warmup=args.warmup, steps=args.steps, **FIXED)


def worker_runs(args, point: dict, model_dir: str, threads: int, rows: list[dict]) -> list[tuple[str, str, dict]]:
    """(framework, worker script, spec) for each framework asked for, on one configuration."""
    base = base_spec(point_args(args, point), model_dir, threads)
    label = key_of(point)
    specs = {"grpokit": ("_grpokit_worker.py", {**base, "label": f"{label}-grpokit", "dtype": "bfloat16"}),
             "trl": ("_trl_worker.py", {**base, "label": f"{label}-trl", "bf16": True, "rows": rows,
                                        "gradient_checkpointing": False})}
    return [(fw, *specs[fw]) for fw in args.frameworks]


def measure(args, configs: dict[str, dict], dirs: dict[str, str], threads: int) -> dict[str, dict[str, dict]]:
    """Run every (configuration, framework) once, one after the other; the raw results by key and framework."""
    rows = rows_in_draw_order()
    raw: dict[str, dict[str, dict]] = {}
    for key, point in configs.items():
        for fw, script, spec in worker_runs(args, point, dirs[point["model"]], threads, rows):
            raw.setdefault(key, {})[fw] = run_worker(script, spec, Path(args.out), args.timeout)
    return raw


def summarise_all(args, raw, configs, params, rates) -> dict[str, dict[str, dict]]:
    """step_speed's summary of each run, plus its completion tokens per step."""
    summary: dict[str, dict[str, dict]] = {}
    for key, by_fw in raw.items():
        point = configs[key]
        for fw, result in by_fw.items():
            s = summarise(result, point_args(args, point), params[point["model"]][1], rates)
            if "error" not in s:
                s["completion_tokens_per_step"] = completion_tokens(result, args.warmup)
            summary.setdefault(key, {})[fw] = s
    return summary


def completion_tokens(result: dict, warmup: int) -> float | None:
    """Mean completion tokens per measured step (what the limit and G actually bought)."""
    counts = [s["completion_tokens"] for s in result["steps"][warmup:]]
    return statistics.mean(counts) if counts and None not in counts else None


# ---------------------------------------------------------------- report


def per_doubling(x1: float, y1, x2: float, y2) -> float | None:
    """y's growth factor per doubling of x between two points: (y2/y1) ** (1/log2(x2/x1))."""
    if not (y1 and y2) or x1 == x2:
        return None
    return (y2 / y1) ** (1 / math.log2(x2 / x1))


def measures(s: dict) -> dict:
    """The three quantities whose growth the tables show, None where a run failed."""
    ok = "error" not in s
    tokens = s.get("completion_tokens_per_step") if ok else None
    return {"s_step": s["median_s_per_step"] if ok else None,
            "s_token": s["median_s_per_step"] / tokens if tokens else None,
            "rss": s.get("peak_rss_mb") if ok else None}


def x_of(factor: str, point: dict, params: dict) -> float:
    return params[point["model"]][0] if factor == "model" else point[factor]


def value_label(factor: str, point: dict, params: dict) -> str:
    return f"{params[point['model']][0] / 1e6:.0f} M" if factor == "model" else str(point[factor])


def growth_cells(factor, prev, point, fw, summary, params) -> list[str]:
    """Growth per doubling of s/step, s/token and RSS against the previous point of the factor."""
    if prev is None:
        return ["", "", ""]
    a, b = measures(summary[key_of(prev)][fw]), measures(summary[key_of(point)][fw])
    x1, x2 = x_of(factor, prev, params), x_of(factor, point, params)
    return [fmt(per_doubling(x1, a[m], x2, b[m]), ".2f", "x") for m in ("s_step", "s_token", "rss")]


def ratio_cell(key: str, fw: str, summary: dict) -> str:
    """TRL's s/step over grpokit's on the same configuration (on the TRL row)."""
    if fw != "trl":
        return ""
    mine, ref = (measures(summary[key].get(f, {"error": "not run"}))["s_step"] for f in ("trl", "grpokit"))
    return f"{mine / ref:.2f}x" if mine and ref else ""


def main_table(sweeps, summary, params, frameworks) -> None:
    print("| factor | value | framework | s/step | x/doubling | completion tok/step | mean completion len "
          "| ms/completion tok | x/doubling | peak RSS MB | x/doubling | TRL / grpokit | CPU stall |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for factor, pts in sweeps.items():
        for i, point in enumerate(pts):
            for fw in frameworks:
                s, key = summary[key_of(point)][fw], key_of(point)
                head = f"| {factor} | {value_label(factor, point, params)} | {fw} |"
                if "error" in s:
                    print(f"{head} failed |" + " |" * 9)
                    continue
                m = measures(s)
                g = growth_cells(factor, pts[i - 1] if i else None, point, fw, summary, params)
                stall = s["cpu_pressure"]
                print(f"{head} {m['s_step']:.2f} | {g[0]} | {fmt(s['completion_tokens_per_step'], '.0f')} | "
                      f"{s['mean_completion_length']:.1f} | {fmt(m['s_token'] and 1e3 * m['s_token'], '.1f')} | "
                      f"{g[1]} | {fmt(m['rss'], '.0f')} | {g[2]} | {ratio_cell(key, fw, summary)} | "
                      f"{fmt(stall and 100 * stall, '.1f', ' %')} |")


def span_table(sweeps, summary, params, frameworks) -> None:
    """Growth per doubling over each factor's whole range (first point to last)."""
    print("\n| factor | range | framework | s/step x/doubling | s/completion tok x/doubling | peak RSS x/doubling |")
    print("|---|---|---|---|---|---|")
    for factor, pts in sweeps.items():
        span = f"{value_label(factor, pts[0], params)} -> {value_label(factor, pts[-1], params)}"
        for fw in frameworks:
            print(f"| {factor} | {span} | {fw} | " + " | ".join(growth_cells(factor, pts[0], pts[-1], fw, summary,
                                                                              params)) + " |")


def header(args, raw, dirs, params, rates, threads) -> None:
    versions = next((r["versions"] for by_fw in raw.values() for r in by_fw.values() if r.get("versions")), {})
    print(f"\n## How cost grows: {' vs '.join(args.frameworks)} {versions or ''}\n")
    print(f"Base point P={args.prompts} x G={BASE['G']}, <= {BASE['limit']} new tokens, the 135M; one factor varied "
          f"at a time. bf16 both, LoRA r=16 alpha=32 all-linear, beta={FIXED['beta']}, lr={FIXED['lr']} constant, "
          f"TRL without gradient checkpointing; {threads} torch threads; {args.steps} measured step(s) after "
          f"{args.warmup} warm-up step(s); s/step is their median.")
    for name, d in dirs.items():
        kind = "trained (embedded)" if args.weights == "trained" and name == "135m" else "random weights, seeded"
        print(f"- model {name}: {d} ({params[name][0] / 1e6:.1f} M parameters, {params[name][1] / 1e6:.1f} M "
              f"without the embedding; {kind})")
    if any(n != "135m" or args.weights == "random" for n in dirs):
        print("- Random weights write junk that almost never emits EOS, so completions run to the limit and nearly every "
              "reward is 0: meaningless text, the same cost (generation, reference pass, update and optimiser "
              "step all run).")
    print(f"- bf16 matmul 2048^2 with {threads} threads (best before/after the runs): {rates['bfloat16']:.0f} GFLOP/s.")
    print("- x/doubling: growth factor per doubling of the factor, (y2/y1)^(1/log2(x2/x1)) against the previous "
          "point (2.00x = linear, 1.00x = flat); for the model x is the parameter count. CPU stall: time other "
          "tasks waited for a CPU during the worker (Linux PSI), as a share of its wall time.\n")


def checks(args, raw, summary, configs) -> None:
    """Failures, and whatever makes a row's figure not the cost of the configuration it names."""
    notes = []
    for key, point in configs.items():
        for fw, s in summary[key].items():
            r = raw[key][fw]
            if "error" in s:
                notes.append(f"**{key} {fw} FAILED**: {s['error']}\n```\n{(r.get('traceback') or '').strip()[-2000:]}\n```")
                continue
            if (s["cpu_pressure"] or 0) > 0.05:
                notes.append(f"WARNING {key} {fw}: other processes competed for the CPUs "
                             f"({100 * s['cpu_pressure']:.0f} % stall): its figures are noisy.")
            if s["completions_per_step"] != [args.prompts * point["G"]]:
                notes.append(f"{key} {fw}: trained {s['completions_per_step']} completions per step, not "
                             f"{args.prompts * point['G']}.")
            if s["mean_completion_length"] < 0.9 * point["limit"]:
                notes.append(f"{key} {fw}: mean completion length {s['mean_completion_length']:.1f} of a limit of "
                             f"{point['limit']} (EOS ended completions early): the limit does not bound this work.")
        done = [raw[key][fw] for fw in summary[key] if "error" not in summary[key][fw]]
        if len(done) > 1 and len({json.dumps([st["prompts"] for st in r["steps"]]) for r in done}) > 1:
            notes.append(f"{key}: the frameworks trained on different prompts.")
    print("\nChecks:\n" + "\n".join(f"- {x}" for x in notes or ["none"]))


# ---------------------------------------------------------------- main


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2, help="measured steps per run (after warm-up)")
    p.add_argument("--warmup", type=int, default=1, help="steps run first and discarded")
    p.add_argument("--factors", default="G,limit,model", help="comma-separated subset of G, limit, model")
    p.add_argument("--frameworks", default="grpokit,trl", help="comma-separated subset of grpokit, trl")
    p.add_argument("--prompts", type=int, default=4, help="P: prompts per step (smaller for a quick look)")
    p.add_argument("--weights", choices=["random", "trained"], default="random",
                   help="135M weights: seeded random (completions run to the limit) or the embedded trained ones")
    p.add_argument("--threads", type=int, default=None, help="torch threads in every worker (default: torch's)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per worker")
    p.add_argument("--out", default="runs/scaling", help="worker logs and run dirs")
    p.add_argument("--json", default=None, help="write every raw number here")
    args = p.parse_args(argv)
    args.factors = [f.strip() for f in args.factors.split(",") if f.strip()]
    args.frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    for name, given, allowed in (("--factors", args.factors, SWEEPS), ("--frameworks", args.frameworks, FRAMEWORKS)):
        if not given or set(given) - set(allowed):
            p.error(f"{name}: a comma-separated subset of {', '.join(allowed)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch

    threads = args.threads or torch.get_num_threads()
    sweeps = points(args.factors)
    configs = {key_of(pt): pt for pts in sweeps.values() for pt in pts}  # the base point once
    dirs = model_dirs(args.weights, {pt["model"] for pt in configs.values()})
    params = {name: non_embedding_params(d) for name, d in dirs.items()}
    rates = {"bfloat16": matmul_rate(torch.bfloat16, threads)}
    raw = measure(args, configs, dirs, threads)
    rates["bfloat16"] = max(rates["bfloat16"], matmul_rate(torch.bfloat16, threads))  # the less disturbed one
    summary = summarise_all(args, raw, configs, params, rates)
    header(args, raw, dirs, params, rates, threads)
    main_table(sweeps, summary, params, args.frameworks)
    span_table(sweeps, summary, params, args.frameworks)
    checks(args, raw, summary, configs)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "threads": threads, "models": {n: {"dir": d, "parameters": params[n][0],
                                                                  "non_embedding_parameters": params[n][1]}
                                                              for n, d in dirs.items()},
            "matmul_gflops": rates, "sweeps": sweeps, "configs": configs, "summary": summary, "raw": raw}, indent=1))
    return 1 if any("error" in s for by_fw in summary.values() for s in by_fw.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
