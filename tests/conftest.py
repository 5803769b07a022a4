"""Tiny models for tests: a character-level tokenizer and a randomly initialised Llama.

Nothing is downloaded; building both takes milliseconds.
"""

from __future__ import annotations

import string

import pytest
import torch

from grpokit.rewards import REWARDS, completion_text, register

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    chars = sorted(set(string.printable) - set("\x0b\x0c"))
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def make_tiny_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=0, eos_token_id=2, bos_token_id=1, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A run with training.num_threads sets torch's global thread count: give the next test its own
    back (a resumed run and its straight twin must reduce in the same order to match bit for bit)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def char_tokenizer():
    return make_char_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random model saved as an ordinary transformers dir, loadable by model.path."""
    directory = tmp_path_factory.mktemp("tiny-model")
    tokenizer = make_char_tokenizer()
    make_tiny_model(len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_recipe(model_dir, out_dir, **sections):
    recipe = {
        "model": {"path": str(model_dir), "dtype": "float32", "lora": None, "device": "cpu"},
        "data": {"source": "builtin:addition", "eval_size": 8, "train_size": 64},
        "rollout": {"num_generations": 8, "max_completion_length": 8},
        "algorithm": {"beta": 0.0},
        "rewards": [{"name": "toy_digits"}],
        "training": {"learning_rate": 3e-3, "max_steps": 30, "prompts_per_step": 4, "output_dir": str(out_dir),
                     "lr_schedule": "constant"},
        "logging": {"progress": False, "samples_every": 5},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    return recipe


# toy rewards a random character model can earn: registered once for every test module
if "toy_digits" not in REWARDS:
    @register("toy_digits")
    def toy_digits(prompts, completions, **_):
        """Share of the reply's characters that are digits: learnable by a random char model."""
        texts = [completion_text(c) for c in completions]
        return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]

    @register("toy_leading_digit")
    def toy_leading_digit(prompts, completions, **_):
        """1 when the reply starts with a digit: a 'correct' that random samples hit now and then."""
        return [float(completion_text(c)[:1].isdigit()) for c in completions]


def run_cli(argv: list[str]):
    """Run a ``grpokit`` subcommand as the CLI parses it, but let grpokit's errors raise
    (``grpokit.cli.main`` would print them and return 2) so tests can match them."""
    from grpokit.cli import build_parser

    args = build_parser().parse_args([str(a) for a in argv])
    return args.func(args)
