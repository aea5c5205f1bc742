"""`eureka-jax make-synthetic --output DIR`: the synthetic visual-reasoning dataset (count, digit,
colour, add) as MM-Eureka jsonl + PNG images; deterministic given --seed."""

from __future__ import annotations

from eureka_jax.commands import argument_parser
from eureka_jax.data.synthetic import DIFFICULTIES, TASKS, make_synthetic

EXAMPLES = (
    "eureka-jax make-synthetic --output data/synthetic",
    "eureka-jax make-synthetic --output data/hard --num-train 5000 --tasks count,add "
    "--difficulty hard",
)


def main(argv: list[str]) -> int:
    parser = argument_parser("make-synthetic", __doc__, EXAMPLES)
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", default=",".join(TASKS),
                        help=f"comma-separated subset of {','.join(TASKS)}")
    parser.add_argument("--difficulty", default="easy", choices=list(DIFFICULTIES))
    parser.add_argument("--short-questions", action="store_true",
                        help="terse questions ('Colour?') for tiny models")
    args = parser.parse_args(argv)
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    if not tasks or set(tasks) - set(TASKS):
        parser.error(f"--tasks must be a comma-separated subset of {','.join(TASKS)}")
    dataset = make_synthetic(args.output, args.num_train, args.num_eval, args.seed, tasks=tasks,
                             difficulty=args.difficulty, short_questions=args.short_questions)
    print(f"wrote {args.num_train} records to {dataset.train_jsonl}")
    print(f"wrote {args.num_eval} records to {dataset.eval_jsonl}")
    return 0
