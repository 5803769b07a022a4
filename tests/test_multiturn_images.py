"""Multi-turn episodes whose observations hold images (a GUI agent's screenshots), on tiny random VLMs.

For every family: the sampler feeds each observation's image tokens with its pixels, at the
positions the family gives an image block mid-sequence (Qwen's 3-D rotary positions), so the
log-probs it sampled with equal both grpokit's log-prob pass and a plain forward of the model
over the whole episode with all its images, HF computing the positions itself. Also: an
opening observation from ``reset`` joins the prompt; a text-only policy is told it cannot
read an image observation; a row's G trajectories must open alike.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from conftest import make_tiny_model
from grpokit.config import ModelConfig
from grpokit.envs import EnvironmentSpec, StepResult
from grpokit.envs.contract import opened_row
from grpokit.errors import EnvFailure
from grpokit.log import json_ready
from grpokit.models.assemble import FAMILIES
from grpokit.models.loading import wrap_policy
from grpokit.models.multimodal import join_pieces
from grpokit.rollout import PromptEncoder, build_sampler, completion_logprobs
from grpokit.train.update import split_micro_batches
from test_vlm_models import tiny_vlm

G = 2
COLOURS = [(220, 40, 40), (40, 40, 220), (40, 180, 60), (200, 200, 30)]


def screenshot(i: int, size=(56, 56)) -> Image.Image:
    return Image.new("RGB", size, COLOURS[i % len(COLOURS)])


class Screens:
    """A GUI stand-in: the first screen comes with ``reset``, each action is answered by the next screen
    (sizes differ, so image blocks differ in length); done after ``turns`` actions."""

    def __init__(self, turns: int = 3, opening: bool = True):
        self.turns, self.opening, self.seen = turns, opening, 0

    def reset(self, row):
        if not self.opening:
            return None
        return {"role": "user", "content": [{"type": "image", "image": screenshot(0)},
                                            {"type": "text", "text": "The first screen."}]}

    def step(self, action):
        self.seen += 1
        # blocks of several rows and columns (the tiny processors cap an image at 4096 pixels), of two sizes:
        # Qwen's 3-D positions differ from a count, and observations differ in length
        size = (56, 56) if self.seen % 2 else (84, 28)
        return StepResult({"role": "user", "content": [{"type": "text", "text": f"Screen {self.seen}:"},
                                                       {"type": "image", "image": screenshot(self.seen, size)}]},
                          reward=0.1, done=self.seen >= self.turns)


def spec(factory) -> EnvironmentSpec:
    return EnvironmentSpec(factory, [], "screens")


ROWS = [{"prompt": [{"role": "user", "content": "Open the settings."}]},
        {"prompt": [{"role": "user", "content": "Find the red button, then press it."}]}]


def eager(policy, bias: float = 5.0):
    """The policy ends its turns often (its end-of-turn logit raised), so screens get shown."""
    shift = torch.zeros(policy.model.get_output_embeddings().out_features)
    shift[policy.eos_ids[0]] = bias
    policy.model.get_output_embeddings().register_forward_hook(lambda module, args, out: out + shift)
    return policy


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def episodes(request):
    torch.manual_seed(0)
    model, processor = tiny_vlm(request.param)
    cfg = ModelConfig(path="unused", dtype="float32", lora=None, device="cpu")
    policy = eager(wrap_policy(model, processor, cfg, beta=0.0, device=torch.device("cpu")))
    batch = PromptEncoder(processor, True, None, 4096)(ROWS)
    out = build_sampler(policy, max_new_tokens=160, seed=1, environment=spec(Screens), max_turns=4).generate(batch, G)
    return request.param, policy, out


def image_token_count(policy, ids) -> int:
    return int((torch.as_tensor(ids) == policy.model.config.image_token_id).sum())


def test_screens_are_fed_with_their_pixels_and_the_opening_joins_the_prompt(episodes):
    family, policy, out = episodes
    assert out.completion_inputs_N is not None and len(out.completion_inputs_N) == len(ROWS) * G
    shown = 0
    for i, episode in enumerate(out.trajectories_N):
        screens = sum(1 for m in episode["messages"] if m["role"] == "user")
        in_completion = image_token_count(policy, out.completion_ids_NC[i][out.completion_mask_NC[i].bool()])
        assert (in_completion > 0) == (screens > 0), (family, i)
        assert not (out.loss_mask_NC[i].bool() & (out.completion_ids_NC[i] == policy.model.config.image_token_id)).any()
        shown += screens
    assert shown >= 2, "some trajectory must see a screen after acting"
    # the first screen is in every prompt, once, as image tokens
    assert out.prompt_inputs_N is not None and all("pixel_values" in inputs for inputs in out.prompt_inputs_N)
    assert all(image_token_count(policy, ids) > 0 for ids in out.prompt_ids_NP)
    assert len(json.dumps(json_ready(out.trajectories_N)))  # the screens are written as labels, not pixels


def test_the_log_prob_pass_scores_what_was_sampled_with_the_screens(episodes):
    family, policy, out = episodes
    own = out.loss_mask_NC.bool()
    with torch.no_grad():
        for group_size in (G, 1):
            logp_NC, _ = completion_logprobs(policy.model, out.prompt_ids_NP, out.prompt_mask_NP, out.completion_ids_NC,
                                             out.completion_mask_NC, out.prompt_inputs_N, out.completion_inputs_N,
                                             group_size=group_size)
            torch.testing.assert_close(logp_NC[own], out.sampling_logprobs_NC[own], atol=1e-4, rtol=1e-4,
                                       msg=f"{family} G={group_size}")
        (mb,) = split_micro_batches(out, grad_accum=1, mask_truncated=False, G=G)
        logp_nC, _ = completion_logprobs(policy.model, *mb.inputs, group_size=mb.group_size)
        torch.testing.assert_close(logp_nC[mb.mask_nC.bool()], out.sampling_logprobs_NC[:, :logp_nC.size(1)][
            mb.mask_nC.bool()], atol=1e-4, rtol=1e-4)


def test_each_episode_scores_as_the_models_own_forward_over_it_with_all_its_images(episodes):
    """The reference: HF's forward over prompt + completion, one sequence at a time, given every image
    of the episode in order and left to compute positions itself (Qwen: get_rope_index over it all)."""
    family, policy, out = episodes
    model, image_token = policy.model, policy.model.config.image_token_id
    for i in range(out.completion_ids_NC.size(0)):
        prompt = out.prompt_ids_NP[i][out.prompt_mask_NP[i].bool()]
        completion = out.completion_ids_NC[i][out.completion_mask_NC[i].bool()]
        ids_1L = torch.cat([prompt, completion])[None]
        inputs = join_pieces([({k: v for k, v in out.prompt_inputs_N[i].items() if not k.endswith("token_type_ids")}, 0),
                              (out.completion_inputs_N[i], 0)])
        if family.startswith("qwen"):
            inputs["mm_token_type_ids"] = (ids_1L == image_token).long()
        model.model.rope_deltas = None  # no state from an earlier call decides a position
        with torch.no_grad():
            logits_LV = model(input_ids=ids_1L, attention_mask=torch.ones_like(ids_1L), **inputs).logits[0].float()
        C = completion.numel()
        expected_C = logits_LV[-C - 1:-1].log_softmax(-1).gather(-1, completion[:, None]).squeeze(-1)
        own_C = out.loss_mask_NC[i][:C].bool()
        torch.testing.assert_close(out.sampling_logprobs_NC[i][:C][own_C], expected_C[own_C], atol=1e-4, rtol=1e-4,
                                   msg=f"{family} sequence {i}")


def test_a_text_policy_is_told_it_cannot_read_a_screen(char_tokenizer):
    cfg = ModelConfig(path="unused", dtype="float32", lora=None, device="cpu")
    policy = eager(wrap_policy(make_tiny_model(len(char_tokenizer)), char_tokenizer, cfg, beta=0.0,
                               device=torch.device("cpu")))
    batch = PromptEncoder(char_tokenizer, True, None, 64)(ROWS)
    sampler = build_sampler(policy, max_new_tokens=40, environment=spec(lambda: Screens(opening=False)))
    with pytest.raises(EnvFailure, match="reads text only; train a vision-language model"):
        sampler.generate(batch, G)


class Opening:
    """TRL's form: ``reset`` returns a string; ``step`` ends the episode."""

    def __init__(self, start=lambda row: f"Start from {len(row['prompt'][0]['content'])}."):
        self.start = start

    def reset(self, row):
        return self.start(row)

    def step(self, action):
        return StepResult(None, done=True)


