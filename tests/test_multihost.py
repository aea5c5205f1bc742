"""Several CPU processes as one JAX run (launch/local_multihost.sh, eureka_jax/distributed.py),
and the trainer run that way: 2 processes x 4 devices train like 1 process x 8 devices, and
resume after one of them is killed.

Each launcher test starts two small processes (a few seconds each on a busy machine; the training
runs take a minute or two); every subprocess has a timeout, so a hang fails the test instead of
stalling the suite."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eureka_jax import cli, distributed, testing
from eureka_jax.configs_common import load_config_file
from eureka_jax.data import make_synthetic
from eureka_jax.metrics import read_metrics
from eureka_jax.train import train

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "launch" / "local_multihost.sh"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

# Two processes x two devices: a 4-device mesh whose data axis spans both processes. Each process
# contributes the rows it owns; the jitted sum and process_allgather need the other process.
GLOBAL_SUM = """
from eureka_jax import distributed
assert distributed.initialize_from_env()
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
assert jax.process_count() == 2 and len(jax.devices()) == 4 and len(jax.local_devices()) == 2
mesh = Mesh(np.array(jax.devices()), ("data",))
rows_2 = np.arange(2.0) + 2 * jax.process_index()
global_4 = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("data")),
                                                 rows_2, (4,))
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, PartitionSpec()))(global_4)
ids = multihost_utils.process_allgather(np.array([jax.process_index()]))
print(f"primary={distributed.is_primary()} sum={float(total)} ids={ids.ravel().tolist()}")
"""


def launch(num_processes, devices, *command, timeout=90):
    return subprocess.run(["bash", str(LAUNCHER), str(num_processes), str(devices), *command],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# The trainer on two processes
# ---------------------------------------------------------------------------------------------

TINY = ROOT / "configs" / "tiny_cpu.py"
# The smoke run of tests/test_train.py on a (2, 2, 2) mesh, which spans both processes' devices;
# 4 steps, eval at steps 0, 2 and 4, a checkpoint after every step.
OVERRIDES = {"data.system_prompt": "Answer.", "rewards.num_workers": 0,
             "train_extras.progress_bar": False, "checkpoint.every": 1,
             "checkpoint.async_save": False, "train.num_steps": 4, "eval.every": 2,
             "rl.entropy_coef": 0.01, "mesh.shape": (2, 2, 2)}
TRAIN_TIMEOUT = 400


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(overrides naming the model and data, metrics by step of a 2 x 4 launcher run, its
    workdir)."""
    root = tmp_path_factory.mktemp("multihost_train")
    model_dir = testing.make_hf_model_dir(root / "model", initializer_range=0.2)
    data = make_synthetic(root / "data", num_train=32, num_eval=8, seed=0,
                          tasks=("colour", "count"))
    overrides = {**OVERRIDES, "model.path": str(model_dir), "data.train": str(data.train_jsonl),
                 "eval.data": str(data.eval_jsonl)}
    workdir = root / "two_processes"
    done = subprocess.run(train_command(workdir, overrides), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=TRAIN_TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return overrides, by_step(workdir), workdir


def train_command(workdir, overrides):
    """`local_multihost.sh 2 4 eureka-jax train ...` (the CLI as a module of this checkout)."""
    return ["bash", str(LAUNCHER), "2", "4", sys.executable, "-m", "eureka_jax.cli", "train",
            f"--config={TINY}:smoke", f"--workdir={workdir}",
            *(f"--config.{k}={v}" for k, v in overrides.items())]


def by_step(workdir):
    """Last record per step (a resumed run repeats the step that was in flight)."""
    records = {}
    for record in read_metrics(workdir):
        records.setdefault(record["step"], {}).update(record)
    return records


def assert_same_run(a, b):
    """Rewards, lengths and eval accuracy equal; the update's figures within float rounding
    (the reductions run over other devices in another order)."""
    assert sorted(a) == sorted(b) == [0, 1, 2, 3, 4]
    assert all("eval/accuracy" in a[step] for step in (0, 2, 4))
    for step in a:
        equal = [k for k in a[step] if k.startswith("reward/")
                 or k in ("response_length/mean", "eval/accuracy")]
        assert {k: a[step][k] for k in equal} == {k: b[step][k] for k in equal}, step
        for key in ("loss", "grad_norm") if step else ():
            assert math.isclose(a[step][key], b[step][key], rel_tol=0, abs_tol=1e-5), (
                step, key, a[step][key], b[step][key])
    assert a[4]["grad_norm"] > 1e-3  # a real update was compared


def test_two_processes_train_like_one(tiny_run, tmp_path):
    overrides, two, _ = tiny_run
    config = load_config_file(TINY, "smoke")
    for key, value in overrides.items():
        section, field = key.split(".")
        config[section][field] = value
    train(config, tmp_path)  # this process: 8 fake devices (conftest)
    assert_same_run(by_step(tmp_path), two)
    # Process 1 wrote nothing of its own: one config, one metrics line per step.
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4]


