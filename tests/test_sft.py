"""SFT (``grpokit sft``) and the supervised loop it shares with reward-model training, on the tiny model."""

import json
import math
import random
from pathlib import Path

import pytest
import torch

from grpokit.config import ModelConfig, SftRecipe, SupervisedTrainingConfig, load_recipe, recipe_from_dict
from grpokit.data.tasks import addition
from grpokit.errors import DataError, RecipeError, RunDirError, TrainingError
from grpokit.log import JsonlSink
from grpokit.models import load_policy
from grpokit.train.sft import (encode_conversation, fit_length, load_conversations, run_sft, setup_sft,
                         sft_loss)
from grpokit.train.supervised import SupervisedJob, fit, train_step

from conftest import run_cli, tiny_recipe

ROOT = Path(__file__).resolve().parents[1]
# SmolLM2-135M-Instruct's template: a default system message, no {% generation %} markers
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def toy_samples(n, seed=0):
    """The built-in addition prompts (what the GRPO test evaluates on), answered in a fixed pattern."""
    rng = random.Random(seed)
    rows = [addition(rng) for _ in range(n)]
    return [{"messages": [{"role": "user", "content": r["prompt"]},
                          {"role": "assistant", "content": f"The answer is {r['answer']}."}]} for r in rows]


def sft_recipe(model_dir, data, out, **training):
    return recipe_from_dict({
        "model": {"path": str(model_dir), "dtype": "float32", "device": "cpu", "lora": {"r": 8, "alpha": 16}},
        "data": {"source": str(data), "eval_size": 16},
        "training": {"learning_rate": 1e-2, "epochs": 2, "batch_size": 8, "eval_every": 10, "lr_schedule": "constant",
                     "num_threads": 1, "output_dir": str(out), **training},
    }, schema=SftRecipe)


# ---------------------------------------------------------------- which tokens are learned


@pytest.mark.parametrize("template", [None, SMOLLM2_TEMPLATE], ids=["tiny", "smollm2"])
def test_assistant_tokens_decode_to_exactly_the_replies(char_tokenizer, template):
    if template:
        char_tokenizer.chat_template = template
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello 1"}, {"role": "user", "content": "And?"},
                {"role": "assistant", "content": "Bye 2"}, {"role": "user", "content": "(ignored)"}]
    end = char_tokenizer.eos_token_id
    ids, labels, _ = encode_conversation(char_tokenizer, messages, [end])
    learned = [t for t, label in zip(ids, labels) if label]
    assert char_tokenizer.decode(learned) == "Hello 1<|im_end|>Bye 2<|im_end|>"
    # the context is the template's rendering of everything else, up to the second reply
    context = char_tokenizer.decode([t for t, label in zip(ids, labels) if not label])
    assert context.startswith("<|im_start|>system\nBe brief.") and "(ignored)" not in context
    full = char_tokenizer.apply_chat_template(messages[:5], tokenize=False)
    assert char_tokenizer.decode(ids) == full  # nothing dropped or added, the trailing newline kept as context
    # a reply's first label sits right after the generation prompt
    start = labels.index(True)
    assert char_tokenizer.decode(ids[:start]).endswith("<|im_start|>assistant\n")


def test_smollm2_default_system_message_is_context(char_tokenizer):
    char_tokenizer.chat_template = SMOLLM2_TEMPLATE
    ids, labels, _ = encode_conversation(char_tokenizer, [{"role": "user", "content": "2+2?"},
                                                       {"role": "assistant", "content": "4"}],
                                      [char_tokenizer.eos_token_id])
    assert "named SmolLM" in char_tokenizer.decode(ids)
    assert char_tokenizer.decode([t for t, label in zip(ids, labels) if label]) == "4<|im_end|>"


def test_fit_length_cuts_the_prompt_side_first():
    ids = list(range(10))
    labels = [False] * 6 + [True] * 3 + [False]  # a trailing unlabelled token is dropped first
    assert fit_length(ids, labels, 20) == (ids[:9], labels[:9], False)
    cut_ids, cut_labels, cut = fit_length(ids, labels, 5)
    assert cut and cut_ids == [4, 5, 6, 7, 8] and cut_labels == [False, False, True, True, True]
    # a reply longer than max_length alone: a little context, then the reply's start
    long_ids, long_labels, _ = fit_length(list(range(30)), [False] * 10 + [True] * 20, 8)
    assert long_ids == [8, 9, 10, 11, 12, 13, 14, 15] and long_labels == [False] * 2 + [True] * 6


# ---------------------------------------------------------------- data errors


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": "hi"}, "'messages' must be a non-empty list of chat messages"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
     r"messages\[0\] is not a chat message"),
    ({"prompt": "hi"}, "needs 'messages'"),
    ({"prompt": "hi", "completion": 5}, "'completion' must be a string or a list of chat messages"),
    ({"prompt": "hi", "completion": []}, "'completion' must be a non-empty list"),
])
def test_bad_rows_fail_with_file_and_line(tmp_path, row, message):
    data = write_jsonl(tmp_path / "d.jsonl", [toy_samples(1)[0], row])
    recipe = sft_recipe("unused", data, tmp_path / "out")
    with pytest.raises(DataError, match=message) as err:
        load_conversations(recipe.data)
    assert f"{data}:2:" in str(err.value)


