"""The answer a completion commits to: its first complete <answer> block, else its last \\boxed{}.

Everything here is linear in the length of the text (one scan with a stack), so megabyte-long or
brace-bombed completions cost milliseconds, not minutes.
"""

from __future__ import annotations

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
_BOXED = ("\\boxed{", "\\boxed {", "\\fbox{")


def answer_block(completion: str) -> str | None:
    """Content of the first complete <answer>...</answer> block (the one that closes first)."""
    close = completion.find(ANSWER_CLOSE)
    if close < 0:
        return None
    start = completion.rfind(ANSWER_OPEN, 0, close)
    if start < 0:
        return None
    return completion[start + len(ANSWER_OPEN) : close]


def _closing_braces(text: str) -> dict[int, int]:
    """Index of every '{' that is closed -> index of its '}'. Escaped \\{ \\} are literal braces."""
    matches: dict[int, int] = {}
    stack: list[int] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            matches[stack.pop()] = i
        i += 1
    return matches


def boxed_contents(text: str) -> list[str]:
    """Contents of the complete, outermost \\boxed{...} (or \\fbox{...}) in `text`, in order."""
    if "box" not in text:
        return []
    closing = _closing_braces(text)
    spans = []
    for marker in _BOXED:
        pos = text.find(marker)
        while pos >= 0:
            brace = pos + len(marker) - 1
            if brace in closing:
                spans.append((pos, brace + 1, closing[brace]))
            pos = text.find(marker, pos + 1)
    spans.sort()
    contents, outer_end = [], -1
    for start, begin, end in spans:
        if start > outer_end:
            contents.append(text[begin:end])
            outer_end = end
    return contents


def last_boxed(text: str) -> str | None:
    """Content of the last complete, outermost \\boxed{...} in `text`."""
    contents = boxed_contents(text)
    return contents[-1] if contents else None


ANSWER_SOURCES = ("answer_tag", "last_boxed")


def extract_answer(completion: str, source: str = "answer_tag") -> str | None:
    """The text to judge, or None (accuracy 0).

    source "last_boxed" (MM-Eureka-Zero's "pretrain" reward, for base models that were never
    taught the tags): the content of the last complete \\boxed{} anywhere, nothing else.
    source "answer_tag" (default):
    The first complete <answer> block; inside it, its \\boxed{} content if it has one (several
    different boxed answers are joined with ", " so that hedging by boxing two candidates is judged
    as answering both). Without an answer block, the last \\boxed{} anywhere in the completion."""
    if source == "last_boxed":
        return last_boxed(completion)
    block = answer_block(completion)
    if block is not None:
        contents = list(dict.fromkeys(boxed_contents(block)))
        return ", ".join(contents) if contents else block
    return last_boxed(completion)
