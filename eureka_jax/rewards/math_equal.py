"""Mathematical equivalence of a predicted answer and the ground truth, via math-verify.

math-verify (LaTeX -> sympy through latex2sympy2_extended, then numeric, symbolic, set, interval
and relation comparison) does the heavy lifting. This module adds the normalisation users expect
and it misses: thousands separators ("1\\,234", "1{,}234"), trailing units when the gold has none
("12 cm^2", "5 \\text{meters}"), degree signs ("30°"), "and"/"or" lists, leading phrases ("The
answer is"), inequalities against intervals in either order (inequality.py rewrites an inequality
as the interval it describes; math-verify alone accepts only an inequality gold). Nothing here
evaluates text as code; math-verify's own timeouts are switched off (they use SIGALRM, which only
works in a main thread and would clobber ours) and the caller bounds the time instead (see
timer.py and pool.py).
"""

from __future__ import annotations

import cmath
import logging
import re
from dataclasses import dataclass
from functools import lru_cache

from latex2sympy2_extended.latex2sympy2 import NormalizationConfig
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from sympy import Basic, Expr, MatrixBase, Rational, UnevaluatedExpr, nan, zoo

from eureka_jax.rewards.extract import last_boxed
from eureka_jax.rewards.fast import fast_verdict
from eureka_jax.rewards.inequality import as_intervals

# math-verify warns on every call when its own timeout is disabled, which we do on purpose.
logging.getLogger("math_verify").setLevel(logging.ERROR)

# math-verify's own unit stripping drops any trailing h, t, c, d, s, m, g, l ... ("2h" -> "2"),
# turning variables into units; units are handled here instead (split_unit), so it is off.
_LATEX_CONFIG = LatexExtractionConfig(
    normalization_config=NormalizationConfig(
        basic_latex=True, units=False, malformed_operators=True, nits=True, boxed="all",
        equations=False,
    )
)
_LATEX = [_LATEX_CONFIG]
_ANYWHERE = [_LATEX_CONFIG, ExprExtractionConfig()]


class GroundTruthError(ValueError):
    """The ground-truth answer cannot be turned into a mathematical object: a data error."""


_DELIMITERS = re.compile(r"\$\$?|\\[()\[\]]")
_LEAD = re.compile(
    r"^(?:(?:so|thus|hence|therefore)\b\s*,?\s*)?(?:the\s+)?(?:final\s+)?answer\s*(?:is\b|:|：)?\s*",
    re.IGNORECASE,
)
_TRAIL_PUNCT = re.compile(r"[\s.,;。]+$")
_THOUSANDS_LATEX = re.compile(r"(?<=\d)(?:\{,\}|\\[,;!: ]|\\thinspace\s*)(?=\d{3}(?!\d))")
_THOUSANDS_PLAIN = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DEGREES = re.compile(
    r"\s*(?:\^\s*\{?\s*\\circ\s*\}?|°|\\degree\b|\\text\{\s*°\s*\}|\s*degrees?\b)"
)
_AND_OR = re.compile(
    r"\s*(?:\\q?quad\s*)?(?:\\text\{\s*(?:and|or)\s*\}|\b(?:and|or)\b)(?:\s*\\q?quad)?\s*"
)
_TEXT_WORDS = re.compile(
    r"\\(?:text|mathrm|textrm|mbox|operatorname)\s*\{\s*([A-Za-z][A-Za-z .]*)\}"
)

