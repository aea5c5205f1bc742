"""The reward process pool: order, per-item time limits, hung and crashed workers replaced,
asynchronous submission, adversarial inputs end to end."""

import os
import signal
import time

import pytest

from eureka_jax.errors import InputError
from eureka_jax.rewards import RewardConfig, RewardPool, score_batch, summarize

GOOD = "<think>because</think><answer>{}</answer>"
TIMEOUT = 0.5
GRACE = 1.0  # pool.GRACE_S


def misbehave(completions, answers, **fields):
    """A user reward that hangs where no signal can stop it, or kills its process, on demand."""
    if "HANG" in completions[0]:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # the soft limit cannot fire
        time.sleep(120)
    if "CRASH" in completions[0]:
        os._exit(3)
    return [0.0]


@pytest.fixture(scope="module")
def pool():
    config = RewardConfig(
        num_workers=2, timeout_s=TIMEOUT, user_functions=(("test_rewards_pool:misbehave", 1.0),)
    )
    with RewardPool(config) as p:
        yield p


def test_results_in_order(pool):
    answers = [str(i) for i in range(40)]
    completions = [GOOD.format(i if i % 3 else i + 1) for i in range(40)]
    results = pool.submit(completions, answers).result()
    assert [r.accuracy for r in results] == [0.0 if i % 3 == 0 else 1.0 for i in range(40)]


def test_hung_worker_is_killed_and_replaced(pool):
    restarts = pool.restarts
    completions = [GOOD.format("1"), GOOD.format("1") + "HANG", GOOD.format("2"), GOOD.format("1")]
    start = time.perf_counter()
    results = pool.submit(completions, ["1", "1", "1", "1"]).result(timeout=30)
    elapsed = time.perf_counter() - start
    assert [r.timed_out for r in results] == [False, True, False, False]
    assert [r.accuracy for r in results] == [1.0, 0.0, 0.0, 1.0]
    assert results[1].format == 0.0  # computed by the parent for the killed item
    assert pool.restarts == restarts + 1
    assert elapsed < TIMEOUT + GRACE + 3.0  # the limit, not the 120 s the item wanted


def test_crashed_worker_is_replaced(pool):
    restarts = pool.restarts
    completions = [GOOD.format("1") + "CRASH"] + [GOOD.format("1")] * 5
    results = pool.submit(completions, ["1"] * 6).result(timeout=30)
    assert results[0].skipped == "worker crashed" and results[0].accuracy == 0.0
    assert not results[0].timed_out
    assert all(r.accuracy == 1.0 for r in results[1:])
    assert pool.restarts == restarts + 1


def test_soft_time_limit_needs_no_restart(pool):
    restarts = pool.restarts
    results = pool.submit([GOOD.format("(x+y+z)^{40}"), GOOD.format("5")], ["5", "5"]).result()
    assert results[0].timed_out and results[0].format == 1.0
    assert results[1].accuracy == 1.0
    assert pool.restarts == restarts


def test_submit_returns_at_once_and_batches_overlap(pool):
    start = time.perf_counter()
    slow = pool.submit([GOOD.format("1") + "HANG"], ["1"])
    fast = pool.submit([GOOD.format("2")] * 3, ["2"] * 3)
    assert time.perf_counter() - start < 0.2
    assert not slow.done()
    assert [r.accuracy for r in fast.result(timeout=30)] == [1.0] * 3
    assert slow.result(timeout=30)[0].timed_out


def test_adversarial_batch_completes_with_accuracy_zero(pool, tmp_path):
    marker = tmp_path / "pwned"
    adversarial = [
        GOOD.format("$9^{9^{9^{9}}}$"),
        GOOD.format("9^9^9^9"),
        GOOD.format("{" * 5000 + "5" + "}" * 5000),
        GOOD.format("\\frac{1}{" * 3000 + "5" + "}" * 3000),
        "<think>" + "x" * 1_000_000 + "</think><answer>" + "5" * 500_000 + "</answer>",
        GOOD.format("5\x00"),
        GOOD.format("\udcff\udcfe 5 \ud800"),  # invalid UTF-8 decoded with surrogateescape
        GOOD.format(f"__import__('os').system('touch {marker}')"),
        GOOD.format(f"open('{marker}', 'w').write('x')"),
        GOOD.format(f"exec(\"open('{marker}','w')\")"),
        GOOD.format("(x+y+z)^{40}"),
    ]
    completions = adversarial + [GOOD.format("5")]
    start = time.perf_counter()
    results = pool.submit(completions, ["5"] * len(completions)).result(timeout=60)
    elapsed = time.perf_counter() - start
    assert [r.accuracy for r in results] == [0.0] * len(adversarial) + [1.0]
    assert not marker.exists()
    # Bounded by the limit: at most one timed-out item per worker runs past it.
    assert elapsed < len(adversarial) * 0.5 + 2 * (TIMEOUT + GRACE) + 5.0
    assert summarize(results)["count"] == len(completions)


def test_time_limit_alone_bounds_explosive_answers():
    """With the guards off, power towers reach sympy: the time limit still ends them."""
    config = RewardConfig(num_workers=2, timeout_s=TIMEOUT, guards=False)
    completions = [GOOD.format("9^{9^{9^{9}}}"), GOOD.format("(10^{8})!"), GOOD.format("5")]
    start = time.perf_counter()
    with RewardPool(config) as p:
        results = p.submit(completions, ["5"] * 3).result(timeout=60)
    assert time.perf_counter() - start < 2 * (TIMEOUT + GRACE) + 5.0
    assert [r.timed_out for r in results] == [True, True, False]
    assert results[2].accuracy == 1.0


def test_user_function_errors_raise_from_result():
    config = RewardConfig(num_workers=1, user_functions=(("test_rewards:raises", 1.0),))
    with RewardPool(config) as p, pytest.raises(InputError, match="boom"):
        p.submit([GOOD.format("1")], ["1"]).result(timeout=30)


def test_bad_import_path_fails_in_the_caller():
    with pytest.raises(InputError, match="cannot be imported"):
        RewardPool(RewardConfig(num_workers=1, user_functions=(("no_such_module:f", 1.0),)))


def test_close_fails_unfinished_batches_and_score_batch_uses_a_pool():
    p = RewardPool(RewardConfig(num_workers=1, timeout_s=5.0,
                                user_functions=(("test_rewards_pool:misbehave", 1.0),)))
    handle = p.submit([GOOD.format("1") + "HANG"], ["1"])
    p.close()
    with pytest.raises(RuntimeError, match="closed"):
        handle.result(timeout=10)
    with pytest.raises(RuntimeError, match="closed"):
        p.submit([GOOD.format("1")], ["1"])
    results = score_batch([GOOD.format("3"), GOOD.format("4")], ["3", "3"],
                          config=RewardConfig(num_workers=1))
    assert [r.reward for r in results] == [1.5, 0.5]
