"""The shared shape of every training config: `base_config()` holds each field with its default
and a comment; configs/*.py start from it and change what they need (big_vision style)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections

from eureka_jax.data import MMEUREKA_SYSTEM_PROMPT
from eureka_jax.rl_config import RLConfig


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mesh = ml_collections.ConfigDict({"shape": (1, 1, 1)})  # (data, fsdp, tensor); -1 = rest

    c.model = ml_collections.ConfigDict({
        "path": "",  # HF directory or hub id to start from
        "param_dtype": "float32",  # master weights
        "compute_dtype": "bfloat16",
        "remat": "none",  # none | full | dots
        "attention_impl": "auto",  # auto | xla | dense | pallas_tpu | cudnn: see attention.py
    })
    c.data = ml_collections.ConfigDict({
        "train": "",  # jsonl / parquet / HF datasets directory
        "system_prompt": MMEUREKA_SYSTEM_PROMPT,
        "min_pixels": 4 * 28 * 28,
        "max_pixels": 640 * 28 * 28,
        "length_buckets": (512, 1024, 2048, 3072),  # prompt tokens
        "patch_buckets": (0, 1024, 2560),  # patches per prompt (640*28*28 px -> 2560)
        "skip_bad_records": False,
        "num_threads": 4,
    })
    c.sampling = ml_collections.ConfigDict({
        "max_new_tokens": 4096,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "stop_tokens": ("<|im_end|>", "<|endoftext|>"),
        "cache_phases": 4,  # the generated-token KV buffer grows this many times
    })
    c.rl = ml_collections.ConfigDict(RLConfig().to_dict())
    c.train = ml_collections.ConfigDict({
        "num_steps": 100,
        "prompts_per_rollout": 128,
        "groups_per_step": 128,
        "minibatch_size": 128 * 8 // 8,  # 128 sequences per optimizer update
        "micro_batch_size": 8,
        "max_rollouts_per_step": 8,
    })
    c.train_extras = ml_collections.ConfigDict({
        "measure_logprob_mismatch": True,
        "progress_bar": True,
    })
    c.optim = ml_collections.ConfigDict({
        "lr": 1e-6,
        "b1": 0.9,
        "b2": 0.95,
        "eps": 1e-8,
        "weight_decay": 0.0,
        "grad_clip": 1.0,
        "warmup_fraction": 0.03,
        "min_lr_ratio": 0.1,
        "freeze_vision": True,
    })
    c.rewards = ml_collections.ConfigDict({  # eureka_jax.rewards.RewardConfig
        "accuracy_weight": 1.0,
        "format_weight": 0.5,
        "overlong": "none",  # none | ramp (DAPO) | truncated
        "overlong_buffer": 0,
        "overlong_penalty": 1.0,
        "user_functions": (),  # (("pkg.module:function", weight), ...)
        "timeout_s": 3.0,
        "num_workers": 2,
    })
    c.eval = ml_collections.ConfigDict({
        "data": "",  # held-out file; empty disables evaluation
        "every": 10,
        "max_examples": 500,
        "batch_size": 32,
    })
    c.checkpoint = ml_collections.ConfigDict({"every": 10, "keep": 3, "async_save": True})
    c.log = ml_collections.ConfigDict({"samples_every": 5, "num_samples": 4})
    return c


def load_config_file(path: str | Path, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of a config file, as `--config path.py:arg` would give it."""
    path = Path(path)
    if not path.exists():
        from eureka_jax.errors import InputError

        raise InputError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"eureka_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()
