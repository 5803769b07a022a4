"""Seconds per GRPO step and peak memory of a vision-language model, through the recipe path.

    .venv/bin/python bench/vlm_step.py --size 2b --steps 6        # on a GPU: a Qwen2-VL-2B-sized model
    .venv/bin/python bench/vlm_step.py --size tiny --steps 3      # anywhere: checks the script itself

The model is a Qwen2-VL of the chosen size with random weights (throughput does not depend on
what the weights know), built from a config with ``grpokit.models.assemble`` around the
embedded SmolLM2's tokenizer (49k tokens; Qwen2-VL's own has 151k, so its output head is
smaller here: say so when quoting a figure). It trains on ``builtin:shape_colour`` with each
image resized to ``--pixels`` (448 x 448 by default: 256 image tokens per prompt), LoRA r = 16
on the language model, bf16, P x G completions of up to ``--new-tokens`` tokens, through
``grpokit.train.train`` exactly as a recipe runs. Printed: the median s/step after the first
step (the first includes warm-up), completion tokens per second, and peak memory (GPU: torch's
max allocated; CPU: the process's peak RSS).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

# text config (Qwen2-VL-2B's language model, and a tiny one), vision config (its ViT, and a tiny one)
SIZES = {
    "2b": ({"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
            "num_key_value_heads": 2, "max_position_embeddings": 32768, "model_type": "qwen2",
            "tie_word_embeddings": True},
           {"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4, "patch_size": 14}),
    "tiny": ({"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 4096, "model_type": "qwen2",
              "tie_word_embeddings": True},
             {"depth": 2, "embed_dim": 64, "num_heads": 2, "mlp_ratio": 2, "patch_size": 14}),
}


def build(size: str, out: Path, pixels: int) -> Path:
    from transformers import AutoTokenizer

    from grpokit.models.assemble import assemble, save_model
    from grpokit.models.loading import resolve_model_dir

    text, vision = SIZES[size]
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir("smollm2-135m-instruct"))
    model, processor = assemble("qwen2_vl", tokenizer, text, vision={**vision, "hidden_size": text["hidden_size"]},
                                image_size=int(pixels ** 0.5))
    return save_model(model, processor, out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="2b")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=8, help="P, prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="G, completions per prompt")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--pixels", type=int, default=448 * 448, help="pixels each image is resized to")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    import torch

    from grpokit.config import recipe_from_dict
    from grpokit.train import train

    work = Path(tempfile.mkdtemp(prefix="vlm-step-"))
    started = time.perf_counter()
    model_dir = build(args.size, work / "model", args.pixels)
    build_s = time.perf_counter() - started
    recipe = {
        "model": {"path": str(model_dir), "dtype": "bfloat16", "lora": {"r": 16, "alpha": 32},
                  "min_pixels": args.pixels, "max_pixels": args.pixels},
        "data": {"source": "builtin:shape_colour", "eval_size": 1, "train_size": 512},
        "rollout": {"num_generations": args.generations, "max_completion_length": args.new_tokens,
                    "max_prompt_length": 4096},
        "algorithm": {"beta": 0.04},
        "rewards": [{"name": "label"}],
        "training": {"max_steps": args.steps, "prompts_per_step": args.prompts, "eval_every": 0, "save_every": 0,
                     "output_dir": str(work / "run"), "learning_rate": 1e-5},
        "logging": {"progress": False},
    }
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run_dir = train(recipe_from_dict(recipe))
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if line.get("kind") == "train"]
    timed = steps[1:] or steps
    figures = {
        "size": args.size, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "P": args.prompts, "G": args.generations, "new_tokens": args.new_tokens, "pixels": args.pixels,
        "build_s": round(build_s, 1),
        "s_per_step": statistics.median(line["step_time_s"] for line in timed),
        "tokens_per_s": statistics.median(line["tokens_per_s"] for line in timed),
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
