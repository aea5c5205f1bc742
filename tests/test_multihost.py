"""Several CPU processes as one JAX run (launch/local_multihost.sh, eureka_jax/distributed.py).

Each test starts two small processes (a few seconds each on a busy machine); every subprocess
has a timeout, so a hang fails the test instead of stalling the suite."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eureka_jax import cli, distributed

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
