"""`eureka-jax train --config configs/X.py[:arg] --workdir DIR [--config.a.b=value ...]`:
GRPO-family training; rerunning the same command resumes from the last checkpoint in DIR.

--config names a Python file whose get_config(arg) returns the training config (every field, with
its default and meaning, is in eureka_jax/configs_common.py base_config()); ":arg" after the path
picks a variant, e.g. configs/tiny_cpu.py:smoke or configs/qwen2_5_vl_7b_mmeureka.py:small. Any
field can then be overridden with --config.SECTION.FIELD=value (--config.train.num_steps=5,
--config.data.length_buckets="(512,1024)"). The config is locked, so a misspelt field is an
error, and it is validated before anything is loaded.

On a multi-host slice set EUREKA_JAX_DISTRIBUTED=1 (launch/tpu_vm.sh does) so that
jax.distributed connects the hosts (eureka_jax/distributed.py; the CLI does it before any
command runs)."""

from __future__ import annotations

import logging
import sys

from absl import flags
from ml_collections import config_flags

from eureka_jax.commands import parse_absl_flags

EXAMPLES = (
    "eureka-jax train --config configs/tiny_cpu.py --workdir runs/tiny "
    "--config.model.path=runs/demo/sft_model --config.data.train=runs/demo/data/train.jsonl",
    "eureka-jax train --config configs/qwen2_5_vl_7b_mmeureka.py:small --workdir runs/7b_small "
    "--config.model.path=Qwen/Qwen2.5-VL-7B-Instruct --config.data.train=mmk12/train.jsonl "
    "--config.train.num_steps=5",
)


def main(argv: list[str]) -> int:
    flag_values = flags.FlagValues()
    # ml_collections finds the --config.a.b overrides in sys_argv, by default sys.argv: pass argv
    # so that main([...]) called in-process (tests, notebooks) takes its own overrides.
    config_flags.DEFINE_config_file(
        "config", None, "training config file: PATH.py or PATH.py:arg (get_config(arg)); "
        "override fields with --config.SECTION.FIELD=value", flag_values=flag_values,
        lock_config=True, sys_argv=["eureka-jax train", *argv])
    flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics); rerun to resume",
                        flag_values=flag_values)
    status = parse_absl_flags("train", __doc__, EXAMPLES, flag_values, argv)
    if status is not None:
        return status
    if flag_values.config is None or flag_values.workdir is None:
        print("eureka-jax train: --config and --workdir are required (see eureka-jax train "
              "--help)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from eureka_jax.errors import InputError
    from eureka_jax.train import train

    try:
        metrics = train(flag_values.config, flag_values.workdir)
    except InputError as error:
        print(f"eureka-jax train: {error}", file=sys.stderr)
        return 2
    print({k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
    return 0
