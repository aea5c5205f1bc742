"""Dense vs chunked (XLA) attention on CPU: wall time and XLA's temporary-memory count.

    .venv/bin/python benchmarks/attention.py [--repeats 3]

Cases (float32, one batch row, jitted):
  vision_window  one image of 40 x 64 = 2560 patches in window order (vision_layout, window 112 px
                 = 8x8 patches), 16 heads of dim 80, window segments and distance bound 63: the
                 31-of-32 vision blocks of Qwen2.5-VL-7B.
  vision_full    the same stream with image segments and no bound (the 4 full-attention blocks).
  text_causal    T=2048 causal with 100 tokens of left padding, 8 heads / 2 kv heads of dim 128;
                 forward (float32, and bfloat16, where the chunked path makes a statistics
                 pass first), and float32 forward + backward of a sum (the update step's work).
Time: median over --repeats runs after one warm-up, the implementations alternating. Memory:
`jax.jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes`. A report, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from eureka_jax.attention import attention
from eureka_jax.processing.layout import vision_layout

IMPLEMENTATIONS = ("dense", "xla")


def inputs(t, n, kv_heads, h, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(1, t, heads, h)), jnp.float32)
                 for heads in (n, kv_heads, kv_heads))


def cases():
    layout = vision_layout([[1, 40, 64]], patch_budget=2560)
    window = jnp.asarray(layout.window_segment_P[None])
    image = jnp.asarray(layout.image_segment_P[None])
    vision = inputs(2560, 16, 16, 80)
    text = inputs(2048, 8, 2, 128, seed=1)
    valid = jnp.asarray(np.arange(2048)[None] >= 100)

    def vision_window(impl):
        return lambda q, k, v: attention(q, k, v, causal=False, segment_ids_BxS=window,
                                         max_distance=63, implementation=impl)

    def vision_full(impl):
        return lambda q, k, v: attention(q, k, v, causal=False, segment_ids_BxS=image,
                                         implementation=impl)

    def text_causal(impl):
        return lambda q, k, v: attention(q, k, v, causal=True, kv_valid_BxS=valid,
                                         implementation=impl)

    def text_causal_bf16(impl):
        forward = text_causal(impl)
        return lambda q, k, v: forward(*(x.astype(jnp.bfloat16) for x in (q, k, v)))

    def text_causal_grad(impl):
        forward = text_causal(impl)
        return jax.grad(lambda q, k, v: forward(q, k, v).sum(), argnums=(0, 1, 2))

    return {"vision_window": (vision_window, vision), "vision_full": (vision_full, vision),
            "text_causal": (text_causal, text), "text_causal_bf16": (text_causal_bf16, text),
            "text_causal_fwd_bwd": (text_causal_grad, text)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.default_backend()}; median of {args.repeats}")
    results = {}
    for name, (make, operands) in cases().items():
        compiled, times = {}, {}
        for impl in IMPLEMENTATIONS:
            start = time.perf_counter()
            compiled[impl] = jax.jit(make(impl)).lower(*operands).compile()
            compile_s = time.perf_counter() - start
            temp = compiled[impl].memory_analysis().temp_size_in_bytes
            jax.block_until_ready(compiled[impl](*operands))
            results[f"{name}/{impl}"] = {"temp_MB": temp / 2**20, "compile_s": compile_s}
            times[impl] = []
        for _ in range(args.repeats):
            for impl in IMPLEMENTATIONS:
                start = time.perf_counter()
                jax.block_until_ready(compiled[impl](*operands))
                times[impl].append(time.perf_counter() - start)
        dense = compiled["dense"](*operands)
        chunked = compiled["xla"](*operands)
        difference = max(float(jnp.abs(a.astype(jnp.float32) - b).max()) for a, b in
                         zip(jax.tree.leaves(dense), jax.tree.leaves(chunked), strict=True))
        for impl in IMPLEMENTATIONS:
            entry = results[f"{name}/{impl}"]
            entry["median_ms"] = statistics.median(times[impl]) * 1e3
            print(f"{name:20s} {impl:6s} {entry['median_ms']:9.1f} ms  temp "
                  f"{entry['temp_MB']:8.1f} MiB  (compile {entry['compile_s']:.1f} s)")
        print(f"{name:20s} max |dense - xla| {difference:.2e}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
