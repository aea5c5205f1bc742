"""MM-Eureka-Zero-38B: RLOO from InternVL2.5-38B-Pretrain (its language model is Qwen2.5-32B),
with the "pretrain" reward.

    eureka-jax train --config configs/internvl2_5_38b_zero.py --workdir gs://BUCKET/zero38b \
        --config.model.path=/models/InternVL2_5-38B-Pretrain-hf \
        --config.data.train=/data/mmk12/train.jsonl

    eureka-jax plan --config configs/internvl2_5_38b_zero.py \
        --config.model.path=OpenGVLab/InternVL2_5-38B-Pretrain --topology v5p-32

The 8B recipe (configs/internvl2_5_8b_mmeureka.py, ../shared/DESIGN.md) with what Zero-38B
changed: 4 nodes x 8 GPUs (here: FSDP over a pod slice with 4-way tensor parallelism, as the
Qwen 32B recipe), a checkpoint every 20 steps, and the reward of a base model that was never
taught the tags: accuracy on the last \\boxed{} of the completion (exact match, else
mathematical equality), no format term. Where it fits is what `eureka-jax plan` says (README,
"Plans").
"""

import importlib.util
from pathlib import Path

_EIGHT_B = Path(__file__).with_name("internvl2_5_8b_mmeureka.py")


def _eight_b_config(arg):
    spec = importlib.util.spec_from_file_location("internvl2_5_8b_mmeureka", _EIGHT_B)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str | None = None):
    config = _eight_b_config("small" if arg == "small" else None)
    config.mesh.shape = (1, -1, 4)  # FSDP over the chips x 4-way tensor parallelism
    config.rewards.answer_source = "last_boxed"
    config.rewards.format_weight = 0.0
    config.checkpoint.every = 20
    return config
