"""`eureka-jax verify-port --model DIR [--dtype float32|bfloat16] [--tolerance 1e-5]`: run
transformers (torch, CPU, float32) and the Flax port on the same prompts (text only, one image, two
images of different sizes, a left-padded batch of two) built with DIR's own processor, print a
table, then one JSON line {"cases": {name: {"max_abs_diff", "rel_diff", "greedy_agree"}},
"passed": bool}. rel_diff = max |port - transformers| / max |transformers| over non-padding
positions; greedy_agree = fraction of positions with the same argmax. Exits 1 when a case's rel_diff
exceeds --tolerance (for bfloat16, pass a loose one such as 0.1). Needs torch (the `verify` extra).
"""

from __future__ import annotations

import json
import sys

from eureka_jax.commands import argument_parser
from eureka_jax.errors import InputError

REPORTED = ("max_abs_diff", "rel_diff", "greedy_agree")


EXAMPLES = (
    "eureka-jax verify-port --model hf/qwen2_5_vl_3b",
    "eureka-jax verify-port --model hf/qwen2_5_vl_3b --dtype bfloat16 --tolerance 0.1",
)


def main(argv: list[str]) -> int:
    parser = argument_parser("verify-port", __doc__, EXAMPLES)
    parser.add_argument("--model", required=True,
                        help="Hugging Face Qwen2.5-VL or InternVL directory")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="parameter and compute dtype of the port (transformers: float32)")
    parser.add_argument("--tolerance", type=float, default=1e-5,
                        help="largest allowed rel_diff")
    parser.add_argument("--min-pixels", type=int,
                        help="Qwen2.5-VL: override preprocessor_config.json")
    parser.add_argument("--max-pixels", type=int,
                        help="Qwen2.5-VL: override preprocessor_config.json")
    parser.add_argument("--max-tiles", type=int,
                        help="InternVL: override preprocessor_config.json max_patches")
    args = parser.parse_args(argv)

    from eureka_jax import verify
    from eureka_jax.families import ImageOptions

    try:
        images = ImageOptions(min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                              max_tiles=args.max_tiles)
        report = verify.verify_port(args.model, dtype=args.dtype, tolerance=args.tolerance,
                                    images=images)
    except InputError as e:
        print(f"eureka-jax verify-port: {e}", file=sys.stderr)
        return 2
    print(report.table())
    cases = {name: {k: case[k] for k in REPORTED} for name, case in report.cases.items()}
    print(json.dumps({"cases": cases, "passed": report.passed}))
    return 0 if report.passed else 1
