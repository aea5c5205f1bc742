"""Curated reward cases with their expected verdicts (tests/data/reward_cases*.jsonl).

reward_cases.jsonl: an answer text (put into a well-formed completion) against a ground truth.
reward_cases_completions.jsonl: whole completions, for extraction, format and data errors.
Each case names its category and, for the tricky ones, why the verdict is what it is.
"""

import json
from pathlib import Path
from unittest import mock

import pytest

import eureka_jax.rewards.math_equal as math_equal_module
from eureka_jax.rewards import GroundTruthError, format_reward, judge
from eureka_jax.rewards.choice import gold_letter

DATA = Path(__file__).parent / "data"


def _load(name):
    with (DATA / name).open() as f:
        return [json.loads(line) for line in f]


ANSWER_CASES = _load("reward_cases.jsonl")
COMPLETION_CASES = _load("reward_cases_completions.jsonl")


def _id(case):
    text = case.get("prediction", case.get("completion"))
    return f"{case['category']}:{case['answer']!r}~{text!r}"[:90]


def test_enough_cases_in_every_category():
    cases = ANSWER_CASES + COMPLETION_CASES
    assert len(cases) >= 150
    categories = {c["category"] for c in cases}
    assert {"number", "fraction", "percent", "radical", "interval", "set", "equation", "choice",
            "unit", "extraction", "format", "data_error"} <= categories
    wrong = [c for c in cases if c["accuracy"] == 0 and not c.get("data_error")]
    assert len(wrong) >= 50, "wrong answers that look right are half the point"


@pytest.mark.parametrize("case", ANSWER_CASES, ids=_id)
def test_answer_case(case):
    completion = f"<think>reasoning</think><answer>{case['prediction']}</answer>"
    verdict = judge(completion, case["answer"])
    assert verdict.accuracy == case["accuracy"], case.get("note", "")
    assert verdict.skipped is None


@pytest.mark.parametrize("case", COMPLETION_CASES, ids=_id)
def test_completion_case(case):
    if case.get("data_error"):
        with pytest.raises(GroundTruthError):
            judge(case["completion"], case["answer"])
    else:
        assert judge(case["completion"], case["answer"]).accuracy == case["accuracy"], case["note"]
    if "format" in case:
        assert format_reward(case["completion"]) == case["format"], case["note"]


def test_fast_paths_agree_with_math_verify():
    """fast.py claims to return math-verify's verdict whenever it returns one: check it on every
    non-choice case by rerunning with the fast path switched off."""
    cases = [c for c in ANSWER_CASES if gold_letter(c["answer"]) is None]
    fast = [math_equal_module.math_equal(c["prediction"], c["answer"]) for c in cases]
    with mock.patch.object(math_equal_module, "fast_verdict", lambda gold, pred: None):
        slow = [math_equal_module.math_equal(c["prediction"], c["answer"]) for c in cases]
    pairs = zip(cases, fast, slow, strict=True)
    assert not [(c["answer"], c["prediction"]) for c, f, s in pairs if f != s]
