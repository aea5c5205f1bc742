"""Format reward (range {0, 1}): MM-Eureka's <think>...</think><answer>...</answer> layout."""

from __future__ import annotations

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def format_reward(completion: str) -> float:
    """1.0 when the completion is exactly one non-empty <think>...</think> followed, after optional
    whitespace, by exactly one non-empty <answer>...</answer>; surrounding whitespace is allowed,
    any other text before, between or after the blocks is not. Else 0.0."""
    text = completion.strip()
    if any(text.count(tag) != 1 for tag in _TAGS):
        return 0.0
    if not (text.startswith("<think>") and text.endswith("</answer>")):
        return 0.0
    think_end = text.index("</think>")
    answer_start = text.index("<answer>")
    if answer_start < think_end or text[think_end + len("</think>") : answer_start].strip():
        return 0.0
    think = text[len("<think>") : think_end]
    answer = text[answer_start + len("<answer>") : -len("</answer>")]
    return 1.0 if think.strip() and answer.strip() else 0.0
