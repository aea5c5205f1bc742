"""`eureka-jax export --checkpoint RUN[/checkpoints/STEP] --output HFDIR [--dtype bfloat16]`:
a Hugging Face directory (config.json, safetensors, tokenizer files) that transformers loads."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="eureka-jax export", description=__doc__)
    parser.add_argument("--checkpoint", required=True,
                        help="run workdir (latest step) or WORKDIR/checkpoints/STEP")
    parser.add_argument("--output", required=True)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="weights dtype in the export (default: as trained)")
    args = parser.parse_args(argv)
    from eureka_jax import hf_io
    from eureka_jax.errors import InputError
    from eureka_jax.train import load_trained_model

    try:
        model, source = load_trained_model(args.checkpoint)
        output = hf_io.export_model(model, args.output, source_dir=source, dtype=args.dtype)
    except InputError as error:
        print(f"eureka-jax export: {error}", file=sys.stderr)
        return 2
    print(f"exported to {output}")
    return 0
