"""How one step's training batch is assembled from the groups the online filter kept: fresh groups
first, the previous step's surplus only to fill, partial minibatches padded with empty groups that
count nowhere, and configs that would train stale leftovers refused. Also the reward control."""

from pathlib import Path

import numpy as np
import pytest

from eureka_jax.configs_common import load_config_file, validate_config
from eureka_jax.errors import InputError
from eureka_jax.processing.qwen_rows import PromptRow
from eureka_jax.rl_config import RLConfig
from eureka_jax.rollout import ScoredGroup, control_rewards
from eureka_jax.train import (
    LoopConfig,
    assemble_batch,
    micro_loss_scales,
    split_minibatches,
    step_minibatches,
)

G = 4
ROOT = Path(__file__).resolve().parent.parent


def make_group(name: str, length: int = 3) -> ScoredGroup:
    row = PromptRow(input_ids_T=np.ones(5, np.int32), positions_3xT=np.zeros((3, 5), np.int32),
                    next_position=5, token_source_T=np.full(5, -1, np.int32),
                    patches_PxC=np.zeros((0, 8), np.float32), pos_hw_Px2=np.zeros((0, 2), np.int32),
                    window_segment_P=np.zeros(0, np.int32), image_segment_P=np.zeros(0, np.int32))
    return ScoredGroup(row=row, record_id=name, tokens_GxL=np.ones((G, 6), np.int32),
                       logprobs_GxL=np.full((G, 6), -1.0, np.float32),
                       lengths_G=np.full(G, length), rewards_G=np.arange(G, dtype=np.float32),
                       advantages_G=np.linspace(-1, 1, G).astype(np.float32))


def names(groups):
    return [g.record_id for g in groups]


def test_fresh_groups_first_then_newest_carried_to_fill():
    fresh = [make_group(f"f{i}") for i in range(3)]
    carried = [make_group(f"c{i}") for i in range(3)]  # c2 is the newest
    batch, carry, counts = assemble_batch(fresh, carried, size=5)
    assert names(batch) == ["f0", "f1", "f2", "c2", "c1"]
    assert carry == []
    assert counts == {"fresh": 3, "carried": 2, "dropped": 1}


def test_fresh_surplus_carries_over_and_unneeded_leftovers_are_dropped():
    fresh = [make_group(f"f{i}") for i in range(6)]
    batch, carry, counts = assemble_batch(fresh, [make_group("old")], size=4)
    assert names(batch) == ["f0", "f1", "f2", "f3"]
    assert names(carry) == ["f4", "f5"]
    assert counts == {"fresh": 4, "carried": 0, "dropped": 1}


def test_partial_minibatch_is_padded_with_groups_that_count_nowhere():
    loop = LoopConfig(num_steps=1, prompts_per_rollout=4, groups_per_step=4, minibatch_size=4 * G,
                      micro_batch_size=2 * G)
    groups = [make_group(f"g{i}") for i in range(3)]
    (minibatch,) = split_minibatches(groups, loop, G, np.random.default_rng(0))
    flat = [g for micro in minibatch for g in micro]
    assert sorted(names(flat)) == ["", "g0", "g1", "g2"]  # every group trained once, one pad
    pad = next(g for g in flat if g.record_id == "")
    assert not pad.lengths_G.any() and not pad.advantages_G.any()
    scales = micro_loss_scales(minibatch, RLConfig(num_generations=G))
    # The micro-batch holding the pad weighs its G real sequences only: 2 * 4 / (3 * 4) * 4 / 4.
    weights = [sum(int((g.lengths_G > 0).sum()) for g in micro) for micro in minibatch]
    np.testing.assert_allclose(scales, [2 * w / 12 for w in weights])


def test_padding_only_micro_batch_gets_zero_scale():
    loop = LoopConfig(num_steps=1, prompts_per_rollout=4, groups_per_step=4, minibatch_size=4 * G,
                      micro_batch_size=2 * G)
    (minibatch,) = split_minibatches([make_group("g0")], loop, G, np.random.default_rng(0))
    scales = micro_loss_scales(minibatch, RLConfig(num_generations=G))
    assert sorted(scales) == [0.0, 2.0]


def test_ppo_epochs_reshuffle_every_group_once_per_epoch():
    loop = LoopConfig(num_steps=1, prompts_per_rollout=4, groups_per_step=4, minibatch_size=2 * G,
                      micro_batch_size=G)
    groups = [make_group(f"g{i}") for i in range(4)]
    minibatches = step_minibatches(groups, loop, RLConfig(num_generations=G, ppo_epochs=3),
                                   np.random.default_rng(0))
    assert len(minibatches) == 6
    for epoch in range(3):
        seen = [g.record_id for mb in minibatches[2 * epoch:2 * epoch + 2] for m in mb for g in m]
        assert sorted(seen) == ["g0", "g1", "g2", "g3"]


def test_a_step_smaller_than_its_rollout_is_refused():
    config = load_config_file(ROOT / "configs" / "tiny_cpu.py")
    config.model.path, config.data.train = "model", "train.jsonl"
    validate_config(config)
    config.train.groups_per_step = 8
    config.train.minibatch_size = 64
    with pytest.raises(InputError, match="train.groups_per_step .8. must be >= "
                                         "train.prompts_per_rollout .16."):
        validate_config(config)


def test_reward_control_is_validated():
    config = load_config_file(ROOT / "configs" / "tiny_cpu.py")
    config.model.path, config.data.train = "model", "train.jsonl"
    config.train_extras.reward_control = "random"
    with pytest.raises(InputError, match="train_extras.reward_control"):
        validate_config(config)


def test_shuffled_reward_control_keeps_the_rewards_and_their_pairing():
    rng = np.random.default_rng(1)
    rewards = rng.integers(0, 2, 128).astype(np.float32) + 0.5
    accuracy = rewards - 0.5
    shuffled, shuffled_accuracy = control_rewards("shuffled", rewards, accuracy, seed=7)
    assert sorted(shuffled) == sorted(rewards) and shuffled.mean() == rewards.mean()
    np.testing.assert_array_equal(shuffled_accuracy, shuffled - 0.5)  # pairs stay together
    assert (shuffled != rewards).any()
    again, _ = control_rewards("shuffled", rewards, accuracy, seed=7)
    np.testing.assert_array_equal(again, shuffled)  # reproducible, like the rest of a run
    same, _ = control_rewards("none", rewards, accuracy, seed=7)
    assert same is rewards
