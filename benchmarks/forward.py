"""Forward-pass time: the jitted Flax port against transformers (torch eager, float32, CPU).

    .venv/bin/python benchmarks/forward.py [--repeats 5] [--threads 2]

One small random Qwen2.5-VL (text: hidden 512, 8 layers, 8 heads / 2 kv heads, mlp 1536, vocab
32000, mrope_section 8/12/12; vision: hidden 256, depth 4, 4 heads, window 112) is saved with
save_pretrained into a temporary directory, so both frameworks load the very same weights.
Inputs: a text-only batch (2 x 256 tokens) and a one-image batch (one 448x448 image = 1024
patches = 256 image tokens, plus its prompt). Host preprocessing is done once, outside the
timings; the port's compile time is reported separately. Each case runs `--repeats` times after
one warm-up, the two frameworks alternating; medians are printed, then one JSON line. A
report, not a test.

On a machine whose cores are busy with other work, torch's OpenMP threads degrade sharply: with a
load average of ~7 on 2 cores the text case took 5.5 s with --threads 2 but 0.83 s with
--threads 1 (the port: 0.9-1.2 s either way). Compare both before drawing conclusions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import TEXT_512, VISION_DEPTH_4
from flax import nnx

from eureka_jax import hf_io, testing, verify
from eureka_jax.families import qwen2_5_vl as qwen
from eureka_jax.processing import QwenVLProcessor


def interleaved_medians_ms(calls: dict, repeats: int) -> dict[str, float]:
    """Median wall time in ms of each name -> (fn, args), after one warm-up call each. The calls
    alternate, so that load from other processes on a shared machine hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
    for _ in range(repeats):
        for name, (fn, args) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def make_inputs(model_dir: Path, vocab_limit: int) -> dict[str, dict[str, np.ndarray]]:
    processor = QwenVLProcessor.from_pretrained(model_dir, min_pixels=448 * 448,
                                                max_pixels=448 * 448)
    rng = np.random.default_rng(0)
    # Ordinary (non-special) tokens of the tiny tokenizer; the vocabulary beyond is never an input.
    text_ids = rng.integers(0, vocab_limit, (2, 256))
    image_prompt = processor.encode(question="Describe every shape in the picture.",
                                    images=[testing.draw_image(448, 448, seed=1)])
    return {
        "text_2x256": {"input_ids": text_ids, "attention_mask": np.ones_like(text_ids)},
        "one_image_448px": qwen.hf_arrays([image_prompt], processor.pad_token_id),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="bench_forward_"))
    model_dir = testing.make_hf_model_dir(workdir / "model", initializer_range=0.02,
                                          text_config=TEXT_512, vision_config=VISION_DEPTH_4)
    model = hf_io.load_model(model_dir)
    reference = qwen.load_reference(model_dir)
    image_token_id = model.config.image_token_id
    vocab_limit = testing.tiny_token_ids()["<|endoftext|>"]

    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, batch):
        logits = nnx.merge(graphdef, state)(
            batch.input_ids_BxT, batch.positions_3xBxT, batch.attention_mask_BxT,
            vision=batch.vision, token_source_BxT=batch.token_source_BxT)
        return logits.astype(jnp.float32)

    results = {}
    for name, arrays in make_inputs(model_dir, vocab_limit).items():
        batch = jax.device_put(qwen.port_inputs(arrays, model.config))
        torch_inputs = qwen.reference_inputs(arrays, image_token_id)

        start = time.perf_counter()
        ours = np.asarray(jax.block_until_ready(forward(state, batch)))
        compile_s = time.perf_counter() - start
        theirs = qwen.reference_forward(reference, torch_inputs).numpy()
        agreement = verify.compare(ours, theirs, arrays["attention_mask"])

        medians = interleaved_medians_ms(
            {"jax": (forward, (state, batch)),
             "torch": (qwen.reference_forward, (reference, torch_inputs))}, args.repeats)
        jax_ms, torch_ms = medians["jax"], medians["torch"]
        results[name] = {
            "tokens": int(arrays["attention_mask"].sum()),
            "patches": int(len(arrays.get("pixel_values", ()))),
            "jax_ms": round(jax_ms, 1),
            "torch_ms": round(torch_ms, 1),
            "torch_over_jax": round(torch_ms / jax_ms, 2),
            "jax_compile_s": round(compile_s, 1),
            "rel_diff": float(f"{agreement['rel_diff']:.2e}"),
        }
        r = results[name]
        print(f"{name:<16} tokens {r['tokens']:>4} patches {r['patches']:>5}  "
              f"jax {r['jax_ms']:8.1f} ms  torch {r['torch_ms']:8.1f} ms  "
              f"torch/jax {r['torch_over_jax']:5.2f}  (compile {r['jax_compile_s']} s, "
              f"rel_diff {r['rel_diff']:.1e})")
    print(json.dumps({"benchmark": "forward", "backend": jax.default_backend(),
                      "torch_threads": args.threads, "repeats": args.repeats,
                      "cases": results}))


if __name__ == "__main__":
    main()
