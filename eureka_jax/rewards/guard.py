"""Cheap pre-checks that refuse answers known to stall the LaTeX parser or sympy.

math-verify's parser is exponential in bracket nesting (12 nested braces take seconds) and sympy
will happily try to expand 9^{9^{9^9}} in C code that no signal can interrupt. These checks run in
linear time and refuse such answers up front (accuracy 0, reason recorded) so that the per-item
time limit, which stays the backstop, is rarely needed. Limits are far above real answers.
"""

from __future__ import annotations

import math
import re

MAX_ANSWER_CHARS = 1000  # an answer block longer than this is an essay, not an answer
MAX_NESTING = 6  # brackets of all kinds; real answers rarely exceed 4 (depth 8 costs ~1 s)
MAX_POWER_DIGITS = 100_000  # decimal digits of base**exponent when both are integer literals
MAX_FACTORIAL = 10_000

_OPEN, _CLOSE = "({[", ")}]"
_INT = re.compile(r"\d+")
_FACTORIAL = re.compile(r"(\d+)\s*!")
_GROUP_FACTORIAL = re.compile(r"[)}\]]\s*!")
_BINOMIAL = re.compile(r"\\[dt]?binom\s*\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")
_POWER_OP = re.compile(r"\s*(?:\^|\*\*)")
_LETTER = re.compile(r"[A-Za-z]")
_COMMAND = re.compile(r"\\[A-Za-z]+")
_BASE = re.compile(r"(\d+)\D{0,2}$")
_PLAIN_TOWER = re.compile(r"[\d\s{}^*]+")
_TOKEN = re.compile(r"-?\d+(?:\.\d+)?|\\?[A-Za-z]+|.", re.DOTALL)


def _nesting(text: str) -> int:
    depth = deepest = 0
    for c in text:
        if c in _OPEN:
            depth += 1
            deepest = max(deepest, depth)
        elif c in _CLOSE:
            depth = max(depth - 1, 0)
    return deepest


def _group_end(text: str, start: int) -> int:
    """Index just past the exponent that starts at `start`: a bracketed group or a single token."""
    n = len(text)
    while start < n and text[start] == " ":
        start += 1
    if start >= n:
        return n
    if text[start] in _OPEN:
        depth = 0
        for i in range(start, n):
            if text[i] in _OPEN:
                depth += 1
            elif text[i] in _CLOSE:
                depth -= 1
                if depth == 0:
                    return i + 1
        return n
    m = _TOKEN.match(text, start)
    return m.end() if m else start + 1


def _group_start(text: str, close: int) -> int:
    """Index of the bracket that opens the group closed at `close`."""
    depth = 0
    for i in range(close, -1, -1):
        if text[i] in _CLOSE:
            depth += 1
        elif text[i] in _OPEN:
            depth -= 1
            if depth == 0:
                return i
    return 0


def _huge_numeric(text: str) -> bool:
    """A numeric (letter-free) expression with a power in it or an integer above MAX_FACTORIAL."""
    if _LETTER.search(_COMMAND.sub("", text)):
        return False
    return "^" in text or any(len(n) > 6 or int(n) > MAX_FACTORIAL for n in _INT.findall(text))


def _tower_digits(numbers: list[str]) -> float:
    """Decimal digits of n0 ** n1 ** n2 ... (right-associative); inf when beyond the limit."""
    if any(len(n) > 20 for n in numbers):
        return math.inf
    value = int(numbers[-1])
    for base in reversed(numbers[:-1]):
        if value > MAX_POWER_DIGITS * 4 or value * math.log10(max(int(base), 2)) > MAX_POWER_DIGITS:
            return math.inf
        value = int(base) ** value
    return math.log10(max(value, 1))


def _power_problem(text: str) -> str | None:
    for m in _POWER_OP.finditer(text):
        end = _group_end(text, m.end())
        exponent = text[m.end() : end]
        chained = _POWER_OP.match(text, end)
        if "^" in exponent or "**" in exponent or chained:
            # A numeric tower can explode; a symbolic one (e^{x^2}) is just an expression.
            tower = exponent + (text[end : _group_end(text, chained.end())] if chained else "")
            if _LETTER.search(_COMMAND.sub("", tower)):
                continue
            base = _BASE.search(text, 0, m.start())
            numbers = ([base.group(1)] if base else []) + _INT.findall(tower)
            if _PLAIN_TOWER.fullmatch(tower) and _tower_digits(numbers) <= MAX_POWER_DIGITS:
                continue  # 2^{3^{4}} is fine
            return "numeric power tower"
        digits = _INT.findall(exponent)
        if len(digits) != 1 or _LETTER.search(_COMMAND.sub("", exponent)):
            continue
        base = _BASE.search(text, 0, m.start())
        if base is None:
            continue  # a symbolic base (x^{100000}) stays symbolic
        base_digits = math.log10(max(int(base.group(1)), 2)) if len(base.group(1)) < 50 else 50
        exp_value = int(digits[0]) if len(digits[0]) < 20 else 10**20
        if exp_value * base_digits > MAX_POWER_DIGITS:
            return "power too large to evaluate"
    return None


def unsafe_reason(text: str) -> str | None:
    """Why `text` must not reach the math parser, or None when it is safe to parse."""
    if len(text) > MAX_ANSWER_CHARS:
        return f"answer longer than {MAX_ANSWER_CHARS} characters"
    if "\x00" in text:
        return "NUL byte in answer"
    if _nesting(text) > MAX_NESTING:
        return f"brackets nested deeper than {MAX_NESTING}"
    for m in _FACTORIAL.finditer(text):
        if len(m.group(1)) > 6 or int(m.group(1)) > MAX_FACTORIAL:
            return "factorial too large to evaluate"
    for m in _GROUP_FACTORIAL.finditer(text):
        if _huge_numeric(text[_group_start(text, m.start()) : m.start() + 1]):
            return "factorial too large to evaluate"
    for m in _BINOMIAL.finditer(text):
        if _huge_numeric(m.group(1)):
            return "binomial too large to evaluate"
    return _power_problem(text)
