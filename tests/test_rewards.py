"""Reward building blocks: extraction, choice letters, guards, fast paths, composition, config."""

import math
import time
from fractions import Fraction

import pytest

from eureka_jax.errors import InputError
from eureka_jax.rewards import (
    RewardConfig,
    extract_answer,
    format_reward,
    overlong_penalty,
    score_batch,
    summarize,
)
from eureka_jax.rewards.choice import chosen_letters, gold_letter
from eureka_jax.rewards.extract import boxed_contents
from eureka_jax.rewards.fast import fast_verdict, interval, linear_form, plain_number
from eureka_jax.rewards.guard import unsafe_reason
from eureka_jax.rewards.inequality import as_intervals
from eureka_jax.rewards.timer import ItemTimeout, time_limit

GOOD = "<think>because</think><answer>{}</answer>"
LOCAL = RewardConfig(num_workers=0)


# ---- user reward functions used below (importable by path) ------------------------------------


def length_bonus(completions, answers, **fields):
    return [min(1.0, len(c) / 1000) for c in completions]


def echo_field(completions, answers, *, difficulty, **fields):
    return [float(d) for d in difficulty]


def out_of_range(completions, answers, **fields):
    return [5.0 for _ in completions]


def raises(completions, answers, **fields):
    raise RuntimeError("boom")


# ---- extraction -------------------------------------------------------------------------------


def test_extract_prefers_first_answer_block_and_its_box():
    assert extract_answer("<answer>1</answer><answer>2</answer>") == "1"
    assert extract_answer("\\boxed{9} <answer>x \\boxed{3}</answer>") == "3"
    assert extract_answer("<answer>\\boxed{3} or \\boxed{4}</answer>") == "3, 4"
    assert extract_answer("<answer>\\boxed{3} and again \\boxed{3}</answer>") == "3"
    assert extract_answer("a \\boxed{1} b \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_answer("nothing here") is None


def test_boxed_handles_escapes_and_unclosed():
    assert boxed_contents("\\boxed{\\{1,2\\}}") == ["\\{1,2\\}"]
    assert boxed_contents("\\boxed{1} \\boxed{2") == ["1"]
    assert boxed_contents("\\boxed{\\boxed{4}}") == ["\\boxed{4}"]


def test_extraction_is_linear_on_brace_bombs():
    bomb = "\\boxed{" * 200_000 + "<answer>" + "{" * 200_000
    start = time.perf_counter()
    assert extract_answer(bomb) is None
    assert time.perf_counter() - start < 2.0


# ---- format -----------------------------------------------------------------------------------


def test_format_reward_basic():
    assert format_reward("<think>a</think> \n<answer>b</answer>") == 1.0
    assert format_reward("<think>a</think><answer>b</answer>x") == 0.0
    assert format_reward("<think> </think><answer>b</answer>") == 0.0


# ---- multiple choice --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,letters",
    [("B", {"B"}), ("(b)", {"B"}), ("Option C", {"C"}), ("D. 4 cm", {"D"}), ("A or B", {"A", "B"}),
     ("AB", {"A", "B"}), ("(A)(B)", {"A", "B"}), ("A、B", {"A", "B"}), ("12", set()),
     ("A triangle", set()), ("so the answer is (C)", {"C"})],
)
def test_chosen_letters(text, letters):
    assert chosen_letters(text) == letters


def test_gold_letter_only_for_option_letters():
    assert gold_letter("C") == "C"
    assert gold_letter("(c)") == "C"
    assert gold_letter("x") is None  # a variable
    assert gold_letter("12") is None


# ---- guards -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["9^{9^{9^{9}}}", "9^9^9^9", "9**9**9", "2^2^2^100", "99^{99999}", "100000!",
             "(10^{8})!", "\\left(10^{9}\\right)!", "\\binom{10^{8}}{10^{7}}",
             "{" * 7 + "1" + "}" * 7, "x" * 1001, "5\x00"],
)
def test_guard_refuses_explosive_answers(text):
    assert unsafe_reason(text) is not None


@pytest.mark.parametrize(
    "text", ["2^{10}", "2^{3^{4}}", "e^{x^2}", "x^{100000}", "10^{100000}", "1000!", "(n+1)!",
             "\\binom{5}{2}",
             "\\left(\\frac{\\sqrt{3}}{2}, \\frac{1}{2}\\right)", "10^{-5}"],
)
def test_guard_accepts_real_answers(text):
    assert unsafe_reason(text) is None


# ---- fast paths -------------------------------------------------------------------------------


