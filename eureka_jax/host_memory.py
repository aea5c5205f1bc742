"""Keep freed host memory in the process, so a CPU training step does not page-fault it back in.

XLA:CPU allocates each executable's temporaries when it runs and frees them when it returns: one
update step of benchmarks/train_step.py maps a fresh 1.08 GB buffer (plus a 99 MB one) every
step. glibc serves requests that large with mmap and gives them back with munmap, so every step
touches ~280k new 4 KiB pages: 0.4 s of kernel time per step on a quiet VM, and 2-4 s when the
hypervisor has reclaimed the guest's free pages (seen here: steps of 2 s and 5 s alternating,
the difference all system time). With `keep_freed_memory()` the step can reuse the same heap
memory. Measured here: a JAX-only loop of that update step, 0 minor faults and ~0.01 s of
system time per step from the second step on (282k and 0.4-3.3 s without); the CPU demo,
0.71M minor faults in all instead of 19.6M, 119 s instead of 125 s, the same accuracies.

Known limit: glibc fixes its arena count the first time a thread takes an arena of its own, so
M_ARENA_MAX binds only if no thread has allocated yet. In benchmarks/train_step.py's spawned
worker processes it did not bind (the JAX worker still faulted ~280k pages per step). Setting
GLIBC_TUNABLES (below) before the process starts is the robust route: the benchmark's workers
start with it (~1k faults per step); the eureka-jax command does not yet.

What it sets, through glibc's mallopt (mallopt(3)):
- M_ARENA_MAX = 1: one heap for every thread. A thread's own arena cannot grow past 64 MiB and
  maps anything larger directly, whatever the mmap limit says;
- M_MMAP_MAX = 0: no allocation is served by mmap, all come from the heap;
- M_TRIM_THRESHOLD = -1: free memory at the top of the heap is never returned to the kernel
  (mallopt(3): "-1 disables trimming completely"; mallopt takes an int, so no finite threshold
  above 2 GiB can be set this way).
The cost: the process's resident memory stays at its peak instead of falling between steps.
Accelerator runs are unaffected in substance (their temporaries live in device memory), which is
why the CLI applies this only when JAX runs on the CPU. It must run before JAX or torch start
their thread pools (the arena limit binds only threads that have not allocated yet); on a C
library without mallopt (macOS, musl) it does nothing and says so."""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER = -1


def keep_freed_memory() -> str:
    """Set glibc's allocator to reuse freed memory in-process; returns what was done, in words."""
    libc_path = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(libc_path)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return f"host memory: C library {libc_path!r} has no mallopt; allocator left as it is"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = {"M_ARENA_MAX": (_M_ARENA_MAX, 1), "M_MMAP_MAX": (_M_MMAP_MAX, 0),
                "M_TRIM_THRESHOLD": (_M_TRIM_THRESHOLD, _NEVER)}
    refused = [name for name, (param, value) in settings.items() if mallopt(param, value) != 1]
    if refused:
        return f"host memory: mallopt refused {', '.join(refused)}"
    return "host memory: freed memory kept in-process (one arena, no mmap, no trimming)"


# The same settings for a process not yet started: glibc reads them before any thread exists.
GLIBC_TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                  "glibc.malloc.trim_threshold=1099511627776")


def environment_keeping_freed_memory(environ: dict[str, str]) -> dict[str, str]:
    """`environ` with GLIBC_TUNABLES extended by the settings above, for a child process."""
    existing = environ.get("GLIBC_TUNABLES")
    return {**environ, "GLIBC_TUNABLES": f"{existing}:{GLIBC_TUNABLES}" if existing
            else GLIBC_TUNABLES}
