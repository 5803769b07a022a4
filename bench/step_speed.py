"""Seconds per GRPO step: grpokit's trainer against TRL's GRPOTrainer on the same work, side by side.

    .venv/bin/python bench/step_speed.py --json runs/step_speed/results.json

Same model (default: embedded SmolLM2-135M-Instruct), same prompts in the same order (built-in larger_number,
chat template), P=4 x G=8 completions per step, <= 32 new tokens (EOS stops), T=1, top_p=1, no top-k, reward
answer_match(extract=first_number), beta=0.04, LoRA r=16 alpha=32 all-linear (or --full), constant lr, one optimiser
step per generation batch. Each run is its own subprocess (bench/_grpokit_worker.py, bench/_trl_worker.py), one after
the other, so each peak RSS is its own. TRL runs in bf16 and fp32; grpokit in bf16 (+ fp32 with --grpokit-fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
import timeit
from pathlib import Path

HERE = Path(__file__).resolve().parent
UPDATE_PASSES = 3  # forward + backward ~ 3 forwards


def matmul_rate(dtype, threads: int, size: int = 2048, reps: int = 10) -> float:
    """GFLOP/s of a size x size matmul in ``dtype`` with ``threads`` torch threads (best of reps, after one warm-up)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    best = min(timeit.repeat(lambda: a @ b, number=1, repeat=reps + 1)[1:])
    return 2 * size ** 3 / best / 1e9