def test_plain_numbers_interval_linear_forms():
    assert plain_number("-\\frac{3}{4}").value == Fraction(-3, 4)
    assert plain_number("2.50").inexact
    assert plain_number("\\frac{1}{0}") is None
    assert interval("(-\\infty, 3]").left_open
    assert interval("[5, 3]") is None  # sympy makes it empty: leave it to math-verify
    assert linear_form("3x - \\frac{1}{2}y + 4") == {"x": 3, "y": Fraction(-1, 2), "": 4}
    assert linear_form("2^x") is None
    assert linear_form("xy") is None


@pytest.mark.parametrize("text, intervals", [
    ("x<2", ("(-\\infty, 2)", "x")),
    ("2 \\geq x", ("(-\\infty, 2]", "x")),
    ("x\\geqslant-1", ("[-1, \\infty)", "x")),
    ("-1 < x \\leq 3", ("(-1, 3]", "x")),
    ("3 \\ge t > 1", ("(1, 3]", "t")),
    ("x \\le \\frac{\\pi}{2}", ("(-\\infty, \\frac{\\pi}{2}]", "x")),
    ("x < 1 \\quad \\text{or} \\quad x \\ge 3", ("(-\\infty, 1) \\cup [3, \\infty)", "x")),
    ("\\left\\{x \\mid x > 0\\right\\}", ("(0, \\infty)", "x")),
])
def test_inequalities_become_intervals(text, intervals):
    assert as_intervals(text) == intervals


@pytest.mark.parametrize("text", [
    "(1, 3)", "x = 2", "x \\neq 2", "x < y", "2x < 4", "x < 2x - 1", "1 < x > 3", "e < 3",
    "x > 1 \\text{ and } x < 3", "x < 1, x > 3", "x < 1 \\text{ or } y > 3", "x < \\max(1, 2)",
    "\\{y \\mid x < 2\\}", "x < 1 < 2 < 3",
])
def test_other_relations_are_left_alone(text):
    assert as_intervals(text) is None


def test_fast_verdict_leaves_the_rounding_band_to_math_verify():
    assert fast_verdict("\\frac{1}{3}", "0.3333333") is None
    assert fast_verdict("\\frac{1}{3}", "0.33") is False
    assert fast_verdict("x = 5", "y = 5") is None
    assert fast_verdict("2y = 4x + 2", "y = 2x + 1") is None


# ---- time limit -------------------------------------------------------------------------------


def test_time_limit_interrupts_python_code():
    start = time.perf_counter()
    with pytest.raises(ItemTimeout), time_limit(0.2):
        while True:
            pass
    assert time.perf_counter() - start < 1.0


# The finaliser's swallowed ItemTimeout is the point of the test, not a problem to report.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_time_limit_survives_a_swallowed_alarm():
    """Python drops an exception raised inside a finaliser; the alarm repeats until the body
    stops (regex objects finalised during scoring once swallowed a limit for 3.7 s)."""

    class Finalised:
        def __del__(self):
            deadline = time.perf_counter() + 0.4  # the limit expires in here and is dropped
            while time.perf_counter() < deadline:
                pass

    start = time.perf_counter()
    with pytest.raises(ItemTimeout), time_limit(0.2):
        Finalised()  # finalised at once: the first alarm goes off inside __del__
        while time.perf_counter() - start < 3.0:  # a lost alarm: DID NOT RAISE after 3 s
            pass
    assert time.perf_counter() - start < 1.0


def test_slow_item_times_out_in_process():
    config = RewardConfig(num_workers=0, timeout_s=0.5)
    start = time.process_time()  # CPU time: wall time is at the mercy of a loaded machine
    [result] = score_batch([GOOD.format("(x+y+z)^{40}")], ["5"], config=config)
    assert time.process_time() - start < 1.5  # 1.5 s of CPU when left to finish
    assert result.timed_out and result.accuracy == 0.0 and result.format == 1.0
    assert result.reward == 0.5


# ---- composition ------------------------------------------------------------------------------


def test_default_weights_are_mm_eureka():
    right, wrong, unformatted = score_batch(
        [GOOD.format("5"), GOOD.format("6"), "\\boxed{5}"], ["5", "5", "5"], config=LOCAL
    )
    assert (right.reward, right.accuracy, right.format) == (1.5, 1.0, 1.0)
    assert (wrong.reward, wrong.accuracy, wrong.format) == (0.5, 0.0, 1.0)
    assert (unformatted.reward, unformatted.format) == (1.0, 0.0)


def test_custom_weights():
    config = RewardConfig(num_workers=0, accuracy_weight=2.0, format_weight=0.0)
    [result] = score_batch([GOOD.format("5")], ["5"], config=config)
    assert result.reward == 2.0