def test_a_reset_string_joins_the_last_user_message_and_the_prompt_is_encoded_with_it(char_tokenizer):
    cfg = ModelConfig(path="unused", dtype="float32", lora=None, device="cpu")
    policy = wrap_policy(make_tiny_model(len(char_tokenizer)), char_tokenizer, cfg, beta=0.0, device=torch.device("cpu"))
    encoder = PromptEncoder(char_tokenizer, True, None, 128)
    out = build_sampler(policy, max_new_tokens=8, environment=spec(Opening)).generate(encoder(ROWS), G)
    opened = [{"prompt": [{"role": "user", "content": row["prompt"][0]["content"] +
                           f"\n\nStart from {len(row['prompt'][0]['content'])}."}]} for row in ROWS]
    expected = encoder(opened)
    assert torch.equal(out.prompt_ids_NP, expected.input_ids_BP.repeat_interleave(G, dim=0))


def test_a_row_whose_trajectories_open_differently_is_refused(char_tokenizer):
    cfg = ModelConfig(path="unused", dtype="float32", lora=None, device="cpu")
    policy = wrap_policy(make_tiny_model(len(char_tokenizer)), char_tokenizer, cfg, beta=0.0, device=torch.device("cpu"))
    counter = iter(range(100))
    sampler = build_sampler(policy, max_new_tokens=8,
                            environment=spec(lambda: Opening(start=lambda row: f"Seed {next(counter)}.")))
    with pytest.raises(EnvFailure, match="different observations; GRPO compares G attempts"):
        sampler.generate(PromptEncoder(char_tokenizer, True, None, 128)(ROWS), G)


