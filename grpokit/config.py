"""The recipe: one typed schema for every stage, loaded from YAML, overridable with --set.

Defaults live here and only here; each field's docstring is its documentation (pydantic
turns attribute docstrings into field descriptions, as litgpt does for its CLI). The
trainer unpacks sections into plain arguments, so no config object enters the math.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from grpokit.errors import RecipeError

DEFAULT_MODEL = "smollm2-135m-instruct"


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, docstrings are the docs."""

    # allow_inf_nan=False: `learning_rate: .inf` passed `gt=0` and made every weight NaN at the first step
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True,
                              allow_inf_nan=False)


class LoraConfig(Section):
    r: int = Field(16, ge=1)
    """Rank of the low-rank update."""
    alpha: float = Field(32.0, gt=0)
    """Scaling numerator: the update is multiplied by alpha / r."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter input (0 keeps sampling and training identical)."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt (e.g. [q_proj, v_proj]) or "all-linear"."""
    last_k_layers: int | None = Field(None, ge=1)
    """Adapt only the last K transformer blocks (null: every block); fewer trainable weights, less memory."""
    modules_to_save: list[str] = []
    """Modules trained in full beside the adapters and saved with them (PEFT's modules_to_save): a VLM's
    roles (projector, vision) or module names, e.g. [projector] to train a new connector (ms-swift's
    freeze_aligner: false); a role listed here leaves the default model.freeze."""


class ModelConfig(Section):
    path: str = DEFAULT_MODEL
    """A local transformers model dir, a .gguf file, a hub id, or "smollm2-135m-instruct" (embedded)."""
    dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"
    """Compute dtype. bf16 matmuls run several times faster than fp32 on CPUs with AVX512-BF16."""
    lora: LoraConfig | None = Field(default_factory=LoraConfig)
    """LoRA adapter settings; null trains every weight (full fine-tuning, with a frozen reference copy)."""
    device: str = "auto"
    """"auto" (CUDA when present, else CPU), "cpu", or a torch device string."""
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = "auto"
    """Attention kernel. "auto": eager on CPU (its backward ran 1.5x faster than SDPA's here
    on short sequences), SDPA elsewhere."""
    trust_remote_code: bool = False
    """Allow a hub model's own Python code to run. Off unless you trust the source."""
    adapter: str | None = None
    """A LoRA adapter (e.g. from `grpokit sft`) merged into the base before training: the run starts
    from that model, and with beta > 0 it is also the KL reference."""
    freeze: list[str] | None = None
    """Parts to keep frozen: the roles vision, projector and language_model of a vision-language model, or
    regular expressions of module names (e.g. ["embed_tokens", "layers\\.[0-3]\\."]): with LoRA no adapter
    goes there, with full fine-tuning their weights get no gradient. Default (null): a VLM's vision tower and
    projector ([vision, projector], as ms-swift and verl do), nothing for a text model; [] freezes nothing."""
    min_pixels: int | None = Field(None, ge=1)
    """A VLM's image processor: the fewest pixels an image is resized to (Qwen's min_pixels); null: its own."""
    max_pixels: int | None = Field(None, ge=1)
    """A VLM's image processor: the most pixels an image keeps (Qwen's max_pixels; Idefics3/SmolVLM: a longest
    edge of sqrt(max_pixels)); fewer pixels, fewer image tokens. null: the processor's own setting."""
    load_in_4bit: bool = False
    """QLoRA (arXiv:2305.14314): the base's linear layers stored in 4 bits by bitsandbytes (pip install
    grpokit[qlora]), the adapters trained in fp32 on top. Needs model.lora; the KL reference stays the base
    with adapters off, so nothing is copied; rollout.merge_lora is off (no merged copy of 4-bit weights)."""
    load_in_8bit: bool = False
    """The base's linear layers stored in 8 bits (bitsandbytes' LLM.int8()); as load_in_4bit, not with it."""
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    """With load_in_4bit: the 4-bit data type, QLoRA's NormalFloat4 (nf4) or plain fp4."""
    bnb_4bit_use_double_quant: bool = True
    """With load_in_4bit: quantize the quantization constants too (QLoRA's double quantization, ~0.4 bit a weight less)."""
    bnb_4bit_compute_dtype: Literal["bfloat16", "float32", "float16"] | None = None
    """With load_in_4bit: the dtype each 4-bit weight is unpacked to for its matmul (default: model.dtype)."""

    @property
    def quantized(self) -> str | None:
        """The recipe key that quantizes the base ("load_in_4bit" or "load_in_8bit"), or None."""
        return "load_in_4bit" if self.load_in_4bit else "load_in_8bit" if self.load_in_8bit else None

    @model_validator(mode="after")
    def _quantization_needs_lora(self) -> "ModelConfig":
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("model.load_in_4bit and model.load_in_8bit are both true; keep one (4 bits: QLoRA, "
                             "the smaller; 8 bits: closer to the full-precision model)")
        if self.quantized and self.lora is None:
            raise ValueError(f"model.{self.quantized}: a quantized base cannot be fine-tuned in full (its weights "
                             f"are frozen integers); give model.lora (e.g. {{r: 16, alpha: 32}}) or set "
                             f"model.{self.quantized}: false")
        return self

    @field_validator("freeze")
    @classmethod
    def _patterns_compile(cls, value: list[str] | None) -> list[str] | None:
        import re

        for pattern in value or ():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression ({exc})") from None
        return value


