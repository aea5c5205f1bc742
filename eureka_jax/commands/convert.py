"""`eureka-jax convert --input X.parquet|DATASET_DIR|X.jsonl --output OUT_DIR`: MM-Eureka jsonl +
PNG images, readable by every eureka-jax command."""

from __future__ import annotations

import sys

from eureka_jax.commands import argument_parser
from eureka_jax.data.convert import convert
from eureka_jax.errors import InputError

EXAMPLES = (
    "eureka-jax convert --input mmk12/train.parquet --output data/mmk12",
    "eureka-jax convert --input hf_saved_dataset --split test --output data/mmk12_test "
    "--skip-bad-records",
)


def main(argv: list[str]) -> int:
    parser = argument_parser("convert", __doc__, EXAMPLES)
    parser.add_argument("--input", required=True,
                        help="a .parquet file (MMK12 style), a HF save_to_disk dir or a jsonl")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--split", help="one split of a saved DatasetDict (default: all splits)")
    parser.add_argument("--skip-bad-records", action="store_true",
                        help="skip and count bad records instead of stopping at the first")
    parser.add_argument("--absolute-paths", action="store_true",
                        help="write file:///abs image URIs instead of paths relative to --output")
    args = parser.parse_args(argv)
    try:
        report = convert(args.input, args.output, split=args.split,
                         skip_bad_records=args.skip_bad_records, absolute_paths=args.absolute_paths)
    except InputError as e:
        print(f"eureka-jax convert: {e}", file=sys.stderr)
        return 2
    for path, count in report.outputs.items():
        print(f"wrote {count} records to {path}")
    skipped = {reason: n for reason, n in report.skipped.items() if n}
    if skipped:
        print(f"skipped bad records: {skipped}")
    return 0
