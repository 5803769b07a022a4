"""Replay buffer: which groups it keeps, how it samples, checkpoint round trip, batch splitting."""

import random

import pytest
import torch

from grpokit.algo.replay import ReplayBuffer, ReplayGroup, groups_from_batch, replay_count


def make_group(advantages: list[float], step: int = 0, name: str = "q") -> ReplayGroup:
    """A G=len(advantages) group whose score is mean |advantages|; the name marks it in asserts."""
    G = len(advantages)
    return ReplayGroup(
        prompt_ids_GP=torch.tensor([[0, 5, 6]] * G), prompt_mask_GP=torch.tensor([[0, 1, 1]] * G),
        completion_ids_GC=torch.arange(G * 2).view(G, 2), completion_mask_GC=torch.ones(G, 2, dtype=torch.long),
        truncated_G=torch.zeros(G, dtype=torch.bool), rewards_G=torch.tensor(advantages) + 1.0,
        advantages_G=torch.tensor(advantages), row={"prompt": name, "answer": "42"}, step=step)


def names(groups: list[ReplayGroup]) -> list[str]:
    return [g.row["prompt"] for g in groups]


def test_score_is_mean_absolute_advantage():
    assert make_group([1.0, -1.0, 0.5, -0.5]).score == pytest.approx(0.75)


def test_capacity_keeps_top_scoring_groups():
    buffer = ReplayBuffer(capacity=3)
    # scores: a 0.5, b 2.0, c 1.0, d 0.25, e 1.5 -> top three are b, e, c
    buffer.add([make_group([0.5, -0.5], name="a"), make_group([2.0, -2.0], name="b"),
                make_group([1.0, -1.0], name="c")])
    buffer.add([make_group([0.25, -0.25], name="d"), make_group([1.5, -1.5], name="e")])
    assert len(buffer) == 3
    assert names(buffer._groups) == ["b", "e", "c"]  # ranked best first


def test_zero_score_groups_are_never_stored():
    buffer = ReplayBuffer(capacity=4)
    buffer.add([make_group([0.0, 0.0], name="flat"), make_group([1.0, -1.0], name="useful")])
    assert names(buffer._groups) == ["useful"]
    buffer.add([make_group([0.0, 0.0, 0.0], name="flat2")])  # room left, still refused
    assert len(buffer) == 1


def test_ties_prefer_newer_step():
    buffer = ReplayBuffer(capacity=2)
    buffer.add([make_group([1.0, -1.0], step=1, name="old"), make_group([1.0, -1.0], step=3, name="new")])
    buffer.add([make_group([1.0, -1.0], step=2, name="mid")])
    assert names(buffer._groups) == ["new", "mid"]  # same score: step 1 is evicted


def filled_buffer(n: int = 5) -> ReplayBuffer:
    buffer = ReplayBuffer(capacity=10)
    buffer.add([make_group([float(i + 1), -float(i + 1)], step=i, name=f"g{i}") for i in range(n)])
    return buffer


@pytest.mark.parametrize("make_rng", [lambda: torch.Generator().manual_seed(0), lambda: random.Random(0)])
def test_sample_is_seeded_distinct_and_non_destructive(make_rng):
    buffer = filled_buffer()
    first, again = buffer.sample(3, make_rng()), buffer.sample(3, make_rng())
    assert names(first) == names(again)  # same seed, same draw
    assert len(set(names(first))) == 3  # without replacement
    assert len(buffer) == 5  # sampling does not consume


def test_sample_draws_vary_with_the_seed_and_cover_the_buffer():
    buffer = filled_buffer()
    draws = {tuple(names(buffer.sample(2, torch.Generator().manual_seed(seed)))) for seed in range(20)}
    assert len(draws) > 1
    assert {name for draw in draws for name in draw} == {f"g{i}" for i in range(5)}


def test_sample_more_than_stored_returns_all():
    buffer = filled_buffer(3)
    drawn = buffer.sample(7, torch.Generator().manual_seed(1))
    assert sorted(names(drawn)) == ["g0", "g1", "g2"]
    assert buffer.sample(0, random.Random(0)) == []
    assert ReplayBuffer(2).sample(3, random.Random(0)) == []


def test_stats():
    assert ReplayBuffer(2).stats() == {"replay/size": 0.0, "replay/mean_score": 0.0}
    stats = filled_buffer(3).stats()  # scores 1, 2, 3
    assert stats == {"replay/size": 3.0, "replay/mean_score": pytest.approx(2.0)}


