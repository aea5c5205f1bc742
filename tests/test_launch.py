"""launch/tpu_vm.sh cannot run here (no gcloud, no TPU): its argument handling and the gcloud
commands it would run, through --dry-run."""

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "tpu_vm.sh"
SETTINGS = {"PROJECT": "proj", "ZONE": "us-east5-a", "TPU": "v6e-16", "NAME": "run1",
            "CONFIG": "configs/tiny_cpu.py", "WORKDIR": "gs://bucket/runs/a",
            "EXTRA": "--config.train.num_steps=5"}
SSH_ALL = "gcloud compute tpus tpu-vm ssh run1 --project proj --zone us-east5-a --worker=all"
CREATE = ("gcloud compute tpus tpu-vm create run1 --project proj --zone us-east5-a "
          "--accelerator-type v6e-16 --version v2-alpha-tpuv6e")
LOGS = ("gcloud compute tpus tpu-vm ssh run1 --project proj --zone us-east5-a --worker=0 "
        "--command 'tail -n +1 -F eureka_jax/train.log'")


def tpu_vm(*args, **settings):
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(settings)
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=30)


def dry_run(step, **overrides):
    done = tpu_vm("--dry-run", step, **{**SETTINGS, **overrides})
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_create():
    assert dry_run("create") == [CREATE]
    assert dry_run("create", SPOT="--spot") == [CREATE + " --spot"]
    assert dry_run("create", TPU="v5p-16")[0].endswith("v5p-16 --version v2-alpha-tpuv5")


def test_install_runs_on_every_worker():
    (line,) = dry_run("install")
    assert line.startswith(SSH_ALL + " --command 'set -e; [ -d eureka_jax ] || git clone ")
    assert '.venv/bin/pip install -q -e ".[tpu]"' in line


def test_start_runs_on_every_worker_then_streams_process_0():
    start, logs = dry_run("start")
    assert start == (
        SSH_ALL + " --command 'cd eureka_jax && { EUREKA_JAX_DISTRIBUTED=1 nohup "
        ".venv/bin/eureka-jax train --config configs/tiny_cpu.py --workdir gs://bucket/runs/a "
        "--config.train.num_steps=5 > train.log 2>&1 < /dev/null & echo $! > train.pid; }'")
    assert logs == LOGS


def test_resume_creates_installs_and_starts():
    lines = dry_run("resume")
    assert lines[0] == CREATE
    assert lines[1] == dry_run("install")[0]
    assert lines[2:] == dry_run("start")
    assert dry_run("all") == lines


def test_logs_and_stop():
    assert dry_run("logs") == [LOGS]
    assert dry_run("stop") == [
        SSH_ALL + " --command '[ -f eureka_jax/train.pid ] && kill -TERM "
        "$(cat eureka_jax/train.pid) || true'"]


@pytest.mark.parametrize("args, settings, message", [
    ((), SETTINGS, "usage:"),
    (("--dry-run",), SETTINGS, "usage:"),
    (("--dry-run", "launch"), SETTINGS, "usage:"),
    (("--dry-run", "start", "extra"), SETTINGS, "usage:"),
    (("--dry-run", "logs"), {"ZONE": "z"}, "set PROJECT"),
    (("--dry-run", "create"), {"PROJECT": "p", "ZONE": "z"}, "set TPU"),
    (("--dry-run", "start"), {"PROJECT": "p", "ZONE": "z", "CONFIG": "c.py"}, "set WORKDIR"),
])
def test_missing_or_bad_arguments_are_usage_errors(args, settings, message):
    done = tpu_vm(*args, **settings)
    assert done.returncode == 2
    assert message in done.stderr and not done.stdout
