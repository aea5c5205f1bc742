"""`eureka-jax sample --model DIR (--prompt TEXT [--image PATH ...] | --inputs IN.npz)
[--num-samples G] [--max-new-tokens N] [--temperature T] [--top-p P] [--top-k K] [--greedy]
[--seed S] [--json] [--system TEXT] [--mesh 1,1,1] [--dtype float32|bfloat16]`:
G completions per prompt from the on-device group sampler.

--prompt builds one user turn, the images first and then the text, with DIR's chat template and
the generation prompt (an optional --system turn first). --inputs takes the arrays the Hugging
Face processor returns (input_ids, attention_mask, pixel_values, image_grid_thw), as
`eureka-jax logits` does; every row is one prompt. Sampling stops at the directory's stop ids
(generation_config.json's eos_token_id, else the tokenizer's eos). Samples are reproducible: the
same seed gives the same tokens, on any mesh.

--json prints one JSON object per sample: prompt_index, sample_index, tokens, text, logprobs
(float32 log-prob of each token under the distribution it was drawn from), finish_reason
("stop" or "length"). Without it, readable text.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from eureka_jax.commands import argument_parser
from eureka_jax.errors import InputError

EXAMPLES = (
    "eureka-jax sample --model hf/qwen2_5_vl_3b --prompt 'What is 2+3?' --num-samples 4",
    "eureka-jax sample --model hf/qwen2_5_vl_3b --prompt 'How many circles?' --image "
    "shapes.png --greedy --json",
)


def load_prompts(model_dir: str, *, prompt: str | None = None, images: Sequence[str] = (),
                system: str | None = None, inputs: dict[str, np.ndarray] | None = None):
    """(processor, model config, rows): the prompts to sample from, checked before any weight is
    read. Either `prompt` (+ `images`, `system`) or HF processor arrays `inputs`."""
    from eureka_jax import families

    family = families.for_model_dir(model_dir)  # a local directory, never the hub
    processor = family.load_processor(model_dir)
    config = family.read_config(Path(model_dir))
    if inputs is None:
        encoded = processor.encode(question=prompt, images=list(images), system=system,
                                   name="--prompt")
        return processor, config, [family.prompt_row(encoded, config, name="--prompt")]
    batch = family.port_inputs(inputs, config, source="--inputs")
    return processor, config, family.prompt_rows(batch, config)


def sample(model_dir: str, rows, processor, sampling, *, seed: int = 0,
           mesh_shape: tuple[int, int, int] = (1, 1, 1), dtype: str = "float32") -> list[dict]:
    """One record per sample (prompt-major), as printed by --json."""
    import jax
    from flax import nnx

    from eureka_jax import families, sharding
    from eureka_jax.batch import Buckets, batch_shardings
    from eureka_jax.sampler import FINISH_REASONS, Sampler

    devices = jax.devices()
    needed = int(np.prod(mesh_shape))
    if needed > len(devices):
        raise InputError(f"--mesh {mesh_shape} needs {needed} devices; {len(devices)} available")
    # One call: the buckets are the batch's own sizes, so nothing is padded beyond the longest.
    buckets = Buckets(lengths=(max(r.num_tokens for r in rows),),
                      patches=(max(r.num_patches for r in rows),))
    family = families.for_model_dir(model_dir)
    batch = family.collate_prompts(rows, buckets, pad_token_id=processor.pad_token_id)
    mesh = sharding.make_mesh(mesh_shape, devices[:needed])
    model = family.load_model(model_dir, mesh=mesh, param_dtype=dtype, compute_dtype=dtype)
    with sharding.activate(mesh):
        graphdef, state = nnx.split(model)
        output = Sampler(graphdef, sampling)(
            state, jax.device_put(batch, batch_shardings(batch, mesh)), seed)
        tokens, logprobs, lengths, finish = jax.device_get(
            (output.tokens_NxL, output.logprobs_NxL, output.lengths_N, output.finish_N))
    group = sampling.num_samples
    records = []
    for n, length in enumerate(lengths.tolist()):
        ids = tokens[n, :length].tolist()
        records.append({
            "prompt_index": n // group,
            "sample_index": n % group,
            "tokens": ids,
            "text": processor.tokenizer.decode(ids, skip_special_tokens=True),
            "logprobs": [float(x) for x in logprobs[n, :length]],
            "finish_reason": FINISH_REASONS[int(finish[n])],
        })
    return records


def main(argv: list[str]) -> int:
    parser = argument_parser("sample", __doc__, EXAMPLES)
    parser.add_argument("--model", required=True,
                        help="Hugging Face Qwen2.5-VL or InternVL directory with tokenizer "
                             "and processor files")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the user's question")
    source.add_argument("--inputs", help="npz of HF processor arrays, one prompt per row")
    parser.add_argument("--image", action="append", default=[],
                        help="image file for --prompt (repeat for several)")
    parser.add_argument("--system", help="system turn for --prompt")
    parser.add_argument("--num-samples", type=int, default=1, help="G samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0, help="1 disables nucleus sampling")
    parser.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-phases", type=int, default=4,
                        help="times the generated-token KV buffer grows (1: sized for "
                             "--max-new-tokens from the start, least memory)")
    parser.add_argument("--json", action="store_true", help="one JSON object per sample")
    parser.add_argument("--mesh", default="1,1,1", help="data,fsdp,tensor mesh shape")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="parameter and compute dtype")
    args = parser.parse_args(argv)

    from eureka_jax.commands.logits import parse_mesh, read_npz
    from eureka_jax.sampler import SamplingConfig

    try:
        if args.inputs is not None and (args.image or args.system is not None):
            raise InputError("--image and --system go with --prompt; --inputs holds whole "
                             "prompts already")
        inputs = None if args.inputs is None else read_npz(args.inputs)
        processor, _, rows = load_prompts(args.model, prompt=args.prompt, images=args.image,
                                         system=args.system, inputs=inputs)
        sampling = SamplingConfig(
            num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            greedy=args.greedy, stop_token_ids=processor.stop_token_ids,
            cache_phases=args.cache_phases)
        records = sample(args.model, rows, processor, sampling, seed=args.seed,
                         mesh_shape=parse_mesh(args.mesh), dtype=args.dtype)
    except InputError as e:
        print(f"eureka-jax sample: {e}", file=sys.stderr)
        return 2
    for record in records:
        if args.json:
            print(json.dumps(record))
        else:
            print(f"--- prompt {record['prompt_index']} sample {record['sample_index']} "
                  f"({record['finish_reason']}, {len(record['tokens'])} tokens, "
                  f"log-prob {sum(record['logprobs']):.2f})")
            print(record["text"])
    return 0
