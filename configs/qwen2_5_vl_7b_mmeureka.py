"""MM-Eureka-Qwen-7B: GRPO on Qwen2.5-VL-7B-Instruct with the recipe's hyperparameters.

    eureka-jax train --config configs/qwen2_5_vl_7b_mmeureka.py --workdir gs://BUCKET/mmeureka7b \
        --config.model.path=Qwen/Qwen2.5-VL-7B-Instruct --config.data.train=/data/mmk12/train.jsonl

Numbers from ../shared/DESIGN.md (MM-Eureka qwen branch): lr 1e-6, Adam (0.9, 0.95), no weight
decay, clip 1.0, cosine to 0.1*lr with 3% warmup; 128 prompts x 8 samples per rollout, 128
sequences per optimizer step (8 updates per rollout); temperature 1.0; prompts up to 3000 tokens,
responses up to 4096; images within [4, 640] x 28 x 28 pixels; frozen vision tower; KL 0; online
filter [0.1, 0.9]; accuracy + 0.5 * format rewards. `:small` keeps the recipe but shrinks batch
and lengths for a smoke run on one v6e-8 host.

Where it fits (`eureka-jax plan`, README "Plans"): the recipe on v6e-8 and v5p-8, not on v5e-4.
What makes it fit on v6e-8: bfloat16 parameters with float32 master weights and moments in the
optimizer (DeepSpeed's mixed precision, which MM-Eureka trained with), rollouts sampled 16 prompts
at a time (their KV cache is 7.7 GiB per chip instead of 30.6 for all 128), and the teacher-forced
forward in passes of micro_batch_size sequences.
"""

from eureka_jax.configs_common import base_config


def get_config(arg: str | None = None):
    config = base_config()
    config.mesh.shape = (1, -1, 1)  # FSDP over every chip; add tensor parallelism for 32B+

    config.model.param_dtype = "bfloat16"
    config.optim.master_weights = True  # float32 master weights and moments in the optimizer
    config.model.compute_dtype = "bfloat16"
    config.model.remat = "full"

    config.data.min_pixels = 4 * 28 * 28
    config.data.max_pixels = 640 * 28 * 28
    config.data.length_buckets = (1024, 2048, 3072)
    config.data.patch_buckets = (0, 1024, 2560)

    config.sampling.max_new_tokens = 4096
    config.sampling.temperature = 1.0

    config.rl.num_generations = 8
    config.rl.loss = "grpo"
    config.rl.ratio_cap = 3.0
    config.rl.clip_eps_low = 0.2
    config.rl.clip_eps_high = 0.2
    config.rl.kl_coef = 0.0
    config.rl.filter_low = 0.1
    config.rl.filter_high = 0.9
    config.rl.max_response_length = 4096

    config.train.num_steps = 120  # ~ one pass over MMK12's 15,616 prompts at 128 per step
    config.train.prompts_per_rollout = 128
    config.train.groups_per_step = 128
    config.train.minibatch_size = 128
    config.train.micro_batch_size = 8
    config.train.rollout_chunk = 16  # prompts per sampler call (plan proposes it from the HBM left)

    config.optim.lr = 1e-6
    config.optim.b1, config.optim.b2 = 0.9, 0.95
    config.optim.weight_decay = 0.0
    config.optim.grad_clip = 1.0
    config.optim.warmup_fraction = 0.03
    config.optim.min_lr_ratio = 0.1
    config.optim.freeze_vision = True

    config.rewards.accuracy_weight = 1.0
    config.rewards.format_weight = 0.5

    config.eval.every = 10
    config.checkpoint.every = 5

    if arg == "small":
        config.sampling.max_new_tokens = 1024
        config.rl.max_response_length = 1024
        config.train.prompts_per_rollout = 16
        config.train.groups_per_step = 16
        config.train.minibatch_size = 32
        config.train.micro_batch_size = 8
        config.eval.max_examples = 64
    return config
