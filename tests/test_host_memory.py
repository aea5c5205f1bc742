"""eureka_jax.host_memory: after keep_freed_memory(), a large buffer freed and allocated again by
a worker thread reuses the same pages (no new page faults); with glibc's defaults it faults every
page in again. And the console script applies it on the CPU backend only."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from eureka_jax import cli

ROOT = Path(__file__).resolve().parents[1]

# A worker thread (as XLA's and torch's are) mallocs 256 MiB, writes every page, frees it, and
# does it again; the second round's minor page faults are printed. Plain malloc, as XLA:CPU's
# buffers are: numpy would ask for transparent huge pages and fault 512x fewer times anyway.
_PROBE = textwrap.dedent("""
    import ctypes, ctypes.util, resource, sys, threading
    from eureka_jax import host_memory
    if sys.argv[1] == "keep":
        print(host_memory.keep_freed_memory(), file=sys.stderr)
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    faults = []
    def rounds():
        for _ in range(2):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            buffer = libc.malloc(256 * 2**20)
            ctypes.memset(buffer, 1, 256 * 2**20)
            libc.free(buffer)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    worker = threading.Thread(target=rounds)
    worker.start()
    worker.join()
    print(faults[1])
""")

PAGES = 256 * 2**20 // 4096


def second_round_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
    assert second_round_faults("keep") < PAGES // 100
    # The control: without it every page of the new buffer faults again (the probe can fail).
    assert second_round_faults("default") > PAGES // 2


@pytest.mark.parametrize("platforms, applied", [("cpu", True), ("tpu", False)])
def test_console_script_keeps_memory_on_cpu_only(platforms, applied, monkeypatch):
    calls = []
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    monkeypatch.setattr(cli.host_memory, "keep_freed_memory", lambda: calls.append(1))
    monkeypatch.setattr(sys, "argv", ["eureka-jax", "--help"])
    with pytest.raises(SystemExit) as exit_:
        cli.run()
    assert exit_.value.code == 0
    assert calls == ([1] if applied else [])
