"""`eureka-jax score`: score completions with the rule rewards, jsonl in, jsonl out.

    eureka-jax score --input IN.jsonl [--output OUT.jsonl] [--config rewards.py] [flags]

Each input line is a JSON object with at least "completion" (string) and "answer" (the ground
truth); "length" (response tokens) is needed only for overlong shaping; every other field ("id",
...) is passed to user reward functions, and "id" names the record in data-error messages. Each
output line is the input object plus "accuracy", "format" and "reward", and, when they apply,
"reward_components", "timed_out", "data_error" and "skipped". A summary (counts, means, timeouts,
data errors) is printed, its last line as JSON.

--config takes a Python file whose get_config() returns RewardConfig fields (a dict or ConfigDict),
either at top level or under a "rewards" key so a training config can be reused; flags override it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from eureka_jax.commands import argument_parser
from eureka_jax.errors import InputError
from eureka_jax.rewards import RewardConfig, RewardResult, score_batch, summarize

_FLAG_FIELDS = {
    "accuracy_weight": "accuracy_weight",
    "format_weight": "format_weight",
    "overlong": "overlong",
    "max_length": "max_length",
    "overlong_buffer": "overlong_buffer",
    "overlong_penalty": "overlong_penalty",
    "timeout": "timeout_s",
    "workers": "num_workers",
}


EXAMPLES = (
    "eureka-jax score --input completions.jsonl --output scored.jsonl",
    "eureka-jax score --input completions.jsonl --config configs/qwen2_5_vl_7b_mmeureka.py "
    "--overlong ramp --max-length 4096 --overlong-buffer 512 --workers 4",
)


def _parser() -> argparse.ArgumentParser:
    p = argument_parser("score", __doc__, EXAMPLES)
    p.add_argument("--input", required=True, type=Path, help="jsonl with completion and answer")
    p.add_argument("--output", type=Path, help="jsonl to write (input fields + scores)")
    p.add_argument("--config", type=Path, help="Python file with get_config() -> reward settings")
    p.add_argument("--accuracy-weight", type=float)
    p.add_argument("--format-weight", type=float)
    p.add_argument("--overlong", choices=["none", "ramp", "truncated"])
    p.add_argument("--max-length", type=int, help="response token limit (overlong shaping)")
    p.add_argument("--overlong-buffer", type=int, help="tokens of the 'ramp' before max-length")
    p.add_argument("--overlong-penalty", type=float)
    p.add_argument("--timeout", type=float, help="seconds per item (default 3)")
    p.add_argument("--workers", type=int, help="reward worker processes; 0: in this process")
    p.add_argument(
        "--user-reward", action="append", default=[], metavar="MODULE:FUNCTION[=WEIGHT]",
        help="add a user reward function (repeatable)",
    )
    return p


def _config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"--config {path}: no such file")
    spec = importlib.util.spec_from_file_location("_eureka_score_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise InputError(f"--config {path}: defines no get_config()")
    values = module.get_config()
    if hasattr(values, "to_dict"):  # ml_collections.ConfigDict
        values = values.to_dict()
    if not isinstance(values, Mapping):
        raise InputError(f"--config {path}: get_config() must return a dict or ConfigDict")
    return dict(values.get("rewards", values))


def build_config(args: argparse.Namespace) -> RewardConfig:
    values = _config_file(args.config) if args.config else {}
    for flag, field in _FLAG_FIELDS.items():
        if getattr(args, flag) is not None:
            values[field] = getattr(args, flag)
    if args.user_reward:
        values["user_functions"] = list(values.get("user_functions", ())) + args.user_reward
    return RewardConfig.from_mapping(values)


def read_records(path: Path) -> tuple[list[dict[str, Any]], list[int], int]:
    """(records, their line numbers, lines with invalid UTF-8). Raises InputError naming the line
    of the first malformed record. Invalid UTF-8 bytes become U+FFFD (model output may hold any
    bytes); blank lines are skipped."""
    if not path.is_file():
        raise InputError(f"--input {path}: no such file")
    records, line_numbers, bad_utf8 = [], [], 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line, bad_utf8 = raw.decode("utf-8", errors="replace"), bad_utf8 + 1
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: not valid JSON ({e.msg}, character {e.pos})") from None
            if not isinstance(record, dict):
                raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
            for key in ("completion", "answer"):
                if key not in record:
                    raise InputError(f"{where}: missing field {key!r}")
            if not isinstance(record["completion"], str):
                raise InputError(f"{where}: 'completion' must be a string")
            length = record.get("length")
            if length is not None and (not isinstance(length, int) or isinstance(length, bool)):
                raise InputError(f"{where}: 'length' must be an integer number of tokens")
            records.append(record)
            line_numbers.append(number)
    return records, line_numbers, bad_utf8


def _output_record(record: dict[str, Any], result: RewardResult) -> dict[str, Any]:
    out = dict(record)
    out.update(accuracy=result.accuracy, format=result.format, reward=result.reward)
    extra_components = set(result.components) - {"accuracy", "format", "overlong"}
    if extra_components or result.components.get("overlong"):
        out["reward_components"] = result.components
    if result.timed_out:
        out["timed_out"] = True
    if result.data_error:
        out["data_error"] = result.data_error
    if result.skipped and not result.timed_out:
        out["skipped"] = result.skipped
    return out


def score_file(args: argparse.Namespace) -> dict[str, Any]:
    config = build_config(args)
    records, line_numbers, bad_utf8 = read_records(args.input)
    if config.overlong != "none":
        for record, number in zip(records, line_numbers, strict=True):
            if record.get("length") is None:
                raise InputError(f"{args.input} line {number}: overlong shaping needs 'length'")
    extras = [{k: v for k, v in r.items() if k not in ("completion", "answer")} for r in records]
    lengths = [r.get("length") for r in records] if config.overlong != "none" else None
    start = time.perf_counter()
    results = score_batch(
        [r["completion"] for r in records], [r["answer"] for r in records], extras, config, lengths
    )
    seconds = time.perf_counter() - start
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with args.output.open("w", encoding="utf-8") as f:
            for record, result in zip(records, results, strict=True):
                f.write(json.dumps(_output_record(record, result)) + "\n")
    summary = summarize(results)
    summary.update(seconds=round(seconds, 3), invalid_utf8_lines=bad_utf8)
    summary["data_error_lines"] = [
        f"line {n}: {r.data_error}"
        for n, r in zip(line_numbers, results, strict=True)
        if r.data_error
    ]
    return summary


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        summary = score_file(args)
    except InputError as e:
        print(f"eureka-jax score: error: {e}", file=sys.stderr)
        return 2
    n, seconds = summary["count"], summary["seconds"]
    rate = n / seconds if seconds > 0 else 0.0
    print(
        f"scored {n} completions in {seconds:.2f} s ({rate:.0f}/s): mean reward "
        f"{summary['mean_reward']:.4f}, accuracy {summary['mean_accuracy']:.4f}, "
        f"format {summary['mean_format']:.4f}"
    )
    print(
        f"timeouts {summary['timeouts']}, data errors {summary['data_errors']}, "
        f"skipped {summary['skipped']}, lines with invalid UTF-8 {summary['invalid_utf8_lines']}"
    )
    for line in summary["data_error_lines"][:20]:
        print(f"  data error: {line}")
    if args.output:
        print(f"wrote {args.output}")
    print(json.dumps(summary))
    return 0
