"""Batch statistics for logs and the `score` command."""

from __future__ import annotations

from collections.abc import Sequence

from eureka_jax.rewards.compose import RewardResult


def summarize(results: Sequence[RewardResult]) -> dict[str, float | int]:
    """Counts and means over a batch: count, mean reward / accuracy / format, timeouts, data
    errors, and items skipped for any other reason (safety guard, worker crash)."""
    n = len(results)

    def mean(values) -> float:
        return sum(values) / n if n else 0.0

    return {
        "count": n,
        "mean_reward": mean(r.reward for r in results),
        "mean_accuracy": mean(r.accuracy for r in results),
        "mean_format": mean(r.format for r in results),
        "timeouts": sum(r.timed_out for r in results),
        "data_errors": sum(r.data_error is not None for r in results),
        "skipped": sum(r.skipped is not None and not r.timed_out for r in results),
    }