DEFAULT_SOURCE = "builtin:larger_number"
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def source_name(path: str) -> str:
    """A data source's default name (its rows' ``data_source``): a built-in task's name, a file's stem, a folder's name."""
    if path.startswith("builtin:"):
        return path.split(":", 1)[1]
    path_ = Path(path)
    return path_.stem if path_.suffix.lower() in DATA_FILE_SUFFIXES else path_.name


class DataSourceConfig(Section):
    path: str
    """One dataset, written as data.source is: "builtin:<task>", "gsm8k", a data file or a save_to_disk folder."""
    weight: float = Field(1.0, gt=0)
    """Relative share of the training rows: each is drawn from this source with probability weight / (sum of weights)."""
    name: str | None = Field(None, min_length=1)
    """The rows' `data_source` value (default: the task's name, the file's stem or the folder's name); unique."""
    eval_size: int | None = Field(None, ge=0)
    """Held-out rows taken from this source (default: data.eval_size)."""

    @property
    def label(self) -> str:
        return self.name or source_name(self.path)


class DataConfig(Section):
    source: str | None = None
    """One dataset: "builtin:<task>", "gsm8k" (from ../shared/data/gsm8k or data.path), a .jsonl file (JSON lines),
    a .json file (a JSON array of objects, or JSON lines), a .csv or .parquet file, or a folder written by
    datasets' save_to_disk (a DatasetDict trains on "train" and holds out from "test", else "validation").
    Relative paths: the working directory, else the recipe's folder. Default: builtin:larger_number, unless
    data.sources is given. Every row gets the source's name as `data_source` (unless it has that column)."""
    sources: list[DataSourceConfig] | None = None
    """Several datasets mixed by weight, instead of data.source: [{path, weight, name, eval_size}]. Each is read
    and split as data.source would be; training rows are drawn as datasets.interleave_datasets(probabilities=
    weights / sum, seed=data.seed, stopping_strategy="all_exhausted") draws them; the held-out rows are every
    source's, in source order (docs/data.md)."""
    path: str | None = None
    """Directory of the GSM8K files (train.jsonl, test.jsonl) when source is "gsm8k"."""
    prompt_field: str = "prompt"
    """Column holding the prompt: a string or a list of chat messages."""
    answer_field: str = "answer"
    """Column holding the reference answer: rewards get it as `answer` and under its own name."""
    eval_size: int = Field(128, ge=0)
    """Held-out rows for the before/after evaluation (taken from the test split, or split off); per source."""
    train_size: int | None = Field(None, ge=1)
    """Use at most this many training rows (built-in tasks: how many to generate; with sources: of the mix)."""
    chat_template: bool = True
    """Wrap string prompts as a user message and apply the tokenizer's chat template."""
    system_prompt: str | None = None
    """Optional system message placed before each prompt when the chat template is applied."""
    seed: int = 1234
    """Seed for generating built-in tasks, splitting off the held-out rows and mixing data.sources."""

    @model_validator(mode="before")
    @classmethod
    def _default_source(cls, values: Any) -> Any:
        # the default task only when neither key is written: `source: null` must come with data.sources
        if isinstance(values, dict) and "source" not in values and values.get("sources") is None:
            values = {**values, "source": DEFAULT_SOURCE}
        return values

    @model_validator(mode="after")
    def _one_kind_of_source(self) -> "DataConfig":
        if self.source is not None and self.sources is not None:
            raise ValueError("data.source and data.sources are both set; give one dataset (source) or a weighted mix "
                             "(sources), and null the other (e.g. --set data.source=null)")
        if self.sources == []:
            raise ValueError("data.sources is empty; list at least one source, e.g. [{path: a.jsonl, weight: 1.0}]")
        if self.source is None and self.sources is None:
            raise ValueError("no data: set data.source (e.g. builtin:larger_number) or data.sources "
                             "(e.g. [{path: a.jsonl, weight: 0.7}, {path: b.jsonl, weight: 0.3}])")
        names = [spec.label for spec in self.sources or ()]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"data.sources: the name(s) {duplicated} appear twice (a name defaults to the file's stem "
                             "or the task's name); give each source its own `name`")
        return self

    @property
    def label(self) -> str:
        """What the data is, for messages and file names: data.source, or the sources' names joined by '+'."""
        return self.source if self.source is not None else "+".join(spec.label for spec in self.sources)

    def anchor_paths(self, folder: Path) -> None:
        """Data paths written relative to the recipe's folder: a relative path that names nothing in the working
        directory but something in ``folder`` becomes absolute, so the recipe runs from any directory."""
        if self.source is not None:
            self.source = anchored_data_path(self.source, folder)
        for spec in self.sources or ():
            spec.path = anchored_data_path(spec.path, folder)


