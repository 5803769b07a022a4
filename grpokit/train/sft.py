"""``grpokit sft``: supervised fine-tuning on chat samples, the loss on the assistant's tokens only.

The warm start before GRPO: teach the format (and what can be imitated) with SFT, then
reinforce from there with ``model.adapter: <output_dir>/adapter`` in a GRPO recipe.

- Data: TRL's conversational format, ``{"messages": [system?, user, assistant, ...]}``
  (what ``grpokit data sft`` writes), or ``{"prompt", "completion"}`` with strings or
  message lists. Every row is checked up front; errors name file:line.
- Tokens: the tokenizer's chat template. Which tokens are the assistant's is found by
  rendering the conversation up to each assistant turn: ``messages[:i]`` with the
  generation prompt ends where turn i's content starts, ``messages[:i+1]`` ends after
  it; the tokens of the text in between are labelled, up to and including the template's
  end-of-turn token (what the model must learn to stop with) and nothing after it. This
  needs no ``{% generation %}`` markers (SmolLM2's template has none). Each piece is
  tokenized on its own, exactly as the prompt and the generated reply are at GRPO time.
- Loss: mean cross-entropy over every assistant token of the batch (TRL's SFT default,
  ``assistant_only_loss=True``). Only labelled positions go through the LM head, as one
  2-D matmul, in row chunks (``rollout/logprobs.py`` explains why).
- Length: samples longer than ``training.max_length`` lose tokens from the left (old
  context first), keeping the last assistant reply whole; a reply longer than that alone
  keeps a little context and the reply's start.
- Output: LoRA -> ``<output_dir>/adapter/`` (PEFT, safetensors); full fine-tuning ->
  ``<output_dir>/model/`` (a transformers model dir, usable as ``model.path``); both with
  the tokenizer, written atomically.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpokit.data.chat import as_chat, check_messages, with_system
from grpokit.errors import DataError, RecipeError

log = logging.getLogger(__name__)

CE_CHUNK_ROWS = 1024  # label positions whose logits exist at once (x vocab x 4 bytes in fp32)


# ---------------------------------------------------------------------------- data


def conversation_of(row: dict, messages_field: str, where: str) -> list[dict]:
    """One row as a conversation: its ``messages_field`` list, or prompt + completion."""
    if messages_field in row:
        messages = list(check_messages(row[messages_field], where, messages_field))
    elif "prompt" in row and "completion" in row:
        messages = as_chat(row["prompt"], "user", where, "prompt") + as_chat(row["completion"], "assistant", where,
                                                                               "completion")
    else:
        keys = sorted(k for k in row if k != "_line")
        raise DataError(f"{where}: a sample needs {messages_field!r} (a list of chat messages) or 'prompt' and "
                        f"'completion'; this row has {keys} (set data.messages_field if the messages are elsewhere)")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn, so nothing to learn (the loss is on assistant tokens only)")
    return messages


@dataclass
class Conversation:
    where: str  # file:line of the row
    messages: list[dict]
    images: list = field(default_factory=list)  # image references (paths or bytes), decoded per batch
    tools: list[dict] | None = None  # tool schemas shown with the conversation (an agent's SFT warm start)


def load_conversations(data) -> list[Conversation]:
    """Every row of ``data.source`` as a checked conversation, system prompt added where asked. A row's
    ``image``/``images`` (TRL's columns; paths relative to the data file) are checked now and their
    placeholders matched to them (TRL's placement when the messages have none)."""
    from grpokit.data.images import with_checked_images
    from grpokit.data.loaders import DEFAULT_TASK_SIZE, make_builtin, read_jsonl
    from grpokit.envs import build_environment

    if data.source.startswith("builtin:"):  # a generated task whose rows carry their reply (shape_caption)
        rows = [{**row, "_line": f"row {i + 1}"} for i, row in
                enumerate(make_builtin(data.source.split(":", 1)[1], DEFAULT_TASK_SIZE, 0, data.seed)[0])]
    else:
        rows = read_jsonl(data.source)
    if not rows:
        raise DataError(f"{data.source}: the file holds no samples")
    environment = build_environment(data)  # data.environment / data.tools: the tools GRPO's prompts will show
    tools = environment.schemas if environment else None
    out = []
    for row in rows:
        where = f"{data.source}:{row['_line']}"
        messages = conversation_of(row, data.messages_field, where)
        refs, messages = with_checked_images(row, messages, where, Path(data.source).parent)
        out.append(Conversation(where, with_system(messages, data.system_prompt), refs, tools))
    return out


# ---------------------------------------------------------------------------- tokens


@dataclass
class SftExample:
    ids: list[int]
    labels: list[bool]  # True where the token is one the model learns to say
    where: str
    # a sample with images keeps its conversation, so its image inputs are made again when its batch needs them
    conversation: Conversation | None = None

    @property
    def num_labels(self) -> int:
        return sum(self.labels[1:])  # the first token has nothing before it to predict it


def encode_conversation(processor, messages: list[dict], end_ids: list[int], where: str = "<sample>",
                        images: list | None = None, tools: list[dict] | None = None
                        ) -> tuple[list[int], list[bool], dict]:
    """Token ids of the rendered conversation, per token whether it is an assistant token, and (for a
    vision-language processor) the image inputs.

    For each assistant turn i: the text from where the previous turn's rendering ended to
    the end of ``render(messages[:i], add_generation_prompt=True)`` is context; the text
    from there to the end of ``render(messages[:i+1])`` is the reply, labelled up to and
    including its last end-of-turn token (``end_ids``). Messages after the last assistant
    turn are left out: they carry no loss. A piece that holds images goes through the
    processor with its images (decoded PIL images, in order), which expands each image's
    placeholder into its image tokens; images sit in user turns, so replies stay plain text.
    """
    from grpokit.models.multimodal import chat_template_of, join_pieces, process_text, tokenizer_of
    from grpokit.rollout.encoding import render_with_tools

    tokenizer = tokenizer_of(processor)
    template = chat_template_of(processor)
    if template is None:
        raise DataError(f"{where}: the tokenizer has no chat template; SFT renders conversations with it")
    pending = list(images or [])
    image_token = getattr(processor, "image_token", None)
    pieces: list[tuple[dict, int]] = []

    def tokenize(text: str) -> list[int]:
        count = text.count(image_token) if image_token and pending else 0
        if count:
            piece_images, pending[:] = pending[:count], pending[count:]
            ids, inputs = process_text(processor, text, piece_images)
        else:
            ids, inputs = tokenizer(text, add_special_tokens=False)["input_ids"], {}
        pieces.append((inputs, len(ids)))
        return ids

    ids: list[int] = []
    labels: list[bool] = []
    done = ""  # the rendered text already turned into tokens
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_with_tools(tokenizer, messages[:i], where, template, tools, generation_prompt=True)
        after = render_with_tools(tokenizer, messages[:i + 1], where, template, tools)
        if not (before.startswith(done) and after.startswith(before)):
            raise DataError(f"{where}: the chat template does not render this conversation turn by turn (the "
                            f"text up to assistant turn {i} is not a prefix of the text after it), so the "
                            "assistant's tokens cannot be told apart; use a template that renders incrementally")
        context, reply = tokenize(before[len(done):]), tokenize(after[len(before):])
        ends = [k for k, token in enumerate(reply) if token in end_ids]
        learned = ends[-1] + 1 if ends else len(reply)  # the end-of-turn token, not the newline after it
        ids += context + reply
        labels += [False] * len(context) + [True] * learned + [False] * (len(reply) - learned)
        done = after
    if pending:
        raise DataError(f"{where}: {len(pending)} image(s) are not placed before the last assistant turn, so "
                        "they would never be seen; put each image block in a user turn before a reply")
    return ids, labels, join_pieces(pieces) if any(inputs for inputs, _ in pieces) else {}


def fit_length(ids: list[int], labels: list[bool], max_length: int) -> tuple[list[int], list[bool], bool]:
    """Drop trailing unlabelled tokens, then cut to ``max_length``; also say whether tokens were cut.

    Cut from the left when the last reply fits (old context goes first); otherwise keep up
    to a quarter of ``max_length`` of context before the last reply and the reply's start.
    """
    end = max(k for k, label in enumerate(labels) if label) + 1
    ids, labels = ids[:end], labels[:end]
    if len(ids) <= max_length:
        return ids, labels, False
    start = end - 1
    while start > 0 and labels[start - 1]:
        start -= 1  # the first token of the last reply
    if end - start < max_length:
        return ids[-max_length:], labels[-max_length:], True
    first = start - min(start, max_length // 4)
    return ids[first:first + max_length], labels[first:first + max_length], True


def encode_examples(processor, conversations: list[Conversation], max_length: int,
                    end_ids: list[int]) -> tuple[list[SftExample], int]:
    """Every conversation as an ``SftExample``, and how many were cut to ``max_length``. Images are
    decoded here to count their tokens, then let go: a batch decodes its own again."""
    from grpokit.data.images import open_images

    examples, cut = [], 0
    for conversation in conversations:
        ids, labels, _ = encode_conversation(processor, conversation.messages, end_ids, conversation.where,
                                             open_images(conversation.images), tools=conversation.tools)
        if conversation.images and len(ids) > max_length:
            raise DataError(f"{conversation.where}: the sample has {len(ids)} tokens with its images, over "
                            f"training.max_length = {max_length}, and image tokens cannot be cut; raise "
                            "training.max_length or lower model.max_pixels")
        ids, labels, was_cut = fit_length(ids, labels, max_length)
        cut += was_cut
        examples.append(SftExample(ids, labels, conversation.where, conversation if conversation.images else None))
    return examples, cut


def image_inputs(policy, examples: list[SftExample], width: int) -> dict:
    """The batch's image inputs, made again from each sample's conversation (right-padded to ``width``)."""
    from grpokit.data.images import open_images
    from grpokit.models.multimodal import collate

    per_sample = [encode_conversation(policy.processor, e.conversation.messages, policy.eos_ids, e.where,
                                      open_images(e.conversation.images), e.conversation.tools)[2]
                  if e.conversation else {}
                  for e in examples]
    return {key: value.to(policy.device) for key, value in collate(per_sample, width, left=False).items()}


# ---------------------------------------------------------------------------- loss


def token_cross_entropy(policy, examples: list[SftExample]):
    """Summed cross-entropy over the batch's assistant tokens (a tensor), how many the model
    predicts right (argmax), and how many there are."""
    import torch
    import torch.nn.functional as F

    from grpokit.models.multimodal import prompt_positions
    from grpokit.models.padding import pad_right
    from grpokit.models.parts import backbone_and_head

    backbone, head = backbone_and_head(policy.model)
    pad = policy.tokenizer.pad_token_id
    ids_NL, mask_NL = pad_right([e.ids for e in examples], pad)
    labels_NL, _ = pad_right([e.labels for e in examples], False)
    ids_NL, mask_NL, labels_NL = ids_NL.to(policy.device), mask_NL.to(policy.device), labels_NL.to(policy.device)
    inputs = {}
    if any(e.conversation for e in examples):
        inputs = image_inputs(policy, examples, ids_NL.size(1))
        inputs["position_ids"] = prompt_positions(backbone, ids_NL, mask_NL, inputs)
    with policy.autocast():
        hidden_NLH = backbone(input_ids=ids_NL, attention_mask=mask_NL, use_cache=False, **inputs).last_hidden_state
        # position t predicts token t+1: only positions followed by an assistant token reach the head
        predicts_NL1 = labels_NL[:, 1:]  # [N, L-1] bool
        hidden_MH = hidden_NLH[:, :-1][predicts_NL1]  # [M, H]
        targets_M = ids_NL[:, 1:][predicts_NL1]  # [M]
        total = hidden_MH.new_zeros((), dtype=torch.float32)
        correct = 0
        for start in range(0, targets_M.numel(), CE_CHUNK_ROWS):
            logits_mV = head(hidden_MH[start:start + CE_CHUNK_ROWS]).float()  # [m, V]
            target_m = targets_M[start:start + CE_CHUNK_ROWS]
            total = total + F.cross_entropy(logits_mV, target_m, reduction="sum")
            correct += (logits_mV.argmax(-1) == target_m).sum().item()
    return total, correct, targets_M.numel()


def sft_loss(policy, examples: list[SftExample]):
    """Mean token cross-entropy of a micro-batch, and its token accuracy."""
    total, correct, count = token_cross_entropy(policy, examples)
    count = max(count, 1)
    return total / count, {"token_accuracy": correct / count}


def held_out_loss(policy, examples: list[SftExample], batch_size: int) -> dict[str, float]:
    """Token-mean loss and accuracy over the held-out samples (empty without any)."""
    if not examples:
        return {}
    total, correct, count = 0.0, 0, 0
    for start in range(0, len(examples), batch_size):
        loss, right, n = token_cross_entropy(policy, examples[start:start + batch_size])
        total, correct, count = total + loss.item(), correct + right, count + n
    return {"loss": total / max(count, 1), "token_accuracy": correct / max(count, 1)}


# ---------------------------------------------------------------------------- the stage


def save_trained(policy, directory: Path) -> Path:
    """The adapter (LoRA) or the whole model, with the tokenizer, written atomically."""
    from grpokit.models.checkpoint import save_directory

    def write(staging: Path) -> None:
        policy.model.save_pretrained(staging, safe_serialization=True)
        policy.processor.save_pretrained(staging)  # a VLM: its processor, tokenizer included

    return save_directory(directory, write)


def setup_sft(recipe):
    """Data checked, model loaded, samples tokenized: the ``SupervisedJob`` the shared loop runs."""
    from grpokit.models import load_policy
    from grpokit.train.supervised import SupervisedJob, hold_out

    if recipe.model.adapter and recipe.model.lora is not None:
        raise RecipeError("model.adapter with LoRA in an SFT recipe: the new adapter would be relative to the "
                          "merged model, and a GRPO recipe's model.adapter takes one adapter on the base. Train "
                          "fully (model.lora: null; the merged result is saved as <output_dir>/model) or start "
                          "from the base model")
    data, training = recipe.data, recipe.training
    conversations = load_conversations(data)  # before the model: bad data fails in a second
    train_rows, eval_rows = hold_out(conversations, data.eval_size, data.seed, data.source)
    policy = load_policy(recipe.model, beta=0.0)
    train_examples, cut = encode_examples(policy.processor, train_rows, training.max_length, policy.eos_ids)
    eval_examples, eval_cut = encode_examples(policy.processor, eval_rows, training.max_length, policy.eos_ids)
    if cut + eval_cut:
        log.warning("%d of %d samples are longer than training.max_length = %d tokens and were cut",
                    cut + eval_cut, len(conversations), training.max_length)
    target = "adapter" if policy.is_lora else "model"
    return SupervisedJob(
        model=policy.model, params=policy.trainable_parameters(), train_examples=train_examples,
        loss_fn=lambda batch: sft_loss(policy, batch),
        eval_fn=lambda: held_out_loss(policy, eval_examples, training.batch_size),
        save=lambda run_dir: save_trained(policy, run_dir / target),
        weight=lambda example: example.num_labels,
        rate=("tokens_per_s", lambda example: len(example.ids)),
        info={"eval_rows": len(eval_examples), "truncated_samples": cut + eval_cut,
              "assistant_tokens": sum(e.num_labels for e in train_examples)},
    )


def run_sft(recipe, overwrite: bool = False, progress=None) -> Path:
    """Fine-tune ``recipe.model`` on ``recipe.data``; return the run directory.

    It holds ``adapter/`` (or ``model/``), ``metrics.jsonl``, ``recipe.yaml`` and ``run.json``
    (held-out loss before and after: ``eval_before``/``eval_after``).
    """
    from grpokit.train.supervised import run_stage

    return run_stage(recipe, "sft", lambda: setup_sft(recipe), overwrite=overwrite, progress=progress)


# ---------------------------------------------------------------------------- CLI


def add_stage_command(subparsers, name: str, help: str, func) -> None:
    """``grpokit NAME RECIPE [--set KEY=VALUE ...] [--overwrite]``: the command line ``grpokit sft`` and
    ``grpokit reward-model`` share, running ``func(args)``."""
    parser = subparsers.add_parser(name, help=help)
    parser.set_defaults(func=func)
    parser.add_argument("recipe", help="path to a YAML recipe (see recipes/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field, e.g. --set training.max_steps=10 (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run directory")


def print_progress(step: int, total: int, metrics: dict[str, Any]) -> None:
    print(f"step {step}/{total}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  "
          f"{metrics['step_time_s']:.2f} s/step", flush=True)


def run_stage_command(args, schema, run) -> tuple[dict, dict, dict]:
    """Load the stage's recipe from the CLI arguments, run it with a progress line per step, and
    return its run.json with the held-out figures before and after (empty when not evaluated)."""
    from grpokit.config import load_recipe

    recipe = load_recipe(args.recipe, args.set, schema=schema)
    run_dir = run(recipe, overwrite=args.overwrite, progress=print_progress)
    info = json.loads((run_dir / "run.json").read_text())
    return info, info["eval_before"] or {}, info["eval_after"] or {}


def cmd_sft(args) -> int:
    from grpokit.config import SftRecipe

    info, before, after = run_stage_command(args, SftRecipe, run_sft)
    if before and after:
        print(f"held-out loss {before['loss']:.4f} -> {after['loss']:.4f} (token accuracy "
              f"{100 * before['token_accuracy']:.1f}% -> {100 * after['token_accuracy']:.1f}%) after "
              f"{info['steps']} steps" + (" (stopped early)" if info["stopped_early"] else ""))
    saved = info["saved"]
    key = "model.adapter" if saved.endswith("adapter") else "model.path"
    print(f"saved {saved}; start a GRPO recipe from it with {key}: {saved}")
    return 0


def add_sft_command(subparsers) -> None:
    add_stage_command(subparsers, "sft", "supervised fine-tuning on chat samples (assistant tokens only); the "
                                         "adapter is a GRPO recipe's model.adapter", cmd_sft)
