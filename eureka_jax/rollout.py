"""Rollouts: sample G responses per prompt, score them on the host, turn rewards into advantages,
and keep the groups the online filter accepts until a training batch is full.

The reward pool scores one rollout while the device runs the teacher-forced forward pass that
measures the sampler/trainer log-prob mismatch (and gives old log-probs when the sampling
distribution is not the policy itself, i.e. temperature != 1 or top-k/top-p filtering).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eureka_jax import grpo
from eureka_jax.batching import (
    Buckets,
    PromptRow,
    TrainBatch,
    collate_prompts,
    response_logprobs,
)
from eureka_jax.rl_config import RLConfig
from eureka_jax.sampler import FINISH_LENGTH, PromptBatch, SampleOutput, decode_texts


@dataclasses.dataclass(frozen=True)
class Example:
    """What the data pipeline yields per record: the prompt row and what the rewards need."""

    row: PromptRow
    record_id: str
    answer: str
    index: int  # position in the dataset: the prompt's sampling key
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ScoredGroup:
    """One prompt's G responses with their scores (host NumPy)."""

    row: PromptRow
    record_id: str
    tokens_GxL: np.ndarray
    logprobs_GxL: np.ndarray  # old log-probs for the update
    lengths_G: np.ndarray
    rewards_G: np.ndarray
    advantages_G: np.ndarray

    _ROW_FIELDS = ("input_ids_T", "positions_3xT", "token_source_T", "patches_PxC", "pos_hw_Px2",
                   "window_segment_P", "image_segment_P")
    _GROUP_FIELDS = ("tokens_GxL", "logprobs_GxL", "lengths_G", "rewards_G", "advantages_G")

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        arrays = {f"{prefix}/row/{f}": getattr(self.row, f) for f in self._ROW_FIELDS}
        arrays.update({f"{prefix}/{f}": getattr(self, f) for f in self._GROUP_FIELDS})
        arrays[f"{prefix}/next_position"] = np.asarray(self.row.next_position)
        arrays[f"{prefix}/record_id"] = np.asarray(self.record_id)
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> ScoredGroup:
        row = PromptRow(next_position=int(arrays[f"{prefix}/next_position"]),
                        **{f: arrays[f"{prefix}/row/{f}"] for f in cls._ROW_FIELDS})
        return cls(row=row, record_id=str(arrays[f"{prefix}/record_id"]),
                   **{f: arrays[f"{prefix}/{f}"] for f in cls._GROUP_FIELDS})


def pack_groups(groups: Sequence[ScoredGroup]) -> dict[str, np.ndarray]:
    arrays = {"count": np.asarray(len(groups))}
    for i, group in enumerate(groups):
        arrays.update(group.to_arrays(f"g{i}"))
    return arrays


def unpack_groups(arrays: dict[str, np.ndarray]) -> list[ScoredGroup]:
    return [ScoredGroup.from_arrays(arrays, f"g{i}") for i in range(int(arrays["count"]))]


