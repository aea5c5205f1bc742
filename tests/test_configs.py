"""Training configs: every shipped config validates; each bad value is an InputError naming the
field, raised before train() touches the work directory."""

import re
from pathlib import Path

import ml_collections
import pytest

from eureka_jax.configs_common import base_config, load_config_file, validate_config
from eureka_jax.errors import InputError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# The two paths every run command supplies (see each config's docstring).
PATHS = {"model.path": "Qwen/Qwen2.5-VL-7B-Instruct", "data.train": "train.jsonl"}


def _variants():
    """(file, arg) for each config and each `arg == "..."` variant it tests for."""
    for path in sorted(CONFIGS.glob("*.py")):
        yield path, None
        for arg in re.findall(r"""arg == ["'](\w+)["']""", path.read_text()):
            yield path, arg


def _with(config, changes):
    for key, value in changes.items():
        *sections, field = key.split(".")
        target = config
        for section in sections:
            target = target[section]
        target[field] = value
    return config


def _config(**changes):
    return _with(load_config_file(CONFIGS / "tiny_cpu.py"), {**PATHS, **changes})


@pytest.mark.parametrize("path, arg", list(_variants()),
                         ids=lambda v: v.name if isinstance(v, Path) else str(v))
def test_every_shipped_config_validates(path, arg):
    config = _with(load_config_file(path, arg), PATHS)
    before = config.to_dict()
    validate_config(config)
    assert config.to_dict() == before  # checks only, changes nothing


def test_shipped_configs_cover_the_variants():
    assert {(p.name, a) for p, a in _variants()} >= {
        ("tiny_cpu.py", None), ("tiny_cpu.py", "smoke"),
        ("qwen2_5_vl_7b_mmeureka.py", None), ("qwen2_5_vl_7b_mmeureka.py", "small")}


def test_the_paths_a_run_must_set_are_named():
    config = load_config_file(CONFIGS / "tiny_cpu.py")
    with pytest.raises(InputError, match=r"model\.path .*--config\.model\.path="):
        validate_config(config)
    config.model.path = "some/model"
    with pytest.raises(InputError, match=r"data\.train .*--config\.data\.train="):
        validate_config(config)


@pytest.mark.parametrize("changes, message", [
    ({"seed": -1}, r"^seed must be in \[0, 2\*\*32\)"),
    ({"mesh.shape": (1, 1)}, r"^mesh\.shape must be three sizes"),
    ({"mesh.shape": (-1, -1, 1)}, r"^mesh\.shape must be"),
    ({"mesh.shape": (0, 1, 1)}, r"^mesh\.shape must be"),
    ({"model.param_dtype": "float64"}, r"^model\.param_dtype must be one of"),
    ({"model.compute_dtype": "int8"}, r"^model\.compute_dtype must be one of"),
    ({"model.remat": "some"}, r"^model\.remat must be one of"),
    ({"data.min_pixels": 0}, r"^data\.min_pixels / data\.max_pixels: min_pixels=0"),
    ({"data.max_pixels": 100, "data.min_pixels": 10}, r"max_pixels=100 is below one merged"),
    ({"data.length_buckets": (128, 96)}, r"^data\.length_buckets must be a non-empty, strictly"),
    ({"data.length_buckets": (96, 96)}, r"^data\.length_buckets must be"),
    ({"data.length_buckets": ()}, r"^data\.length_buckets must be"),
    ({"data.length_buckets": (0, 96)}, r"^data\.length_buckets must be .* sizes >= 1"),
    ({"data.patch_buckets": (-1, 64)}, r"^data\.patch_buckets must be .* sizes >= 0"),
    ({"data.num_threads": -1}, r"^data\.num_threads must be >= 0"),
    ({"sampling.temperature": 0.0}, r"^sampling\.temperature must be > 0"),
    ({"sampling.top_p": 0.0}, r"^sampling\.top_p must be in \(0, 1\]"),
    ({"sampling.top_k": -1}, r"^sampling\.top_k must be >= 0"),
    ({"sampling.cache_phases": 0}, r"^sampling\.cache_phases must be >= 1"),
    ({"sampling.max_new_tokens": 0, "rl.max_response_length": 0},
     r"^rl\.max_response_length must be >= 1"),
    ({"sampling.stop_tokens": ()}, r"^sampling\.stop_tokens must be a non-empty tuple"),
    ({"sampling.max_new_tokens": 32},
     r"^rl\.max_response_length must be equal to sampling\.max_new_tokens=32 \(got 16\).*"
     r"--config\.sampling\.max_new_tokens=N --config\.rl\.max_response_length=N"),
    ({"rl.max_response_length": 32}, r"^rl\.max_response_length must be equal to sampling"),
    ({"rl.num_generations": 1}, r"^rl\.num_generations must be > 1"),
    ({"train.num_steps": 0}, r"^train\.num_steps must be >= 1"),
    ({"train.max_rollouts_per_step": 0}, r"^train\.max_rollouts_per_step must be >= 1"),
    ({"train.minibatch_size": 60}, r"^train\.minibatch_size and train\.micro_batch_size must be "
                                   r"multiples of rl\.num_generations=8"),
    ({"train.groups_per_step": 9}, r"^train\.groups_per_step \* rl\.num_generations must be"),
    ({"train.micro_batch_size": 48}, r"^train\.minibatch_size must be a multiple of train\.micro"),
    ({"optim.lr": 0.0}, r"^optim\.lr must be > 0"),
    ({"optim.lr": float("inf")}, r"^optim\.lr must be > 0 and finite"),
    ({"optim.b2": 1.0}, r"^optim\.b2 must be in \[0, 1\)"),
    ({"optim.eps": 0.0}, r"^optim\.eps must be > 0"),
    ({"optim.grad_clip": -1.0}, r"^optim\.grad_clip must be > 0"),
    ({"optim.warmup_fraction": 1.5}, r"^optim\.warmup_fraction must be in \[0, 1\]"),
    ({"optim.min_lr_ratio": -0.1}, r"^optim\.min_lr_ratio must be in \[0, 1\]"),
    ({"rewards.accuracy_weight": float("nan")}, r"^rewards\.accuracy_weight must be a finite"),
    ({"rewards.timeout_s": 0.0}, r"^rewards\.timeout_s must be a positive number"),
    ({"rewards.num_workers": -1}, r"^rewards\.num_workers must be >= 0"),
    ({"rewards.overlong": "soft"}, r"^rewards\.overlong must be one of"),
    ({"rewards.overlong": "ramp"}, r"rewards\.overlong_buffer < max_length=16 \(got 0\)"),
    ({"rewards.user_functions": (("no_colon", 1.0),)}, r"user reward 'no_colon'"),
    ({"eval.data": "eval.jsonl", "eval.every": 0},
     r"^eval\.every must be >= 1 when eval\.data is set \(got 0\)"),
    ({"eval.data": "eval.jsonl", "eval.max_examples": -1}, r"^eval\.max_examples must be >= 0"),
    ({"eval.data": "eval.jsonl", "eval.batch_size": 0}, r"^eval\.batch_size must be >= 1"),
    ({"checkpoint.every": -1}, r"^checkpoint\.every must be >= 0"),
    ({"checkpoint.keep": 0}, r"^checkpoint\.keep must be >= 1"),
    ({"log.samples_every": -5}, r"^log\.samples_every must be >= 0"),
    ({"log.num_samples": -1}, r"^log\.num_samples must be >= 0"),
])
def test_a_bad_value_names_its_field(changes, message):
    with pytest.raises(InputError, match=message):
        validate_config(_config(**changes))


