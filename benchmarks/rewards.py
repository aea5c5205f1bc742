"""Reward throughput on this machine: completions per second for a realistic GRPO batch, and the
time of a 1,024-item batch with 1% pathological items.

    .venv/bin/python benchmarks/rewards.py            # defaults: 1,024 items, 5 / 3 repeats
    .venv/bin/python benchmarks/rewards.py --quick    # 256 items, 2 repeats (smoke test)

The realistic mix imitates a rollout of 128 prompts x 8 samples on MMK12-style problems: integers,
fractions, decimals, radicals, multiple choice, intervals, equations; completions of 0.6-3k
characters of reasoning with the answer in the MM-Eureka format (mostly), in varied dress, about
half correct, with the repeated answers typical of a group. Every repeat uses fresh random data (the
workers cache verdicts, so re-scoring the same batch would flatter the numbers). Targets: >= 500
completions/s on 2 cores; the pathological batch bounded by the time limit, not by its worst item.
The last line printed is a JSON object with the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import time

from eureka_jax.rewards import RewardConfig, RewardPool, summarize

WORDS = [
    "we", "know", "that", "the", "triangle", "has", "sides", "so", "area", "is", "given", "by",
    "first", "compute", "then", "substitute", "into", "equation", "which", "gives", "therefore",
    "since", "both", "are", "equal", "it", "follows",
]


def _reasoning(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(6, 30)):
        sentence = " ".join(rng.choices(WORDS, k=rng.randint(8, 16)))
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        parts.append(f"{sentence} $x = \\frac{{{a}}}{{{b}}}$, so ${a} + {b} = {a + b}$.")
    return "\n".join(parts)


def _problem(rng: random.Random) -> tuple[str, list[str], list[str]]:
    """(gold, dresses of a correct answer, plausible wrong answers)."""
    kind = rng.choices(
        ["int", "frac", "decimal", "radical", "choice", "interval", "equation", "pi", "set",
         "poly", "percent"],
        weights=[30, 12, 8, 10, 15, 5, 5, 5, 4, 3, 3],
    )[0]
    n = rng.randint(2, 500)
    if kind == "int":
        return str(n), [f"{n}", f"\\boxed{{{n}}}", f"{n} cm", f"x = {n}", f"{n}.0"], [
            str(n + 1), str(-n), str(n * 2), f"\\frac{{{n}}}{{2}}"]
    if kind == "frac":
        p, q = rng.randint(1, 20), rng.randint(21, 40)
        right = [f"\\frac{{{p}}}{{{q}}}", f"{p}/{q}", f"\\dfrac{{{2 * p}}}{{{2 * q}}}"]
        wrong = [f"\\frac{{{q}}}{{{p}}}", f"-\\frac{{{p}}}{{{q}}}", f"{round(p / q, 2)}"]
        return f"\\frac{{{p}}}{{{q}}}", right, wrong
    if kind == "decimal":
        v = round(rng.uniform(0, 100), 2)
        return str(v), [str(v), f"{v:.3f}", f"\\boxed{{{v}}}"], [
            str(round(v + 0.1, 2)), str(round(v * 10, 2))]
    if kind == "radical":
        a, b = rng.randint(2, 9), rng.choice([2, 3, 5, 6, 7])
        right = [f"{a}\\sqrt{{{b}}}", f"\\sqrt{{{a * a * b}}}", f"{a}\\sqrt {b}"]
        wrong = [f"{a + 1}\\sqrt{{{b}}}", f"\\sqrt{{{a * b}}}", f"{a * b}"]
        return f"{a}\\sqrt{{{b}}}", right, wrong
    if kind == "choice":
        letter = rng.choice("ABCD")
        others = [c for c in "ABCD" if c != letter]
        return letter, [letter, f"({letter})", f"{letter}. {n} cm", f"Option {letter}"], [
            rng.choice(others), f"{letter}, {others[0]}", f"({others[1]})"]
    if kind == "interval":
        a, b = sorted(rng.sample(range(-20, 20), 2))
        return f"[{a}, {b})", [f"[{a},{b})", f"[{a}, {b})"], [f"[{a}, {b}]", f"({a}, {b})"]
    if kind == "pi":
        p, q = rng.randint(1, 9), rng.choice([2, 3, 4, 6])
        right = [f"\\frac{{{p}\\pi}}{{{q}}}", f"\\frac{{{p}}}{{{q}}}\\pi", f"{p}\\pi/{q}"]
        return f"\\frac{{{p}\\pi}}{{{q}}}", right, [f"\\frac{{{q}\\pi}}{{{p}}}", f"{p}\\pi"]
    if kind == "set":
        a, b = sorted(rng.sample(range(-9, 10), 2))
        return f"\\{{{a}, {b}\\}}", [f"\\{{{b}, {a}\\}}", f"{a}, {b}", f"x = {a} or x = {b}"], [
            f"\\{{{a}\\}}", f"\\{{{a}, {b + 1}\\}}"]
    if kind == "poly":
        a, b = rng.randint(1, 5), rng.randint(1, 5)
        return f"x^2 + {a + b}x + {a * b}", [f"(x+{a})(x+{b})", f"x^2+{a + b}x+{a * b}"], [
            f"(x-{a})(x+{b})", f"x^2+{a * b}x+{a + b}"]
    if kind == "percent":
        v = rng.randint(1, 99)
        return f"{v}\\%", [f"{v}\\%", f"{v / 100}", f"{v}"], [f"{v + 1}\\%", f"{v / 10}"]
    k, c = rng.randint(2, 9), rng.randint(1, 9)
    right, wrong = [f"y={k}x+{c}", f"y = {c} + {k}x"], [f"y = {k}x - {c}", f"y = {c}x + {k}"]
    return f"y = {k}x + {c}", right, wrong


def realistic_batch(rng: random.Random, prompts: int, group: int = 8):
    completions, answers, extras = [], [], []
    for p in range(prompts):
        gold, right, wrong = _problem(rng)
        for _ in range(group):
            answer = rng.choice(right) if rng.random() < 0.5 else rng.choice(wrong)
            style = rng.random()
            if style < 0.8:
                tail = f"<answer>{answer}</answer>" if rng.random() < 0.5 else (
                    f"<answer>The answer is $\\boxed{{{answer}}}$.</answer>")
                text = f"<think>\n{_reasoning(rng)}\n</think>\n{tail}"
            elif style < 0.9:
                text = f"{_reasoning(rng)}\nSo the final answer is $\\boxed{{{answer}}}$."
            else:  # truncated by the length limit: no answer at all
                text = f"<think>\n{_reasoning(rng)}"
            completions.append(text)
            answers.append(gold)
            extras.append({"id": f"p{p}"})
    return completions, answers, extras


PATHOLOGICAL = [
    "<answer>$9^{9^{9^{9}}}$</answer>",
    "<answer>" + "{" * 5000 + "1" + "}" * 5000 + "</answer>",
    "<answer>" + "\\frac{1}{" * 2000 + "2" + "}" * 2000 + "</answer>",
    "<think>" + "a" * 1_000_000 + "</think><answer>\\boxed{" + "7" * 500_000 + "}</answer>",
    "<answer>5\x00\x00\udcff\udcfe</answer>",
    "<answer>__import__('os').system('touch /tmp/pwned')</answer>",
    "<answer>(x+y+z)^{40}</answer>",  # slips past the guards; sympy expands it until the timeout
    "<answer>\\binom{100000}{50000}</answer>",  # slow-ish big-integer work (about a second)
    "<answer>{{{{{{1}}}}}}</answer>",  # nesting at the guard's limit: the parser takes ~0.4 s
    "<answer>" + "\\boxed{" * 100_000 + "</answer>",
    "<answer>(10^{8})!</answer>",
]


def _time_batch(pool: RewardPool, completions, answers, extras) -> tuple[float, list]:
    start = time.perf_counter()
    results = pool.submit(completions, answers, extras).result()
    return time.perf_counter() - start, results


def _pathological_runs(pool: RewardPool, rng: random.Random, prompts: int, repeats: int, label):
    """Batches with 1% of items replaced by pathological ones: [(seconds, summary, restarts)]."""
    runs = []
    for _ in range(repeats):
        completions, answers, extras = realistic_batch(rng, prompts)
        n_bad = max(1, len(completions) // 100)
        for k, i in enumerate(rng.sample(range(len(completions)), n_bad)):
            completions[i] = PATHOLOGICAL[k % len(PATHOLOGICAL)]
        restarts = pool.restarts
        seconds, results = _time_batch(pool, completions, answers, extras)
        runs.append((seconds, summarize(results), pool.restarts - restarts))
        print(f"{label}, {n_bad} pathological: {seconds:.2f} s, {runs[-1][1]}, "
              f"restarts {runs[-1][2]}")
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 items, 2 repeats")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--timeout", type=float, default=RewardConfig().timeout_s)
    args = parser.parse_args()
    prompts, repeats = (32, 2) if args.quick else (128, 5)
    config = RewardConfig(num_workers=args.workers, timeout_s=args.timeout)
    rng = random.Random(0)

    with RewardPool(config) as pool:
        _time_batch(pool, *realistic_batch(rng, 4))  # warm-up: workers started, parsers compiled
        clean = []
        for _ in range(repeats):
            seconds, results = _time_batch(pool, *realistic_batch(rng, prompts))
            clean.append(seconds)
            print(f"realistic: {len(results)} items in {seconds:.2f} s, {summarize(results)}")
        guarded = _pathological_runs(pool, rng, prompts, max(2, repeats - 2), "guards on")

    # The same kind of batch with the guards off: only the per-item time limit (soft in the
    # worker, hard kill + replacement from the parent) stands between a power tower and a stall.
    unguarded_config = dataclasses.replace(config, guards=False)
    with RewardPool(unguarded_config) as pool:
        _time_batch(pool, *realistic_batch(rng, 4))
        unguarded = _pathological_runs(pool, rng, prompts, 2, "guards off")

    def median_seconds(runs):
        return round(statistics.median(s for s, _, _ in runs), 3)

    items = prompts * 8
    clean_median = statistics.median(clean)
    print(json.dumps({
        "items": items,
        "workers": config.num_workers,
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "timeout_s": config.timeout_s,
        "completions_per_s": round(items / clean_median, 1),
        "batch_s_median": round(clean_median, 3),
        "pathological_items": max(1, items // 100),
        "pathological_batch_s_median": median_seconds(guarded),
        "pathological_timeouts": [stats["timeouts"] for _, stats, _ in guarded],
        "pathological_refused_by_guards": [stats["skipped"] for _, stats, _ in guarded],
        "unguarded_batch_s_median": median_seconds(unguarded),
        "unguarded_timeouts": [stats["timeouts"] for _, stats, _ in unguarded],
        "unguarded_worker_restarts": [r for _, _, r in unguarded],
    }))


if __name__ == "__main__":
    main()
