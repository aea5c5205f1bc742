"""The demo on several seeds: held-out greedy accuracy before the first GRPO update and at the end,
the gain, and the time of each run; then the median and the worst gain.

    .venv/bin/python benchmarks/demo_seeds.py [--seeds 0 1 2 3 4] [--parallel 2]
        [--reward-control shuffled] [--cache-phases 4] [--threads 1] [--workdir runs/seeds]
        [--family internvl]

Each seed is one `eureka-jax demo --seed S` process in its own work directory, exactly as a user
runs it (data, tiny model, warm start and GRPO all depend on the seed). `--parallel 2` runs two
seeds at a time, each pinned to one core with one XLA thread (so the per-run time is a one-core
time); `--threads 1` pins a single run to one thread likewise. `--cache-phases N` overrides the
sampler's KV buffer phases (a float-rounding-level change in sampling). `--reward-control
shuffled` runs the control: GRPO on rewards permuted across each rollout, where accuracy must not
rise. `--family internvl` runs the demo's tiny InternVL instead of the tiny Qwen2.5-VL. A run is
reported as it finishes; the table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def demo_command(seed: int, workdir: Path, args) -> list[str]:
    command = [sys.executable, "-m", "eureka_jax.cli", "demo", "--seed", str(seed),
               "--workdir", str(workdir), "--reward-control", args.reward_control,
               "--family", args.family, "--no-progress"]
    if args.cache_phases is not None:
        command += ["--cache-phases", str(args.cache_phases)]
    return command


def start(seed: int, slot: int, args) -> tuple[subprocess.Popen, Path, float]:
    workdir = Path(args.workdir) / f"{args.family}_{args.reward_control}_seed{seed}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    command = demo_command(seed, workdir, args)
    if args.parallel > 1 or args.threads == 1:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + ONE_THREAD).strip()
        if args.parallel > 1:
            command = ["taskset", "-c", str(slot % os.cpu_count()), *command]
    workdir.mkdir(parents=True, exist_ok=True)
    log = open(workdir / "demo.log", "w")  # noqa: SIM115 (closed when the process ends)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    return process, workdir, time.perf_counter()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--parallel", type=int, default=1, choices=(1, 2))
    parser.add_argument("--threads", type=int, default=None, choices=(1, 2))
    parser.add_argument("--reward-control", choices=("none", "shuffled"), default="none")
    parser.add_argument("--cache-phases", type=int, default=None)
    parser.add_argument("--family", choices=("qwen2_5_vl", "internvl"), default="qwen2_5_vl")
    parser.add_argument("--workdir", default="runs/seeds")
    args = parser.parse_args()

    queue = list(args.seeds)
    running: dict[int, tuple[subprocess.Popen, Path, float, int]] = {}
    results = []
    free_slots = list(range(args.parallel))
    while queue or running:
        while queue and free_slots:
            seed, slot = queue.pop(0), free_slots.pop(0)
            process, workdir, started = start(seed, slot, args)
            running[seed] = (process, workdir, started, slot)
        time.sleep(1)
        for seed, (process, workdir, started, slot) in list(running.items()):
            if process.poll() is None:
                continue
            del running[seed]
            free_slots.append(slot)
            if process.returncode != 0:
                print(f"seed {seed}: the demo failed (exit {process.returncode}); see "
                      f"{workdir / 'demo.log'}", file=sys.stderr)
                return 1
            summary = json.loads((workdir / "summary.json").read_text())
            summary["wall_s"] = time.perf_counter() - started
            results.append(summary)
            print(f"seed {seed}: {summary['eval_accuracy_before']:.3f} -> "
                  f"{summary['eval_accuracy_after']:.3f} in {summary['wall_s']:.0f} s",
                  flush=True)

    results.sort(key=lambda r: r["seed"])
    gains = [r["eval_accuracy_after"] - r["eval_accuracy_before"] for r in results]
    setting = (f"reward_control={args.reward_control}, cache_phases="
               f"{args.cache_phases or 'config'}, "
               + ("2 runs at once, 1 core and 1 thread each" if args.parallel > 1 else
                  f"{args.threads or 'all'} thread(s)"))
    print(f"\n{setting}")
    print("| seed | warm start sampled acc | SFT steps | before | after | gain (points) | "
          "eval curve | time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r, gain in zip(results, gains, strict=True):
        curve = " ".join(f"{acc:.2f}" for _, acc in r["eval_curve"])
        print(f"| {r['seed']} | {r['warm_start_sampled_accuracy']:.3f} | {r['sft_steps']} | "
              f"{r['eval_accuracy_before']:.3f} | {r['eval_accuracy_after']:.3f} | "
              f"{100 * gain:+.1f} | {curve} | {r['seconds']:.0f} |")
    print(f"\nmedian gain {100 * statistics.median(gains):+.1f} points, worst "
          f"{100 * min(gains):+.1f} (seed {results[gains.index(min(gains))]['seed']}), "
          f"median time {statistics.median(r['seconds'] for r in results):.0f} s, longest "
          f"{max(r['seconds'] for r in results):.0f} s")
    print(json.dumps({"setting": setting, "seeds": [r["seed"] for r in results],
                      "gains": gains, "median_gain": statistics.median(gains),
                      "worst_gain": min(gains),
                      "seconds": [r["seconds"] for r in results]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
