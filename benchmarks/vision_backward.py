"""Where the vision tower's training time goes: forward + backward of the port's tower against
transformers' on the same weights, then of its two halves alone (every block's attention
sub-block, every block's MLP sub-block), on CPU.

    .venv/bin/python benchmarks/vision_backward.py [--repeats 9] [--threads 2]

The tower is train_step.py's (hidden 256, depth 4, 4 heads, mlp 768, full attention in blocks 1
and 3, 112 px windows) on its image batch: 8 rows, one 224x224 image each (256 patches, four
64-patch windows). Each case is the gradient of sum(output * fixed cotangent) with respect to
the parameters (and, for the halves, the input): ours jitted, torch eager with autograd, both in
float32, alternating within each repeat. The halves run the blocks' own modules in sequence with
a residual, as the tower does: attention = RMSNorm, qkv, 2-D rotary, attention within the image
(full blocks) or window, proj; MLP = RMSNorm, SwiGLU with biases. Patches are random (the
timing does not depend on them); parity is tested in tests/, not here. Medians of --repeats
after a warm-up; the last line is one JSON object.
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

from eureka_jax import hf_io, testing
from eureka_jax.models.qwen2_5_vl import VisionInputs
from eureka_jax.processing.layout import vision_layout

ROWS, GRID = 8, 16  # 8 images of 16 x 16 patches (224 px)


def ours_cases(model):
    """name -> zero-argument callable running one jitted gradient to completion."""
    vision_config = model.config.vision
    patches = GRID * GRID
    layout = vision_layout([[1, GRID, GRID]], patch_budget=patches)
    rng = np.random.default_rng(0)
    inputs = VisionInputs(
        patches_BxPxC=jnp.asarray(rng.normal(size=(ROWS, patches, vision_config.patch_features)),
                                  jnp.float32),
        pos_hw_BxPx2=jnp.asarray(np.broadcast_to(layout.pos_hw_Px2, (ROWS, patches, 2))),
        window_segment_BxP=jnp.asarray(np.broadcast_to(layout.window_segment_P, (ROWS, patches))),
        image_segment_BxP=jnp.asarray(np.broadcast_to(layout.image_segment_P, (ROWS, patches))))
    graphdef, state = nnx.split(model.visual)
    merged_ct = jnp.asarray(rng.normal(size=(ROWS, patches // 4, vision_config.out_hidden_size)),
                            jnp.float32)
    x = jnp.asarray(rng.normal(size=(ROWS, patches, vision_config.hidden_size)), jnp.float32)
    cos = jnp.cos(jnp.linspace(0, 3, patches * vision_config.head_dim)).reshape(
        1, patches, vision_config.head_dim).repeat(ROWS, 0)
    sin = jnp.sin(jnp.linspace(0, 3, patches * vision_config.head_dim)).reshape(
        1, patches, vision_config.head_dim).repeat(ROWS, 0)
    full = set(vision_config.fullatt_block_indexes)
    window_distance = vision_config.window_patches - 1

    def tower(state):
        return jnp.sum(nnx.merge(graphdef, state)(inputs) * merged_ct)

    def blocks(state, x, half):
        tower_module = nnx.merge(graphdef, state)
        block_graphdef, block_state = nnx.split(tower_module.blocks)
        for i in range(vision_config.depth):
            block = nnx.merge(block_graphdef, jax.tree.map(lambda a, i=i: a[i], block_state))
            if half == "attention":
                x = x + block.attn(block.norm1(x), cos, sin, inputs, i in full, window_distance)
            else:
                x = x + block.mlp(block.norm2(x))
        return jnp.sum(x * x)

    grads = {"tower": jax.jit(jax.grad(tower)),
             "attention": jax.jit(jax.grad(lambda s, x: blocks(s, x, "attention"), (0, 1))),
             "mlp": jax.jit(jax.grad(lambda s, x: blocks(s, x, "mlp"), (0, 1)))}
    args = {"tower": (state,), "attention": (state, x), "mlp": (state, x)}
    return {name: (lambda g=g, a=args[name]: jax.block_until_ready(g(*a)))
            for name, g in grads.items()}


def torch_cases(model_dir: Path, threads: int):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.set_num_threads(threads)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(model_dir),
                                                               dtype=torch.float32).train()
    visual = model.model.visual
    patches = GRID * GRID
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(ROWS * patches, visual.config.in_channels * 2 * 14 * 14,
                         generator=generator)
    grid_thw = torch.tensor([[1, GRID, GRID]] * ROWS)
    hidden = visual.config.hidden_size
    head_dim = hidden // visual.config.num_heads
    x = torch.randn(ROWS * patches, hidden, generator=generator, requires_grad=True)
    angles = torch.linspace(0, 3, patches * head_dim).reshape(patches, head_dim).repeat(ROWS, 1)
    position = (torch.cos(angles), torch.sin(angles))
    image_bounds = torch.arange(0, ROWS * patches + 1, patches, dtype=torch.int32)
    window_bounds = torch.arange(0, ROWS * patches + 1, patches // 4, dtype=torch.int32)
    full = set(visual.config.fullatt_block_indexes)
    out = visual(pixels, grid_thw=grid_thw)
    out = getattr(out, "pooler_output", out)
    merged_ct = torch.randn(out.shape, generator=generator)

    def tower():
        model.zero_grad(set_to_none=True)
        out = visual(pixels, grid_thw=grid_thw)
        (getattr(out, "pooler_output", out) * merged_ct).sum().backward()

    def blocks(half):
        def run():
            model.zero_grad(set_to_none=True)
            x.grad = None
            y = x
            for i, block in enumerate(visual.blocks):
                if half == "attention":
                    bounds = image_bounds if i in full else window_bounds
                    y = y + block.attn(block.norm1(y), bounds, position_embeddings=position)
                else:
                    y = y + block.mlp(block.norm2(y))
            (y * y).sum().backward()
        return run

    return {"tower": tower, "attention": blocks("attention"), "mlp": blocks("mlp")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        model_dir = testing.make_hf_model_dir(
            Path(workdir) / "model", initializer_range=0.02,
            text_config={**TEXT_512, "num_hidden_layers": 1}, vision_config=VISION_DEPTH_4)
        ours = ours_cases(hf_io.load_model(model_dir))
        theirs = torch_cases(model_dir, args.threads)
    results = {}
    for name in ours:
        ours[name](), theirs[name]()  # compile / warm up
        times: dict[str, list[float]] = {"jax": [], "torch": []}
        for _ in range(args.repeats):
            for side, case in (("jax", ours[name]), ("torch", theirs[name])):
                start = time.perf_counter()
                case()
                times[side].append((time.perf_counter() - start) * 1e3)
        jax_ms, torch_ms = (statistics.median(times[s]) for s in ("jax", "torch"))
        results[name] = {"jax_ms": round(jax_ms, 1), "torch_ms": round(torch_ms, 1),
                         "torch_over_jax": round(torch_ms / jax_ms, 2),
                         "jax_ms_min": round(min(times["jax"]), 1),
                         "torch_ms_min": round(min(times["torch"]), 1)}
        print(f"{name:<10} fwd+bwd | jax {jax_ms:7.1f} ms | torch {torch_ms:7.1f} ms | "
              f"torch/jax {torch_ms / jax_ms:.2f} (minima {min(times['jax']):.1f} / "
              f"{min(times['torch']):.1f} ms)")
    print(json.dumps({"benchmark": "vision_backward", "backend": jax.default_backend(),
                      "rows": ROWS, "patches_per_row": GRID * GRID, "repeats": args.repeats,
                      "torch_threads": args.threads, "cases": results}))


if __name__ == "__main__":
    main()
