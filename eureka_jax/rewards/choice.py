"""Multiple-choice answers: which option letters an answer chooses.

A gold answer that is one option letter ("B", "(B)", "\\boxed{B}", "B. 12 cm") makes the item a
multiple-choice item. The prediction is correct only when it chooses exactly one letter and that
letter is the gold one: "B", "(B)", "\\boxed{B}", "\\text{B}", "B. 12 cm", "Option B", "The answer
is (B)" all choose B; "B, C", "B and C", "BC", "(B)(C)" choose two and are wrong.
"""

from __future__ import annotations

import re

_WRAPPER = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mathit|mbox|boxed)\s*\{([^{}]*)\}")
_DELIMITERS = re.compile(r"\$|\*\*|\\[()\[\]]")
_LEAD = re.compile(
    r"^(?:(?:so|thus|hence|therefore)\s*,?\s*)?(?:the\s+)?(?:final\s+|correct\s+|best\s+)*"
    r"(?:answer|option|choice)s?(?:\s+is|\s+are)?\s*[:：]?\s*",
    re.IGNORECASE,
)
_OPTION_WORD = re.compile(r"^(?:option|choice)\s*", re.IGNORECASE)

_DRESSED = r"[(\[{]?\s*([A-Za-z])\s*[)\]}]?"
_SINGLE = re.compile(_DRESSED)
_TOKEN = r"(?:[(\[{]\s*[A-Za-z]\s*[)\]}]|[A-Za-z])"
_SEPARATOR = r"(?:\s*(?:,|、|;|/|&|\band\b|\bor\b)\s*|\s+|(?<=[)\]}])(?=[(\[{]))"
_LIST = re.compile(rf"{_TOKEN}(?:{_SEPARATOR}{_TOKEN})+")
_LIST_LETTER = re.compile(r"(?<![A-Za-z])[A-Za-z](?![A-Za-z])")
_LIST_WORDS = re.compile(r"\b(?:and|or)\b")
_CONCAT = re.compile(r"[A-Z]{2,8}")
# "B. 12 cm", "(B) 12 cm", "B) 12", "B: 12", "(b) 12"
_WITH_TEXT = re.compile(r"(?:([A-Z])\s*[.:：)]|[(\[]([A-Za-z])[)\]]\s*[.:：]?)\s*(\S.*)", re.DOTALL)
_OTHER_OPTION = re.compile(r"(?:^|[\s,;])(?:([A-Z])[.:：)]|[(\[]([A-Z])[)\]])(?=\s|$)")
_IN_PROSE = re.compile(
    r"(?i:answer|option|choice)\s*(?i:is\s*)?[:：]?\s*[(\[]?([A-Z])(?![A-Za-z])|(?:^|\s)\(([A-Z])\)"
)


def _clean(text: str) -> str:
    previous = None
    while previous != text:
        previous, text = text, _WRAPPER.sub(r"\1", text)
    text = _DELIMITERS.sub("", text).strip().rstrip(".。").strip()
    text = _LEAD.sub("", text, count=1)
    return _OPTION_WORD.sub("", text, count=1).strip()


def _first(groups: tuple[str | None, ...]) -> str:
    return next(g for g in groups if g)


def chosen_letters(text: str) -> set[str]:
    """Upper-case option letters that `text` chooses (empty when it names none)."""
    text = _clean(text)
    if m := _SINGLE.fullmatch(text):
        return {m.group(1).upper()}
    if _CONCAT.fullmatch(text):
        return set(text)
    if _LIST.fullmatch(text):
        return {c.upper() for c in _LIST_LETTER.findall(_LIST_WORDS.sub(" ", text))}
    if m := _WITH_TEXT.fullmatch(text):
        letters = {_first(m.groups()[:2]).upper()}
        letters |= {_first(o.groups()) for o in _OTHER_OPTION.finditer(m.group(3))}
        return letters
    return {_first(m.groups()).upper() for m in _IN_PROSE.finditer(text)}


def gold_letter(answer: str) -> str | None:
    """The option letter when the ground truth is a multiple-choice letter, else None.

    A bare lower-case letter ("x", "a") is a variable, not an option; "(a)" is an option."""
    text = _clean(answer)
    if re.fullmatch(r"[A-Z]", text):
        return text
    if m := re.fullmatch(r"[(\[]([A-Za-z])[)\]]", text):
        return m.group(1).upper()
    if m := _WITH_TEXT.fullmatch(text):
        return _first(m.groups()[:2]).upper()
    return None


def choice_correct(prediction: str, letter: str) -> bool:
    """True when `prediction` chooses exactly one option and it is `letter`."""
    return chosen_letters(prediction) == {letter}
