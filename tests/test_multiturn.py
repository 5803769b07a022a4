"""Multi-turn rollouts in environments, on the tiny character model.

The random model is nudged toward its end-of-turn token (a constant added to that logit by a
hook on the output head, in sampling and scoring alike), so its turns end and environments
get to answer. Checked: environment tokens are in the context but out of the loss (zero
gradient); the ids scored are the ids sampled (log-probs recomputed equal the sampler's);
a one-turn environment gives exactly the single-turn rollouts and loss; raising and hanging
environments end their trajectory only, and too many in a row stop the run; TRL-style
environment classes and plain tool functions run unchanged.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model, tiny_recipe
from grpokit.algo import BatchNorms, policy_loss
from grpokit.config import ModelConfig, recipe_from_dict
from grpokit.envs import EnvironmentSpec, FactoryEnvironment, StepResult, ToolEnvironment, parse_tool_calls
from grpokit.envs.builtin import calculate
from grpokit.errors import EnvFailure
from grpokit.models.loading import wrap_policy
from grpokit.rollout import PromptEncoder, build_sampler, completion_logprobs
from grpokit.report import write_report
from grpokit.train import train
from grpokit.train.update import split_micro_batches

G = 3
EOS = 2  # the char tokenizer's <|im_end|>


def eager_policy(tokenizer, bias: float = 4.0):
    """A tiny policy that ends its turns often: its EOS logit raised by ``bias`` everywhere."""
    cfg = ModelConfig(path="unused", dtype="float32", lora=None, device="cpu")
    policy = wrap_policy(make_tiny_model(len(tokenizer)), tokenizer, cfg, beta=0.0, device=torch.device("cpu"))
    shift = torch.zeros(len(tokenizer))
    shift[EOS] = bias
    policy.model.get_output_embeddings().register_forward_hook(lambda module, args, out: out + shift)
    return policy


class Echo:
    """Answers every turn with a short observation; done after ``turns`` turns."""

    def __init__(self, turns: int = 3):
        self.turns, self.seen = turns, 0

    def reset(self, row):
        return None

    def step(self, action):
        self.seen += 1
        return StepResult(f"obs {self.seen}", reward=0.5, done=self.seen >= self.turns)


def spec(factory, name="test") -> EnvironmentSpec:
    return EnvironmentSpec(factory, [], name)


def rollouts_of(policy, tokenizer, factory, rows=None, max_new_tokens=40, seed=0, **turns):
    rows = rows or [{"prompt": [{"role": "user", "content": "hi"}]}, {"prompt": [{"role": "user", "content": "a b c"}]}]
    batch = PromptEncoder(tokenizer, True, None, 64)(rows)
    sampler = build_sampler(policy, max_new_tokens=max_new_tokens, seed=seed, environment=spec(factory), **turns)
    return sampler, sampler.generate(batch, G)


def test_environment_tokens_are_context_not_loss_and_the_ids_scored_are_the_ids_sampled(char_tokenizer):
    policy = eager_policy(char_tokenizer)
    _, out = rollouts_of(policy, char_tokenizer, lambda: Echo(turns=3), max_turns=4)
    episodes = out.trajectories_N
    assert any(len(e["steps"]) >= 2 for e in episodes), "some trajectory must take several turns"
    env_tokens = (out.completion_mask_NC.bool() & ~out.loss_mask_NC.bool())
    assert env_tokens.any()
    # every observation's text sits in the context, out of the loss
    for i, episode in enumerate(episodes):
        context = char_tokenizer.decode(out.completion_ids_NC[i][env_tokens[i]])
        for message in episode["messages"]:
            if message["role"] != "assistant":
                assert message["content"] in context
    # the log-prob pass over the packed rollouts reproduces the sampler's own log-probs
    with torch.no_grad():
        for group_size in (G, 1):
            logp_NC, _ = completion_logprobs(policy.model, out.prompt_ids_NP, out.prompt_mask_NP, out.completion_ids_NC,
                                             out.completion_mask_NC, group_size=group_size)
            own = out.loss_mask_NC.bool()
            torch.testing.assert_close(logp_NC[own], out.sampling_logprobs_NC[own], atol=1e-4, rtol=1e-4)


def test_tool_output_tokens_get_zero_gradient(char_tokenizer):
    policy = eager_policy(char_tokenizer)
    _, out = rollouts_of(policy, char_tokenizer, lambda: Echo(turns=3))
    (mb,) = split_micro_batches(out, grad_accum=1, mask_truncated=False, G=G)
    logp_nC, _ = completion_logprobs(policy.model, *mb.inputs, group_size=mb.group_size)
    logp_nC.retain_grad()
    advantages = torch.linspace(-1, 1, logp_nC.size(0))
    norms = BatchNorms(sequences=logp_nC.size(0), tokens=float(mb.mask_nC.sum()), max_completion_length=40)
    loss, _ = policy_loss(logp_nC, logp_nC.detach(), advantages, mb.mask_nC, norms, beta=0.0, epsilon_low=0.2,
                          epsilon_high=0.2, loss_type="dapo", importance_level="token", kl_estimator="k3")
    loss.backward()
    env_nC = out.completion_mask_NC.bool() & ~out.loss_mask_NC.bool()
    assert env_nC.any() and torch.all(logp_nC.grad[env_nC] == 0)
    assert logp_nC.grad[out.loss_mask_NC.bool()].abs().sum() > 0


def test_a_one_turn_environment_gives_exactly_the_single_turn_rollouts(char_tokenizer):
    policy = eager_policy(char_tokenizer, bias=1.0)
    _, multi = rollouts_of(policy, char_tokenizer, lambda: Echo(turns=1), max_new_tokens=12, seed=5)
    rows = [{"prompt": [{"role": "user", "content": "hi"}]}, {"prompt": [{"role": "user", "content": "a b c"}]}]
    single = build_sampler(policy, max_new_tokens=12, seed=5).generate(PromptEncoder(char_tokenizer, True, None, 64)(rows), G)
    C = single.completion_ids_NC.size(1)
    width = multi.completion_ids_NC.size(1)
    assert width <= C
    mask = single.completion_mask_NC
    assert torch.equal(multi.completion_mask_NC, mask[:, :width]) and not mask[:, width:].any()
    assert torch.equal(multi.completion_ids_NC * mask[:, :width], single.completion_ids_NC[:, :width] * mask[:, :width])
    assert torch.equal(multi.loss_mask_NC, mask[:, :width]) and torch.equal(multi.truncated_N, single.truncated_N)
    torch.testing.assert_close(multi.sampling_logprobs_NC, single.sampling_logprobs_NC[:, :width])


class Raises(Echo):
    def step(self, action):
        raise RuntimeError("the simulator crashed")


class Hangs(Echo):
    def step(self, action):
        time.sleep(3)
        return StepResult("late")


@pytest.mark.parametrize("environment, reason", [(Raises, "error: step() raised RuntimeError: the simulator crashed"),
                                                 (Hangs, "timeout: step() took over 0.2 s")])
def test_a_raising_or_hanging_environment_ends_only_its_trajectory(char_tokenizer, environment, reason):
    policy = eager_policy(char_tokenizer)
    sampler, out = rollouts_of(policy, char_tokenizer, environment, timeout_s=0.2, max_failures=100)
    ends = [e["end"] for e in out.trajectories_N]
    assert reason in ends and all(end in (reason, "length") for end in ends)
    assert out.completion_mask_NC.sum() > 0  # the rollouts are still usable
    with pytest.raises(EnvFailure, match="failed 2 times in a row"):
        build_sampler(policy, max_new_tokens=40, environment=spec(environment), timeout_s=0.2,
                      max_failures=2).generate(PromptEncoder(char_tokenizer, True, None, 64)(
                          [{"prompt": [{"role": "user", "content": "hi"}]}]), G)


# ---------------------------------------------------------------- tools


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first.
        b: The second.
    """
    return a + b


