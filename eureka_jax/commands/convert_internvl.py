"""`eureka-jax convert-internvl --input SRC --output DST`: an original InternVL2.5 release
checkpoint (InternVLChatModel, loaded with trust_remote_code) -> transformers' native layout
(InternVLForConditionalGeneration, model_type "internvl"), tokenizer and processor included."""

from __future__ import annotations

import sys

from eureka_jax.commands import argument_parser
from eureka_jax.errors import InputError

EXAMPLES = (
    "eureka-jax convert-internvl --input InternVL2_5-8B --output InternVL2_5-8B-native",
    "eureka-jax convert-internvl --input InternVL2_5-1B --output InternVL2_5-1B-native",
)


def main(argv: list[str]) -> int:
    parser = argument_parser("convert-internvl", __doc__, EXAMPLES)
    parser.add_argument("--input", required=True,
                        help="release directory: config.json, safetensors shards, tokenizer")
    parser.add_argument("--output", required=True, help="output directory (native layout)")
    args = parser.parse_args(argv)
    from eureka_jax.models.internvl_convert import convert_release_checkpoint

    try:
        report = convert_release_checkpoint(args.input, args.output)
    except InputError as e:
        print(f"eureka-jax convert-internvl: {e}", file=sys.stderr)
        return 2
    print(f"wrote {report.num_tensors} tensors in {report.num_shards} shard(s) to "
          f"{report.output_dir} ({report.llm_architecture} language model; tokenizer "
          f"{report.vocab_size} ids, <IMG_CONTEXT> = {report.image_token_id})")
    return 0