class RolloutConfig(Section):
    backend: Literal["torch"] = "torch"
    """Which Sampler draws the completions (grpokit/rollout): torch, decoding with the policy's own modules."""
    num_generations: int = Field(8, ge=2)
    """G: completions sampled per prompt; advantages compare completions within a group."""
    max_prompt_length: int = Field(256, ge=1)
    """Longer prompts are cut from the left, keeping the question at the end (see prompt_overflow)."""
    prompt_overflow: Literal["truncate", "error"] = "truncate"
    """Prompts longer than max_prompt_length: cut from the left (counted in the log) or refuse the data."""
    max_completion_length: int = Field(32, ge=1)
    """Generation stops at EOS or after this many tokens."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = Field(0, ge=0)
    """Keep only the k most likely tokens (0 = off)."""
    share_prompt_prefix: bool = True
    """In the reference and update passes, run each prompt once per group and reuse its KV
    cache for the group's G completions (same result, fewer tokens through the model)."""
    seed_per_prompt: bool = False
    """Draw each prompt's samples from their own random stream, seeded from training.seed, the
    step and the prompt's place in it, so the samples do not depend on which prompts share a
    batch or a process. Multi-process runs turn it on; turn it on here for a one-process run
    that samples exactly as they do."""
    merge_lora: bool = True
    """With LoRA: sample from a copy of the model with the adapters merged into its weights
    (refreshed after every optimiser step): one matmul per layer instead of three, at the
    cost of one more copy of the weights in the compute dtype. Ignored (with a warning) for a quantized
    base (model.load_in_4bit / load_in_8bit): sampling then runs the quantized base with the adapters on."""
    environment: str | None = None
    """Multi-turn rollouts in an environment: a registered name (calculator) or module:Class (grpokit's
    reset(row)/step(action), or TRL's environment_factory class with reset(**row) and tool methods)."""
    environment_args: dict[str, Any] = {}
    """Keyword arguments for the environment class's constructor."""
    tools: list[str] = []
    """Tool functions (module:function, type hints and a docstring, as TRL's tools=) the policy may call;
    alone they make a tool environment, with rollout.environment they add to its tools."""
    max_turns: int = Field(4, ge=1)
    """Policy turns per trajectory at most (an environment ends it sooner with done)."""
    max_tool_output_tokens: int = Field(64, ge=1)
    """Tokens of one observation or tool result at most; longer ones are cut."""
    environment_timeout_s: float = Field(30.0, gt=0)
    """Seconds an environment's reset or step may take; past it the trajectory ends (timeout)."""
    max_consecutive_env_failures: int = Field(8, ge=1)
    """Environment failures (raised, hung) in a row that stop the run."""


class ReplayConfig(Section):
    capacity: int = Field(0, ge=0)
    """Groups kept in the replay buffer (the highest mean |advantage|); 0 turns replay off."""
    ratio: float = Field(0.25, ge=0, lt=1)
    """Share of each step's P groups drawn from the buffer (at most P - 1)."""


# The choices of the algorithm's registries (grpokit/algo), spelled out here so loading a recipe
# imports no torch; tests/test_layering.py checks they equal the registered names.
LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
AdvantageEstimator = Literal["group_std", "group_mean", "batch_std", "rloo"]
KlEstimator = Literal["k1", "k2", "k3"]


