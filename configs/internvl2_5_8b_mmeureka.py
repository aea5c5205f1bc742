"""MM-Eureka-8B: RLOO on InternVL2.5-8B (instruct; its language model is InternLM2.5-7B).

    eureka-jax train --config configs/internvl2_5_8b_mmeureka.py --workdir gs://BUCKET/mmeureka8b \
        --config.model.path=/models/InternVL2_5-8B-hf --config.data.train=/data/mmk12/train.jsonl

    eureka-jax plan --config configs/internvl2_5_8b_mmeureka.py \
        --config.model.path=OpenGVLab/InternVL2_5-8B --topology v6e-8

A checkpoint in InternVL's original release layout converts with `eureka-jax convert-internvl`.
MM-Eureka v1's settings (../shared/DESIGN.md, branch internvl): RLOO advantages
(`--advantage_estimator rloo`) whitened over the training batch (`--normalize_reward`, per token
as OpenRLHF does); lr 3e-7; 128 prompts x 8 samples per rollout; 64 sequences per optimizer step
(16 updates per rollout); prompts up to 2048 tokens, responses up to 4096; temperature 1.0; KL 0;
bf16 with gradient checkpointing; no online filter (off by default there); the "instruct" reward
(accuracy on the first <answer> block + 0.5 format); one episode; a checkpoint every 50 steps;
frozen vision tower. What differs, and why: micro-batches of 8 sequences (one group; theirs were
2 per GPU), and at most 6 tiles per image (+ thumbnail: 7 x 256 = 1792 image tokens) so that an
image fits the 2048-token prompt limit. Where it fits is what `eureka-jax plan` says (README,
"Plans").
"""

from eureka_jax.configs_common import base_config


def get_config(arg: str | None = None):
    config = base_config()
    config.mesh.shape = (1, -1, 1)  # FSDP over every chip

    config.model.param_dtype = "bfloat16"
    config.optim.master_weights = True  # float32 master weights and moments in the optimizer
    config.model.compute_dtype = "bfloat16"
    config.model.remat = "full"

    config.data.max_tiles = 6
    config.data.length_buckets = (1024, 2048)
    config.data.patch_buckets = (0, 7)  # tiles per prompt: one image of up to 6 + thumbnail

    config.sampling.max_new_tokens = 4096
    config.sampling.temperature = 1.0
    config.sampling.stop_tokens = ("<|im_end|>",)

    config.rl.num_generations = 8
    config.rl.advantage = "rloo"
    config.rl.scale_rewards = "none"
    config.rl.whiten_advantages = True
    config.rl.loss = "grpo"  # OpenRLHF's PolicyLoss: token mean per sequence, then the mean
    config.rl.ratio_cap = None  # plain PPO clip, as OpenRLHF
    config.rl.clip_eps_low = 0.2
    config.rl.clip_eps_high = 0.2
    config.rl.kl_coef = 0.0
    config.rl.filter_enabled = False
    config.rl.max_response_length = 4096

    config.train.num_steps = 122  # one episode of MMK12's 15,616 prompts at 128 per step
    config.train.prompts_per_rollout = 128
    config.train.groups_per_step = 128
    config.train.minibatch_size = 64
    config.train.micro_batch_size = 8
    config.train.rollout_chunk = 8  # prompts per sampler call (16 did not fit v6e-8: plan)

    config.optim.lr = 3e-7
    config.optim.b1, config.optim.b2 = 0.9, 0.95
    config.optim.weight_decay = 0.0
    config.optim.grad_clip = 1.0
    config.optim.warmup_fraction = 0.03
    config.optim.min_lr_ratio = 0.1
    config.optim.freeze_vision = True

    config.rewards.accuracy_weight = 1.0
    config.rewards.format_weight = 0.5

    config.eval.every = 10
    config.checkpoint.every = 50

    if arg == "small":  # a smoke run on one host
        config.sampling.max_new_tokens = 1024
        config.rl.max_response_length = 1024
        config.train.prompts_per_rollout = 16
        config.train.groups_per_step = 16
        config.train.minibatch_size = 32
        config.eval.max_examples = 64
    return config
