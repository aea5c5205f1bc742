"""Connect the processes of a multi-host run (jax.distributed) from environment variables.

Every process of a run executes the same command; these variables tell each one who it is:

  EUREKA_COORDINATOR    host:port of process 0's coordination service (127.0.0.1:PORT locally)
  EUREKA_NUM_PROCESSES  how many processes take part
  EUREKA_PROCESS_ID     this process's id, 0 .. EUREKA_NUM_PROCESSES - 1

launch/local_multihost.sh sets all three. On a TPU VM slice set EUREKA_JAX_DISTRIBUTED=1 instead
(launch/tpu_vm.sh does): JAX then finds the coordinator and the process ids from the TPU metadata.
With none of them set the run is a single process and nothing happens here.

A dead or hung peer must not leave the others waiting on a collective for ever: the coordination
service declares a process dead after EUREKA_HEARTBEAT_TIMEOUT seconds without a heartbeat
(default 30) and then stops every process with an error naming it; start-up gives up after
EUREKA_INIT_TIMEOUT seconds (default 60) if some process never connects."""

from __future__ import annotations

import os

COORDINATOR = "EUREKA_COORDINATOR"
NUM_PROCESSES = "EUREKA_NUM_PROCESSES"
PROCESS_ID = "EUREKA_PROCESS_ID"
AUTO_DETECT = "EUREKA_JAX_DISTRIBUTED"
INIT_TIMEOUT = "EUREKA_INIT_TIMEOUT"
HEARTBEAT_TIMEOUT = "EUREKA_HEARTBEAT_TIMEOUT"


def requested() -> bool:
    """Whether the environment asks for a multi-process run."""
    return COORDINATOR in os.environ or os.environ.get(AUTO_DETECT) == "1"


def initialize_from_env() -> bool:
    """jax.distributed.initialize() as the environment asks; True if processes are connected.

    Call before anything touches a JAX backend (jax.devices(), the first array). jax is imported
    here, not at module level, so that `eureka-jax --help` does not pay for importing it."""
    if not requested():
        return False
    arguments = {
        "initialization_timeout": _seconds(INIT_TIMEOUT, 60),
        "heartbeat_timeout_seconds": _seconds(HEARTBEAT_TIMEOUT, 30),
    }
    if COORDINATOR in os.environ:  # else JAX finds the peers itself (TPU metadata)
        missing = [name for name in (NUM_PROCESSES, PROCESS_ID) if name not in os.environ]
        if missing:
            raise ValueError(f"{COORDINATOR} is set but {' and '.join(missing)} is not")
        arguments.update(coordinator_address=os.environ[COORDINATOR],
                         num_processes=int(os.environ[NUM_PROCESSES]),
                         process_id=int(os.environ[PROCESS_ID]))
    import jax

    if jax.distributed.is_initialized():  # cli.main() called twice in one process (a notebook)
        return True
    # CPU processes exchange collectives over TCP with gloo (the fake-device tests, CPU hosts);
    # TPU and GPU use their own interconnect and ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**arguments)
    return True


def is_primary() -> bool:
    """True on the process that writes metrics, logs and exports (process 0)."""
    import jax

    return jax.process_index() == 0


def _seconds(name: str, default: int) -> int:
    value = int(os.environ.get(name, default))
    if value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value}")
    return value


def to_host(tree):
    """jax.device_get that also works for arrays spread over several processes' devices: those
    are gathered (process_allgather, a collective every process must call), so every process gets
    the whole array. Replicated and local arrays are read directly."""
    import jax
    from jax.experimental import multihost_utils

    def fetch(x):
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            return multihost_utils.process_allgather(x, tiled=True)
        return jax.device_get(x)

    return jax.tree.map(fetch, tree)


def any_process(flag: bool) -> bool:
    """Whether `flag` is True on any process; a collective that every process must call."""
    import jax

    if jax.process_count() == 1:
        return flag
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(multihost_utils.process_allgather(np.asarray(flag)).any())


def own_share(count: int) -> slice:
    """This process's contiguous share of `count` items (the rows it scores): process i of P
    takes [i * ceil(count / P), (i + 1) * ceil(count / P)), the last one fewer."""
    import jax

    per = -(-count // jax.process_count())
    start = min(count, jax.process_index() * per)
    return slice(start, min(count, start + per))


def gather_shares(local, count: int):
    """Every process's `own_share(count)` rows of a NumPy array ([share, ...]) -> the whole
    [count, ...] array on every process; a collective that every process must call."""
    import jax
    import numpy as np

    local = np.asarray(local)
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    per = -(-count // jax.process_count())
    padded = np.zeros((per, *local.shape[1:]), local.dtype)
    padded[:len(local)] = local
    return np.asarray(multihost_utils.process_allgather(padded, tiled=True))[:count]


def gather_bytes(local: bytes) -> list[bytes]:
    """Every process's `local` bytes, in process order, on every process; a collective that
    every process must call (one for the lengths, one for the padded bytes)."""
    import jax

    if jax.process_count() == 1:
        return [local]
    import numpy as np
    from jax.experimental import multihost_utils

    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([len(local)]))).ravel()
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:len(local)] = np.frombuffer(local, np.uint8)
    every = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [every[p, :size].tobytes() for p, size in enumerate(sizes)]