def test_tool_calls_are_parsed_run_and_their_misuse_recorded():
    env = ToolEnvironment([add])
    result = env.step('Let me add. <tool_call>{"name": "add", "arguments": {"a": 2, "b": 40}}</tool_call>')
    assert result.observation == {"role": "tool", "name": "add", "content": "42"} and not result.done
    bad = env.step('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call><tool_call>{"name": "mul"}</tool_call>'
                   '<tool_call>{not json}</tool_call>')
    errors = [call["error"] for call in bad.info["tool_calls"]]
    assert "bad arguments for add" in errors[0] and "unknown tool 'mul'" in errors[1] and "not valid JSON" in errors[2]
    assert env.step("The answer is 42.").done
    assert parse_tool_calls('<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>') == [
        {"name": "add", "arguments": {"a": 1, "b": 2}}]
    assert env.schemas[0]["function"]["parameters"]["required"] == ["a", "b"]


def test_the_calculator_is_exact_and_runs_no_code():
    assert calculate("123456789 * 987654321 + 1") == str(123456789 * 987654321 + 1)
    assert calculate("1,234 + 5,678") == "6912" and calculate("7 / 2") == "3.5"
    for expression in ("__import__('os').system('true')", "2 ** 100000", "[1] * 10"):
        with pytest.raises(ValueError):
            calculate(expression)