def test_prompt_completion_rows_and_empty_files(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hi", "completion": "yo"},
                                             {"prompt": [{"role": "user", "content": "a"}],
                                              "completion": [{"role": "assistant", "content": "b"}]}])
    recipe = sft_recipe("unused", data, tmp_path / "out").model_copy(deep=True)
    recipe.data.system_prompt = "S"
    conversations = [c.messages for c in load_conversations(recipe.data)]
    assert conversations[0] == [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "yo"}]
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="holds no samples"):
        load_conversations(sft_recipe("unused", tmp_path / "empty.jsonl", tmp_path / "o").data)


# ---------------------------------------------------------------- the loss and the loop


@pytest.fixture
def tiny_policy(tiny_model_dir):
    torch.manual_seed(0)
    return load_policy(ModelConfig(path=str(tiny_model_dir), dtype="float32", lora=None, device="cpu"), beta=0.0)


def encoded(policy, n, seed=0):
    from grpokit.train.sft import SftExample

    out = []
    for i, row in enumerate(toy_samples(n, seed)):
        messages = row["messages"] if i % 2 else [{"role": "system", "content": "x" * i}] + row["messages"]
        ids, labels, _ = encode_conversation(policy.tokenizer, messages, policy.eos_ids)
        out.append(SftExample(*fit_length(ids, labels, 512)[:2], where=str(i)))
    return out


def test_loss_equals_the_full_forward_with_masked_labels(tiny_policy):
    """Reference vs fast: only labelled positions through the head == HF's loss with -100 elsewhere."""
    examples = encoded(tiny_policy, 3)
    fast, _ = sft_loss(tiny_policy, examples)
    width = max(len(e.ids) for e in examples)
    ids = torch.tensor([e.ids + [0] * (width - len(e.ids)) for e in examples])
    mask = torch.tensor([[1] * len(e.ids) + [0] * (width - len(e.ids)) for e in examples])
    labels = torch.tensor([[t if lab else -100 for t, lab in zip(e.ids, e.labels)] + [-100] * (width - len(e.ids))
                           for e in examples])
    reference = tiny_policy.model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert torch.allclose(fast, reference, atol=1e-5)