def non_embedding_params(model_dir: str) -> tuple[int, int]:
    """(all parameters, parameters minus the input embedding matrix), counted on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    total = sum(p.numel() for p in model.parameters())
    return total, total - model.get_input_embeddings().weight.numel()


def cpu_stall_us() -> float | None:
    """Microseconds some task waited for a CPU (Linux PSI): other load on the machine shows up here."""
    try:
        return float(Path("/proc/pressure/cpu").read_text().split("total=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return None


def run_worker(script: str, spec: dict, out: Path, timeout: float) -> dict:
    """Run one worker subprocess; its result JSON, or an error record if it died without one."""
    out.mkdir(parents=True, exist_ok=True)
    spec_path, result_path, log_path = (out / f"{spec['label']}.{x}" for x in ("spec.json", "result.json", "log"))
    spec = {**spec, "result_path": str(result_path), "run_dir": str(out / spec["label"])}
    spec_path.write_text(json.dumps(spec)), result_path.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": str(spec["threads"])}
    print(f"[step_speed] {spec['label']}: running (log: {log_path})", file=sys.stderr, flush=True)
    t0, stall0 = time.perf_counter(), cpu_stall_us()
    try:
        with open(log_path, "w") as log:
            proc = subprocess.run([sys.executable, str(HERE / script), str(spec_path)], stdout=log, stderr=log,
                                  env=env, timeout=timeout, cwd=str(HERE.parent))
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    if result_path.is_file():
        result = json.loads(result_path.read_text())
    else:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        result = {"label": spec["label"], "error": f"worker exited with {rc} and no result", "traceback": "\n".join(tail)}
    stall1 = cpu_stall_us()
    if stall0 is not None and stall1 is not None:
        result["cpu_pressure"] = (stall1 - stall0) / 1e6 / (time.perf_counter() - t0)
    print(f"[step_speed] {spec['label']}: done in {time.perf_counter() - t0:.0f} s"
          + (f" -- FAILED: {result['error']}" if "error" in result else ""), file=sys.stderr, flush=True)
    return result


def summarise(result: dict, args, n_params: int, rates: dict) -> dict:
    """Median s/step and throughputs over the steps after warm-up."""
    steps = result.get("steps") or []
    kept = steps[args.warmup:]  # the first --warmup steps are discarded
    if "error" in result or not kept:
        return {"error": result.get("error", "no measured steps")}
    med = statistics.median  # rates are medians of per-step rates: one step slowed by other load moves them little
    tokens = [s["completion_tokens"] + s["prompt_tokens"] for s in kept if s.get("prompt_tokens") is not None]
    passes = 1 + (args.beta > 0) + UPDATE_PASSES
    flops_per_token = 2 * n_params * (1 + (args.beta > 0)) + 6 * n_params
    s = {"median_s_per_step": med(s["step_time_s"] for s in kept), "steps_measured": len(kept),
         "min_s_per_step": min(s["step_time_s"] for s in kept), "cpu_pressure": result.get("cpu_pressure"),
         "step_times_s": [round(x["step_time_s"], 2) for x in steps],
         "completions_per_step": sorted({x["completions"] for x in kept}),
         "mean_completion_length": statistics.mean(x["mean_completion_length"] for x in kept),
         "completion_tokens_per_s": med(x["completion_tokens"] / x["step_time_s"] for x in kept),
         "peak_rss_mb": result.get("peak_rss_mb")}
    if len(tokens) == len(kept):
        s["total_tokens_per_s"] = med(t * passes / x["step_time_s"] for t, x in zip(tokens, kept))
        s["gflops"] = med(t * flops_per_token / x["step_time_s"] for t, x in zip(tokens, kept)) / 1e9
        s["peak_fraction"] = s["gflops"] / rates[result["dtype"]]
    return s


def rows_in_draw_order() -> list[dict]:
    """The training rows in the order grpokit draws them (training.seed 0, first epoch): TRL gets them so, unshuffled."""
    from grpokit.data import make_task

    train_rows, _ = make_task("larger_number", 64, 8, seed=0)
    order = list(range(len(train_rows)))
    random.Random(0).shuffle(order)
    return [train_rows[i] for i in order]


def base_spec(args, model_dir: str, threads: int) -> dict:
    """The work every worker is given (bench/scaling.py builds each of its configurations with it too)."""
    return {"model": model_dir, "prompts": args.prompts, "generations": args.generations, "threads": threads,
            "max_completion_length": args.max_completion_length, "beta": args.beta, "lr": args.lr, "full": args.full,
            "total_steps": args.warmup + args.steps, "seed": 0, "data_seed": 0, "train_size": 64, "eval_size": 8,
            "attn": args.attn}


def fmt(value, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="transformers model dir (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=int, default=6, help="measured steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=1, help="steps run first and discarded")
    p.add_argument("--prompts", type=int, default=4, help="P: prompts per step")  # the task has 64 training rows
    p.add_argument("--generations", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--max-completion-length", type=int, default=32)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--lr", type=float, default=1e-5, help="constant learning rate, both frameworks")
    p.add_argument("--full", action="store_true", help="full fine-tuning on both (default: LoRA r=16)")
    p.add_argument("--grpokit-fp32", action="store_true", help="also run grpokit with model.dtype float32")
    p.add_argument("--trl-dtypes", default="bf16,fp32", help='TRL runs, comma-separated: bf16, fp32 ("" skips TRL)')
    p.add_argument("--trl-gradient-checkpointing", action="store_true",
                   help="TRL's own default (GRPOConfig: True); off by default here, as grpokit does not checkpoint")
    p.add_argument("--attn", choices=["eager", "sdpa"], default=None,
                   help="attention kernel for both (default: each framework's own: grpokit eager on CPU, TRL sdpa)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in every worker (default: torch's)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per worker")
    p.add_argument("--out", default="runs/step_speed", help="worker logs and run dirs")
    p.add_argument("--json", default=None, help="write every raw number here")
    args = p.parse_args(argv)

    import torch

    from grpokit.models import resolve_model_dir

    threads = args.threads or torch.get_num_threads()
    model_dir = args.model or resolve_model_dir("smollm2-135m-instruct")
    rows = rows_in_draw_order()
    n_total, n_params = non_embedding_params(model_dir)
    rates = {"bfloat16": matmul_rate(torch.bfloat16, threads), "float32": matmul_rate(torch.float32, threads)}
    base = base_spec(args, model_dir, threads)
    out = Path(args.out)
    runs = [("_grpokit_worker.py", {**base, "label": "grpokit-bf16", "dtype": "bfloat16"})]
    if args.grpokit_fp32:
        runs.append(("_grpokit_worker.py", {**base, "label": "grpokit-fp32", "dtype": "float32"}))
    for d in [x.strip() for x in args.trl_dtypes.split(",") if x.strip()]:
        runs.append(("_trl_worker.py", {**base, "label": f"trl-{d}", "bf16": d == "bf16", "rows": rows,
                                        "gradient_checkpointing": args.trl_gradient_checkpointing}))
    results = {spec["label"]: run_worker(script, spec, out, args.timeout) for script, spec in runs}
    for dtype in rates:  # measured before and after the workers; the better is the less disturbed one
        rates[dtype] = max(rates[dtype], matmul_rate(getattr(torch, dtype), threads))
    summary = {label: summarise(r, args, n_params, rates) for label, r in results.items()}
    report(args, results, summary, rates, n_total, n_params, model_dir, threads)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "model_dir": model_dir, "threads": threads,
                                               "parameters": n_total, "non_embedding_parameters": n_params,
                                               "matmul_gflops": rates, "summary": summary, "raw": results}, indent=1))
    return 0 if "error" not in summary.get("grpokit-bf16", {}) else 1


def report(args, results, summary, rates, n_total, n_params, model_dir, threads) -> None:
    P, G = args.prompts, args.generations
    passes = 1 + (args.beta > 0) + UPDATE_PASSES
    print(f"\n## GRPO step speed: grpokit vs TRL {results.get('trl-bf16', results.get('trl-fp32', {})).get('versions', {})}\n")
    print(f"model {model_dir} ({n_total / 1e6:.1f} M parameters, N = {n_params / 1e6:.1f} M without the embedding); "
          f"{'full fine-tuning' if args.full else 'LoRA r=16 alpha=32 all-linear'}; P={P} x G={G}, <= "
          f"{args.max_completion_length} new tokens (EOS stops), T=1, beta={args.beta}, lr={args.lr} constant; "
          f"{threads} torch threads; {args.steps} measured steps after {args.warmup} warm-up step(s).")
    print(f"matmul 2048^2 with {threads} threads (best before/after the runs): bf16 {rates['bfloat16']:.0f} GFLOP/s, "
          f"fp32 {rates['float32']:.0f} GFLOP/s.")
    print(f"Conventions: s/step = median wall time of one step (generation + reward + reference + update + optimiser). "
          f"Rates are medians over measured steps of per-step rates. completion tok/s = completion tokens / step time. "
          f"total tok/s = (prompt + completion tokens, unpadded) x {passes} passes (generation 1"
          f"{' + reference 1' if args.beta > 0 else ''} + update 3) / step time. FLOP rate = ({'2+2' if args.beta > 0 else '2'}+6)*N*tokens / step time, vs the "
          f"matmul rate of the run's dtype (6N for the update counts weight gradients even under LoRA; lm_head excluded).")
    for label, r in results.items():
        if "error" in r:
            print(f"\n**{label} FAILED**: {r['error']}\n```\n{(r.get('traceback') or '').strip()[-3000:]}\n```")
    print("\n| run | dtype | s/step | TRL / grpokit | completions/step | mean completion len | completion tok/s "
          "| total tok/s | GFLOP/s | % of matmul rate | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ref = summary.get("grpokit-bf16", {}).get("median_s_per_step")
    for label, s in summary.items():
        dtype = results[label].get("dtype", "?")
        if "error" in s:
            print(f"| {label} | {dtype} | failed | | | | | | | | |")
            continue
        same = summary.get(f"grpokit-{'fp32' if dtype == 'float32' else 'bf16'}", {}).get("median_s_per_step")
        ratio = ""
        if label.startswith("trl") and ref:
            ratio = f"{s['median_s_per_step'] / ref:.2f}x vs grpokit-bf16"
            if same and same != ref:
                ratio += f", {s['median_s_per_step'] / same:.2f}x vs grpokit-fp32"
        print(f"| {label} | {dtype} | {s['median_s_per_step']:.2f} | {ratio} | {s['completions_per_step']} | "
              f"{s['mean_completion_length']:.1f} | {s['completion_tokens_per_s']:.1f} | "
              f"{fmt(s.get('total_tokens_per_s'), '.0f')} | {fmt(s.get('gflops'), '.1f')} | "
              f"{fmt(100 * s['peak_fraction'] if 'peak_fraction' in s else None, '.1f', ' %')} | "
              f"{fmt(s['peak_rss_mb'], '.0f')} |")
    print("\nPer-step wall times (s, warm-up included):")
    for label, s in summary.items():
        if "error" not in s:
            print(f"- {label}: {s['step_times_s']} (min {s['min_s_per_step']:.2f}; CPU pressure from other "
                  f"load during the run: {fmt(100 * s['cpu_pressure'] if s['cpu_pressure'] is not None else None, '.0f', ' %')})")
    checks(args, results, summary)


def checks(args, results, summary) -> None:
    """Warn about anything that makes the s/step figures incomparable."""
    notes, n = [], args.prompts * args.generations
    for label, s in summary.items():
        if "error" not in s and (s["cpu_pressure"] or 0) > 0.05:
            notes.append(f"{label}: other processes competed for the CPUs ({100 * s['cpu_pressure']:.0f} % stall): noisy.")
        if "error" not in s and s["completions_per_step"] != [n]:
            notes.append(f"{label} trained {s['completions_per_step']} completions per step, not {n}.")
    ok = {k: v for k, v in summary.items() if "error" not in v}
    if len(ok) > 1:
        lengths = {k: v["mean_completion_length"] for k, v in ok.items()}
        if max(lengths.values()) > 1.25 * min(lengths.values()):
            notes.append(f"mean completion lengths differ by more than 25 %: {lengths} -- compare tok/s, not only s/step.")
        prompts = {k: [st["prompts"] for st in results[k]["steps"]] for k in ok}
        first = next(iter(prompts.values()))
        differ = [k for k, v in prompts.items() if v != first]
        notes.append("same prompts at every step in every run: " + ("yes" if not differ else f"NO ({differ})"))
    for label, r in results.items():
        if r.get("framework") == "trl" and "error" not in r:
            notes.append(f"{label}: generation_batch_size {r['generation_batch_size']}, steps_per_generation "
                         f"{r['steps_per_generation']}, {r['reward_calls']} reward calls for {len(r['steps'])} steps, "
                         f"attention {r['attn_implementation']}, weights {r['param_dtype']}, gradient checkpointing "
                         f"{r['gradient_checkpointing']}.")
    print("\nChecks:\n" + "\n".join(f"- {x}" for x in notes))


if __name__ == "__main__":
    sys.exit(main())