class TrlCounter:
    """A TRL environment_factory class, as TRL's docs write one."""

    def reset(self, **kwargs):
        self.total = 0
        return f"Start from {kwargs.get('start', 0)}."

    def increment(self, step: int) -> str:
        """Add to the counter.

        Args:
            step: How much to add.
        """
        self.total += step
        return str(self.total)

    def get_reward(self) -> float:
        return float(self.total)


def test_a_trl_environment_class_runs_unchanged():
    env = FactoryEnvironment(TrlCounter())
    assert env.reset({"start": 3, "prompt": "x"}) == "Start from 3."
    assert [s["function"]["name"] for s in env.schemas] == ["increment"]
    assert env.step('<tool_call>{"name": "increment", "arguments": {"step": 5}}</tool_call>').observation["content"] == "5"
    final = env.step("done")
    assert final.done and final.reward == 5.0


def test_the_prompt_describes_the_tools_when_the_template_ignores_them(char_tokenizer):
    encoder = PromptEncoder(char_tokenizer, True, None, 4096, tools=ToolEnvironment([add]).schemas)
    text = char_tokenizer.decode(encoder.token_ids({"prompt": [{"role": "user", "content": "2+40?"}]}))
    assert text.startswith("<|im_start|>system\n") and '"name": "add"' in text and "<tool_call>" in text


def test_grpo_trains_through_a_trl_class_and_a_tool_function(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "agent_tools.py").write_text(
        "def add(a: int, b: int) -> int:\n    \"\"\"Add two integers.\n\n    Args:\n        a: The first.\n"
        "        b: The second.\n    \"\"\"\n    return a + b\n\n\nclass Counter:\n    def reset(self, **kwargs):\n"
        "        self.total = 0\n\n    def increment(self, step: int) -> str:\n        \"\"\"Add to the counter.\n\n"
        "        Args:\n            step: How much to add.\n        \"\"\"\n        self.total += step\n"
        "        return str(self.total)\n\n    def get_reward(self) -> float:\n        return float(self.total)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run",
                         rollout={"environment": "agent_tools:Counter", "tools": ["agent_tools:add"], "max_turns": 2,
                                  "max_completion_length": 24, "num_generations": 4, "max_prompt_length": 1024},
                         training={"max_steps": 2, "prompts_per_step": 2, "eval_every": 2})
    recipe["rewards"] = [{"name": "toy_digits"}, {"name": "environment_reward"}, {"name": "tool_misuse"}]
    run_dir = train(recipe_from_dict(recipe))
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if line["kind"] == "train"]
    assert [line["step"] for line in train_lines] == [1, 2]
    assert all("episode/turns" in line and "tools/calls" in line and "rewards/environment_reward" in line
               for line in train_lines)
    evaluated = json.loads((run_dir / "eval" / "step-2.json").read_text())["samples"]
    assert all(sample["trajectory"]["messages"][0]["role"] == "assistant" for sample in evaluated)
    report = write_report(run_dir).read_text()
    assert "## A trajectory before and after" in report and "| 1 | assistant |" in report
    sys.modules.pop("agent_tools", None)