class AlgorithmConfig(Section):
    beta: float = Field(0.04, ge=0)
    """Weight of the KL penalty to the reference; 0 skips the reference pass entirely."""
    kl_estimator: KlEstimator = "k3"
    """KL(policy || reference) estimator: k1 (log ratio), k2 (squared log ratio / 2) or k3 (exp(r) - r - 1)."""
    epsilon: float = Field(0.2, gt=0, lt=1)
    """PPO clip range: the ratio is clipped to [1 - epsilon, 1 + epsilon]."""
    epsilon_low: float | None = Field(None, gt=0, lt=1)
    """Lower clip range (default: epsilon)."""
    epsilon_high: float | None = Field(None, gt=0)
    """Upper clip range (default: epsilon); DAPO's clip-higher uses 0.28 with epsilon_low 0.2."""
    loss_type: LossType = "grpo"
    """How token losses are averaged: grpo, bnpo, dr_grpo or dapo (see grpokit/algo/loss.py)."""
    advantage: AdvantageEstimator = "group_std"
    """Advantage estimator: group_std (GRPO), group_mean (Dr. GRPO), batch_std, or rloo."""
    importance_level: Literal["token", "sequence"] = "token"
    """Importance weights per token (GRPO) or per sequence, length-normalised (GSPO)."""
    num_iterations: int = Field(1, ge=1)
    """mu: optimiser passes over each generation batch; > 1 stores old log-probs at generation time."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal and sample more prompts until the batch is full."""
    max_sampling_rounds: int = Field(3, ge=0)
    """With dynamic sampling: extra generation rounds allowed per step before training on what was kept."""
    mask_truncated_completions: bool = False
    """Leave completions that hit max_completion_length without EOS out of the loss."""
    overlong_buffer: int | None = Field(None, ge=1)
    """DAPO's soft overlong penalty: the last N tokens before max_completion_length cost up to overlong_penalty."""
    overlong_penalty: float = Field(1.0, ge=0)
    """Largest overlong penalty, reached at max_completion_length."""
    top_entropy_quantile: float = Field(1.0, gt=0, le=1)
    """Train only on the tokens in this top quantile of entropy (1.0: all tokens; 0.2 as in arXiv:2506.01939)."""
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    """Replay buffer of high-|advantage| groups mixed into later batches (off by default)."""

    @property
    def clip_range(self) -> tuple[float, float]:
        """(epsilon_low, epsilon_high) with the symmetric default filled in."""
        return (self.epsilon_low or self.epsilon, self.epsilon_high or self.epsilon)


