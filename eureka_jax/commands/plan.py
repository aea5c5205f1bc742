"""`eureka-jax plan --config configs/X.py[:arg] [--config.a.b=value ...] --topology NAME
[--hbm_gib G] [--programs update,sampler]`: compile one training step's programs ahead of time
for a TPU slice (v6e-8, v5p-8, v5e-4, v4-8, v5p-32, ...) or for N fake CPU devices (cpu-N), with
abstract parameters, and say whether the step fits the chips' memory and how fast it could be (see
eureka_jax/plan.py). --hbm_gib judges the fit against that many GiB per device instead of the
chip's HBM; --programs compiles only the named programs.

config.model.path is a local Hugging Face directory (only its config.json is read) or a preset
hub id such as Qwen/Qwen2.5-VL-7B-Instruct: nothing is downloaded. TPU topologies need libtpu
(pip install -e '.[plan]'; make install does), not a TPU. cpu-N sets
XLA_FLAGS=--xla_force_host_platform_device_count=N itself when jax is not yet imported.
Progress goes to stderr; the report to stdout, whose last line is one JSON object (topology,
num_devices, hbm_bytes_per_device, programs, peak_bytes_per_device, fits, projected_step_s).
Exit status: 0 fits, 1 does not fit, 2 bad input (e.g. an unknown topology: the known ones are
listed).
"""

from __future__ import annotations

import json
import os
import re
import sys

from absl import flags
from ml_collections import config_flags

from eureka_jax.commands import parse_absl_flags

EXAMPLES = (
    "eureka-jax plan --config configs/qwen2_5_vl_7b_mmeureka.py "
    "--config.model.path=Qwen/Qwen2.5-VL-7B-Instruct --topology v6e-8",
    "eureka-jax plan --config configs/qwen2_5_vl_32b_mmeureka.py "
    "--config.model.path=Qwen/Qwen2.5-VL-32B-Instruct --topology v5p-32",
    "eureka-jax plan --config configs/tiny_cpu.py:smoke --config.model.path=runs/demo/sft/model "
    "--topology cpu-8 --programs update,sampler",
)


def _prepare_environment(topology: str) -> None:
    """Before jax is imported: compile-only planning never runs on an accelerator (it must not
    claim a TPU that training is using), and cpu-N needs N host devices."""
    if "jax" in sys.modules:
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    match = re.fullmatch(r"cpu-(\d+)", topology.strip().lower())
    if match:
        flag = f"--xla_force_host_platform_device_count={match.group(1)}"
        existing = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                          os.environ.get("XLA_FLAGS", ""))
        os.environ["XLA_FLAGS"] = f"{existing} {flag}".strip()


def main(argv: list[str]) -> int:
    # config_flags finds the --config.a.b overrides in the argv it is given at definition time
    # (sys.argv by default, which is not this argv when main is called in-process).
    argv = ["eureka-jax plan", *argv]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "training config file (get_config)",
                                    flag_values=flag_values, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("topology", None, "v6e-8, v5p-8, v5e-4, v4-8, ..., or cpu-N",
                        flag_values=flag_values)
    flags.DEFINE_list("programs", [], "compile only these (optimizer_init, update, "
                      "logprob_forward, sampler); default all", flag_values=flag_values)
    flags.DEFINE_float("hbm_gib", None, "judge the fit against this many GiB per device instead "
                       "of the chip's HBM", flag_values=flag_values)
    topology = next((a.split("=", 1)[1] for a in argv if a.startswith("--topology=")), None)
    if topology is None and "--topology" in argv[:-1]:
        topology = argv[argv.index("--topology") + 1]
    _prepare_environment(topology or "")
    status = parse_absl_flags("plan", __doc__, EXAMPLES, flag_values, argv[1:])
    if status is not None:
        return status
    if flag_values.config is None or flag_values.topology is None:
        print("eureka-jax plan: --config and --topology are required", file=sys.stderr)
        return 2

    from eureka_jax.errors import InputError
    from eureka_jax.plan import GiB, format_plan, plan_training, stderr_log

    hbm = None if flag_values.hbm_gib is None else int(flag_values.hbm_gib * GiB)
    try:
        result = plan_training(flag_values.config, flag_values.topology,
                               config_name=config_flags.get_config_filename(flag_values["config"]),
                               hbm_bytes=hbm, only=tuple(flag_values.programs),
                               log=stderr_log)
    except InputError as error:
        print(f"eureka-jax plan: {error}", file=sys.stderr)
        return 2
    print(format_plan(result))
    print(json.dumps(result.to_json()))
    return 0 if result.fits else 1
