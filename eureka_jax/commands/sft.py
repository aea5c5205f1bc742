"""`eureka-jax sft --config configs/X.py --workdir DIR --data SFT.jsonl [--steps N] ...`:
supervised warm-start on records with a `response` field; writes a HF directory DIR/model."""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags


def main(argv: list[str]) -> int:
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file (model, data settings)",
                                    flag_values=fv)
    flags.DEFINE_string("workdir", None, "output directory", flag_values=fv)
    flags.DEFINE_string("data", None, "jsonl/parquet with a 'response' field", flag_values=fv)
    flags.DEFINE_integer("steps", 200, "optimizer steps", flag_values=fv)
    flags.DEFINE_integer("batch_size", 32, "sequences per step", flag_values=fv)
    flags.DEFINE_float("lr", 1e-4, "peak learning rate", flag_values=fv)
    flags.DEFINE_integer("max_response_tokens", 512, "response length bucket", flag_values=fv)
    try:
        fv(["eureka-jax sft", *argv])
    except flags.Error as error:
        print(f"eureka-jax sft: {error}", file=sys.stderr)
        return 2
    if fv.config is None or fv.workdir is None or fv.data is None:
        print("eureka-jax sft: --config, --workdir and --data are required", file=sys.stderr)
        return 2
    from eureka_jax.errors import InputError
    from eureka_jax.sft import sft

    try:
        output = sft(fv.config, fv.workdir, data=fv.data, steps=fv.steps,
                     batch_size=fv.batch_size, lr=fv.lr,
                     max_response_tokens=fv.max_response_tokens)
    except InputError as error:
        print(f"eureka-jax sft: {error}", file=sys.stderr)
        return 2
    print(f"SFT model written to {output}")
    return 0
