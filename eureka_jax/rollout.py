"""Rollouts: sample G responses per prompt, score them on the host, turn rewards into advantages,
and keep the groups the online filter accepts until a training batch is full.

The reward pool scores one rollout while the device runs the teacher-forced forward passes: the
policy's, which measures the sampler/trainer log-prob mismatch (and gives old log-probs when the
sampling distribution is not the policy itself, i.e. temperature != 1 or top-k/top-p filtering),
and the reference model's when the KL is in the reward. `rollout_advantages` (one rollout) and
`whiten_training_batch` (one step's groups) are the host-side advantage maths, model-free.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from eureka_jax import distributed, families, grpo
from eureka_jax.batch import Buckets, PromptBatch, TrainBatch, cut_by_prompt
from eureka_jax.errors import InputError
from eureka_jax.families import collate_prompts
from eureka_jax.policy import make_forward_logprobs
from eureka_jax.processing.examples import Example
from eureka_jax.rl_config import RLConfig
from eureka_jax.sampler import FINISH_LENGTH, SampleOutput, decode_texts


@dataclasses.dataclass(frozen=True)
class ScoredGroup:
    """One prompt's G responses with their scores (host NumPy)."""

    row: Any  # the family's prompt row
    record_id: str
    tokens_GxL: np.ndarray
    logprobs_GxL: np.ndarray  # old log-probs for the update
    lengths_G: np.ndarray
    rewards_G: np.ndarray  # the reward functions' scores (before any KL penalty)
    advantages_G: np.ndarray

    _GROUP_FIELDS = ("tokens_GxL", "logprobs_GxL", "lengths_G", "rewards_G", "advantages_G")

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """Flat arrays for a checkpoint: every field of the row (with its family's name) and of
        the group."""
        arrays = families.row_to_arrays(self.row, prefix)
        arrays.update({f"{prefix}/{f}": getattr(self, f) for f in self._GROUP_FIELDS})
        arrays[f"{prefix}/record_id"] = np.asarray(self.record_id)
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> ScoredGroup:
        if f"{prefix}/family" not in arrays:  # written before model families: Qwen2.5-VL rows
            arrays = {**arrays, f"{prefix}/family": np.asarray("qwen2_5_vl"),
                      f"{prefix}/row/next_position": arrays[f"{prefix}/next_position"]}
        return cls(row=families.row_from_arrays(arrays, prefix),
                   record_id=str(arrays[f"{prefix}/record_id"]),
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


class RolloutAdvantages(NamedTuple):
    """What `rollout_advantages` returns (host NumPy)."""

    advantages_N: np.ndarray  # float32, one per sequence, prompt-major
    keep_P: np.ndarray  # bool: the groups the online filter keeps
    metrics: dict[str, float]


def rollout_advantages(
    rl: RLConfig,
    rewards_N: np.ndarray,
    accuracy_N: np.ndarray,
    lengths_N: np.ndarray,
    truncated_N: np.ndarray,
    logp_NxL: np.ndarray | None = None,
    ref_logp_NxL: np.ndarray | None = None,
) -> RolloutAdvantages:
    """One rollout's rewards -> KL penalty -> group advantages -> ADORA -> online filter.

    The KL penalty (rl.kl_coef > 0 with rl.kl_placement 'reward') needs the old log-probs of the
    sampled tokens (`logp_NxL`) and the reference model's (`ref_logp_NxL`); token l of sequence
    n counts if l < lengths_N[n]. Formulas in eureka_jax/grpo.py.
    """
    group = rl.num_generations
    rewards_N = np.asarray(rewards_N, np.float32)
    lengths_N = np.asarray(lengths_N)
    metrics: dict[str, float] = {}
    if rl.kl_coef > 0 and rl.kl_placement == "reward":
        if logp_NxL is None or ref_logp_NxL is None:
            raise ValueError("rl.kl_placement='reward' needs logp_NxL and ref_logp_NxL")
        mask_NxL = np.arange(logp_NxL.shape[1])[None, :] < lengths_N[:, None]
        penalty_N = np.asarray(grpo.kl_reward_penalty(
            logp_NxL, ref_logp_NxL, mask_NxL, rl.kl_coef, rl.kl_estimator))
        rewards_N = rewards_N - penalty_N
        metrics["kl/reward_penalty"] = float(penalty_N.mean())
    advantages_N = np.asarray(grpo.group_advantages(
        rewards_N, group, rl.advantage, rl.scale_rewards, rl.adv_eps))
    if rl.adora_enabled:
        advantages_N = np.asarray(grpo.adora_scale(
            advantages_N, np.asarray(accuracy_N) > 0.5, lengths_N, truncated_N, group,
            rl.adora_factor))
    keep_P = np.ones(len(rewards_N) // group, bool)
    if rl.filter_enabled:
        keep_P = np.asarray(grpo.online_filter(accuracy_N, group, rl.filter_low, rl.filter_high))
    metrics["filter/kept_fraction"] = float(keep_P.mean())
    return RolloutAdvantages(advantages_N, keep_P, metrics)


def whiten_training_batch(groups: Sequence[ScoredGroup], rl: RLConfig) -> list[ScoredGroup]:
    """With rl.whiten_advantages, the groups one step trains on with their advantages whitened
    over all of them, weighted by response length (grpo.whiten_advantages); else the groups.

    OpenRLHF (MM-Eureka v1) whitens every token's advantage over its replay buffer, the batch its
    epochs of minibatches are drawn from: here, one step's groups. The pending groups of the
    next step keep their unwhitened advantages, so each batch is whitened once, over itself.
    """
    if not rl.whiten_advantages or not groups:
        return list(groups)
    advantages_N = np.concatenate([grp.advantages_G for grp in groups])
    lengths_N = np.concatenate([grp.lengths_G for grp in groups])
    whitened_N = np.asarray(grpo.whiten_advantages(advantages_N, lengths_N))
    bounds = np.cumsum([0] + [len(grp.advantages_G) for grp in groups])
    return [dataclasses.replace(grp, advantages_G=whitened_N[start:end])
            for grp, start, end in zip(groups, bounds[:-1], bounds[1:], strict=True)]


# "shuffled": the control run for the claim that learning comes from the reward. Each response
# gets the reward of a random other response of its rollout: the same mean and distribution of
# rewards, no information about what was answered.
REWARD_CONTROLS = ("none", "shuffled")


def stack_micro_batches(micro_batches: Sequence[Sequence[ScoredGroup]], buckets: Buckets,
                        pad_token_id: int) -> TrainBatch:
    """Micro-batches of equally many groups -> one TrainBatch (NumPy) whose every leaf has a
    leading micro-batch axis M, for the update step's scan. All micro-batches share the shape
    bucket of the largest prompt among them (collated together, then cut)."""
    m = len(micro_batches)
    per_micro = len(micro_batches[0])
    if any(len(micro) != per_micro for micro in micro_batches):
        raise ValueError("micro-batches must hold equally many groups")
    whole = collate_groups([g for micro in micro_batches for g in micro], buckets, pad_token_id)
    return cut_by_prompt(whole, m, xp=np)


def control_rewards(control: str, rewards_N: np.ndarray, accuracy_N: np.ndarray, seed: int):
    """(rewards, accuracy) that training sees: as scored, or with "shuffled" one random
    permutation of the rollout applied to both (a response's reward and accuracy stay paired, so
    the online filter sees a consistent, uninformative score)."""
    if control == "none":
        return rewards_N, accuracy_N
    order_N = np.random.default_rng([seed, 0xC0]).permutation(len(rewards_N))
    return rewards_N[order_N], accuracy_N[order_N]


def _score_columns(results) -> np.ndarray:
    """[n, 5] float32: reward, accuracy, format, timed out, data error of each result."""
    return np.asarray([(r.reward, r.accuracy, r.format, r.timed_out, r.data_error is not None)
                       for r in results], np.float32).reshape(-1, 5)


class RolloutWorker:
    """Runs one rollout: sample -> (rewards on the pool || teacher-forced forwards) -> groups.

    `ref_params` (the reference policy) are needed exactly when the KL is in the reward."""

    def __init__(self, *, sampler, reward_pool, tokenizer, rl: RLConfig, buckets: Buckets,
                 pad_token_id: int, graphdef, recompute_old_logprobs: bool,
                 measure_mismatch: bool, put_on_device, ref_params=None,
                 reward_control: str = "none", chunk: int = 0, forward_sequences: int = 0):
        if (ref_params is not None) != (rl.kl_coef > 0 and rl.kl_placement == "reward"):
            raise ValueError("ref_params are needed exactly when rl.kl_coef > 0 and "
                             "rl.kl_placement == 'reward'")
        self.sampler = sampler
        self.reward_pool = reward_pool
        self.tokenizer = tokenizer
        self.rl = rl
        self.buckets = buckets
        self.pad_token_id = pad_token_id
        self.recompute_old_logprobs = recompute_old_logprobs
        self.measure_mismatch = measure_mismatch or recompute_old_logprobs
        self.put_on_device = put_on_device
        self.ref_params = ref_params
        if reward_control not in REWARD_CONTROLS:
            raise InputError(f"train_extras.reward_control must be one of {REWARD_CONTROLS} "
                             f"(got {reward_control!r})")
        self.reward_control = reward_control
        self.chunk = chunk
        # sequences per teacher-forced pass (0: a whole rollout chunk at once)
        self._forward_logprobs = make_forward_logprobs(graphdef, forward_sequences)

    def run(self, params, examples: Sequence[Example], seed: int):
        """Sample, score and turn into groups one rollout of `examples`, `self.chunk` prompts
        per sampler call (0: all at once). Chunks are independent (every sample's key depends on
        its prompt's dataset index, not on its chunk), so chunking changes memory, not results.
        The pool scores a chunk while the device samples the next one and runs the
        teacher-forced forward of the last."""
        group = self.rl.num_generations
        size = self.chunk or len(examples)
        chunks = [examples[i:i + size] for i in range(0, len(examples), size)]
        handles, forward_logps, ref_logps, outputs = [], [], [], []
        sample_time = 0.0
        for chunk in chunks:
            chunk_started = time.perf_counter()
            prompts = self.put_on_device(collate_prompts(
                [e.row for e in chunk], self.buckets, pad_token_id=self.pad_token_id,
                prompt_keys=[e.index for e in chunk]))
            output = self.sampler(params, prompts, seed)
            tokens, logprobs, lengths, finish = distributed.to_host(
                (output.tokens_NxL, output.logprobs_NxL, output.lengths_N, output.finish_N))
            sample_time += time.perf_counter() - chunk_started
            outputs.append((tokens, logprobs, lengths, finish))
            texts = decode_texts(self.tokenizer, tokens, lengths)
            answers = [e.answer for e in chunk for _ in range(group)]
            extras = [{"id": e.record_id, **e.extra} for e in chunk for _ in range(group)]
            # Each process scores its own share of the samples in its own pool; the scores are
            # gathered below, so every process ends with all of them.
            own = distributed.own_share(len(texts))
            handles.append((texts, answers, self.reward_pool.submit(
                texts[own], answers[own], extras[own], lengths=lengths[own].tolist())))
            # Device work while the pool scores: the trainer's and the reference's log-probs of
            # the sampled tokens (dispatched asynchronously; read after the rewards).
            if self.measure_mismatch or self.ref_params is not None:
                batch = rollout_train_batch(prompts, output, group)
                if self.measure_mismatch:
                    forward_logps.append(self._forward_logprobs(params, batch))
                if self.ref_params is not None:
                    ref_logps.append(self._forward_logprobs(self.ref_params, batch))
        rollout_time = sample_time

        started = time.perf_counter()
        scores = np.concatenate([distributed.gather_shares(_score_columns(handle.result()),
                                                           len(chunk_texts))
                                 for chunk_texts, _, handle in handles])
        texts = [t for chunk_texts, _, _ in handles for t in chunk_texts]
        answers = [a for _, chunk_answers, _ in handles for a in chunk_answers]
        tokens, logprobs, lengths, finish = (np.concatenate(parts)
                                             for parts in zip(*outputs, strict=True))
        forward_logp = np.concatenate(distributed.to_host(forward_logps)) if forward_logps else None
        ref_logp = np.concatenate(distributed.to_host(ref_logps)) if ref_logps else None
        reward_time = time.perf_counter() - started

        rewards, accuracy, formats, timed_out, data_errors = scores.T
        mask = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
        metrics = {
            "reward/mean": rewards.mean(),
            "reward/accuracy": accuracy.mean(),
            "reward/format": formats.mean(),
            "reward/timeouts": int(timed_out.sum()),
            "reward/data_errors": int(data_errors.sum()),
            "response_length/mean": lengths.mean(),
            "response_length/clip_fraction": (finish == FINISH_LENGTH).mean(),
            "time/rollout": rollout_time,
            "time/reward": reward_time,
            "rollout/tokens": int(lengths.sum()),
        }
        if forward_logp is not None:
            metrics["logprob_mismatch/max"] = float(np.abs(forward_logp - logprobs)[mask].max())
            if self.recompute_old_logprobs:
                logprobs = np.where(mask, forward_logp, 0.0)

        # The metrics above are the true rewards; with the control on, training sees each
        # response's reward and accuracy moved to another response of the rollout.
        train_rewards, train_accuracy = control_rewards(self.reward_control, rewards, accuracy,
                                                        seed)
        scored = rollout_advantages(
            self.rl, train_rewards, train_accuracy, lengths, finish == FINISH_LENGTH, logprobs,
            None if ref_logp is None else np.asarray(ref_logp))
        metrics.update(scored.metrics)
        groups = []
        for p, example in enumerate(examples):
            if not scored.keep_P[p]:
                continue
            rows = slice(p * group, (p + 1) * group)
            groups.append(ScoredGroup(
                row=example.row, record_id=example.record_id, tokens_GxL=tokens[rows],
                logprobs_GxL=logprobs[rows], lengths_G=lengths[rows], rewards_G=rewards[rows],
                advantages_G=scored.advantages_N[rows]))
        samples = [{"id": examples[i // group].record_id, "answer": answers[i],
                    "completion": texts[i], "reward": float(rewards[i])}
                   for i in range(0, len(texts), group)]
        return groups, metrics, samples