def test_overlong_ramp_is_dapo():
    config = RewardConfig(num_workers=0, overlong="ramp", max_length=100, overlong_buffer=20)
    assert overlong_penalty(80, config) == 0.0
    assert overlong_penalty(90, config) == pytest.approx(-0.5)
    assert overlong_penalty(100, config) == -1.0
    results = score_batch([GOOD.format("5")] * 2, ["5"] * 2, config=config, lengths=[10, 95])
    assert [r.reward for r in results] == [1.5, pytest.approx(1.5 - 0.75)]
    assert results[1].components["overlong"] == pytest.approx(-0.75)


def test_overlong_truncated_is_length_independent():
    config = RewardConfig(
        num_workers=0, overlong="truncated", max_length=100, overlong_penalty=0.5
    )
    assert [overlong_penalty(n, config) for n in (1, 99, 100)] == [0.0, 0.0, -0.5]
    with pytest.raises(InputError, match="lengths"):
        score_batch([GOOD.format("5")], ["5"], config=config)


def test_user_functions_by_import_path():
    config = RewardConfig(
        num_workers=0,
        user_functions=(("test_rewards:length_bonus", 0.5), ("test_rewards:echo_field", 1.0)),
    )
    completion = GOOD.format("5")
    [result] = score_batch([completion], ["5"], [{"difficulty": 0.25, "id": "r1"}], config)
    bonus = len(completion) / 1000
    assert result.components["test_rewards:length_bonus"] == pytest.approx(bonus)
    assert result.reward == pytest.approx(1.5 + 0.5 * bonus + 0.25)


@pytest.mark.parametrize("function", ["test_rewards:out_of_range", "test_rewards:raises"])
def test_misbehaving_user_function_is_an_input_error(function):
    config = RewardConfig(num_workers=0, user_functions=((function, 1.0),))
    with pytest.raises(InputError, match=function):
        score_batch([GOOD.format("5")], ["5"], config=config)


@pytest.mark.parametrize(
    "kwargs",
    [{"overlong": "sometimes"}, {"overlong": "ramp"}, {"overlong": "ramp", "max_length": 10},
     {"timeout_s": 0}, {"num_workers": -1}, {"accuracy_weight": math.nan},
     {"user_functions": (("no_colon", 1.0),)}],
)
def test_config_validation(kwargs):
    with pytest.raises(InputError):
        RewardConfig(**kwargs)


def test_config_from_mapping():
    config = RewardConfig.from_mapping(
        {"format_weight": 0.0, "user_functions": ["test_rewards:length_bonus=0.25"]}
    )
    assert config.user_functions == (("test_rewards:length_bonus", 0.25),)
    with pytest.raises(InputError, match="unknown reward settings"):
        RewardConfig.from_mapping({"acc_weight": 1.0})
    with pytest.raises(InputError, match="cannot be imported"):
        score_batch(["x"], ["1"], config=RewardConfig(num_workers=0, user_functions=(("no:f", 1),)))


def test_data_error_names_the_record_and_is_counted():
    results = score_batch(
        [GOOD.format("5"), GOOD.format("5")], ["???", "5"], [{"id": "q17"}, {"id": "q18"}], LOCAL
    )
    assert "q17" in results[0].data_error and results[0].accuracy == 0.0
    assert results[1].data_error is None
    summary = summarize(results)
    assert summary["data_errors"] == 1 and summary["count"] == 2


def test_batch_input_validation():
    with pytest.raises(InputError, match="answers"):
        score_batch(["a", "b"], ["1"], config=LOCAL)
    with pytest.raises(InputError, match="completion 0"):
        score_batch([None], ["1"], config=LOCAL)
    [result] = score_batch([GOOD.format("7")], [7], config=LOCAL)  # numeric gold is fine
    assert result.accuracy == 1.0


def test_last_boxed_answer_source_reads_only_the_last_box():
    from eureka_jax.rewards.accuracy import judge
    from eureka_jax.rewards.compose import RewardConfig

    completion = "<answer>\\boxed{5}</answer> so the final answer is \\boxed{7}"
    assert judge(completion, "5").accuracy == 1.0  # MM-Eureka: the first answer block
    assert judge(completion, "5", answer_source="last_boxed").accuracy == 0.0
    assert judge(completion, "7", answer_source="last_boxed").accuracy == 1.0
    # A base model's plain answer without a box scores 0 under the pretrain reward.
    assert judge("<answer>7</answer>", "7", answer_source="last_boxed").accuracy == 0.0
    with pytest.raises(InputError, match="rewards.answer_source"):
        RewardConfig(answer_source="first_line")