def test_an_opening_with_a_screen_keeps_the_prompts_own_images_first():
    row = {"prompt": "Compare <image> with the screen.", "images": [b"first"]}
    opening = {"role": "user", "content": [{"type": "image", "image": screenshot(1)}, {"type": "text", "text": "Now."}]}
    opened = opened_row(row, opening, "t")
    assert opened["images"][0] == b"first" and opened["images"][1][:4] == b"\x89PNG"
    blocks = opened["prompt"][0]["content"]
    assert [b["type"] for b in blocks] == ["text", "image", "text", "image", "text"]
    assert blocks[-1]["text"] == "Now." and "image" not in blocks[3]  # pixels travel in images, not in blocks
    assert row == {"prompt": "Compare <image> with the screen.", "images": [b"first"]}  # the row is not changed


def test_a_gui_agent_replays_recorded_screenshots(tmp_path):
    """The replay environment with ``images: true``: an episodes file whose steps are screenshots (paths
    relative to the file); the policy sees the first screen in its prompt and each next screen after acting."""
    from grpokit.data.loaders import read_rows
    from grpokit.envs.builtin import Replay

    (tmp_path / "shots").mkdir()
    for i, name in enumerate(["home", "menu", "done"]):
        screenshot(i).save(tmp_path / "shots" / f"{name}.png")
    steps = [{"index": i, "observation": {"image_path": f"shots/{name}.png"}, "action": {"type": "tap", "text": action}}
             for i, (name, action) in enumerate([("home", "tap menu"), ("menu", "tap done"), ("done", "stop")])]
    episode = {"episode_id": "e0", "instruction": "Finish the task.", "steps": steps, "success": True}
    (tmp_path / "episodes.jsonl").write_text(json.dumps(episode) + "\n")
    (row,) = read_rows(tmp_path / "episodes.jsonl", prompt_field="instruction")
    assert row["steps"][1]["observation"]["image_path"] == str(tmp_path / "shots" / "menu.png")

    model, processor = tiny_vlm("qwen2_vl")
    cfg = ModelConfig(path="unused", dtype="float32", lora=None, device="cpu")
    policy = eager(wrap_policy(model, processor, cfg, beta=0.0, device=torch.device("cpu")))
    environment = EnvironmentSpec(lambda: Replay(images=True), [], "replay")
    out = build_sampler(policy, max_new_tokens=120, environment=environment, max_turns=3).generate(
        PromptEncoder(processor, True, None, 4096)([row]), G)
    assert image_token_count(policy, out.prompt_ids_NP[0]) > 0  # the home screen opens the episode
    assert all(len(e["steps"]) >= 1 for e in out.trajectories_N)
    shown = [m for e in out.trajectories_N for m in e["messages"] if m["role"] == "user"]
    assert shown and all(block["type"] in ("image", "text") for m in shown for block in m["content"])
    assert out.completion_inputs_N is not None and any("pixel_values" in inputs for inputs in out.completion_inputs_N)
    text_only = Replay()
    assert text_only.reset(row) == "[image]"  # without images: true, a screenshot-only step reads as text