# ---------------------------------------------------------------- rewards and metrics over trajectories


def episode(*steps, end="done"):
    return {"messages": [], "steps": [dict(step) for step in steps], "end": end, "turns": len(steps),
            "episode_reward": sum(step["reward"] for step in steps)}


def step(action, reward=0.0, calls=()):
    return {"action": action, "observation": None, "reward": reward, "done": False,
            "info": {"tool_calls": [{"name": name, "arguments": {}, "error": error, "known": name != "mul"}
                                    for name, error in calls]}}


EPISODES = [
    episode(step("SEGMENT(img)"), step("GET_PROPERTIES(1)", 0.5), step("GET_PROPERTIES(1)"), step("DONE", 1.0)),
    episode(step("x", calls=[("add", None), ("mul", "unknown tool 'mul'")]), step("y", calls=[("add", "bad")]),
            end="error: step() raised RuntimeError: boom"),
]


def test_trajectory_rewards_by_hand():
    from grpokit.rewards.trajectory import action_coherence, environment_reward, tool_misuse

    columns = {"trajectory": EPISODES + [None]}
    assert environment_reward(None, [0, 0, 0], episode_reward=[1.5, 0.0, None]) == [1.5, 0.0, None]
    assert environment_reward(None, [0]) == [None]
    assert tool_misuse(None, [0, 0, 0], penalty=-0.5, **columns) == [0.0, -1.0, None]
    # SEGMENT->GET_PROPERTIES +0.2, GET_PROPERTIES repeated -0.5, GET_PROPERTIES->DONE nothing; add->add repeated -0.5
    assert action_coherence(None, [0, 0, 0], pairs={"SEGMENT -> GET_PROPERTIES": 0.2}, repeat_penalty=-0.5,
                            **columns) == pytest.approx([-0.3, -0.5, None])
    assert tool_misuse(None, ["one turn"]) == [None]
    from grpokit.rewards.trajectory import episode_success

    won, lost = episode(step("a")), episode(step("b"))
    won["steps"][-1]["info"]["success"], lost["steps"][-1]["info"]["success"] = True, False
    assert episode_success(None, [0] * 4, trajectory=[won, lost, EPISODES[0], None]) == [1.0, 0.0, None, None]


def test_episode_metrics_by_hand():
    from grpokit.envs.trajectory import episode_metrics

    metrics = episode_metrics(EPISODES + [None])
    assert metrics["episode/turns"] == 3.0 and metrics["episode/reward"] == 0.75
    assert metrics["episode/step_reward"] == pytest.approx(1.5 / 6)
    assert metrics["episode/end_done"] == 0.5 and metrics["episode/end_error"] == 0.5
    assert (metrics["tools/calls"], metrics["tools/failures"]) == (3.0, 2.0)
    assert (metrics["tools/add/calls"], metrics["tools/add/failures"], metrics["tools/unknown_tool/failures"]) == (
        2.0, 1.0, 1.0)
    assert not any("mul" in key for key in metrics)  # an invented tool name makes no metric key
    assert metrics["actions/GET_PROPERTIES"] == pytest.approx(2 / 6) and metrics["actions/add"] == pytest.approx(2 / 6)
    assert episode_metrics(None) == {}


