"""Inequalities in one variable rewritten as interval notation: "-1 < x \\le 3" -> "(-1, 3]".

math-verify compares an inequality gold with an interval prediction (it turns the relation into a
set) but not the other way round: `verify` does that only with allow_set_relation_comp, and even
then two chains written in opposite directions ("1<x<3", "3>x>1") or a union written with "or"
("x<1 or x>3", which becomes a list of relations) are not equal. Rewriting both sides to intervals
before parsing makes every pairing an interval comparison, which fast.py decides exactly for
numeric bounds and math-verify for the others (\\sqrt{2}, \\pi).

Understood: a relation or a chain of two relations in the same direction (<, \\le, \\leq,
\\leqslant, \\lt, <=, ≤, ⩽ and their mirror images) between one variable letter and bounds that do
not contain it; unions of those joined by "or", \\text{or}, \\vee, \\lor, \\cup or 或 (all in the
same variable); the set-builder form \\{x \\mid ...\\}. Not understood (left to math-verify):
conjunctions ("x > 1 and x < 3", which the caller turns into a list), comma lists, \\neq, and
anything whose variable side is not a lone letter (2x < 4). Regular expressions only, linear in
the length of the text: nothing is evaluated.
"""

from __future__ import annotations

import re

_RELATION = re.compile(
    r"(?P<le>\\(?:leqslant|leqq|leq|le)(?![A-Za-z])|≤|⩽|<=)"
    r"|(?P<lt>\\lt(?![A-Za-z])|<)"
    r"|(?P<ge>\\(?:geqslant|geqq|geq|ge)(?![A-Za-z])|≥|⩾|>=)"
    r"|(?P<gt>\\gt(?![A-Za-z])|>)"
)
_OR = re.compile(
    r"\s*(?:\\q?quad\s*)*(?:\\(?:text|mathrm|textrm)\s*\{\s*(?:or|或)\s*\}|\bor\b|或"
    r"|\\(?:vee|lor|cup)(?![A-Za-z]))(?:\s*\\q?quad)*\s*"
)
_SET_BUILDER = re.compile(
    r"(?:\\left\s*)?\\\{\s*([A-Za-z])\s*(?:\\mid|\\vert|\||:)\s*(.+?)\s*(?:\\right\s*)?\\\}"
)
# e and i are Euler's number and the imaginary unit to the LaTeX parser, not variables.
_VARIABLE = re.compile(r"\s*([a-dfghj-zA-DF-HJ-Z])\s*")
_COMMAND = re.compile(r"\\[A-Za-z]+")
_NOT_A_BOUND = re.compile(r"[,=|;]|\\in(?![A-Za-z])|\\[{}]|\\ne(?:q)?(?![A-Za-z])")
_PAIRS = {")": "(", "]": "[", "}": "{"}


def _balanced(text: str) -> bool:
    stack = []
    for c in text:
        if c in "([{":
            stack.append(c)
        elif c in _PAIRS and (not stack or stack.pop() != _PAIRS[c]):
            return False
    return not stack


def _bound(text: str, variable: str) -> str | None:
    """`text` stripped when it can stand as an interval end for `variable`, else None."""
    text = text.strip()
    if not text or _NOT_A_BOUND.search(text) or not _balanced(text):
        return None
    if re.search(rf"(?<![A-Za-z]){variable}(?![A-Za-z])", _COMMAND.sub(" ", text)):
        return None  # x < 2x - 1 is an equation to solve, not a bound
    return text


def _kind(relation: re.Match) -> tuple[bool, bool]:
    """(points up, i.e. < or \\le; strict) of a relation token."""
    return relation.lastgroup in ("lt", "le"), relation.lastgroup in ("lt", "gt")


def _one(text: str) -> tuple[str, str] | None:
    """(interval text, variable) for one relation or chain, else None."""
    relations = list(_RELATION.finditer(text))
    if len(relations) not in (1, 2):
        return None
    edges = [0, *(edge for r in relations for edge in r.span()), len(text)]
    operands = [text[start:end] for start, end in zip(edges[::2], edges[1::2], strict=True)]
    kinds = [_kind(r) for r in relations]
    if len(relations) == 2:
        middle = _VARIABLE.fullmatch(operands[1])
        if middle is None or kinds[0][0] != kinds[1][0]:
            return None  # 1 < x > 3 says nothing about an interval
        variable = middle.group(1)
        first, last = _bound(operands[0], variable), _bound(operands[2], variable)
        if first is None or last is None:
            return None
        (up, first_strict), (_, last_strict) = kinds
        ends = (first, first_strict, last, last_strict)
        lower, lower_open, upper, upper_open = ends if up else ends[2:] + ends[:2]
    else:
        left, right = (_VARIABLE.fullmatch(o) for o in operands)
        if (left is None) == (right is None):
            return None  # x < y: no way to tell which letter is the variable
        variable = (left or right).group(1)
        bound = _bound(operands[1] if left else operands[0], variable)
        if bound is None:
            return None
        up, strict = kinds[0]
        if (up and left) or (not up and right):  # x < b, b > x
            lower, lower_open, upper, upper_open = "-\\infty", True, bound, strict
        else:  # b < x, x > b
            lower, lower_open, upper, upper_open = bound, strict, "\\infty", True
    text = f"{'(' if lower_open else '['}{lower}, {upper}{')' if upper_open else ']'}"
    return text, variable


def as_intervals(text: str) -> tuple[str, str] | None:
    """(interval text, variable) when `text` is an inequality, chain or union of them in one
    variable: ("(-\\infty, 1) \\cup [3, \\infty)", "x") for "x < 1 or x \\ge 3". Else None."""
    builder = _SET_BUILDER.fullmatch(text.strip())
    if builder is not None:
        inner = as_intervals(builder.group(2))
        return inner if inner is not None and inner[1] == builder.group(1) else None
    if _RELATION.search(text) is None:
        return None
    pieces = [_one(part) for part in _OR.split(text)]
    if None in pieces or len({variable for _, variable in pieces}) != 1:
        return None
    return " \\cup ".join(interval for interval, _ in pieces), pieces[0][1]
