"""`eureka-jax export --checkpoint RUN[/checkpoints/STEP] --output HFDIR [--dtype bfloat16]`:
a Hugging Face directory (config.json, safetensors, tokenizer files) that transformers loads."""

from __future__ import annotations

import sys

from eureka_jax.commands import argument_parser

EXAMPLES = (
    "eureka-jax export --checkpoint runs/tiny --output runs/tiny/hf",
    "eureka-jax export --checkpoint runs/7b/checkpoints/120 --output hf/mmeureka-7b --dtype "
    "bfloat16",
)


def main(argv: list[str]) -> int:
    parser = argument_parser("export", __doc__, EXAMPLES)
    parser.add_argument("--checkpoint", required=True,
                        help="run workdir (latest step) or WORKDIR/checkpoints/STEP")
    parser.add_argument("--output", required=True)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="weights dtype in the export (default: as trained)")
    args = parser.parse_args(argv)
    from eureka_jax import families
    from eureka_jax.distributed import is_primary
    from eureka_jax.errors import InputError
    from eureka_jax.train import default_mesh, load_trained_model

    try:
        # On several processes the parameters are spread over all of them and gathered as they
        # are written; process 0 writes.
        model, source = load_trained_model(args.checkpoint, mesh=default_mesh())
        output = families.for_config(model.config).export_model(
            model, args.output, source_dir=source, dtype=args.dtype)
    except InputError as error:
        print(f"eureka-jax export: {error}", file=sys.stderr)
        return 2
    if is_primary():
        print(f"exported to {output}")
    return 0
