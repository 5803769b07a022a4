"""Peak memory and seconds of one GRPO update: gradient checkpointing on and off, a 4-bit base or not.

    .venv/bin/python bench/memory.py [--configs lora,lora-noshare,lora+gc,4bit,4bit+gc] [--prompts 4] [--generations 8]
                                     [--tokens 32] [--model smollm2-135m-instruct] [--dtype bfloat16]

Each configuration runs in two processes of its own (one's freed memory cannot hide another's peak): load the
policy (LoRA r = 16 on all linear layers; "4bit": model.load_in_4bit, nf4, double quantization; "+gc":
training.gradient_checkpointing, which sets rollout.share_prompt_prefix aside in the update, so "lora-noshare"
is the like-for-like baseline for the recompute alone), sample one
batch of P x G completions (seeded: the same batch with and without checkpointing, which sampling does not
see), then run ``policy_update`` on it twice (reference pass at beta = 0.04, forward + backward, one AdamW
step), a warm-up and the one reported. Printed per configuration: the update's seconds (from the first
process); its peak memory above what was in use just before it (from the second; CUDA:
torch.cuda.max_memory_allocated; CPU: the process's RSS read every 2 ms, glibc told by MALLOC_MMAP_THRESHOLD_
to hand every block of 64 KiB or more back at once, so the RSS follows the live tensors: a coarser figure, and
slower, which is why that process is not the timed one); the bytes the model's weights hold; the completion
tokens trained.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

# name: (model.load_in_4bit, training.gradient_checkpointing, rollout.share_prompt_prefix)
CONFIGS = {"lora": (False, False, True), "lora-noshare": (False, False, False), "lora+gc": (False, True, True),
           "4bit": (True, False, True), "4bit+gc": (True, True, True)}


class PeakRss:
    """The process's largest resident set size while inside the ``with``, read from /proc every 2 ms."""

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one(name: str, args) -> dict:
    """Measure one configuration in this process; returns its figures."""
    import torch

    from grpokit.config import recipe_from_dict
    from grpokit.models.loading import enable_checkpointing
    from grpokit.train.batch import collect_batch
    from grpokit.train.run import next_prompts, setup
    from grpokit.train.update import policy_update

    four_bit, checkpointing, share = CONFIGS[name]
    recipe = recipe_from_dict({
        "model": {"path": args.model, "dtype": args.dtype, "load_in_4bit": four_bit},
        "data": {"source": "builtin:larger_number", "eval_size": 8},
        "rollout": {"num_generations": args.generations, "max_completion_length": args.tokens,
                    "share_prompt_prefix": share},
        "algorithm": {"beta": 0.04}, "rewards": [{"name": "answer_match"}],
        "training": {"prompts_per_step": args.prompts, "gradient_checkpointing": checkpointing,
                     "output_dir": "/tmp/grpokit-bench-memory", "lr_schedule": "constant"},
        "logging": {"progress": False},
    })
    run = setup(recipe)
    if checkpointing and not run.policy.gradient_checkpointing:  # a train/run.py that does not pass the switch yet
        enable_checkpointing(run.policy.model.get_base_model())
        run.policy.gradient_checkpointing = True
    optimizer = torch.optim.AdamW(run.policy.trainable_parameters(), lr=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    batch = collect_batch(run, 1, next_prompts)
    cuda = run.policy.device.type == "cuda"
    seconds = peak = 0.0
    for _ in range(2):  # the first allocates AdamW's moments and warms the allocator; the second is reported
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        with PeakRss() as rss:
            policy_update(run, optimizer, scheduler, batch.rollouts, batch.advantages_N)
            if cuda:
                torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated() - before) if cuda else (rss.peak - rss.start)
    model = run.policy.model
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return {"config": name, "seconds": seconds, "peak_bytes": peak, "weights_bytes": weights,
            "tokens": int(batch.rollouts.completion_mask_NC.sum()), "device": str(run.policy.device),
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32, help="max completion tokens")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: measure this configuration
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args)))
        return 0
    rows = []
    for name in args.configs.split(","):
        if name not in CONFIGS:
            parser.error(f"unknown configuration {name!r}; choose from {', '.join(CONFIGS)}")
        child = [sys.executable, __file__, "--one", name, *sum(([f"--{k}", str(getattr(args, k))] for k in
                                                                ("prompts", "generations", "tokens", "model", "dtype")), [])]
        figures = []
        for env in (os.environ, {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 << 10)}):  # timed, measured
            done = subprocess.run(child, capture_output=True, text=True, env=env)
            if done.returncode:
                print(f"{name}: failed\n{done.stderr[-2000:]}")
                break
            figures.append(json.loads(done.stdout.strip().splitlines()[-1]))
        else:
            rows.append({**figures[0], "peak_bytes": figures[1]["peak_bytes"]})
    if not rows:
        return 1
    print(f"{args.model} ({args.dtype}), LoRA r=16 all-linear, P={args.prompts} x G={args.generations}, "
          f"<= {args.tokens} tokens, beta=0.04; {rows[0]['device']}, {rows[0]['threads']} torch threads")
    print(f"{'config':<10} {'update s':>9} {'peak MB':>9} {'weights MB':>11} {'tokens':>7}")
    for r in rows:
        print(f"{r['config']:<10} {r['seconds']:>9.2f} {r['peak_bytes'] / 2**20:>9.0f} "
              f"{r['weights_bytes'] / 2**20:>11.0f} {r['tokens']:>7}")
    base = rows[0]
    for r in rows[1:]:
        print(f"{r['config']} vs {base['config']}: {r['seconds'] / base['seconds']:.2f}x time, "
              f"{r['peak_bytes'] / max(base['peak_bytes'], 1):.2f}x update peak, "
              f"{r['weights_bytes'] / base['weights_bytes']:.2f}x weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
