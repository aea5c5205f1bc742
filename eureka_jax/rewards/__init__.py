"""Rule rewards for GRPO: math answer accuracy, format, composition, and a timed process pool.

Scoring (plain functions over strings): accuracy.py (extract.py, choice.py, math_equal.py with
fast.py and inequality.py, guard.py), format.py. Composition and configuration: compose.py. Running
them in parallel with a time limit per item: pool.py (timer.py). The trainer calls `RewardPool`
(asynchronous) or `score_batch` (synchronous); `eureka-jax score` wraps `score_batch` for jsonl
files.
"""

from eureka_jax.rewards.accuracy import Verdict, accuracy_reward, check_ground_truth, judge
from eureka_jax.rewards.compose import RewardConfig, RewardResult, overlong_penalty
from eureka_jax.rewards.extract import extract_answer
from eureka_jax.rewards.format import format_reward
from eureka_jax.rewards.math_equal import GroundTruthError
from eureka_jax.rewards.pool import RewardHandle, RewardPool, score_batch
from eureka_jax.rewards.summary import summarize

__all__ = [
    "GroundTruthError",
    "RewardConfig",
    "RewardHandle",
    "RewardPool",
    "RewardResult",
    "Verdict",
    "accuracy_reward",
    "check_ground_truth",
    "extract_answer",
    "format_reward",
    "judge",
    "overlong_penalty",
    "score_batch",
    "summarize",
]