class RewardSpec(Section):
    name: str
    """A registered reward name (see `grpokit.rewards`) or "package.module:function"."""
    weight: float = 1.0
    """Weight of this component in the total reward."""
    args: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments bound to the function (e.g. a regex pattern)."""
    kind: Literal["completion", "group", "verl"] | None = None
    """completion: TRL's fn(prompts, completions, **columns); group: fn(prompt, group_completions, **row);
    verl: compute_score(data_source, solution_str, ground_truth, extra_info). Default: as the function declares."""
    factory: bool = False
    """The name is a factory (open-r1's get_cosine_scaled_reward): it is called once with `args` and returns
    the reward function, which then gets no bound args."""
    run_in: Literal["auto", "thread", "main", "process"] = "auto"
    """Where calls run. thread: a worker thread, concurrently with other rewards (thread-safe code only);
    main: the main thread, as TRL calls rewards (math-verify's timeout works there); process: a worker process
    of its own, killed at the timeout (for code that may block inside C or crash). auto: as the function
    declares (built-ins) or @grpokit.rewards.thread_safe says, else main."""
    timeout_s: float = Field(120.0, gt=0)
    """A call (one batch of completions) taking longer counts as a failure of this component for that batch,
    under reward_shaping.max_consecutive_failures; no reward can stall a step longer."""


class CurriculumStage(Section):
    step: int = Field(ge=0)
    """From this training step on, these weights apply."""
    weights: dict[str, float]
    """Weight per reward name; rewards not named get weight 0 in this stage."""


class RewardShapingConfig(Section):
    normalize: bool = False
    """Z-score each component with its running mean and std (Welford) before weighting."""
    window: int | None = Field(None, ge=2)
    """Compute the running statistics over only the last N values (default: all values seen)."""
    clip: tuple[float, float] = (-10.0, 10.0)
    """The total reward is clipped to this range."""
    curriculum: list[CurriculumStage] = Field(default_factory=list)
    """Weight changes at given steps, e.g. [{step: 1000, weights: {accuracy: 0.7, format: 0.3}}]."""
    max_consecutive_failures: int = Field(3, ge=1)
    """A reward failing on this many consecutive sampling rounds (one per step, more with dynamic sampling) stops the run."""


class TrainingConfig(Section):
    learning_rate: float = Field(1e-5, gt=0)
    """Peak AdamW learning rate."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup from 0 to the peak learning rate."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup, down to 10% of the peak (cosine, linear) or none."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradients are clipped to this global norm."""
    max_steps: int = Field(100, ge=0)
    """Optimiser steps (one generation batch each)."""
    prompts_per_step: int = Field(4, ge=1)
    """P: prompts per step; each yields G completions."""
    grad_accum: int = Field(1, ge=1)
    """Split the P*G completions into this many micro-batches (lower memory, same result)."""
    gradient_checkpointing: bool = False
    """Keep only each transformer block's input in the update's forward and recompute the block in the
    backward (HF gradient checkpointing, non-reentrant): activation memory falls from every block's to
    their inputs plus one block's, for about one more forward of time (docs/performance.md). Same loss and
    gradients. Checkpointing turns the KV cache off, so the reference and update passes score each
    completion with its own prompt (rollout.share_prompt_prefix is set aside); sampling is unaffected.
    Text models only for now."""
    seed: int = 0
    """Seed for sampling prompts and completions."""
    eval_every: int = Field(0, ge=0)
    """Evaluate on the held-out rows every N steps (0: only before and after training)."""
    save_every: int = Field(20, ge=0)
    """Write a checkpoint every N steps (0: only at the end and on SIGINT/SIGTERM); --resume starts there."""
    keep_checkpoints: int = Field(2, ge=1)
    """Keep the newest K checkpoints; older ones are deleted once a newer one is complete."""
    max_consecutive_skips: int = Field(3, ge=1)
    """Stop after this many consecutive steps whose loss or gradient was not finite (each is skipped)."""
    output_dir: str = "runs/demo"
    """The run directory (relative paths are relative to the current directory)."""
    num_threads: int | None = Field(None, ge=1)
    """CPU threads for torch (default: torch's own choice)."""
    distributed_timeout_s: float = Field(600.0, gt=0)
    """Multi-process runs: how long a rank waits for the others at a collective (gathering rewards,
    summing gradients). A rank that died or stalled longer stops the run with a message naming
    it and its stage; the last checkpoint stays intact."""
    fsdp: bool = False
    """Full fine-tuning over several processes: shard every weight, its gradient and AdamW's moments across
    them with FSDP2 (each transformer block one unit), so each GPU holds 1/N of them; sampling gathers the
    whole model for its duration. Checkpoints stay full models. Needs model.lora: null; text models only;
    one process ignores it. accelerate launch --use_fsdp turns it on too (docs/scaling.md)."""


class EvalConfig(Section):
    accuracy_reward: str | None = None
    """Reward component whose value counts as correctness (>= 1 is correct); default: the first reward."""
    batch_size: int = Field(64, ge=1)
    """Prompts generated at once during evaluation."""
    num_samples: int = Field(16, ge=0)
    """Completions kept verbatim in each eval file for the report."""
    num_generations: int = Field(0, ge=0)
    """Sampled completions per held-out prompt for pass@k and diversity (0: greedy accuracy only)."""
    pass_k: list[int] = Field(default_factory=lambda: [1, 5, 10])
    """The k of pass@k; values above num_generations are left out."""
    temperature: float | None = Field(None, gt=0)
    """Sampling temperature for pass@k (default: rollout.temperature)."""

    @field_validator("pass_k")
    @classmethod
    def _positive_k(cls, value: list[int]) -> list[int]:
        if not value or any(k < 1 for k in value):
            raise ValueError("pass_k needs at least one k, each >= 1 (e.g. [1, 5, 10])")
        return sorted(set(value))


class LoggingConfig(Section):
    samples_every: int = Field(10, ge=0)
    """Append some completions to samples.jsonl every N steps (0: never)."""
    num_samples: int = Field(4, ge=1)
    """Completions written to samples.jsonl each time."""
    progress: bool = True
    """Show a live progress bar in the terminal."""
    sinks: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=list)
    """Trackers fed beside metrics.jsonl (each an optional extra: pip install grpokit[tensorboard])."""
    project: str = "grpokit"
    """W&B project / MLflow experiment name."""
    run_name: str | None = None
    """Run name in the trackers (default: the run directory's name)."""
    mlflow_tracking_uri: str | None = None
    """MLflow tracking URI (default: a local file store in <run dir>/mlruns)."""


class Recipe(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    """The policy to train."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Training prompts and the held-out rows."""
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    """How completions are sampled."""
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    """The GRPO objective."""
    rewards: list[RewardSpec] = Field(min_length=1)
    """Reward components; the total reward is their weighted sum."""
    reward_shaping: RewardShapingConfig = Field(default_factory=RewardShapingConfig)
    """How components are combined: normalisation, clipping, a curriculum of weights."""
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    """The optimisation loop."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """The held-out evaluation before, during and after training."""
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    """What the run writes besides metrics."""
    python_path: list[str] = Field(default_factory=list)
    """Folders searched (after the installed packages) for `module:function` reward names. Loading a recipe
    file puts its own folder first, so a rewards.py beside the recipe is found; the working directory is
    searched too. Relative entries are relative to the recipe's folder."""

    @model_validator(mode="after")
    def _accuracy_reward_exists(self) -> "Recipe":
        names = [spec.name for spec in self.rewards]
        if self.eval.accuracy_reward is not None and self.eval.accuracy_reward not in names:
            raise ValueError(f"eval.accuracy_reward {self.eval.accuracy_reward!r} is not one of the rewards {names}")
        return self

    @model_validator(mode="after")
    def _reward_names_unique(self) -> "Recipe":
        names = [spec.name for spec in self.rewards]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"rewards {duplicated} appear twice; each component needs its own name")
        return self

    @model_validator(mode="after")
    def _fsdp_is_full_fine_tuning(self) -> "Recipe":
        if self.training.fsdp and self.model.lora is not None:
            raise ValueError("training.fsdp shards full fine-tuning: set model.lora: null, or training.fsdp: false "
                             "(with LoRA each process keeps the frozen base and only the small adapters are trained)")
        return self

    @property
    def accuracy_reward(self) -> str:
        return self.eval.accuracy_reward or self.rewards[0].name


class SupervisedDataConfig(Section):
    source: str
    """A .jsonl file: chat samples ({"messages": [...]}, or prompt + completion) for SFT;
    preference pairs ({"prompt", "chosen", "rejected"}, TRL's format) for a reward model."""
    messages_field: str = "messages"
    """SFT: the column holding the chat messages."""
    eval_size: int = Field(32, ge=0)
    """Rows held out (seeded) to report loss / preference accuracy on."""
    seed: int = 1234
    """Seed for holding out the eval rows."""
    system_prompt: str | None = None
    """Optional system message put before each sample that has none."""
    environment: str | None = None
    """SFT for an agent: show this environment's tools in every sample, as the GRPO recipe's prompts will
    (rollout.environment: the same name or module:Class)."""
    tools: list[str] = []
    """SFT for an agent: tool functions (module:function) shown in every sample, as rollout.tools."""


class SupervisedTrainingConfig(Section):
    learning_rate: float = Field(2e-4, gt=0)
    """Peak AdamW learning rate."""
    epochs: int = Field(3, ge=1)
    """Passes over the training rows (max_steps, when set, stops earlier)."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimiser steps."""
    batch_size: int = Field(8, ge=1)
    """Samples (or pairs) per optimiser step."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per step (lower memory, same result)."""
    max_length: int = Field(512, ge=8)
    """Tokens per sample; longer samples are cut (from the left for prompts, keeping the answer)."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup steps."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradients are clipped to this global norm."""
    max_consecutive_skips: int = Field(3, ge=1)
    """Stop after this many consecutive steps whose loss or gradient was not finite (each is skipped)."""
    loss_threshold: float | None = Field(None, gt=0)
    """Early stop once the mean training loss of the last eval_every steps falls below this."""
    eval_every: int = Field(20, ge=0)
    """Held-out loss / accuracy every N steps (0: only at the end)."""
    seed: int = 0
    """Seed for shuffling and initialisation."""
    output_dir: str = "runs/sft"
    """Where the adapter (or model), metrics.jsonl and run.json go."""
    num_threads: int | None = Field(None, ge=1)
    """CPU threads for torch (default: torch's own choice)."""


class RewardHeadConfig(Section):
    kind: Literal["linear", "mlp"] = "linear"
    """A linear head, or a small MLP (hidden -> ReLU -> 1), on the last token's hidden state."""
    hidden: int = Field(256, ge=1)
    """Width of the MLP head."""
    margin: float = Field(0.0, ge=0)
    """Bradley-Terry margin: loss = -log sigmoid(r_chosen - r_rejected - margin)."""


class SftRecipe(Section):
    """`grpokit sft RECIPE`: supervised warm start on chat samples, assistant tokens only."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    """The model to fine-tune (LoRA by default)."""
    data: SupervisedDataConfig
    """The chat samples."""
    training: SupervisedTrainingConfig = Field(default_factory=SupervisedTrainingConfig)
    """The optimisation loop."""


class RewardModelRecipe(Section):
    """`grpokit reward-model RECIPE`: a scalar head on a base LM, Bradley-Terry on preference pairs."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    """The base LM (LoRA by default)."""
    data: SupervisedDataConfig
    """The preference pairs."""
    head: RewardHeadConfig = Field(default_factory=RewardHeadConfig)
    """The scalar head and the loss margin."""
    training: SupervisedTrainingConfig = Field(
        default_factory=lambda: SupervisedTrainingConfig(learning_rate=1e-4, epochs=2, output_dir="runs/reward-model"))
    """The optimisation loop."""


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested recipe to dotted keys, for trackers whose params are flat: ``{"model": {"lora":
    {"r": 16}}}`` -> ``{"model.lora.r": 16}``; a list of sections (``rewards``) is indexed
    (``rewards.0.name``); a list of plain values stays one value."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{path}."))
        elif isinstance(value, list) and any(isinstance(v, dict) for v in value):
            flat.update(flatten({str(i): v for i, v in enumerate(value)}, f"{path}."))
        else:
            flat[path] = value
    return flat


def _lookup(tree: Any, key: str) -> Any:
    for part in key.split("."):
        if isinstance(tree, dict):
            tree = tree.get(part)
        elif isinstance(tree, list) and part.isdigit() and int(part) < len(tree):
            tree = tree[int(part)]
        else:
            return None
    return tree


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every key whose value differs, in ``new``'s key
    order, then keys only ``old`` has: the one comparison behind "is this the same run / job?".
    A key one side holds as a single value and the other as a section is reported whole."""
    a, b = flatten(old), flatten(new)
    found: dict[str, tuple[str, Any, Any]] = {}
    for key in [*b, *(k for k in a if k not in b)]:
        if a.get(key) == b.get(key):
            continue
        parts = key.split(".")
        key = next((p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in a or p in b), key)
        found.setdefault(key, (key, _lookup(old, key), _lookup(new, key)))
    return list(found.values())


# --------------------------------------------------------------------------- loading


class _SafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no Python objects, ever) whose bad scalars fail as YAML errors with a line.

    Plain SafeLoader raises a bare ValueError for ``2001-02-30`` (read as a date) or
    ``!!int abc`` and an IndexError for ``!!int ""``, with no position; here they become
    ConstructorErrors at the node.
    """

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except (yaml.YAMLError, RecursionError):
            raise
        except Exception as exc:  # noqa: BLE001 - a constructor fails in many ways (IndexError for "!!int ")
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {node.value!r} as {node.tag.rsplit(':', 1)[-1]} ({exc}); quote it to keep it a string",
                node.start_mark) from None


def safe_load(text: str) -> Any:
    """Parse YAML safely; every failure is a ``yaml.YAMLError`` (too deep nesting included)."""
    try:
        return yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None
    except ValueError as exc:  # PyYAML's scanner: chr() of an escape past U+10FFFF ("\U1e400000")
        raise yaml.YAMLError(str(exc)) from None


def _key_lines(text: str) -> dict[tuple, int]:
    """Map each key path in a YAML text to its 1-based line, so errors can say file:line."""
    lines: dict[tuple, int] = {}

    def walk(node: yaml.Node, path: tuple, inside: frozenset) -> None:
        if id(node) in inside:  # an alias inside its own anchor (a: &x [*x]) would recurse forever
            return
        inside = inside | {id(node)}
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                child = path + (key_node.value,)
                lines[child] = key_node.start_mark.line + 1
                walk(value_node, child, inside)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                lines[path + (index,)] = item.start_mark.line + 1
                walk(item, path + (index,), inside)

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is not None:
            walk(root, (), frozenset())
    except (yaml.YAMLError, RecursionError):
        pass  # the lines found so far still help
    return lines


def _section_fields(loc: tuple, schema: type[BaseModel] = None) -> list[str]:
    """Valid field names of the schema section that holds the key at ``loc``."""
    model: Any = schema or Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields) if model is not None else []


def _format_errors(err: ValidationError, origin: str, lines: dict[tuple, int], overrides: dict[tuple, str],
                   schema: type[BaseModel] = None) -> str:
    messages = []
    for item in err.errors():
        loc = tuple(part for part in item["loc"] if not (isinstance(part, str) and part.startswith("function-after")))
        key = ".".join(str(p) for p in loc) or "(recipe)"
        # the --set that wrote this key, or a key above or below it (training.seed.x=1 breaks training.seed)
        setter = overrides.get(loc) or next((raw for path, raw in overrides.items()
                                             if loc and (path[:len(loc)] == loc or loc[:len(path)] == path)), None)
        if setter is not None:
            where = f"--set {setter}"
        elif loc in lines:
            where = f"{origin}:{lines[loc]}"
        else:
            where = origin
        if item["type"] == "extra_forbidden":
            valid = _section_fields(loc, schema)
            near = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"did you mean {'.'.join([*map(str, loc[:-1]), near[0]])!r}?" if near else f"valid keys here: {', '.join(valid)}"
            messages.append(f"{where}: unknown key {key!r}; {hint}")
        elif item["type"] == "missing":
            messages.append(f"{where}: missing required key {key!r}")
        else:
            got = item.get("input")
            shown = repr(got) if not isinstance(got, dict) else "a mapping"
            messages.append(f"{where}: {key}: {item['msg']} (got {shown})")
    if len(messages) == 1:  # the common case stays one line
        return f"invalid recipe: {messages[0]}"
    return f"invalid recipe ({len(messages)} errors):\n  " + "\n  ".join(messages)


def parse_overrides(assignments: list[str]) -> list[tuple[tuple, Any, str]]:
    """Parse ``a.b=c`` strings; values are read as YAML so 10, 1e-4, true and [x, y] keep their types."""
    parsed = []
    for text in assignments:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set {text!r}: expected KEY=VALUE, e.g. --set training.max_steps=10")
        path = tuple(int(p) if p.isascii() and p.isdigit() else p for p in key.strip().split("."))
        try:
            parsed.append((path, safe_load(value), text))
        except yaml.YAMLError as exc:
            raise RecipeError(f"--set {text!r}: the value is not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    return parsed


def _apply_override(data: dict, path: tuple, value: Any, text: str) -> None:
    node: Any = data
    for depth, part in enumerate(path[:-1]):
        if isinstance(node, list):
            if not isinstance(part, int) or part >= len(node):
                raise RecipeError(f"--set {text}: {'.'.join(map(str, path[:depth + 1]))} is not an index of that list")
            node = node[part]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):  # a list element may be a scalar too (rewards: [x])
            raise RecipeError(f"--set {text}: {'.'.join(map(str, path[:depth + 1]))} is not a section")
    if isinstance(node, list):
        if not isinstance(path[-1], int) or path[-1] >= len(node):
            raise RecipeError(f"--set {text}: no list element {path[-1]}")
    node[path[-1]] = value


def recipe_from_dict(data: Any, origin: str = "<recipe>", text: str = "", overrides: list[str] = (),
                     schema: type[BaseModel] = None) -> Any:
    """Validate a recipe mapping (after applying ``--set`` overrides) into ``schema`` (a GRPO Recipe
    by default; SftRecipe and RewardModelRecipe for the other stages)."""
    schema = schema or Recipe
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: a recipe must be a YAML mapping of sections, got {type(data).__name__}")
    parsed = parse_overrides(list(overrides))
    for path, value, raw in parsed:
        _apply_override(data, path, value, raw)
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_errors(err, origin, _key_lines(text), {p: raw for p, _, raw in parsed}, schema)) from None
    except RecursionError:
        raise RecipeError(f"{origin}: the recipe nests too deeply (or an alias *x sits inside its own anchor &x)") from None


def load_recipe(path: str | Path, overrides: list[str] = (), schema: type[BaseModel] = None) -> Any:
    """Read, override and validate a YAML recipe; every failure is a RecipeError for people."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found (check the path; examples are in recipes/)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise RecipeError(f"{path}: cannot read the recipe ({exc})") from None
    try:
        data = safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise RecipeError(f"{where}: malformed YAML: {getattr(exc, 'problem', exc)}") from None
    recipe = recipe_from_dict(data, origin=str(path), text=text, overrides=overrides, schema=schema)
    folder = path.resolve().parent
    if isinstance(getattr(recipe, "python_path", None), list):
        recipe.python_path = anchored_python_path(recipe.python_path, folder)
    data = getattr(recipe, "data", None)
    # a data file beside the recipe is found from any working directory, as its rewards module is
    if isinstance(data, DataConfig):
        data.anchor_paths(folder)
    elif isinstance(getattr(data, "source", None), str):
        data.source = anchored_data_path(data.source, folder)
    return recipe


def anchored_data_path(path: str, folder: Path) -> str:
    """A relative data path that names nothing in the working directory but something in the recipe's
    ``folder``, made absolute; built-in sources and paths found from here stay as written."""
    if path.startswith("builtin:") or path == "gsm8k" or Path(path).is_absolute() or Path(path).exists():
        return path
    return str(folder / path) if (folder / path).exists() else path


def anchored_python_path(entries: list[str], folder: Path) -> list[str]:
    """The recipe's folder first, then its ``python_path`` entries made absolute against that folder:
    the resolved recipe a run writes still finds the user's reward module from any directory."""
    absolute = [str(folder), *(str((folder / entry).resolve()) for entry in entries)]
    return list(dict.fromkeys(absolute))


def dump_recipe(recipe: BaseModel) -> str:
    """The resolved recipe as YAML: every default filled in, so a run can be repeated from it."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