def test_an_agent_sft_sample_shows_the_tools_and_learns_the_tool_call(char_tokenizer, tmp_path):
    """data.environment in an SFT recipe: each sample's system message describes the tools exactly as the
    GRPO prompts will, and both the tool call and the final answer are learned, not the tool's reply."""
    from grpokit.config import SftRecipe
    from grpokit.train.sft import encode_examples, load_conversations

    recipe = recipe_from_dict({"model": {"path": "unused"}, "data": {"source": "builtin:multi_sum", "environment":
                                                                       "calculator", "eval_size": 1},
                               "training": {"output_dir": str(tmp_path / "o")}}, schema=SftRecipe)
    conversation = load_conversations(recipe.data)[0]
    (example,), _ = encode_examples(char_tokenizer, [conversation], 4096, [EOS])
    learned = char_tokenizer.decode([t for t, label in zip(example.ids, example.labels) if label])
    answer = conversation.messages[-1]["content"]
    assert learned == conversation.messages[1]["content"] + "<|im_end|>" + answer + "<|im_end|>"
    prompt = PromptEncoder(char_tokenizer, True, None, 4096, tools=conversation.tools)
    rendered = char_tokenizer.decode(prompt.token_ids({"prompt": conversation.messages[0]["content"]}))
    assert char_tokenizer.decode(example.ids).startswith(rendered)  # the GRPO prompt is the sample's prefix
    assert '"name": "calculate"' in rendered


def test_the_replay_environment_walks_a_recorded_episode():
    from grpokit.data.loaders import read_rows
    from grpokit.envs.builtin import Replay

    rows = read_rows(Path(__file__).resolve().parents[1] / "recipes" / "data" / "phone-episodes.jsonl",
                     prompt_field="instruction")
    row = next(r for r in rows if r["episode_id"] == "ok-0")
    env = Replay()
    assert env.reset(row).startswith("Home screen")
    first = env.step("Tap  MUSIC")
    assert first.reward == 1.0 and first.observation.startswith("Music app") and not first.done
    second = env.step("type Fast Train")
    assert second.reward == 0.0 and second.info["expected"] == "type Slow Train"
    last = env.step("tap first result")
    assert last.done and last.reward == 1.0 and last.info["success"] is False  # one step did not match
    typed = Replay(match="type")
    typed.reset(row)
    assert typed.step("tap Camera").reward == 1.0
    with pytest.raises(ValueError, match="did not succeed"):
        Replay().reset(next(r for r in rows if not r["success"]))


def test_curiosity_pays_for_what_its_dynamics_model_cannot_predict_and_learns(tmp_path):
    from grpokit.rewards.trajectory import Curiosity

    seen = episode(step("open the door", 0.0), step("look", 0.0))
    seen["steps"][0]["observation"] = {"role": "user", "content": "a long red corridor"}
    seen["steps"][1]["observation"] = {"role": "user", "content": "a locked green gate"}
    ended = episode(step("answer"))  # no observation after its only turn: nothing to predict
    curiosity = Curiosity(eta=1.0, encoder="hash", dim=64, learning_rate=0.05)
    first = curiosity(["start"] * 3, [0, 0, 0], trajectory=[seen, ended, None])
    assert first[0] > 0 and first[1] == 0.0 and first[2] is None
    for _ in range(30):
        later = curiosity(["start"], [0], trajectory=[seen])
    assert later[0] < first[0] / 4  # a familiar transition pays less and less
    assert curiosity(["start"], [0]) == [None]  # one-turn rollouts

    copy = Curiosity(eta=1.0, encoder="hash", dim=64, learning_rate=0.05)
    copy.load_state_dict(curiosity.state_dict())
    assert copy(["start"], [0], trajectory=[seen]) == curiosity(["start"], [0], trajectory=[seen])


class Corridor:
    def reset(self, row):
        self.turn = 0

    def step(self, action):
        self.turn += 1
        return StepResult(f"room {self.turn}", done=self.turn >= 2)


