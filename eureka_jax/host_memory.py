"""Keep freed host memory in the process, so a CPU training step does not page-fault it back in.

XLA:CPU allocates each executable's temporaries when it runs and frees them when it returns: one
update step of benchmarks/train_step.py maps a fresh 1.08 GB buffer (plus a 99 MB one) every
step. glibc serves requests that large with mmap and gives them back with munmap, so every step
touches ~280k new 4 KiB pages: 0.4 s of kernel time per step on a quiet VM, and 2-4 s when the
hypervisor has reclaimed the guest's free pages (seen here: steps of 2 s and 5 s alternating,
the difference all system time). With `keep_freed_memory()` the step reuses the same heap
memory: 0 minor faults and ~0.01 s of system time per step once the heap has grown to the
step's peak, usually after one or two steps (benchmarks/train_step.py reports both, per
framework; `--malloc default` for the comparison). It is not a guarantee: a heap fragmented by
other allocations can still grow, as in one of four cases there, where torch's steps interleave
with ours in one process.

What it sets, through glibc's mallopt (mallopt(3)):
- M_ARENA_MAX = 1: one heap for every thread. A thread's own arena cannot grow past 64 MiB and
  maps anything larger directly, whatever the mmap limit says;
- M_MMAP_MAX = 0: no allocation is served by mmap, all come from the heap;
- M_TRIM_THRESHOLD = 2 GiB - 1 (mallopt takes an int): free memory at the top of the heap is
  returned to the kernel only when more than that is free.
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
_TRIM_THRESHOLD_BYTES = 2**31 - 1


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
                "M_TRIM_THRESHOLD": (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)}
    refused = [name for name, (param, value) in settings.items() if mallopt(param, value) != 1]
    if refused:
        return f"host memory: mallopt refused {', '.join(refused)}"
    return "host memory: freed memory kept in-process (one arena, no mmap, trim above 2 GiB)"