def test_state_dict_round_trip_is_identical(tmp_path):
    buffer = filled_buffer(4)
    torch.save(buffer.state_dict(), tmp_path / "replay.pt")
    restored = ReplayBuffer(capacity=10)
    restored.load_state_dict(torch.load(tmp_path / "replay.pt", weights_only=True))
    assert len(restored) == len(buffer) == 4
    for saved, loaded in zip(buffer._groups, restored._groups):
        for field in ("prompt_ids_GP", "prompt_mask_GP", "completion_ids_GC", "completion_mask_GC", "truncated_G",
                      "rewards_G", "advantages_G"):
            assert torch.equal(getattr(saved, field), getattr(loaded, field)), field
            assert getattr(saved, field).dtype == getattr(loaded, field).dtype, field
        assert (saved.row, saved.step) == (loaded.row, loaded.step)
    # identical contents -> identical draws
    assert names(restored.sample(2, random.Random(3))) == names(buffer.sample(2, random.Random(3)))


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(0)


@pytest.mark.parametrize("prompts, ratio, expected", [(4, 0.0, 0), (4, 0.5, 2), (4, 0.99, 3), (1, 0.9, 0), (8, 0.3, 2)])
def test_replay_count(prompts, ratio, expected):
    # 0.99 * 4 rounds to 4, capped at 3 so one fresh group remains; 8 * 0.3 = 2.4 -> 2
    assert replay_count(prompts, ratio) == expected


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_replay_count_rejects_ratio_outside_unit_interval(ratio):
    with pytest.raises(ValueError, match="ratio"):
        replay_count(4, ratio)


def batch_of_two_groups() -> dict:
    """B=2 prompts x G=2. Prompt 0 has 2 tokens, prompt 1 has 3 (batch width 4);
    group 0's longest completion is 2 tokens, group 1's is 3 (batch width 4)."""
    return dict(
        prompt_ids_NP=torch.tensor([[0, 0, 11, 12], [0, 0, 11, 12], [0, 21, 22, 23], [0, 21, 22, 23]]),
        prompt_mask_NP=torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1]]),
        completion_ids_NC=torch.tensor([[1, 2, 0, 0], [3, 0, 0, 0], [4, 5, 6, 0], [7, 8, 0, 0]]),
        completion_mask_NC=torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]]),
        truncated_N=torch.tensor([False, False, True, False]),
        rewards_N=torch.tensor([1.0, 0.0, 0.5, 2.0]),
        advantages_N=torch.tensor([0.7, -0.7, -0.7, 0.7]),
        rows=[{"prompt": "p0"}, {"prompt": "p1"}], group_size=2, step=9)


def test_groups_from_batch_slices_rows_and_trims_padding():
    g0, g1 = groups_from_batch(**batch_of_two_groups())
    assert torch.equal(g0.prompt_ids_GP, torch.tensor([[11, 12], [11, 12]]))  # left padding dropped
    assert torch.equal(g0.prompt_mask_GP, torch.ones(2, 2, dtype=torch.long))
    assert torch.equal(g0.completion_ids_GC, torch.tensor([[1, 2], [3, 0]]))  # right padding dropped
    assert torch.equal(g0.completion_mask_GC, torch.tensor([[1, 1], [1, 0]]))
    assert torch.equal(g1.prompt_ids_GP, torch.tensor([[21, 22, 23], [21, 22, 23]]))
    assert torch.equal(g1.completion_ids_GC, torch.tensor([[4, 5, 6], [7, 8, 0]]))
    assert torch.equal(g1.completion_mask_GC, torch.tensor([[1, 1, 1], [1, 1, 0]]))
    assert torch.equal(g1.truncated_G, torch.tensor([True, False]))
    assert torch.equal(g1.rewards_G, torch.tensor([0.5, 2.0]))
    assert torch.equal(g0.advantages_G, torch.tensor([0.7, -0.7]))
    assert (g0.row, g1.row, g0.step, g1.step) == ({"prompt": "p0"}, {"prompt": "p1"}, 9, 9)


def test_groups_from_batch_clones():
    batch = batch_of_two_groups()
    (g0, _) = groups_from_batch(**batch)
    for name in ("prompt_ids_NP", "prompt_mask_NP", "completion_ids_NC", "completion_mask_NC", "rewards_N",
                 "advantages_N"):
        batch[name].fill_(-1)
    batch["truncated_N"].fill_(True)
    batch["rows"][0]["prompt"] = "changed"
    assert torch.equal(g0.prompt_ids_GP, torch.tensor([[11, 12], [11, 12]]))
    assert torch.equal(g0.completion_ids_GC, torch.tensor([[1, 2], [3, 0]]))
    assert torch.equal(g0.completion_mask_GC, torch.tensor([[1, 1], [1, 0]]))
    assert torch.equal(g0.truncated_G, torch.tensor([False, False]))
    assert torch.equal(g0.rewards_G, torch.tensor([1.0, 0.0]))
    assert torch.equal(g0.advantages_G, torch.tensor([0.7, -0.7]))
    assert g0.row == {"prompt": "p0"}


def test_groups_from_batch_rejects_mismatched_rows():
    batch = batch_of_two_groups()
    batch["rows"] = batch["rows"][:1]
    with pytest.raises(ValueError, match="group size 2"):
        groups_from_batch(**batch)
