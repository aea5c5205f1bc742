"""Sampling throughput: the on-device group sampler against transformers `generate` (torch eager,
float32, CPU), on the same weights and prompts, both generating exactly `--new-tokens` tokens.

    .venv/bin/python benchmarks/sampler.py [--repeats 3] [--new-tokens 128] [--threads 2]
        [--shapes 1x1,8x1,4x8,16x8] [--no-image]

Model: a random Qwen2.5-VL saved with save_pretrained (text: hidden 768, 8 layers, 12 heads / 2 kv
heads, head_dim 64, mlp 2048, vocab 32000 untied = 98M language-model parameters, 394 MB in
float32; vision: hidden 64, depth 2), loaded by both frameworks from that directory. Prompts:
P short chat-formatted questions of different lengths (left-padded for transformers, bucketed
for the sampler); PxG = P prompts x G samples each (transformers: num_return_sequences=G, which
prefills every sample; the sampler prefills once per prompt). An extra 4x8 case puts an image in
every prompt. Sampling: temperature 1, no top-k / top-p, no stop tokens (transformers:
eos_token_id=None), so both run exactly `--new-tokens` decoding steps.

Decode throughput = P*G*(new_tokens - 1) / (time(new_tokens) - time(1)): the time of a run that
generates one token (vision + prefill + first token) is subtracted, for both frameworks. Each
timing is the median of `--repeats` runs after a warm-up; compile_s is an ahead-of-time
lower + compile of the sampler's program, timed on its own.

Roofline: a decoding step must read every language-model weight once (the embedding table only for
the rows it gathers), the keys and values of each prompt once (its G samples share them) and those
of each sample's generated tokens so far (averaged over the steps). bytes per step / measured step
time / measured memory bandwidth (the best of NumPy sum on 1 and 2 threads, NumPy copy and an XLA
sum over 512 MB, medians of 5) is the fraction of this machine's roofline the decoding loop reaches.
GFLOP/s counts 2 x (weights multiplied per token, i.e. not the embedding lookup) x rows per step, so
at large P*G, where decoding is compute-bound, it is the figure to compare with the CPU's peak.
matmul_floor_ms times the step's matrix products alone (same weights, P*G rows, one jitted chain):
matmul_fraction = floor / step time is how close a step comes to the compute ceiling. A report,
not a test; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import hf_prompt_inputs
from flax import nnx

from eureka_jax import hf_io, testing
from eureka_jax.batch import Buckets
from eureka_jax.processing import QwenVLProcessor
from eureka_jax.processing.qwen_rows import collate_prompts, prompt_row
from eureka_jax.sampler import Sampler, SamplingConfig, generate

TEXT = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
            num_key_value_heads=2, vocab_size=32000,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                             "mrope_section": [8, 12, 12]})
VISION = dict(hidden_size=64, intermediate_size=128, depth=2, num_heads=2, window_size=112,
              fullatt_block_indexes=[1])
QUESTIONS = (
    "What is 3 + 4?",
    "Find x such that 3x + 5 = 20.",
    "The circle has radius 4. What is its area?",
    "Which of the following is correct? A. 1 B. 2 C. 3 D. 4",
    "A rectangle has length 12 and width 7. What is its perimeter?",
    "Compute 2^10.",
    "What is the sum of the angles in a triangle, in degrees?",
    "Simplify 1/2 + 1/3.",
)
BUCKETS = Buckets(lengths=(64, 128), patches=(0, 256))


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def memory_bandwidth_gbps(megabytes: int = 512, repeats: int = 5) -> dict[str, float]:
    """Memory bandwidth from arrays far larger than the caches: bytes read by a NumPy sum on 1 and
    2 threads (each summing half; NumPy releases the GIL in the reduction) and by a jitted XLA
    sum, and bytes read + written by a NumPy copy. "best" is the largest: the roofline."""
    array = np.ones(megabytes * 2**20 // 4, np.float32)
    target = np.empty_like(array)
    halves = np.array_split(array, 2)

    def two_threads():
        threads = [threading.Thread(target=np.sum, args=(h,)) for h in halves]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    on_device = jnp.asarray(array)
    xla_sum = jax.jit(jnp.sum)
    xla_sum(on_device).block_until_ready()
    size = array.nbytes
    figures = {
        "numpy_sum_1_thread": size / median_s(array.sum, repeats),
        "numpy_sum_2_threads": size / median_s(two_threads, repeats),
        "numpy_copy": 2 * size / median_s(lambda: np.copyto(target, array), repeats),
        "xla_sum": size / median_s(lambda: xla_sum(on_device).block_until_ready(), repeats),
    }
    figures = {name: round(value / 1e9, 2) for name, value in figures.items()}
    figures["best"] = max(figures.values())
    return figures


def decode_bytes_per_step(model, prompt_tokens: list[int], group: int, new_tokens: int) -> float:
    """Bytes a decoding step must read: weights once (embedding rows only for the tokens it
    embeds, unless tied), each prompt's K/V once for its group, and each sample's generated K/V,
    averaged over the steps."""
    config = model.config
    text = config.text
    params = nnx.state(model, nnx.Param)
    n = len(prompt_tokens) * group
    weight_bytes = 0
    for path, variable in nnx.to_flat_state(params):
        if path[0] == "visual" or (path[0] == "embed_tokens" and not config.tie_word_embeddings):
            continue
        weight_bytes += variable.get_value().nbytes
    itemsize = jnp.dtype(config.compute_dtype).itemsize
    weight_bytes += n * text.hidden_size * itemsize  # the gathered embedding rows
    kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * itemsize
    prompt_kv = sum(prompt_tokens) * kv_per_token
    return weight_bytes + prompt_kv + n * (new_tokens / 2) * kv_per_token


def matmul_floor_s(model, rows: int, repeats: int, loops: int = 10) -> float:
    """Seconds per step of the decoding step's matrix products alone (every language-model
    projection, MLP and output-layer product at `rows` rows, chained as in a step, jitted): the
    compute ceiling a decoding step can reach on this machine with these weights."""
    kernels = []
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[0] != "visual" and path[-1] == "kernel":
            value = v.get_value()
            # Decoder layers are stacked (a leading layer axis): one kernel per layer.
            kernels.extend(value if value.ndim == 3 else [value])
    if model.config.tie_word_embeddings:
        kernels.append(model.embed_tokens.get_value().T)
    highest = jax.lax.Precision.HIGHEST

    def chain(_, carry):
        acts = {kernels[0].shape[0]: jnp.full((rows, kernels[0].shape[0]), 1e-3) + carry}
        total = 0.0
        for kernel in kernels:
            d_in, d_out = kernel.shape
            x = acts.get(d_in, jnp.full((rows, d_in), 1e-3) + carry)
            acts[d_out] = jnp.dot(x, kernel, precision=highest)
            total = total + acts[d_out][0, 0]
        return carry + total * 1e-9

    program = jax.jit(lambda: jax.lax.fori_loop(0, loops, chain, jnp.float32(0)))
    program().block_until_ready()
    return median_s(lambda: program().block_until_ready(), repeats) / loops


# ---------------------------------------------------------------------------------------------
# The two samplers
# ---------------------------------------------------------------------------------------------


def torch_inputs(encoded, pad_token_id: int, image_token_id: int) -> dict:
    """Left-padded batch, as transformers expects for generation."""
    length = max(len(e.input_ids) for e in encoded)
    return hf_prompt_inputs(encoded, length, pad_token_id, image_token_id)


def run_torch(reference, inputs: dict, group: int, new_tokens: int, pad_token_id: int):
    import torch

    reference.model.rope_deltas = None
    with torch.no_grad():
        out = reference.generate(
            **inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
            num_return_sequences=group, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            eos_token_id=None, pad_token_id=pad_token_id)
    assert out.shape[1] == inputs["input_ids"].shape[1] + new_tokens, out.shape


def make_sampler(graphdef, group: int, new_tokens: int) -> Sampler:
    return Sampler(graphdef, SamplingConfig(num_samples=group, max_new_tokens=new_tokens,
                                            temperature=1.0))


def compile_seconds(sampler: Sampler, state, batch) -> float:
    """Ahead-of-time lower + compile of the program the sampler runs (same function, same
    shapes), timed on its own: the first call's time minus a later call's is noisy under load."""
    graphdef, config = sampler.graphdef, sampler.config
    program = jax.jit(lambda s, b, seed: generate(nnx.merge(graphdef, s), b, seed, config))
    start = time.perf_counter()
    program.lower(state, batch, jnp.uint32(0)).compile()
    return time.perf_counter() - start


def run_ours(sampler, state, batch, seed: int):
    out = sampler(state, batch, seed)
    jax.block_until_ready(out)
    assert out.tokens_NxL.shape[1] == sampler.config.max_new_tokens


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Bench:
    model: object  # the port (float32)
    graphdef: nnx.GraphDef
    state: nnx.State
    reference: object  # transformers' model (float32)
    processor: QwenVLProcessor
    lm_params: int
    matmul_params: int  # weights a decoding step multiplies by (not the embedding lookup)
    bandwidth_gbps: float
    new_tokens: int
    repeats: int


def run_case(bench: Bench, p: int, g: int, with_image: bool) -> dict:
    """Decode throughput of both samplers for P prompts x G samples. The repeats interleave the
    two frameworks so that load from other processes affects both alike."""
    pad, new = bench.processor.pad_token_id, bench.new_tokens
    images = [[testing.draw_image(200, 120, seed=i)] if with_image else [] for i in range(p)]
    encoded = [bench.processor.encode(question=QUESTIONS[i % len(QUESTIONS)], images=images[i])
               for i in range(p)]
    rows = [prompt_row(e, bench.model.config) for e in encoded]
    batch = jax.tree.map(jnp.asarray, collate_prompts(rows, BUCKETS, pad_token_id=pad))
    inputs = torch_inputs(encoded, pad, bench.model.config.image_token_id)

    full, first = make_sampler(bench.graphdef, g, new), make_sampler(bench.graphdef, g, 1)
    compile_s = compile_seconds(full, bench.state, batch)
    run_ours(full, bench.state, batch, 0)
    run_ours(first, bench.state, batch, 0)
    run_torch(bench.reference, inputs, g, 1, pad)  # warm-up
    runs = {
        "ours_full": lambda seed: run_ours(full, bench.state, batch, seed),
        "ours_first": lambda seed: run_ours(first, bench.state, batch, seed),
        "hf_full": lambda seed: run_torch(bench.reference, inputs, g, new, pad),
        "hf_first": lambda seed: run_torch(bench.reference, inputs, g, 1, pad),
    }
    times = {name: [] for name in runs}
    for seed in range(1, bench.repeats + 1):
        for name, run in runs.items():
            started = time.perf_counter()
            run(seed)
            times[name].append(time.perf_counter() - started)
    t = {name: statistics.median(values) for name, values in times.items()}

    n = p * g
    step_s = (t["ours_full"] - t["ours_first"]) / (new - 1)
    hf_step_s = (t["hf_full"] - t["hf_first"]) / (new - 1)
    bytes_per_step = decode_bytes_per_step(bench.model, [len(e.input_ids) for e in encoded], g,
                                           new)
    matmul_s = matmul_floor_s(bench.model, n, bench.repeats)
    return {
        "case": f"{p}x{g}{'+image' if with_image else ''}",
        "ours_decode_tok_s": round(n / step_s, 1),
        "hf_decode_tok_s": round(n / hf_step_s, 1),
        "ratio": round(hf_step_s / step_s, 2),
        "ours_e2e_tok_s": round(n * new / t["ours_full"], 1),
        "hf_e2e_tok_s": round(n * new / t["hf_full"], 1),
        "ours_prefill_s": round(t["ours_first"], 3),
        "hf_prefill_s": round(t["hf_first"], 3),
        "compile_s": round(compile_s, 1),
        "ours_ms_per_step": round(step_s * 1e3, 2),
        "hf_ms_per_step": round(hf_step_s * 1e3, 2),
        "bytes_per_step_MB": round(bytes_per_step / 1e6, 1),
        "roofline_fraction": round(bytes_per_step / step_s / 1e9 / bench.bandwidth_gbps, 3),
        "matmul_floor_ms": round(matmul_s * 1e3, 2),
        "matmul_fraction": round(matmul_s / step_s, 3),
        "gflops": round(2 * bench.matmul_params * n / step_s / 1e9, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--shapes", default="1x1,8x1,4x8,16x8", help="PxG cases")
    parser.add_argument("--no-image", action="store_true", help="skip the 4x8 image case")
    args = parser.parse_args()

    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.set_num_threads(args.threads)
    bandwidth = memory_bandwidth_gbps()
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    print(f"memory bandwidth GB/s (512 MB arrays): {bandwidth}; load average {load}")

    workdir = Path(tempfile.mkdtemp(prefix="bench_sampler_"))
    model_dir = testing.make_hf_model_dir(workdir / "model", initializer_range=0.02,
                                          text_config=TEXT, vision_config=VISION)
    model = hf_io.load_model(model_dir)
    graphdef, state = nnx.split(model)
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(model_dir), dtype=torch.float32).eval()
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    lm_params = sum(v.get_value().size for path, v in flat if path[0] != "visual")
    lookup_only = 0 if model.config.tie_word_embeddings else model.embed_tokens.get_value().size
    bench = Bench(model, graphdef, state, reference, QwenVLProcessor.from_pretrained(model_dir),
                  lm_params, lm_params - lookup_only, bandwidth["best"], args.new_tokens,
                  args.repeats)
    print(f"language model: {lm_params / 1e6:.1f}M parameters, float32; "
          f"{args.new_tokens} new tokens; {args.repeats} repeats; backend {jax.default_backend()}")

    cases = [(shape, False) for shape in args.shapes.split(",")]
    if not args.no_image:
        cases.append(("4x8", True))
    print(f"{'case':<10} {'ours tok/s':>10} {'hf tok/s':>9} {'ratio':>6} {'ours e2e':>9} "
          f"{'hf e2e':>8} {'compile s':>9} {'ms/step':>8} {'roofline':>8} {'GFLOP/s':>8} "
          f"{'matmul ms':>9} {'matmul frac':>11}")
    results = []
    for shape, with_image in cases:
        p, g = (int(x) for x in shape.split("x"))
        r = run_case(bench, p, g, with_image)
        results.append(r)
        print(f"{r['case']:<10} {r['ours_decode_tok_s']:>10} {r['hf_decode_tok_s']:>9} "
              f"{r['ratio']:>6} {r['ours_e2e_tok_s']:>9} {r['hf_e2e_tok_s']:>8} "
              f"{r['compile_s']:>9} {r['ours_ms_per_step']:>8} {r['roofline_fraction']:>8} "
              f"{r['gflops']:>8} {r['matmul_floor_ms']:>9} {r['matmul_fraction']:>11}", flush=True)
    print(json.dumps({"benchmark": "sampler", "backend": jax.default_backend(),
                      "torch_threads": args.threads, "repeats": args.repeats,
                      "new_tokens": args.new_tokens, "lm_params_M": round(lm_params / 1e6, 1),
                      "load_average": load, "bandwidth_GBps": bandwidth, "cases": results}))


if __name__ == "__main__":
    main()