def test_curiosity_state_is_checkpointed_and_resumed(tiny_model_dir, tmp_path, monkeypatch):
    from grpokit.models.checkpoint import load_torch_state

    monkeypatch.setattr(sys.modules[__name__], "Corridor", Corridor)
    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run",
                         rollout={"environment": f"{__name__}:Corridor", "max_turns": 2, "num_generations": 2,
                                  "max_completion_length": 24, "max_prompt_length": 1024},
                         training={"max_steps": 2, "prompts_per_step": 2, "save_every": 1})
    recipe["rewards"] = [{"name": "toy_digits"},
                         {"name": "curiosity", "args": {"encoder": "hash", "dim": 32, "eta": 0.5}}]
    # the tiny model ends turns rarely: nudge its end-of-turn token as it is loaded
    monkeypatch.setattr("grpokit.train.run.load_policy", _eager)
    run_dir = train(recipe_from_dict(recipe))
    updates = load_torch_state(run_dir / "checkpoints" / "step-2", "rewards")["curiosity"]["updates"]
    assert updates >= 1
    recipe["training"]["max_steps"] = 3
    train(recipe_from_dict(recipe), resume=True)
    resumed = load_torch_state(run_dir / "checkpoints" / "step-3", "rewards")["curiosity"]["updates"]
    assert resumed > updates  # it went on from the saved model, not from a new one


def _eager(model_cfg, beta, merge_lora=False, gradient_checkpointing=False):
    """load_policy, then the end-of-turn nudge of ``eager_policy`` on the loaded model."""
    from grpokit.models.loading import load_policy

    policy = load_policy(model_cfg, beta, merge_lora, gradient_checkpointing)
    shift = torch.zeros(policy.model.get_output_embeddings().out_features)
    shift[EOS] = 4.0
    policy.model.get_output_embeddings().register_forward_hook(lambda module, args, out: out + shift)
    return policy


def test_generate_runs_episodes_in_the_recipes_environment(tiny_model_dir, tmp_path):
    import yaml

    from conftest import run_cli

    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run", rollout={"environment": "calculator", "max_turns": 2,
                                                                     "max_completion_length": 16,
                                                                     "max_prompt_length": 1024})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "gen.jsonl"
    assert run_cli(["generate", "--model", tiny_model_dir, "--recipe", path, "--num-generations", 2, "--out", out,
                    "--limit", 3, "--rewards"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 3 and all(len(line["trajectories"]) == 2 for line in lines)
    assert all(t["end"] in ("done", "max_turns", "length") for line in lines for t in line["trajectories"])


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3"])
def test_a_vlm_acts_on_an_image_prompt_over_several_turns(family):
    """A screenshot in the prompt, text observations after: the ids scored are the ids sampled, with
    the prompt's images and (Qwen) its multimodal positions."""
    from test_vlm_models import tiny_vlm
    from test_vlm_rollout import ROWS

    model, processor = tiny_vlm(family)
    cfg = ModelConfig(path="unused", dtype="float32", lora=None, device="cpu")
    policy = wrap_policy(model, processor, cfg, beta=0.0, device=torch.device("cpu"))
    eos = policy.eos_ids[0]
    shift = torch.zeros(policy.model.get_output_embeddings().out_features)
    shift[eos] = 5.0
    policy.model.get_output_embeddings().register_forward_hook(lambda module, args, out: out + shift)
    batch = PromptEncoder(processor, True, None, 4096)(ROWS)
    out = build_sampler(policy, max_new_tokens=40, environment=spec(lambda: Echo(turns=3))).generate(batch, G)
    assert (out.completion_mask_NC.bool() & ~out.loss_mask_NC.bool()).any()  # observations were fed
    with torch.no_grad():
        logp_NC, _ = completion_logprobs(policy.model, out.prompt_ids_NP, out.prompt_mask_NP, out.completion_ids_NC,
                                         out.completion_mask_NC, out.prompt_inputs_N, group_size=G)
    own = out.loss_mask_NC.bool()
    torch.testing.assert_close(logp_NC[own], out.sampling_logprobs_NC[own], atol=1e-4, rtol=1e-4)
