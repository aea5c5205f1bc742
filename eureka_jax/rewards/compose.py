"""Reward composition: weights, overlong shaping, user reward functions, and scoring one item.

reward = accuracy_weight * accuracy + format_weight * format + overlong + sum(w_i * user_i)

with accuracy, format in {0, 1} (accuracy.py, format.py) and overlong <= 0 (see `overlong_penalty`).
Defaults are MM-Eureka's: accuracy 1.0, format 0.5, no overlong shaping, no user functions.

User reward functions are named by import path "package.module:function" and called as

    function(completions: list[str], answers: list[str], **fields: list) -> list[float]

where `fields` are the record's other fields (id, question, ...), one list entry per completion.
Each value must be a finite float in [-1, 1] (scale it with the weight); anything else, or an
exception, is an error in the user function and stops the batch with an InputError that names it.
The functions run inside the reward workers, one item at a time (lists of length 1), under the same
per-item time limit as the built-in rewards.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

from eureka_jax.errors import InputError
from eureka_jax.rewards.accuracy import judge
from eureka_jax.rewards.extract import ANSWER_SOURCES
from eureka_jax.rewards.format import format_reward
from eureka_jax.rewards.math_equal import GroundTruthError
from eureka_jax.rewards.timer import ItemTimeout, time_limit

OVERLONG_MODES = ("none", "ramp", "truncated")
UserFunction = Callable[..., list[float]]


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """How completions are scored. Validated on construction.

    overlong: "none"; "ramp" (DAPO soft overlong punishment: 0 up to max_length - overlong_buffer
      tokens, then linear down to -overlong_penalty at max_length); "truncated" (length-independent:
      -overlong_penalty for every response that reached max_length, i.e. was cut off).
    user_functions: (("package.module:function", weight), ...); see the module docstring.
    timeout_s: wall-time limit per item; an item over it scores accuracy 0 and is counted.
    num_workers: reward worker processes; 0 scores in the calling process (tests, debugging: a
      hang in C code cannot be interrupted there).
    guards: refuse explosive answers (power towers, deep nesting; guard.py) before parsing. Off
      only to measure the time limit on its own (benchmarks/rewards.py); never for training.
    answer_source: "answer_tag" (the first <answer> block, else the last \\boxed{}: MM-Eureka)
      or "last_boxed" (only the last \\boxed{}: MM-Eureka-Zero's "pretrain" reward).
    """

    accuracy_weight: float = 1.0
    format_weight: float = 0.5
    overlong: str = "none"
    max_length: int | None = None
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    user_functions: tuple[tuple[str, float], ...] = ()
    timeout_s: float = 3.0
    num_workers: int = dataclasses.field(default_factory=_default_workers)
    guards: bool = True
    answer_source: str = "answer_tag"

    def __post_init__(self):
        # Named as the training config names them (config.rewards; eureka-jax score --config).
        for name in ("accuracy_weight", "format_weight", "overlong_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise InputError(f"rewards.{name} must be a finite number "
                                 f"(got {getattr(self, name)!r})")
        if self.overlong not in OVERLONG_MODES:
            raise InputError(f"rewards.overlong must be one of {OVERLONG_MODES} "
                             f"(got {self.overlong!r})")
        if self.overlong != "none" and not (self.max_length and self.max_length > 0):
            raise InputError("rewards.overlong needs max_length (the response token limit)")
        if self.overlong == "ramp" and not 0 < self.overlong_buffer < self.max_length:
            raise InputError(f"rewards.overlong='ramp' needs 0 < rewards.overlong_buffer < "
                             f"max_length={self.max_length} (got {self.overlong_buffer})")
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise InputError(f"rewards.timeout_s must be a positive number of seconds "
                             f"(got {self.timeout_s!r})")
        if self.answer_source not in ANSWER_SOURCES:
            raise InputError(f"rewards.answer_source must be one of {ANSWER_SOURCES} "
                             f"(got {self.answer_source!r})")
        if self.num_workers < 0:
            raise InputError(f"rewards.num_workers must be >= 0 (got {self.num_workers}; 0: "
                             "score in-process)")
        pairs = tuple((str(path), float(weight)) for path, weight in self.user_functions)
        for path, weight in pairs:
            if path.count(":") != 1 or not all(path.split(":")) or not math.isfinite(weight):
                raise InputError(
                    f"user reward {path!r}: expected ('package.module:function', finite weight)"
                )
        object.__setattr__(self, "user_functions", pairs)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RewardConfig:
        """Build from a dict (config files, CLI); unknown keys are an InputError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown reward settings {unknown}; known: {sorted(known)}")
        values = dict(values)
        if "user_functions" in values:
            values["user_functions"] = tuple(_user_pair(u) for u in values["user_functions"])
        return cls(**values)


def _user_pair(spec) -> tuple[str, float]:
    """'mod:fn' (weight 1), 'mod:fn=0.5', or a (path, weight) pair."""
    if isinstance(spec, str):
        path, _, weight = spec.partition("=")
        try:
            return path.strip(), float(weight) if weight else 1.0
        except ValueError:
            raise InputError(f"user reward {spec!r}: weight after '=' must be a number") from None
    path, weight = spec
    return str(path), float(weight)


@dataclasses.dataclass(frozen=True)
class RewardResult:
    """The reward of one completion. `components` holds the unweighted values ("accuracy",
    "format", "overlong" and each user function's path); `reward` is their weighted sum."""

    reward: float
    accuracy: float
    format: float
    components: dict[str, float]
    timed_out: bool = False
    data_error: str | None = None  # ground truth unusable; names the record
    skipped: str | None = None  # accuracy not judged: timeout, worker crash, safety guard


@dataclasses.dataclass(frozen=True)
class ItemScore:
    """What a worker sends back for one item (before lengths and weights are applied)."""

    accuracy: float = 0.0
    format: float = 0.0
    user: tuple[float, ...] = ()
    timed_out: bool = False
    data_error: str | None = None
    skipped: str | None = None
    error: str | None = None  # a user function misbehaved


def load_user_function(path: str) -> UserFunction:
    module_name, _, attr = path.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise InputError(f"user reward {path!r} cannot be imported: {e}") from e
    if not callable(function):
        raise InputError(f"user reward {path!r} is not callable")
    return function


def load_user_functions(config: RewardConfig) -> list[UserFunction]:
    return [load_user_function(path) for path, _ in config.user_functions]


def record_label(extra: Mapping[str, Any] | None, index: int) -> str:
    if extra and extra.get("id") is not None:
        return f"record id={extra['id']!r}"
    return f"item {index}"


def _call_user(path: str, fn: UserFunction, completion: str, answer: str, extra) -> float:
    fields = {key: [value] for key, value in (extra or {}).items()}
    values = fn([completion], [answer], **fields)
    if not isinstance(values, (list, tuple)) or len(values) != 1:
        raise ValueError(f"returned {values!r:.80}; expected a list holding one float")
    value = float(values[0])
    if not (math.isfinite(value) and -1.0 <= value <= 1.0):
        raise ValueError(f"returned {value}; values must be finite and within [-1, 1]")
    return value


def score_item(
    completion: str,
    answer: str,
    extra: Mapping[str, Any] | None,
    index: int,
    config: RewardConfig,
    user_fns: list[UserFunction],
) -> ItemScore:
    """Score one item under the per-item time limit. Never raises (user-function misbehaviour is
    reported in `error`)."""
    fmt = format_reward(completion)
    accuracy, user = 0.0, []
    try:
        with time_limit(config.timeout_s):
            verdict = judge(completion, answer, config.guards, config.answer_source)
            accuracy = verdict.accuracy
            for (path, _), fn in zip(config.user_functions, user_fns, strict=True):
                try:
                    user.append(_call_user(path, fn, completion, answer, extra))
                except Exception as e:  # user code: report, don't crash the worker
                    return ItemScore(format=fmt, error=f"user reward {path!r}: {e!r}"[:500])
    except ItemTimeout:
        return ItemScore(format=fmt, timed_out=True, skipped="timeout")
    except GroundTruthError as e:
        return ItemScore(format=fmt, data_error=f"{record_label(extra, index)}: {e}")
    except Exception as e:  # a parser bug must cost one item, not the run; the reason is counted
        return ItemScore(format=fmt, skipped=f"scoring error: {e!r}"[:300])
    return ItemScore(accuracy, fmt, tuple(user), skipped=verdict.skipped)


def failed_item(completion: str, reason: str) -> ItemScore:
    """Score for an item whose worker timed out or died: format only (linear, safe here)."""
    timed_out = reason == "timeout"
    return ItemScore(format=format_reward(completion), timed_out=timed_out, skipped=reason)


def overlong_penalty(length: int | None, config: RewardConfig) -> float:
    """Length shaping (<= 0) for a response of `length` tokens; see RewardConfig.overlong."""
    if config.overlong == "none":
        return 0.0
    if length is None:
        raise InputError(f"overlong={config.overlong!r} needs response lengths")
    if config.overlong == "truncated":
        return -config.overlong_penalty if length >= config.max_length else 0.0
    start = config.max_length - config.overlong_buffer
    if length <= start:
        return 0.0
    return -config.overlong_penalty * min(1.0, (length - start) / config.overlong_buffer)


def combine(item: ItemScore, length: int | None, config: RewardConfig) -> RewardResult:
    """Apply weights and overlong shaping to a worker's ItemScore."""
    user = item.user or (0.0,) * len(config.user_functions)
    components = {"accuracy": item.accuracy, "format": item.format}
    components["overlong"] = overlong_penalty(length, config)
    reward = (
        config.accuracy_weight * item.accuracy
        + config.format_weight * item.format
        + components["overlong"]
    )
    for (path, weight), value in zip(config.user_functions, user, strict=True):
        components[path] = value
        reward += weight * value
    return RewardResult(
        reward=reward,
        accuracy=item.accuracy,
        format=item.format,
        components=components,
        timed_out=item.timed_out,
        data_error=item.data_error,
        skipped=item.skipped,
    )
