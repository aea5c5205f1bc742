"""Accuracy reward (range {0, 1}): is the answer a completion commits to equal to the ground truth?

MM-Eureka's semantics, made robust: judge the first complete <answer> block (its \\boxed{} if any),
else the last \\boxed{} in the completion, else score 0. Option-letter golds are judged as multiple
choice (choice.py), everything else mathematically (math_equal.py). A ground truth that cannot be
parsed raises GroundTruthError (a data error) instead of rewarding every response, which is what
MM-Eureka's reward does.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from eureka_jax.rewards.choice import choice_correct, gold_letter
from eureka_jax.rewards.extract import extract_answer
from eureka_jax.rewards.guard import unsafe_reason
from eureka_jax.rewards.math_equal import GroundTruthError, math_equal, parse_gold


@dataclass(frozen=True)
class Verdict:
    accuracy: float
    skipped: str | None = None  # why the answer was refused without judging (safety guard)


def check_ground_truth(answer: str, guards: bool = True) -> None:
    """Raise GroundTruthError when `answer` cannot serve as a ground truth."""
    if not isinstance(answer, str) or not answer.strip():
        raise GroundTruthError(f"ground truth {answer!r} is empty or not a string")
    if gold_letter(answer) is not None:
        return
    reason = unsafe_reason(answer) if guards else None
    if reason is not None:
        raise GroundTruthError(f"ground truth {answer[:80]!r} refused: {reason}")
    parse_gold(answer)


@lru_cache(maxsize=16384)
def _equal(prediction: str, answer: str) -> bool:
    """Cached verdict: the samples of a GRPO group often repeat the same final answer."""
    letter = gold_letter(answer)
    if letter is not None:
        return choice_correct(prediction, letter)
    return math_equal(prediction, answer)


def judge(completion: str, answer: str, guards: bool = True,
          answer_source: str = "answer_tag") -> Verdict:
    """Accuracy of one completion. Raises GroundTruthError for an unusable ground truth.
    `answer_source`: where the answer is read (extract.extract_answer).

    `guards=False` skips the safety pre-checks (guard.py), leaving only the caller's time limit:
    for measuring that limit, never for training."""
    check_ground_truth(answer, guards)
    prediction = extract_answer(completion, answer_source)
    if prediction is None or not prediction.strip():
        return Verdict(0.0)
    reason = unsafe_reason(prediction) if guards else None
    if reason is not None:
        return Verdict(0.0, reason)
    return Verdict(1.0 if _equal(prediction.strip(), answer) else 0.0)


def accuracy_reward(completion: str, answer: str) -> float:
    """1.0 when the completion's answer equals `answer`, else 0.0 (GroundTruthError on bad gold)."""
    return judge(completion, answer).accuracy