_UNIT_NAMES = [
    "mm", "cm", "dm", "m", "km", "nm", "in", "inch", "inches", "ft", "feet", "foot", "yd", "yard",
    "yards", "mi", "mile", "miles", "g", "kg", "mg", "lb", "lbs", "pound", "pounds", "oz", "ton",
    "tons", "tonnes", "s", "sec", "secs", "second", "seconds", "min", "mins", "minute", "minutes",
    "h", "hr", "hrs", "hour", "hours", "day", "days", "week", "weeks", "month", "months", "year",
    "years", "ml", "mL", "l", "L", "liter", "liters", "litre", "litres", "cc", "ha", "acre",
    "acres", "unit", "units", "meter", "meters", "metre", "metres", "centimeter", "centimeters",
    "centimetre", "centimetres", "millimeter", "millimeters", "kilometer", "kilometers", "gram",
    "grams", "kilogram", "kilograms", "yuan", "dollars", "dollar", "cents", "cent", "people",
    "persons", "students", "pieces", "times", "W", "kW", "V", "A", "J", "N", "Pa", "Hz", "mph",
    "kmh",
]
_UNIT = r"(?:" + "|".join(sorted(map(re.escape, _UNIT_NAMES), key=len, reverse=True)) + r")"
_POWER = r"(?:\s*(?:\^\s*\{?\s*[23]\s*\}?|²|³))?"
_TRAILING_UNIT = re.compile(
    rf"(?:(?<=[\d}})\]%])|(?<=\\pi))((?:\\[,;: ]|~|\s)*)"
    rf"((?:(?:square|sq\.?|cubic)\s+)?{_UNIT}{_POWER}(?:\s*/\s*{_UNIT}{_POWER})?)\s*$"
)
_WORD = re.compile(r"[A-Za-z]{3,}")
_MATH_WORDS = frozenset(
    [
        "sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "exp", "sqrt", "pi", "max", "min",
        "lim", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "det", "gcd", "lcm", "mod",
        "inf", "infty", "frac", "dfrac", "tfrac", "cdot", "times", "div", "left", "right", "pm",
        "mp", "leq", "geq", "neq", "le", "ge", "cup", "cap", "emptyset", "varnothing", "circ",
        "text", "mathrm", "begin", "end", "pmatrix", "bmatrix", "matrix", "vmatrix", "array",
        "sqrt", "overline", "mathbb",
    ]
)


def _unwrap_boxed(text: str) -> str:
    inner = last_boxed(text)
    return inner if inner is not None else text


def normalize(text: str) -> tuple[str, str | None]:
    """Strip the dress around an answer: delimiters, leading phrase, trailing punctuation, thousands
    separators, degree signs; an inequality becomes its interval ("x \\le 2" -> "(-\\infty, 2]",
    returned with its variable, else None); "a and b" / "a or b" become the list "a, b"."""
    text = _DELIMITERS.sub(" ", _unwrap_boxed(text)).strip()
    text = _LEAD.sub("", text, count=1)
    text = _TRAIL_PUNCT.sub("", text)
    text = _THOUSANDS_LATEX.sub("", text)
    if _THOUSANDS_PLAIN.fullmatch(text):
        text = text.replace(",", "")
    text = _DEGREES.sub("", text)
    if (intervals := as_intervals(text)) is not None:
        return intervals
    return _AND_OR.sub(", ", text).strip(), None


def split_unit(text: str) -> tuple[str, str | None]:
    """("12", "cm^2") for "12 \\text{cm}^2"; (text, None) when there is no trailing unit."""
    plain = _TEXT_WORDS.sub(r" \1", text)
    m = _TRAILING_UNIT.search(plain)
    # "2h" or "4s" are more likely a variable than hours or seconds: one-letter units need a space.
    if m is None or (len(m.group(2)) == 1 and not m.group(1)):
        return text, None
    unit = re.sub(r"[\s{}]+", "", m.group(2)).replace("²", "^2").replace("³", "^3")
    return plain[: m.start()].strip(), unit


def _is_prose(text: str) -> bool:
    without_commands = re.sub(r"\\[A-Za-z]+", " ", text)
    return any(w.lower() not in _MATH_WORDS for w in _WORD.findall(without_commands))


def _parse(original: str, normalized: str) -> list:
    """LaTeX parse of a math-looking answer; math-verify's answer search over prose otherwise."""
    if _is_prose(normalized):
        return parse(original, _ANYWHERE, parsing_timeout=None)
    return parse(f"${normalized}$", _LATEX, parsing_timeout=None)


