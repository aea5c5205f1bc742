"""`eureka-jax sft --config configs/X.py --workdir DIR --data SFT.jsonl [--steps N] ...`:
supervised warm-start on records with a `response` field; writes a HF directory DIR/model.

--config is a training config (its model and data sections are used); fields can be overridden
with --config.SECTION.FIELD=value, as for `eureka-jax train`."""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from eureka_jax.commands import parse_absl_flags

EXAMPLES = (
    "eureka-jax sft --config configs/tiny_cpu.py --workdir runs/sft --data sft.jsonl "
    "--config.model.path=runs/demo/init_model --steps 100 --lr 3e-4",
)


def main(argv: list[str]) -> int:
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file (model, data settings)",
                                    flag_values=fv, sys_argv=["eureka-jax sft", *argv])
    flags.DEFINE_string("workdir", None, "output directory", flag_values=fv)
    flags.DEFINE_string("data", None, "jsonl/parquet with a 'response' field", flag_values=fv)
    flags.DEFINE_integer("steps", 200, "optimizer steps", flag_values=fv)
    flags.DEFINE_integer("batch_size", 32, "sequences per step", flag_values=fv)
    flags.DEFINE_float("lr", 1e-4, "peak learning rate", flag_values=fv)
    flags.DEFINE_integer("max_response_tokens", 512, "response length bucket", flag_values=fv)
    status = parse_absl_flags("sft", __doc__, EXAMPLES, fv, argv)
    if status is not None:
        return status
    if fv.config is None or fv.workdir is None or fv.data is None:
        print("eureka-jax sft: --config, --workdir and --data are required (see eureka-jax sft "
              "--help)", file=sys.stderr)
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