def test_resume_after_one_process_is_killed(tiny_run, tmp_path):
    overrides, uninterrupted, _ = tiny_run
    workdir = tmp_path / "run"
    launcher = subprocess.Popen(train_command(workdir, overrides), cwd=ROOT, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TRAIN_TIMEOUT
        # Orbax renames a step's directory into place once every process has written it.
        while not (workdir / "checkpoints" / "2").exists():
            assert launcher.poll() is None, "the run ended before its second checkpoint"
            assert time.monotonic() < deadline, "no second checkpoint in time"
            time.sleep(0.2)
        os.kill(training_pid(workdir, process_id=1), signal.SIGKILL)
        # The launcher stops process 0 and reports the killed one's status.
        assert launcher.wait(timeout=60) == 128 + signal.SIGKILL
    finally:
        launcher.kill()
    assert 4 not in by_step(workdir)  # it was killed before the end

    done = subprocess.run(train_command(workdir, overrides), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=TRAIN_TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # Resumed, not restarted: a fresh run would evaluate step 0 again.
    assert [r["step"] for r in read_metrics(workdir)].count(0) == 1
    assert_same_run(by_step(workdir), uninterrupted)


def test_sigterm_to_one_process_stops_both_after_the_same_checkpoint(tiny_run, tmp_path):
    """A preemption notice reaches one host first: both save the same step and exit cleanly."""
    overrides, _, _ = tiny_run
    workdir = tmp_path / "run"
    launcher = subprocess.Popen(train_command(workdir, overrides), cwd=ROOT, env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + TRAIN_TIMEOUT
        while not (workdir / "checkpoints" / "1").exists():
            assert launcher.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no first checkpoint in time"
            time.sleep(0.2)
        os.kill(training_pid(workdir, process_id=1), signal.SIGTERM)
        output = launcher.communicate(timeout=120)[0]
    finally:
        launcher.kill()
    assert launcher.returncode == 0, output[-3000:]
    saved = [line.split("step ")[1] for line in output.splitlines()
             if "SIGTERM: checkpoint saved at step" in line]
    assert len(saved) == 2 and saved[0] == saved[1], output[-3000:]
    assert int(saved[0].split(";")[0]) < 4


def test_export_and_eval_on_two_processes(tiny_run, tmp_path):
    """The trained run exported and evaluated by 2 processes (parameters spread over both,
    gathered as they are written; eval shared) equals what one process writes; only process 0
    writes and prints."""
    overrides, _, workdir = tiny_run
    eval_args = ["--data", overrides["eval.data"], "--max-new-tokens", "24", "--batch-size", "4",
                 "--system", overrides["data.system_prompt"]]
    cli_args = {"export": ["--checkpoint", str(workdir)], "eval": ["--model", str(workdir)]}
    for name, output in (("export", "hf"), ("eval", "results.json")):
        extra = eval_args if name == "eval" else []
        done = launch(2, 4, sys.executable, "-m", "eureka_jax.cli", name, *cli_args[name],
                      "--output", str(tmp_path / "two" / output), *extra, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        # What the command prints (not gloo's connection lines): process 0's alone.
        printed = [line for line in done.stdout.splitlines()
                   if "exported to" in line or '"accuracy"' in line]
        assert len(printed) == 1 and printed[0].startswith("[0] "), done.stdout
        assert cli.main([name, *cli_args[name], "--output", str(tmp_path / "one" / output),
                         *extra]) == 0
    one_hf, two_hf = tmp_path / "one" / "hf", tmp_path / "two" / "hf"
    assert sorted(p.name for p in one_hf.iterdir()) == sorted(p.name for p in two_hf.iterdir())
    for path in one_hf.iterdir():
        assert path.read_bytes() == (two_hf / path.name).read_bytes(), path.name
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert {k: v for k, v in one.items() if k != "model"} == {
        k: v for k, v in two.items() if k != "model"}
    assert one["num_examples"] == 8


def training_pid(workdir, process_id):
    """The pid of the trainer (python -m eureka_jax.cli) that is process `process_id` of the
    run in `workdir`, found through /proc."""
    for entry in Path("/proc").iterdir():
        try:
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
            environment = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (arguments[1:3] == [b"-m", b"eureka_jax.cli"]
                and f"--workdir={workdir}".encode() in arguments
                and f"{distributed.PROCESS_ID}={process_id}".encode() in environment):
            return int(entry.name)
    raise AssertionError(f"no process {process_id} of the run in {workdir}")


def test_two_processes_reduce_over_one_mesh():
    done = launch(2, 2, sys.executable, "-c", GLOBAL_SUM)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "[0] primary=True sum=6.0 ids=[0, 1]" in lines, done.stdout
    assert "[1] primary=False sum=6.0 ids=[0, 1]" in lines, done.stdout


def test_launcher_stops_the_others_when_one_fails():
    # Process 1 exits before connecting; process 0 would wait for it in initialize().
    program = ("import os, sys\n"
               "if os.environ['EUREKA_PROCESS_ID'] == '1': sys.exit(3)\n"
               "from eureka_jax import distributed\n"
               "distributed.initialize_from_env()\n")
    start = time.monotonic()
    done = launch(2, 2, sys.executable, "-c", program)
    assert done.returncode == 3
    assert time.monotonic() - start < 60
    assert "process 1 exited with status 3; stopping the others" in done.stderr


def test_dead_peer_stops_the_others_without_the_launcher():
    """On a slice no launcher watches the hosts: jax.distributed's heartbeat must stop them."""
    program = ("import os\n"
               "from eureka_jax import distributed\n"
               "distributed.initialize_from_env()\n"
               "import numpy as np\n"
               "from jax.experimental import multihost_utils\n"
               "multihost_utils.process_allgather(np.zeros(1))\n"
               "if os.environ['EUREKA_PROCESS_ID'] == '1':\n"
               "    os._exit(3)\n"
               "multihost_utils.process_allgather(np.zeros(1))\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**ENV, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           distributed.COORDINATOR: f"127.0.0.1:{port}", distributed.NUM_PROCESSES: "2",
           distributed.HEARTBEAT_TIMEOUT: "5"}
    start = time.monotonic()
    processes = [subprocess.Popen([sys.executable, "-c", program], cwd=ROOT,
                                  env={**env, distributed.PROCESS_ID: str(i)},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for i in range(2)]
    try:
        outputs = [p.communicate(timeout=90)[0] for p in processes]
    finally:
        for p in processes:
            p.kill()
    assert processes[1].returncode == 3, outputs[1]
    assert processes[0].returncode != 0, outputs[0]
    assert time.monotonic() - start < 60
    assert "Task 1 heartbeat timeout" in outputs[0], outputs[0][-3000:]


def test_stopping_the_launcher_stops_every_process():
    program = "import time; print('up', flush=True); time.sleep(300)"
    launcher = subprocess.Popen(["bash", str(LAUNCHER), "2", "1", sys.executable, "-c", program],
                                cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    try:
        assert sorted(launcher.stdout.readline() for _ in range(2)) == ["[0] up\n", "[1] up\n"]
        launcher.send_signal(signal.SIGTERM)
        # The launcher returns only once it has waited for both processes.
        assert launcher.wait(timeout=30) == 130
    finally:
        launcher.kill()
    assert "interrupted; stopping all processes" in launcher.stderr.read()


def test_usage_errors():
    for args in ([], ["2", "2"], ["two", "2", "true"], ["2", "0", "true"]):
        done = subprocess.run(["bash", str(LAUNCHER), *args], capture_output=True, text=True,
                              timeout=30)
        assert done.returncode == 2 and "usage:" in done.stderr, args


def test_cli_connects_before_the_command(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(distributed, "initialize_from_env", lambda: calls.append("init"))
    assert cli.main(["score", "--help"]) == 0
    assert calls == ["init"]


def test_single_process_needs_no_connection(monkeypatch):
    for name in (distributed.COORDINATOR, distributed.AUTO_DETECT):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize_from_env() is False


def test_coordinator_without_process_id_is_an_error(monkeypatch):
    monkeypatch.setenv(distributed.COORDINATOR, "127.0.0.1:1")
    monkeypatch.setenv(distributed.NUM_PROCESSES, "2")
    monkeypatch.delenv(distributed.PROCESS_ID, raising=False)
    with pytest.raises(ValueError, match=distributed.PROCESS_ID):
        distributed.initialize_from_env()
