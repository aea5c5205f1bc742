"""`eureka-jax train --config configs/X.py[:arg] --workdir DIR [--config.a.b=value ...]`.

Rerunning the same command resumes from the last checkpoint in DIR. On a multi-host slice set
EUREKA_JAX_DISTRIBUTED=1 (launch/tpu_vm.sh does) so that jax.distributed connects the hosts."""

from __future__ import annotations

import logging
import os
import sys

from absl import flags
from ml_collections import config_flags


def main(argv: list[str]) -> int:
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "training config file (get_config)",
                                    flag_values=flag_values, lock_config=True)
    flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics)",
                        flag_values=flag_values)
    try:
        flag_values(["eureka-jax train", *argv])
    except flags.Error as error:
        print(f"eureka-jax train: {error}", file=sys.stderr)
        return 2
    if flag_values.config is None or flag_values.workdir is None:
        print("eureka-jax train: --config and --workdir are required", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if os.environ.get("EUREKA_JAX_DISTRIBUTED") == "1":
        # Multi-host TPU/GPU: every host runs this same command; JAX finds its peers.
        import jax

        jax.distributed.initialize()
    from eureka_jax.errors import InputError
    from eureka_jax.train import train

    try:
        metrics = train(flag_values.config, flag_values.workdir)
    except InputError as error:
        print(f"eureka-jax train: {error}", file=sys.stderr)
        return 2
    print({k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
    return 0
