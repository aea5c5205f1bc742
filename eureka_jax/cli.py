"""`eureka-jax COMMAND [flags]`: dispatches to eureka_jax.commands.<module>.main(argv).

`main` returns the exit status, also for argparse's --help and usage errors (which raise
SystemExit), so a test or notebook can call it like any function."""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import sys

from eureka_jax import distributed, host_memory

# command -> (module under eureka_jax.commands, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "GRPO-family training from a config file; rerun to resume"),
    "demo": ("demo", "the CPU demo: synthetic data, tiny model, SFT warm-start then GRPO"),
    "sft": ("sft", "supervised warm-start on (prompt, response) records"),
    "sample": ("sample", "sample G completions per prompt with the on-device sampler"),
    "eval": ("evaluate", "greedy or pass@k accuracy on a held-out file"),
    "score": ("score", "score completions with the rule rewards (jsonl in, jsonl out)"),
    "logits": ("logits", "logits of the Flax port for HF processor arrays (npz in, npz out)"),
    "verify-port": ("verify_port", "compare the Flax port with transformers on a HF directory"),
    "plan": ("plan", "does a config fit a TPU slice? compile a step ahead of time, time it"),
    "export": ("export", "export a training checkpoint to a Hugging Face directory"),
    "convert": ("convert", "convert MMK12-style parquet / HF datasets to MM-Eureka jsonl"),
    "convert-internvl": ("convert_internvl", "InternVL2.5 release checkpoint -> native layout"),
    "make-synthetic": ("make_synthetic", "write the synthetic visual-arithmetic dataset"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: eureka-jax COMMAND [flags]   (eureka-jax COMMAND --help for flags)", ""]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def default_platforms() -> None:
    """JAX_PLATFORMS=cpu on a host with no TPU and no CUDA plugin, unless the user set it.

    `make install` puts libtpu into the environment (for `eureka-jax plan`); on a machine without
    a TPU, jax would then spend ~10 s probing for one at start-up and print pages of warnings
    before falling back to the CPU. TPU hosts expose /dev/accel* (v4, v5e) or /dev/vfio/N (v5p,
    v6e); there jax is left to pick the TPU, as it is left to pick CUDA when its plugin is
    installed."""
    if "JAX_PLATFORMS" in os.environ:
        return
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return
    if any(importlib.util.find_spec(p) for p in ("jax_cuda12_plugin", "jax_cuda13_plugin")):
        return
    os.environ["JAX_PLATFORMS"] = "cpu"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    default_platforms()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"eureka-jax: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    # Before the command touches a JAX backend: a multi-host run's processes connect here.
    distributed.initialize_from_env()
    module = importlib.import_module(f"eureka_jax.commands.{COMMANDS[name][0]}")
    try:
        return int(module.main(rest) or 0)
    except SystemExit as exit_:  # argparse exits after --help (0) and after a bad flag (2)
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        raise


def run() -> None:
    """The console script: `main` in a process of its own. Only here, before JAX starts its
    threads, is it safe to retune the C allocator: on the CPU backend freed host memory is kept
    in-process (see eureka_jax.host_memory), which a notebook calling `main` does not get."""
    default_platforms()
    if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
        host_memory.keep_freed_memory()
    sys.exit(main())


if __name__ == "__main__":
    run()
