"""`eureka-jax demo [--workdir runs/demo]`: the CPU demo (see eureka_jax/demo.py)."""

from __future__ import annotations

import json

from eureka_jax.commands import argument_parser

EXAMPLES = (
    "eureka-jax demo",
    "eureka-jax demo --workdir runs/demo2 --seed 1 --grpo-steps 50",
)


def main(argv: list[str]) -> int:
    parser = argument_parser("demo", __doc__, EXAMPLES)
    parser.add_argument("--workdir", default="runs/demo",
                        help="data, models, checkpoints, metrics and curves go here")
    parser.add_argument("--seed", type=int, default=0, help="data, initialisation and sampling")
    parser.add_argument("--grpo-steps", type=int, default=None,
                        help="GRPO steps (default: configs/tiny_cpu.py's train.num_steps)")
    args = parser.parse_args(argv)
    from eureka_jax.demo import run_demo

    summary = run_demo(args.workdir, seed=args.seed, grpo_steps=args.grpo_steps)
    before, after = summary["eval_accuracy_before"], summary["eval_accuracy_after"]
    print(f"\nheld-out accuracy: {before:.3f} before GRPO -> {after:.3f} after "
          f"({100 * (after - before):+.1f} points) in {summary['seconds']:.0f} s")
    print(f"curves: {summary['curves_png']}")
    print(json.dumps(summary))
    return 0
