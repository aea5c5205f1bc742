"""The `eureka-jax` command line: every command answers --help; bad flags exit 2 with a message."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from eureka_jax.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_answers_help(name, flag, capsys):
    assert main([name, flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: eureka-jax {name}")
    assert "\n  --" in out  # the flags, one per line
    examples = out.split("\nexamples:\n", 1)[1].splitlines()
    assert examples and examples[0].startswith(f"  eureka-jax {name}"), out


def test_train_help_in_a_fresh_interpreter():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "eureka_jax.cli", "train", "--help"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for text in ("usage: eureka-jax train", "--config:", "--workdir:",
                 "--config.SECTION.FIELD=value", "examples:", "  eureka-jax train --config "):
        assert text in done.stdout


@pytest.mark.parametrize("argv, message", [
    (["train", "--no-such-flag"], "Unknown command line flag 'no-such-flag'"),
    (["sft", "--no-such-flag"], "Unknown command line flag 'no-such-flag'"),
    (["convert", "--input", "a", "--output", "b", "--no-such-flag"],
     "unrecognized arguments: --no-such-flag"),
    (["make-synthetic", "--output", "x", "--num-train", "many"], "invalid int value: 'many'"),
    (["train", "--config", "configs/tiny_cpu.py:smoke", "--workdir", "unused",
      "--config.train.num_step=5"], '--config.train.num_step: the config has no field '
                                    "'num_step' (did you mean \"num_steps\""),
    (["train", "--config", "configs/tiny_cpu.py", "--workdir", "unused", "--config.trian.x=1"],
     "--config.trian.x: the config has no field 'trian'"),
    (["train", "--config", "configs/no_such_file.py", "--workdir", "unused"],
     "Failed loading config file"),
    (["train", "--config", "configs/tiny_cpu.py"], "--config and --workdir are required"),
])
def test_bad_flags_exit_2_with_a_message(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_config_overrides_come_from_argv_not_sys_argv(monkeypatch):
    """ml_collections looks for --config.a.b overrides in sys.argv unless told otherwise."""
    from eureka_jax import train as train_module

    seen = {}
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(train_module, "train", lambda config, workdir: seen.update(
        steps=config.train.num_steps, workdir=workdir) or {})
    assert main(["train", "--config", "configs/tiny_cpu.py:smoke", "--workdir", "w",
                 "--config.train.num_steps=7"]) == 0
    assert seen == {"steps": 7, "workdir": "w"}