@dataclass(frozen=True)
class Gold:
    text: str  # normalised, unit removed
    unit: str | None
    variable: str | None  # of an inequality gold, rewritten as an interval in `text`


@lru_cache(maxsize=4096)
def _parse_gold_sympy(answer: str, body: str) -> list:
    parsed = _parse(answer, body)
    objects = [p for p in parsed if isinstance(p, (Basic, MatrixBase))]
    if not objects:
        raise GroundTruthError(f"ground truth {answer[:80]!r} does not parse as mathematics")
    if any(p in (zoo, nan) for p in objects if isinstance(p, Basic)):
        raise GroundTruthError(f"ground truth {answer[:80]!r} is undefined (division by zero?)")
    return parsed


@lru_cache(maxsize=4096)
def parse_gold(answer: str) -> Gold:
    """Check and normalise a ground-truth answer (cached: a GRPO group shares it). A gold that
    fast.py cannot judge is parsed with math-verify here. Raises GroundTruthError."""
    normalized, variable = normalize(answer)
    body, unit = split_unit(normalized)
    if not body:
        raise GroundTruthError(f"ground truth {answer[:80]!r} is empty after normalisation")
    if fast_verdict(body, body) is None:  # not a shape fast.py understands: check it parses
        _parse_gold_sympy(answer, body)
    return Gold(body, unit, variable)


def math_equal(prediction: str, answer: str) -> bool:
    """True when `prediction` is mathematically equal to the ground truth `answer`."""
    gold = parse_gold(answer)
    normalized, variable = normalize(prediction)
    if variable is not None and gold.variable is not None and variable != gold.variable:
        return False  # a > 1 against x > 1: the range of another quantity
    body, unit = split_unit(normalized)
    if unit is not None and gold.unit is not None and unit != gold.unit:
        return False  # no unit conversion: 50 mm is judged different from a gold of 5 cm
    if _bodies_equal(gold, answer, body, prediction):
        return True
    # "5 m" against a gold of "5m": the letter taken for a unit may be the gold's variable.
    return unit is not None and gold.unit is None and _bodies_equal(
        gold, answer, normalized, prediction
    )


def _bodies_equal(gold: Gold, answer: str, body: str, prediction: str) -> bool:
    if not body:
        return False
    verdict = fast_verdict(gold.text, body)
    if verdict is not None:
        return verdict
    parsed = _parse(prediction, body)
    if not parsed:
        return False
    gold_parsed = _parse_gold_sympy(answer, gold.text)
    if _clearly_different(gold_parsed[0], parsed[0]):
        return False
    # allow_set_relation_comp: a relation that inequality.py leaves alone (x \\neq 2, x^2 < 4)
    # against a set gold is compared as the set it describes, as math-verify does the other way.
    return verify(gold_parsed, parsed, timeout_seconds=None, allow_set_relation_comp=True)


# Distinct, unremarkable probe values for free symbols (sorted by name).
_PROBES = tuple(Rational(p, q) for p, q in ((7, 13), (11, 17), (19, 23), (29, 31), (37, 41)))


def _clearly_different(gold: object, pred: object) -> bool:
    """A shortcut past sympy's simplify() (tens of ms) for wrong answers: two expressions that
    differ numerically at one point are not equal, so math-verify could only answer False.
    Percentages, relations, sets and matrices are left to math-verify."""
    if not (isinstance(gold, Expr) and isinstance(pred, Expr)):
        return False
    if gold.has(UnevaluatedExpr) or pred.has(UnevaluatedExpr):
        return False
    symbols = gold.free_symbols
    if symbols != pred.free_symbols or len(symbols) > len(_PROBES):
        return False
    at = dict(zip(sorted(symbols, key=str), _PROBES[: len(symbols)], strict=True))
    try:
        a, b = complex(gold.evalf(30, subs=at)), complex(pred.evalf(30, subs=at))
    except (TypeError, ValueError, ArithmeticError):
        return False
    if not all(map(cmath.isfinite, (a, b))):
        return False
    return abs(a - b) > max(1e-6, 1e-9 * max(abs(a), abs(b)))
