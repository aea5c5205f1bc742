"""Untrusted model output: adversarial inputs finish in time with accuracy 0, nothing is executed,
and property-based tests throw random text at every entry point."""

import time
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eureka_jax.rewards import RewardConfig, extract_answer, format_reward, judge, score_batch
from eureka_jax.rewards.choice import chosen_letters
from eureka_jax.rewards.compose import score_item
from eureka_jax.rewards.timer import ItemTimeout, time_limit

GOOD = "<think>because</think><answer>{}</answer>"
LIMIT = 2.0
# How far past the limit an item may finish: the alarm repeats every 50 ms (rewards/timer.py) but
# cannot interrupt a C call in progress. Seen on a 2-core machine at load 5: "slow expansion"
# 0.75 s past the limit, two of its alarms swallowed by finalisers. The bound is on this
# process's CPU time, not on wall time: in a CI run with the cores oversubscribed "slow
# expansion" (1.5 s of CPU when left alone) took 3.45 s of wall time against the 2 s limit, the
# process waiting for a core, not computing. An item the timer failed to stop would keep
# burning CPU and fail the bound either way.
OVERRUN_S = 1.0

ADVERSARIAL = {
    "power tower": GOOD.format("$9^{9^{9^{9}}}$"),
    "plain power tower": GOOD.format("9^9^9^9"),
    "python power": GOOD.format("9**9**9**9"),
    "huge power": GOOD.format("10^{1000000000}"),
    "huge factorial": GOOD.format("100000000!"),
    "nested braces": GOOD.format("{" * 5000 + "5" + "}" * 5000),
    "nested frac": GOOD.format("\\frac{1}{" * 3000 + "5" + "}" * 3000),
    "nested parentheses": GOOD.format("(" * 5000 + "5" + ")" * 5000),
    "boxed bomb": "\\boxed{" * 100_000 + "5",
    "megabyte completion": "<think>" + "5" * 1_000_000 + "</think><answer>\\boxed{6}</answer>",
    "megabyte unclosed": "<think>" + "{" * 1_000_000 + "<answer>\\boxed{" + "5" * 1_000_000,
    "megabyte answer": GOOD.format("5+" * 500_000 + "5"),
    "NUL bytes": GOOD.format("5\x00\x00"),
    "invalid UTF-8": GOOD.format("\udcff\udcfe5\ud800"),
    "long sum": GOOD.format("1+" * 400 + "1"),
    "slow expansion": GOOD.format("(x+y+z)^{40}"),
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_completion_scores_zero_in_time(name):
    config = RewardConfig(num_workers=0, timeout_s=LIMIT)
    start = time.process_time()
    [result] = score_batch([ADVERSARIAL[name]], ["5"], config=config)
    assert time.process_time() - start < LIMIT + OVERRUN_S
    assert result.accuracy == 0.0


def test_code_in_a_completion_is_never_run(tmp_path):
    marker = tmp_path / "created"
    attempts = [
        f"__import__('os').system('touch {marker}')",
        f"open('{marker}', 'w').write('1')",
        f"exec(\"open('{marker}', 'w')\")",
        f"eval(\"__import__('pathlib').Path('{marker}').touch()\")",
        f"$\\text{{{marker}}}$ = __import__('os').system('touch {marker}')",
        "import os; os.system('touch " + str(marker) + "')",
    ]
    for code in attempts:
        for completion in (GOOD.format(code), f"```python\n{code}\n```\n\\boxed{{{code}}}"):
            for gold in ("5", "x", "A"):
                with time_limit(LIMIT):
                    assert judge(completion, gold).accuracy == 0.0
    assert not marker.exists()


# ---- properties on random text ------------------------------------------------------------------

ANY_TEXT = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=300)
MATHY = st.text(
    st.sampled_from(list("0123456789+-*/^_=.,()[]{}$ \\xyabcABpfracsqrtboxedinftypi%°<>")),
    max_size=60,
)
GOLDS = st.sampled_from(["5", "-3", "\\frac{1}{2}", "2\\sqrt{3}", "[1, 2)", "\\{1, 2\\}",
                         "y = 2x + 1", "B", "x^2 + 1", "50\\%"])
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _score(completion, gold):
    return score_item(completion, gold, {"id": "h"}, 0, RewardConfig(num_workers=0,
                                                                      timeout_s=LIMIT), [])


@FAST
@given(ANY_TEXT, GOLDS)
def test_random_text_never_crashes(text, gold):
    for completion in (text, GOOD.format(text), f"<answer>\\boxed{{{text}}}</answer>"):
        result = _score(completion, gold)
        assert result.accuracy in (0.0, 1.0) and result.format in (0.0, 1.0)
        assert result.data_error is None and result.error is None


@FAST
@given(MATHY, GOLDS)
def test_random_latex_never_crashes_or_hangs(text, gold):
    start = time.perf_counter()
    result = _score(GOOD.format(text), gold)
    assert time.perf_counter() - start < LIMIT + OVERRUN_S
    assert result.accuracy in (0.0, 1.0) and result.format == (1.0 if text.strip() else 0.0)


@FAST
@given(st.text(max_size=50), st.text(max_size=50))
def test_format_reward_matches_its_definition(think, answer):
    completion = f"<think>{think}</think>\n<answer>{answer}</answer>"
    clean = not any(tag in think + answer for tag in ("<think>", "</think>", "<answer>",
                                                      "</answer>"))
    expected = clean and bool(think.strip()) and bool(answer.strip())
    assert format_reward(completion) == float(expected)
    assert format_reward("x" + completion) == 0.0


@FAST
@given(st.text(max_size=80).filter(lambda t: "<" not in t and "box" not in t))
def test_answer_block_is_extracted_verbatim(text):
    assert extract_answer(f"<think>t</think><answer>{text}</answer>") == text


@FAST
@given(st.sampled_from("ABCDE"), st.sampled_from(["{}", "({})", "\\boxed{{{}}}", "{}. 12 cm",
                                                     "Option {}", "The answer is ({})."]))
def test_any_single_option_dress_is_read(letter, dress):
    assert chosen_letters(dress.format(letter)) == {letter}


@FAST
@given(st.integers(-10**9, 10**9), st.integers(-10**9, 10**9))
def test_integers_thousands_separators_and_sign_errors(a, b):
    gold = str(a)
    assert judge(GOOD.format(f"{a:,}"), gold).accuracy == 1.0
    assert judge(GOOD.format(str(b)), gold).accuracy == float(a == b)
    if a:
        assert judge(GOOD.format(str(-a)), gold).accuracy == 0.0


@FAST
@given(st.fractions(min_value=-100, max_value=100, max_denominator=50))
def test_fractions_against_their_decimals(value):
    gold = f"\\frac{{{value.numerator}}}{{{value.denominator}}}"
    assert judge(GOOD.format(f"{value.numerator}/{value.denominator}"), gold).accuracy == 1.0
    rounded = round(float(value), 2)
    close = abs(Fraction(str(rounded)) - value) < Fraction(1, 10**6)
    assert judge(GOOD.format(str(rounded)), gold).accuracy == float(close)


def test_time_limit_is_a_base_exception():
    """math-verify and sympy catch Exception broadly; the timeout must get past them."""
    assert not issubclass(ItemTimeout, Exception)
