"""`eureka-jax eval --model HFDIR_or_RUN --data FILE --output results.json [--num-samples K]`:
greedy accuracy (or pass@K with K samples at --temperature) on a held-out file, scored by the
same reward code as training."""

from __future__ import annotations

import contextlib
import json
import sys

from eureka_jax.batch import Buckets, batch_shardings
from eureka_jax.commands import argument_parser
from eureka_jax.workdirs import as_path

EXAMPLES = (
    "eureka-jax eval --model runs/tiny --data runs/demo/data/eval.jsonl --output results.json",
    "eureka-jax eval --model Qwen/Qwen2.5-VL-7B-Instruct --data mmk12/test.jsonl --output "
    "pass8.json --num-samples 8 --temperature 1.0",
)


def main(argv: list[str]) -> int:
    parser = argument_parser("eval", __doc__, EXAMPLES)
    parser.add_argument("--model", required=True,
                        help="HF directory / hub id, or a training run / checkpoint")
    parser.add_argument("--data", required=True, help="jsonl / parquet / HF datasets directory")
    parser.add_argument("--output", required=True, help="results.json")
    parser.add_argument("--num-samples", type=int, default=1, help="K for pass@K (1 = greedy)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--max-examples", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--system", default=None, help="system prompt (default: MM-Eureka's)")
    parser.add_argument("--min-pixels", type=int, default=None, help="Qwen2.5-VL images")
    parser.add_argument("--max-pixels", type=int, default=None, help="Qwen2.5-VL images")
    parser.add_argument("--max-tiles", type=int, default=None, help="InternVL tiles per image")
    parser.add_argument("--length-buckets", default="256,512,1024,2048,4096")
    parser.add_argument("--patch-buckets", default="0,256,1024,2560,4096")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import jax

    from eureka_jax import distributed, families, hf_io, sharding
    from eureka_jax.data import MMEUREKA_SYSTEM_PROMPT
    from eureka_jax.errors import InputError
    from eureka_jax.evaluation import Evaluator
    from eureka_jax.rewards import RewardConfig, RewardPool
    from eureka_jax.train import checkpoint_paths, default_mesh, load_trained_model

    # On several processes the model is spread over all of them, each preprocesses and scores
    # its share of every batch, and process 0 writes the results.
    mesh = default_mesh()
    try:
        try:
            checkpoint_paths(args.model)
            model, source = load_trained_model(args.model, mesh=mesh)
        except InputError:
            source = hf_io.resolve_model_dir(args.model)
            model = families.for_model_dir(source).load_model(source, mesh=mesh)
        family = families.for_config(model.config)
        processor = family.load_processor(source, families.ImageOptions(
            min_pixels=args.min_pixels, max_pixels=args.max_pixels, max_tiles=args.max_tiles))
        from flax import nnx

        graphdef, params = nnx.split(model)
        buckets = Buckets(
            lengths=tuple(int(x) for x in args.length_buckets.split(",")),
            patches=tuple(int(x) for x in args.patch_buckets.split(",")))
        if mesh is None:
            def put_on_device(tree):
                return jax.tree.map(jax.numpy.asarray, tree)
        else:
            def put_on_device(batch):
                return jax.device_put(batch, batch_shardings(batch, mesh))
        with RewardPool(RewardConfig()) as pool, (
                sharding.activate(mesh) if mesh is not None else contextlib.nullcontext()):
            evaluator = Evaluator(
                graphdef=graphdef, processor=processor, model_config=model.config,
                data=args.data, max_examples=args.max_examples, batch_size=args.batch_size,
                buckets=buckets,
                system_prompt=args.system if args.system is not None else MMEUREKA_SYSTEM_PROMPT,
                max_new_tokens=args.max_new_tokens, stop_token_ids=processor.stop_token_ids,
                reward_pool=pool, put_on_device=put_on_device,
                num_samples=args.num_samples, temperature=args.temperature, seed=args.seed)
            result = evaluator.run(params)
    except InputError as error:
        print(f"eureka-jax eval: {error}", file=sys.stderr)
        return 2
    summary = {"accuracy": result.accuracy, f"pass@{args.num_samples}": result.pass_at_k,
               "num_examples": len(result.items), "model": args.model, "data": args.data}
    if distributed.is_primary():
        as_path(args.output).write_text(json.dumps({**summary, "items": result.items}, indent=2))
        print(json.dumps(summary))
    return 0
