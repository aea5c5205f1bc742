"""Exact verdicts for the common answer shapes, without the LaTeX parser or sympy.

math-verify's ANTLR parser takes 15-100 ms for an interval or an equation and sympy's simplify or
solve as much again, while a rollout is mostly plain numbers, intervals and linear equations. For
those shapes this module decides in microseconds, with Python's exact Fractions, and returns the
verdict math-verify would reach; anything else, or any case where math-verify's 6-decimal float
rounding could matter, returns None and goes to math-verify. tests/test_rewards_cases.py checks
that both routes agree on every shape handled here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

_ROUNDING = Fraction(1, 10**6)  # math-verify compares floats rounded to 6 decimals
_ASSIGNMENT = re.compile(r"[A-Za-z]\s*=\s*")
_DECIMAL = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)")
_FRACTION = re.compile(
    r"(-?)(?:\\[dt]?frac\s*\{\s*(\d+)\s*\}\s*\{\s*(\d+)\s*\}|\\[dt]?frac(\d)(\d)|(\d+)\s*/\s*(\d+))"
)
_INFINITY = re.compile(r"([+-]?)\s*(?:\\infty|∞)")
_INTERVAL = re.compile(r"([\[(])\s*([^,\[\]()]+?)\s*,\s*([^,\[\]()]+?)\s*([\])])")
# One term of a linear form: sign, optional integer or \frac coefficient, optional variable.
# e, E, i, I are excluded: latex2sympy reads them as Euler's number and the imaginary unit.
_TERM = re.compile(r"([+-]?)(?:(\d+)|\\[dt]?frac\{(\d+)\}\{(\d+)\})?([a-dfghj-zA-DF-HJ-Z])?")


@dataclass(frozen=True)
class PlainNumber:
    value: Fraction
    inexact: bool  # written with a decimal point: math-verify compares it rounded


def plain_number(text: str) -> PlainNumber | None:
    """The value of an integer, decimal or integer fraction, else None."""
    text = text.strip()
    if len(text) > 40:
        return None
    if _DECIMAL.fullmatch(text):
        return PlainNumber(Fraction(text), "." in text)
    if m := _FRACTION.fullmatch(text):
        numerator, denominator = (int(g) for g in m.groups()[1:] if g is not None)
        if denominator == 0:
            return None
        sign = -1 if m.group(1) else 1
        return PlainNumber(sign * Fraction(numerator, denominator), False)
    return None


def numbers_equal(gold: PlainNumber, pred: PlainNumber) -> bool | None:
    """Certain verdict, or None inside the band where float rounding decides."""
    if gold.value == pred.value:
        return True
    if not (gold.inexact or pred.inexact) or abs(gold.value - pred.value) >= _ROUNDING:
        return False
    return None


@dataclass(frozen=True)
class Interval:
    left_open: bool
    start: PlainNumber | None  # None: -infinity
    end: PlainNumber | None  # None: +infinity
    right_open: bool


def _endpoint(text: str, sign: str) -> PlainNumber | None | bool:
    """PlainNumber, None for an infinity of the expected sign, False when not understood."""
    if m := _INFINITY.fullmatch(text):
        return None if (m.group(1) or "+") == sign else False
    return plain_number(text) or False


def interval(text: str) -> Interval | None:
    """An interval with numeric or infinite endpoints and start < end, else None."""
    m = _INTERVAL.fullmatch(text)
    if m is None:
        return None
    start, end = _endpoint(m.group(2), "-"), _endpoint(m.group(3), "+")
    if start is False or end is False:
        return None
    if start is not None and end is not None and start.value >= end.value:
        return None  # sympy turns these into empty or one-point sets
    # sympy makes an infinite end open whatever bracket was written.
    left_open, right_open = m.group(1) == "(" or start is None, m.group(4) == ")" or end is None
    return Interval(left_open, start, end, right_open)


def _intervals_equal(gold: Interval, pred: Interval) -> bool | None:
    if (gold.left_open, gold.right_open) != (pred.left_open, pred.right_open):
        return False
    verdicts = []
    for g, p in ((gold.start, pred.start), (gold.end, pred.end)):
        if g is None or p is None:
            verdicts.append(g is None and p is None)
        else:
            verdicts.append(numbers_equal(g, p))
    if False in verdicts:
        return False
    return None if None in verdicts else True


def number_set(text: str, allow_assignments: bool) -> set[Fraction] | None:
    """{1, 2} for "\\{1, 2\\}" or "1, 2" (or "x = 1, x = 2" when `allow_assignments`: math-verify
    unwraps equations in a predicted set), exact numbers only, else None."""
    braced = text.startswith("\\{") and text.endswith("\\}")
    inner = text[2:-2] if braced else text
    if not braced and "," not in inner:
        return None
    values = set()
    for part in inner.split(","):
        var, value = _assigned(part.strip())
        number = plain_number(value)
        if number is None or number.inexact or (var and not allow_assignments):
            return None
        values.add(number.value)
    return values


def linear_form(text: str) -> dict[str, Fraction] | None:
    """{variable or "": coefficient} for sums like "3x - \\frac{1}{2}y + 4", else None."""
    s = text.replace(" ", "")
    if not s or len(s) > 80:
        return None
    form: dict[str, Fraction] = {}
    pos = 0
    while pos < len(s):
        m = _TERM.match(s, pos)
        sign, integer, numerator, denominator, var = m.groups()
        if not (integer or numerator or var) or (pos > 0 and not sign):
            return None
        if denominator is not None and int(denominator) == 0:
            return None
        coefficient = Fraction(int(numerator), int(denominator)) if numerator else 1
        coefficient *= int(integer) if integer else 1
        key = var or ""
        form[key] = form.get(key, 0) + (-coefficient if sign == "-" else coefficient)
        pos = m.end()
    return {k: v for k, v in form.items() if v != 0}


def _equation(text: str) -> dict[str, Fraction] | None:
    """lhs - rhs of a linear equation "lhs = rhs" in at least one variable, else None."""
    if text.count("=") != 1 or re.search(r"[<>!\\]=|=[<>]", text):
        return None
    lhs, rhs = (linear_form(side) for side in text.split("="))
    if lhs is None or rhs is None:
        return None
    difference = dict(lhs)
    for k, v in rhs.items():
        difference[k] = difference.get(k, 0) - v
    difference = {k: v for k, v in difference.items() if v != 0}
    return difference if set(difference) - {""} else None


def _equations_equal(gold: dict, pred: dict) -> bool | None:
    if set(gold) != set(pred):
        return False  # different variables, or a constant term on one side only
    ratios = {pred[k] / gold[k] for k in gold}
    if len(ratios) > 1:
        return False  # different lines (hyperplanes): different solution sets
    return True if ratios <= {1, -1} else None  # 2y = 4x + 2: leave to math-verify's solve


def _assigned(text: str) -> tuple[str | None, str]:
    """("x", "5") for "x = 5"; (None, text) otherwise."""
    m = _ASSIGNMENT.match(text)
    return (text[0], text[m.end() :]) if m and "=" not in text[m.end() :] else (None, text)


def fast_verdict(gold: str, pred: str) -> bool | None:
    """math-verify's verdict for normalised gold and prediction texts when it is certain, else
    None (the caller then runs math-verify)."""
    (gold_var, gold_value), (pred_var, pred_value) = _assigned(gold), _assigned(pred)
    if gold_var and pred_var and gold_var != pred_var:
        return None  # x = 5 against y = 5: math-verify's relation rules decide
    g, p = plain_number(gold_value), plain_number(pred_value)
    if g is not None and p is not None:
        return numbers_equal(g, p)
    if (gi := interval(gold_value)) is not None and (pi := interval(pred_value)) is not None:
        return _intervals_equal(gi, pi)
    gs, ps = number_set(gold, False), number_set(pred, True)
    if gs is not None and ps is not None:
        return gs == ps
    if "=" in gold and "=" in pred:
        ge, pe = _equation(gold), _equation(pred)
        if ge is not None and pe is not None:
            return _equations_equal(ge, pe)
        return None
    if "=" not in gold and "=" not in pred:
        gl, pl = linear_form(gold), linear_form(pred)
        if gl is not None and pl is not None and set(gl) - {""}:
            return gl == pl
    return None