def test_values_that_turn_a_feature_off_are_accepted():
    validate_config(_config(**{"eval.data": "", "eval.every": 0}))  # no evaluation
    validate_config(_config(**{"eval.data": "eval.jsonl", "eval.max_examples": 0}))
    validate_config(_config(**{"checkpoint.every": 0, "log.samples_every": 0}))
    validate_config(_config(**{"mesh.shape": (1, -1, 1), "sampling.max_new_tokens": 32,
                               "rl.max_response_length": 32}))


def test_unknown_missing_and_mistyped_fields():
    config = _config()
    config.train.num_step = 5  # an unlocked ConfigDict takes a new key without complaint
    with pytest.raises(InputError, match=r"^train\.num_step is not a config field \(the train "
                                         r"fields are .*num_steps"):
        validate_config(config)
    config = _config()
    config.trian = ml_collections.ConfigDict({"num_steps": 5})
    with pytest.raises(InputError, match=r"^trian is not a config field \(the sections are"):
        validate_config(config)
    config = _config()
    config.rl.num_generation = 4
    with pytest.raises(InputError, match=r"^rl\.num_generation is not an RL option"):
        validate_config(config)
    values = _config().to_dict()
    del values["eval"]["every"]
    with pytest.raises(InputError, match=r"^eval\.every is missing: start the config from"):
        validate_config(values)
    values = _config().to_dict()
    values["train"]["num_steps"] = "5"
    with pytest.raises(InputError, match=r"^train\.num_steps must be an integer \(got '5'\)"):
        validate_config(values)
    values["train"]["num_steps"] = True
    with pytest.raises(InputError, match=r"^train\.num_steps must be an integer"):
        validate_config(values)
    values = _config().to_dict()
    values["optim"]["lr"] = 1  # an int where a float is expected is a number all the same
    validate_config(values)


def test_base_config_holds_every_field_validate_config_knows():
    assert set(base_config()) == {"seed", "mesh", "model", "data", "sampling", "rl", "train",
                                  "train_extras", "optim", "rewards", "eval", "checkpoint", "log"}


def test_train_rejects_a_bad_config_before_touching_the_workdir(tmp_path):
    from eureka_jax.train import train

    config = _config(**{"eval.data": "eval.jsonl", "eval.every": 0})
    with pytest.raises(InputError, match=r"^eval\.every must be >= 1"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_train_command_reports_a_bad_config(capsys, monkeypatch):
    from eureka_jax.cli import main

    monkeypatch.chdir(CONFIGS.parent)
    argv = ["train", "--config", "configs/tiny_cpu.py:smoke", "--workdir", "unused",
            "--config.model.path=m", "--config.data.train=t.jsonl",
            "--config.eval.data=e.jsonl", "--config.eval.every=0"]
    assert main(argv) == 2
    assert "eureka-jax train: eval.every must be >= 1 when eval.data is set" in (
        capsys.readouterr().err)
    assert not (CONFIGS.parent / "unused").exists()
