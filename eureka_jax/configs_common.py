"""The shared shape of every training config: `base_config()` holds each field with its default
and a comment; configs/*.py start from it and change what they need (big_vision style).
`validate_config` checks a whole config at start-up (train() calls it first)."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections

from eureka_jax.data import MMEUREKA_SYSTEM_PROMPT
from eureka_jax.errors import InputError
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
        "logits_chunk": 512,  # response positions whose logits exist at once (0 = all)
        "attention_impl": "auto",  # auto | xla | dense | pallas_tpu | cudnn: see attention.py
    })
    c.data = ml_collections.ConfigDict({
        "train": "",  # jsonl / parquet / HF datasets directory
        "system_prompt": MMEUREKA_SYSTEM_PROMPT,
        "min_pixels": 4 * 28 * 28,  # Qwen2.5-VL image resizing
        "max_pixels": 640 * 28 * 28,
        "max_tiles": 0,  # InternVL: 448 px tiles per image at most (0 = the checkpoint's own)
        "length_buckets": (512, 1024, 2048, 3072),  # prompt tokens
        # Vision inputs per prompt: patches for Qwen2.5-VL (640*28*28 px -> 2560), tiles for
        # InternVL.
        "patch_buckets": (0, 1024, 2560),
        "skip_bad_records": False,
        "num_threads": 4,
    })
    c.sampling = ml_collections.ConfigDict({
        "max_new_tokens": 4096,  # must equal rl.max_response_length: set both (see below)
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "stop_tokens": ("<|im_end|>", "<|endoftext|>"),
        "cache_phases": 4,  # the generated-token KV buffer grows this many times
        "layer_loop": "auto",  # decoding over the layers: scan | unrolled | auto (see sampler)
    })
    # eureka_jax/rl_config.py documents every field. rl.max_response_length (the dr_grpo loss
    # divides by it) is the longest response the sampler produces, so it must equal
    # sampling.max_new_tokens; validate_config rejects a mismatch rather than picking one of the
    # two: change both (--config.sampling.max_new_tokens=N --config.rl.max_response_length=N).
    c.rl = ml_collections.ConfigDict(RLConfig().to_dict())
    c.train = ml_collections.ConfigDict({
        "num_steps": 100,
        "prompts_per_rollout": 128,
        "groups_per_step": 128,
        "minibatch_size": 128 * 8 // 8,  # 128 sequences per optimizer update
        "micro_batch_size": 8,
        "max_rollouts_per_step": 8,
        # Prompts per sampler call (0: the whole rollout). The KV cache of a chunk, not of the
        # rollout, is what must fit beside the train state; `eureka-jax plan` proposes a size.
        "rollout_chunk": 0,
    })
    c.train_extras = ml_collections.ConfigDict({
        "measure_logprob_mismatch": True,
        "progress_bar": True,
        # "shuffled": train on rewards permuted across the rollout (a control run: same reward
        # mean, no information); metrics still report the true rewards. See rollout.py.
        "reward_control": "none",
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
        # A float32 copy of the parameters in the optimizer state, for model.param_dtype
        # bfloat16 (eureka_jax.train.with_float32_master_weights).
        "master_weights": False,
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
        "answer_source": "answer_tag",  # answer_tag | last_boxed (MM-Eureka-Zero's reward)
    })
    c.eval = ml_collections.ConfigDict({
        "data": "",  # held-out file; empty disables evaluation
        "every": 10,  # steps between evaluations (also before step 1 and after the last)
        "max_examples": 500,  # 0: the whole file
        "batch_size": 32,
    })
    c.checkpoint = ml_collections.ConfigDict({
        "every": 10,  # steps between checkpoints; 0: only after the last step (and on SIGTERM)
        "keep": 3,
        "async_save": True,
    })
    c.log = ml_collections.ConfigDict({
        "samples_every": 5,  # steps between sample dumps; 0: never
        "num_samples": 4,
    })
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


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

_NULLABLE = {"eval.max_examples"}  # None means the whole file, as 0 does


def validate_config(config: ml_collections.ConfigDict | Mapping[str, Any]) -> None:
    """Raise InputError naming the first field of a training config that training cannot use,
    and saying what to do. Checks the shape against base_config() (no unknown or missing
    fields: a misspelt key in a config built in Python is not caught by ml_collections), the
    type of every field, then each section's values and the fields that must agree."""
    values = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    _check_shape(values, base_config().to_dict(), "")

    def get(field: str) -> Any:
        section, _, name = field.partition(".")
        return values[section][name] if name else values[section]

    def require(ok: bool, field: str, condition: str, what_to_do: str) -> None:
        if not ok:
            raise InputError(f"{field} must be {condition} (got {get(field)!r}): {what_to_do}")

    from eureka_jax.models.decoder import DTYPES, REMAT_POLICIES
    from eureka_jax.processing.image import ImageSettings
    from eureka_jax.rewards import RewardConfig
    from eureka_jax.sampler import SamplingConfig

    require(0 <= get("seed") < 2**32, "seed", "in [0, 2**32)", "it seeds NumPy's generators")

    shape = tuple(get("mesh.shape"))
    require(len(shape) == 3 and all(s == -1 or s >= 1 for s in shape) and shape.count(-1) <= 1,
            "mesh.shape", "three sizes (data, fsdp, tensor), each >= 1 or one of them -1",
            "-1 takes the remaining devices, e.g. (1, -1, 1) for FSDP over every chip")

    require(bool(get("model.path")), "model.path", "a HF directory or hub id",
            "set --config.model.path=DIR (or e.g. Qwen/Qwen2.5-VL-7B-Instruct)")
    for field in ("model.param_dtype", "model.compute_dtype"):
        require(get(field) in DTYPES, field, f"one of {sorted(DTYPES)}", "pick a float dtype")
    require(get("model.remat") in REMAT_POLICIES, "model.remat",
            f"one of {sorted(REMAT_POLICIES)}", "'full' saves the most memory")
    require(get("model.logits_chunk") >= 0, "model.logits_chunk", ">= 0",
            "response positions whose logits exist at once; 0 computes them all together")

    require(bool(get("data.train")), "data.train", "a jsonl / parquet file or dataset directory",
            "set --config.data.train=PATH")
    ImageSettings(min_pixels=get("data.min_pixels"), max_pixels=get("data.max_pixels")).validate(
        "data.min_pixels / data.max_pixels")
    for field, least in (("data.length_buckets", 1), ("data.patch_buckets", 0)):
        buckets = tuple(get(field))
        require(bool(buckets) and min(buckets) >= least and list(buckets) == sorted(set(buckets)),
                field, f"a non-empty, strictly increasing tuple of sizes >= {least}",
                "each bucket is one compiled shape; a prompt takes the smallest that fits")
    require(get("data.max_tiles") >= 0, "data.max_tiles", ">= 0",
            "InternVL tiles per image; 0 keeps the checkpoint's max_patches")
    require(get("data.num_threads") >= 0, "data.num_threads", ">= 0", "threads per process")

    rl = RLConfig.from_dict(values["rl"])
    values["rl"] = rl.to_dict()  # an rl field left out takes RLConfig's default
    SamplingConfig(num_samples=rl.num_generations, max_new_tokens=get("sampling.max_new_tokens"),
                   temperature=get("sampling.temperature"), top_k=get("sampling.top_k"),
                   top_p=get("sampling.top_p"), cache_phases=get("sampling.cache_phases"),
                   layer_loop=get("sampling.layer_loop"))
    stop_tokens = tuple(get("sampling.stop_tokens"))
    require(bool(stop_tokens) and all(isinstance(t, str) and t for t in stop_tokens),
            "sampling.stop_tokens", "a non-empty tuple of token strings",
            "a response ends at the first of them")
    require(rl.max_response_length == get("sampling.max_new_tokens"), "rl.max_response_length",
            f"equal to sampling.max_new_tokens={get('sampling.max_new_tokens')}",
            "it is the longest response the sampler produces; set both to the same N "
            "(--config.sampling.max_new_tokens=N --config.rl.max_response_length=N)")

    _validate_loop(values["train"], rl.num_generations)

    optim = (
        ("optim.lr", lambda v: 0 < v < math.inf, "> 0 and finite"),
        ("optim.b1", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("optim.b2", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("optim.eps", lambda v: v > 0, "> 0"),
        ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
        ("optim.grad_clip", lambda v: v > 0, "> 0"),
        ("optim.warmup_fraction", lambda v: 0 <= v <= 1, "in [0, 1]"),
        ("optim.min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    )
    for field, ok, condition in optim:
        require(ok(get(field)), field, condition, "see make_optimizer in eureka_jax/train.py")
    require(not get("optim.master_weights") or get("model.param_dtype") != "float32",
            "optim.master_weights", "False with model.param_dtype='float32'",
            "the parameters are the float32 master weights already")

    # The trainer passes sampling.max_new_tokens as the reward's max_length.
    RewardConfig.from_mapping({**values["rewards"], "max_length": get("sampling.max_new_tokens")})

    if get("eval.data"):
        require(get("eval.every") >= 1, "eval.every", ">= 1 when eval.data is set",
                "steps between evaluations; set eval.data='' to turn evaluation off")
        require(get("eval.max_examples") is None or get("eval.max_examples") >= 0,
                "eval.max_examples", ">= 0", "0 evaluates the whole file")
        require(get("eval.batch_size") >= 1, "eval.batch_size", ">= 1", "prompts per batch")

    require(get("checkpoint.every") >= 0, "checkpoint.every", ">= 0",
            "0 saves only after the last step")
    require(get("checkpoint.keep") >= 1, "checkpoint.keep", ">= 1",
            "resuming needs the last checkpoint")
    from eureka_jax.rollout import REWARD_CONTROLS

    require(get("train_extras.reward_control") in REWARD_CONTROLS, "train_extras.reward_control",
            f"one of {REWARD_CONTROLS}", "'shuffled' is the control run (uninformative rewards)")
    require(get("log.samples_every") >= 0, "log.samples_every", ">= 0", "0 never dumps samples")
    require(get("log.num_samples") >= 0, "log.num_samples", ">= 0", "samples per dump")


def _validate_loop(train: Mapping[str, Any], group: int) -> None:
    for name in ("num_steps", "prompts_per_rollout", "groups_per_step", "minibatch_size",
                 "micro_batch_size", "max_rollouts_per_step"):
        if train[name] < 1:
            raise InputError(f"train.{name} must be >= 1 (got {train[name]})")
    if train["minibatch_size"] % group or train["micro_batch_size"] % group:
        raise InputError(f"train.minibatch_size and train.micro_batch_size must be multiples of "
                         f"rl.num_generations={group}: a group stays in one minibatch")
    if (train["groups_per_step"] * group) % train["minibatch_size"]:
        raise InputError("train.groups_per_step * rl.num_generations must be a multiple of "
                         "train.minibatch_size")
    chunk = train["rollout_chunk"]
    if chunk < 0 or (chunk and train["prompts_per_rollout"] % chunk):
        raise InputError(f"train.rollout_chunk must be 0 or divide train.prompts_per_rollout="
                         f"{train['prompts_per_rollout']} (got {chunk}): every sampler call "
                         "has the same shape")
    if train["groups_per_step"] < train["prompts_per_rollout"]:
        # A rollout of P prompts can keep P groups; a smaller batch would train last step's
        # leftovers and drop fresh groups unused (the demo once trained 8 of 100 batches on
        # fresh data this way).
        raise InputError(
            f"train.groups_per_step ({train['groups_per_step']}) must be >= "
            f"train.prompts_per_rollout ({train['prompts_per_rollout']}): a step must be able "
            "to train every group its rollout keeps; raise groups_per_step (more updates per "
            "step through minibatch_size) or lower prompts_per_rollout")
    if train["minibatch_size"] % train["micro_batch_size"]:
        raise InputError("train.minibatch_size must be a multiple of train.micro_batch_size")


def _check_shape(values: Mapping[str, Any], schema: Mapping[str, Any], prefix: str) -> None:
    """Same keys as base_config() and, outside rl (RLConfig checks its own), the same types."""
    unknown = sorted(set(values) - set(schema))
    if unknown:
        where = f"{prefix[:-1]} fields" if prefix else "sections"
        raise InputError(f"{prefix}{unknown[0]} is not a config field (the {where} are "
                         f"{', '.join(sorted(schema))}); check its spelling")
    missing = sorted(set(schema) - set(values))
    if missing:
        raise InputError(f"{prefix}{missing[0]} is missing: start the config from "
                         "eureka_jax.configs_common.base_config()")
    for key, default in schema.items():
        field, value = prefix + key, values[key]
        if isinstance(default, Mapping):
            if not isinstance(value, Mapping):
                raise InputError(f"{field} must be a section (ConfigDict), got {value!r}")
            if key != "rl":
                _check_shape(value, default, field + ".")
        elif not _same_kind(value, default) and not (value is None and field in _NULLABLE):
            raise InputError(f"{field} must be {_kind(default)} (got {value!r})")


def _same_kind(value: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (tuple, list)):
        return isinstance(value, (tuple, list))
    return isinstance(value, type(default))


def _kind(default: Any) -> str:
    if isinstance(default, (tuple, list)):
        return "a tuple"
    return {bool: "True or False", int: "an integer", float: "a number", str: "a string"}[
        type(default)]
