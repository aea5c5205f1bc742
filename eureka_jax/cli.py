"""`eureka-jax COMMAND [flags]`: dispatches to eureka_jax.commands.<module>.main(argv)."""

from __future__ import annotations

import importlib
import sys

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
    "make-synthetic": ("make_synthetic", "write the synthetic visual-arithmetic dataset"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: eureka-jax COMMAND [flags]   (eureka-jax COMMAND --help for flags)", ""]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"eureka-jax: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"eureka_jax.commands.{COMMANDS[name][0]}")
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
