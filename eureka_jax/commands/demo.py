"""`eureka-jax demo [--workdir runs/demo]`: the CPU demo (see eureka_jax/demo.py)."""

from __future__ import annotations

import json

from eureka_jax.commands import argument_parser

EXAMPLES = (
    "eureka-jax demo",
    "eureka-jax demo --workdir runs/demo2 --seed 1 --grpo-steps 50",
    "eureka-jax demo --workdir runs/control --reward-control shuffled",
)


def main(argv: list[str]) -> int:
    parser = argument_parser("demo", __doc__, EXAMPLES)
    parser.add_argument("--workdir", default="runs/demo",
                        help="data, models, checkpoints, metrics and curves go here")
    parser.add_argument("--seed", type=int, default=0, help="data, initialisation and sampling")
    parser.add_argument("--family", default="qwen2_5_vl", choices=("qwen2_5_vl", "internvl"),
                        help="model family of the tiny random model")
    parser.add_argument("--grpo-steps", type=int, default=None,
                        help="GRPO steps (default: configs/tiny_cpu.py's train.num_steps)")
    parser.add_argument("--reward-control", choices=("none", "shuffled"), default="none",
                        help="shuffled: the control run, GRPO on rewards permuted across each "
                             "rollout (same mean, no information)")
    parser.add_argument("--cache-phases", type=int, default=None,
                        help="override sampling.cache_phases (the KV buffer's growth phases)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    from eureka_jax.demo import run_demo

    overrides = {}
    if args.cache_phases is not None:
        overrides["sampling.cache_phases"] = args.cache_phases
    summary = run_demo(args.workdir, family=args.family, seed=args.seed, grpo_steps=args.grpo_steps,
                       reward_control=args.reward_control, config_overrides=overrides,
                       show_progress=not args.no_progress)
    before, after = summary["eval_accuracy_before"], summary["eval_accuracy_after"]
    print(f"\nheld-out accuracy: {before:.3f} before GRPO -> {after:.3f} after "
          f"({100 * (after - before):+.1f} points) in {summary['seconds']:.0f} s")
    print(f"curves: {summary['curves_png']}")
    print(json.dumps(summary))
    return 0
