"""`eureka-jax demo [--workdir runs/demo]`: the CPU demo (see eureka_jax/demo.py)."""

from __future__ import annotations

import argparse
import json


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="eureka-jax demo", description=__doc__)
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grpo-steps", type=int, default=None)
    args = parser.parse_args(argv)
    from eureka_jax.demo import run_demo

    summary = run_demo(args.workdir, seed=args.seed, grpo_steps=args.grpo_steps)
    before, after = summary["eval_accuracy_before"], summary["eval_accuracy_after"]
    print(f"\nheld-out accuracy: {before:.3f} before GRPO -> {after:.3f} after "
          f"({100 * (after - before):+.1f} points) in {summary['seconds']:.0f} s")
    print(f"curves: {summary['curves_png']}")
    print(json.dumps(summary))
    return 0