def test_grad_accum_gives_the_same_update(tiny_policy):
    """Micro-batches weighted by their assistant tokens sum to the full batch's token-mean gradient."""
    examples = encoded(tiny_policy, 5)  # different lengths and label counts
    assert len({e.num_labels for e in examples}) > 1
    initial = {n: p.detach().clone() for n, p in tiny_policy.model.named_parameters()}
    results = []
    for accum in (1, 3):
        with torch.no_grad():
            for n, p in tiny_policy.model.named_parameters():
                p.copy_(initial[n])
        params = tiny_policy.trainable_parameters()
        optimizer = torch.optim.SGD(params, lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        metrics = train_step(params, optimizer, scheduler, examples, lambda b: sft_loss(tiny_policy, b),
                             lambda e: e.num_labels, accum, max_grad_norm=1e9)
        results.append((metrics, [p.detach().clone() for p in params]))
    (m1, p1), (m3, p3) = results
    assert math.isclose(m1["loss"], m3["loss"], rel_tol=1e-5)
    assert math.isclose(m1["token_accuracy"], m3["token_accuracy"], rel_tol=1e-6)
    for a, b in zip(p1, p3):
        assert torch.allclose(a, b, atol=1e-6)


def test_non_finite_loss_skips_the_update_and_five_in_a_row_stop(tmp_path):
    layer = torch.nn.Linear(2, 1)
    calls = {"n": 0}

    def loss_fn(batch):
        calls["n"] += 1
        x = torch.tensor([[1.0, 2.0]] * len(batch))
        loss = layer(x).pow(2).mean()
        return (loss * float("nan") if calls["n"] in (2, *range(4, 100)) else loss), {}

    job = SupervisedJob(model=layer, params=list(layer.parameters()), train_examples=list(range(8)),
                        loss_fn=loss_fn, eval_fn=dict, save=lambda d: d)
    training = SupervisedTrainingConfig(batch_size=1, epochs=1, eval_every=0, max_consecutive_skips=5)
    sink = JsonlSink(tmp_path / "metrics.jsonl")
    with pytest.raises(TrainingError, match="not finite in 5 consecutive steps"):
        fit(job, training, sink)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_update"] for r in rows] == [0, 1, 0, 1, 1, 1, 1, 1]
    assert rows[1]["loss"] is None  # NaN is written as null


def test_trainable_parameters_respect_last_k_layers_and_freeze(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", toy_samples(20))
    lora = sft_recipe(tiny_model_dir, data, tmp_path / "a")
    lora.model.lora.last_k_layers = 1
    job = setup_sft(lora)
    names = [n for n, p in job.model.named_parameters() if p.requires_grad]
    assert names and all(".layers.1." in n and "lora_" in n for n in names), names
    full = sft_recipe(tiny_model_dir, data, tmp_path / "b")
    full.model.lora = None
    full.model.freeze = ["embed_tokens", r"layers\.0\."]
    job = setup_sft(full)
    names = [n for n, p in job.model.named_parameters() if p.requires_grad]
    assert names and not any("embed_tokens" in n or "layers.0." in n for n in names), names
    assert sum(p.numel() for p in job.params) == sum(p.numel() for n, p in job.model.named_parameters() if n in names)


def test_lora_sft_refuses_to_start_from_an_adapter(tmp_path):
    recipe = sft_recipe("unused", tmp_path / "d.jsonl", tmp_path / "out")
    recipe.model.adapter = str(tmp_path)
    with pytest.raises(RecipeError, match="model.adapter with LoRA"):
        setup_sft(recipe)


# ---------------------------------------------------------------- end to end: SFT, then GRPO from the adapter


def greedy(model, tokenizer, prompts, new_tokens):
    """Independent reference: transformers' own greedy decoding, one prompt at a time."""
    texts = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new_tokens, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
        texts.append(tokenizer.decode(out[0, ids.size(1):], skip_special_tokens=True))
    return texts


@pytest.mark.slow
def test_sft_lowers_held_out_loss_and_grpo_starts_from_the_adapter(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpokit.train import train

    data = write_jsonl(tmp_path / "sft.jsonl", toy_samples(160))
    run_dir = run_sft(sft_recipe(tiny_model_dir, data, tmp_path / "sft"))
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["steps"] == 36 and info["eval_rows"] == 16
    before, after = info["eval_before"], info["eval_after"]
    # LoRA cannot touch the tiny model's norm or its 0.02-std embeddings, so its logits stay within about
    # +-1.3 and the loss cannot fall far below log(V) - 2.5 ~ 3.4; the token accuracy shows the learning
    assert after["loss"] < before["loss"] - 1.0, info
    assert after["token_accuracy"] > 0.6 and before["token_accuracy"] < 0.05, info
    adapter = run_dir / "adapter"
    assert info["saved"] == str(adapter)
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "tokenizer_config.json").is_file() and (run_dir / "recipe.yaml").is_file()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 10, 20, 30, 36]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "token_accuracy", "step_time_s", "skipped_update"):
        assert key in train_rows[0], key

    grpo = tiny_recipe(tiny_model_dir, tmp_path / "grpo", model={"adapter": str(adapter), "lora": {"r": 4, "alpha": 8}},
                       training={"max_steps": 1, "num_threads": 1})
    grpo_dir = train(recipe_from_dict(grpo))
    samples = json.loads((grpo_dir / "eval" / "step-0.json").read_text())["samples"]
    prompts, completions = [s["prompt"] for s in samples], [s["completion"] for s in samples]

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    base_texts = greedy(base, tokenizer, prompts, 8)
    sft_texts = greedy(PeftModel.from_pretrained(base, adapter).eval(), tokenizer, prompts, 8)
    assert completions == sft_texts
    assert completions != base_texts
    assert sum(t.startswith("The ans") for t in completions) >= len(completions) // 2, completions


# ---------------------------------------------------------------- CLI, run dir, early stop, the shipped recipe


def test_cli_runs_refuses_an_existing_run_and_stops_early(tiny_model_dir, tmp_path, capsys):
    import yaml

    data = write_jsonl(tmp_path / "sft.jsonl", toy_samples(40))
    recipe = sft_recipe(tiny_model_dir, data, tmp_path / "run").model_dump(mode="json")
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(recipe))
    def run(*extra):
        return run_cli(["sft", path, *extra])

    assert run("--set", "training.max_steps=2", "--set", "model.lora=null") == 0
    out = capsys.readouterr().out
    assert "held-out loss" in out and "model.path" in out
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    with pytest.raises(RunDirError, match="--overwrite"):
        run("--set", "training.max_steps=1")
    # a threshold every loss is below: stop after the first window of eval_every steps
    assert run("--overwrite", "--set", "training.loss_threshold=100", "--set", "training.eval_every=3") == 0
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["stopped_early"] and info["steps"] == 3 and "loss_threshold" in info["stop_reason"]
    assert "(stopped early)" in capsys.readouterr().out
    with pytest.raises(RecipeError, match="unknown key 'trainig'"):
        run("--set", "trainig.epochs=1")


def test_shipped_sft_recipe_validates():
    recipe = load_recipe(ROOT / "recipes" / "sft-demo.yaml", schema=SftRecipe)
    assert (ROOT / recipe.data.source).is_file() and recipe.model.path == "smollm2-135m-instruct"
