"""MM-Eureka-Qwen-32B: GRPO on Qwen2.5-VL-32B-Instruct with the recipe's hyperparameters.

    eureka-jax train --config configs/qwen2_5_vl_32b_mmeureka.py --workdir gs://BUCKET/mmeureka32b \
        --config.model.path=Qwen/Qwen2.5-VL-32B-Instruct --config.data.train=/data/mmk12/train.jsonl

    eureka-jax plan --config configs/qwen2_5_vl_32b_mmeureka.py \
        --config.model.path=Qwen/Qwen2.5-VL-32B-Instruct --topology v5p-32

The 7B recipe's settings (configs/qwen2_5_vl_7b_mmeureka.py, ../shared/DESIGN.md) on the 32B
model, with what MM-Eureka-Qwen-32B changed: its second stage adds a k3 KL penalty to the
reference policy with coefficient 1e-3 (`:stage2`; the first stage has none, so no reference copy
is kept). 32B parameters do not fit FSDP over 8 chips with their float32 optimizer state, so the
mesh shards over every chip of a pod slice with 4-way tensor parallelism inside each group of
chips. Where it fits is what `eureka-jax plan` says (README, "Plans").
"""

import importlib.util
from pathlib import Path

_SEVEN_B = Path(__file__).with_name("qwen2_5_vl_7b_mmeureka.py")


def _seven_b_config(arg):
    spec = importlib.util.spec_from_file_location("qwen2_5_vl_7b_mmeureka", _SEVEN_B)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str | None = None):
    config = _seven_b_config("small" if arg == "small" else None)
    config.mesh.shape = (1, -1, 4)  # FSDP over the chips x 4-way tensor parallelism
    if arg == "stage2":
        config.rl.kl_coef = 1e-3
        config.rl.kl_estimator = "k3"
        config.rl.kl_placement = "loss"
    return config