def rollout_train_batch(prompts: PromptBatch, output: SampleOutput, group: int) -> TrainBatch:
    """A TrainBatch over a whole rollout (device arrays), for teacher-forced log-probs."""
    n, length = output.tokens_NxL.shape
    return TrainBatch(
        prompts=prompts,
        prompt_index_B=jnp.repeat(jnp.arange(n // group, dtype=jnp.int32), group),
        response_tokens_BxL=output.tokens_NxL,
        response_mask_BxL=jnp.arange(length)[None, :] < output.lengths_N[:, None],
        old_logp_BxL=output.logprobs_NxL,
        advantages_B=jnp.zeros((n,), jnp.float32),
    )


def collate_groups(groups: Sequence[ScoredGroup], buckets: Buckets, pad_token_id: int,
                   ) -> TrainBatch:
    """Kept groups -> one TrainBatch (NumPy) of len(groups) prompts x G responses."""
    g, length = groups[0].tokens_GxL.shape
    prompts = collate_prompts([grp.row for grp in groups], buckets, pad_token_id=pad_token_id)
    tokens = np.concatenate([grp.tokens_GxL for grp in groups])
    lengths = np.concatenate([grp.lengths_G for grp in groups])
    return TrainBatch(
        prompts=prompts,
        prompt_index_B=np.repeat(np.arange(len(groups), dtype=np.int32), g),
        response_tokens_BxL=tokens.astype(np.int32),
        response_mask_BxL=np.arange(length)[None, :] < lengths[:, None],
        old_logp_BxL=np.concatenate([grp.logprobs_GxL for grp in groups]).astype(np.float32),
        advantages_B=np.concatenate([grp.advantages_G for grp in groups]).astype(np.float32),
    )


class RolloutWorker:
    """Runs one rollout: sample -> (rewards on the pool || teacher-forced forward) -> groups."""

    def __init__(self, *, sampler, reward_pool, tokenizer, rl: RLConfig, buckets: Buckets,
                 pad_token_id: int, graphdef, recompute_old_logprobs: bool,
                 measure_mismatch: bool, put_on_device):
        self.sampler = sampler
        self.reward_pool = reward_pool
        self.tokenizer = tokenizer
        self.rl = rl
        self.buckets = buckets
        self.pad_token_id = pad_token_id
        self.recompute_old_logprobs = recompute_old_logprobs
        self.measure_mismatch = measure_mismatch or recompute_old_logprobs
        self.put_on_device = put_on_device
        from flax import nnx

        def forward_logprobs(params, batch):
            return response_logprobs(nnx.merge(graphdef, params), batch)[0]

        self._forward_logprobs = jax.jit(forward_logprobs)

    def run(self, params, examples: Sequence[Example], seed: int):
        group = self.rl.num_generations
        started = time.perf_counter()
        prompts = collate_prompts([e.row for e in examples], self.buckets,
                                  pad_token_id=self.pad_token_id,
                                  prompt_keys=[e.index for e in examples])
        prompts = self.put_on_device(prompts)
        output = self.sampler(params, prompts, seed)
        tokens, logprobs, lengths, finish = jax.device_get(
            (output.tokens_NxL, output.logprobs_NxL, output.lengths_N, output.finish_N))
        rollout_time = time.perf_counter() - started

        started = time.perf_counter()
        texts = decode_texts(self.tokenizer, tokens, lengths)
        answers = [e.answer for e in examples for _ in range(group)]
        extras = [{"id": e.record_id, **e.extra} for e in examples for _ in range(group)]
        handle = self.reward_pool.submit(texts, answers, extras, lengths=lengths.tolist())
        # Device work while the pool scores: the trainer's log-probs of the sampled tokens.
        forward_logp = None
        if self.measure_mismatch:
            forward_logp = self._forward_logprobs(
                params, rollout_train_batch(prompts, output, group))
        results = handle.result()
        reward_time = time.perf_counter() - started

        rewards = np.asarray([r.reward for r in results], np.float32)
        accuracy = np.asarray([r.accuracy for r in results], np.float32)
        formats = np.asarray([r.format for r in results], np.float32)
        mask = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
        metrics = {
            "reward/mean": rewards.mean(),
            "reward/accuracy": accuracy.mean(),
            "reward/format": formats.mean(),
            "reward/timeouts": sum(r.timed_out for r in results),
            "reward/data_errors": sum(r.data_error is not None for r in results),
            "response_length/mean": lengths.mean(),
            "response_length/clip_fraction": (finish == FINISH_LENGTH).mean(),
            "time/rollout": rollout_time,
            "time/reward": reward_time,
            "rollout/tokens": int(lengths.sum()),
        }
        if forward_logp is not None:
            forward_logp = np.asarray(forward_logp)
            metrics["logprob_mismatch/max"] = float(np.abs(forward_logp - logprobs)[mask].max())
            if self.recompute_old_logprobs:
                logprobs = np.where(mask, forward_logp, 0.0)

        advantages = np.asarray(grpo.group_advantages(
            rewards, group, self.rl.advantage, self.rl.scale_rewards_by_std, self.rl.adv_eps))
        if self.rl.adora_enabled:
            advantages = np.asarray(grpo.adora_scale(
                advantages, accuracy > 0.5, lengths, finish == FINISH_LENGTH, group,
                self.rl.adora_factor))
        keep = np.ones(len(examples), bool)
        if self.rl.filter_enabled:
            keep = np.asarray(grpo.online_filter(accuracy, group, self.rl.filter_low,
                                                 self.rl.filter_high))
        metrics["filter/kept_fraction"] = keep.mean()
        groups = []
        for p, example in enumerate(examples):
            if not keep[p]:
                continue
            rows = slice(p * group, (p + 1) * group)
            groups.append(ScoredGroup(
                row=example.row, record_id=example.record_id, tokens_GxL=tokens[rows],
                logprobs_GxL=logprobs[rows], lengths_G=lengths[rows], rewards_G=rewards[rows],
                advantages_G=advantages[rows]))
        samples = [{"id": examples[i // group].record_id, "answer": answers[i],
                    "completion": texts[i], "reward": float(rewards[i])}
                   for i in range(0, len(texts), group)]
        return groups, metrics, samples
