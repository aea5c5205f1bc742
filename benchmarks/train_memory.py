"""Peak memory of one GRPO update at a long sequence: our jitted update (eureka_jax.train
make_update_step) against the same step in PyTorch (transformers, float32, CPU), on the same
weights and the same sequence.

    .venv/bin/python benchmarks/train_memory.py [--prompt 1024] [--response 3072] [--threads 2]
        [--sides torch,jax:full,jax:none]

Model: a random Qwen2.5-VL whose language model has Qwen2.5-0.5B's shape (hidden 896, 24 layers,
14 heads / 2 kv heads of 64, mlp 4864, vocab 151936, tied embeddings: 494M parameters; a 2-block
vision tower, frozen on both sides), saved with save_pretrained and loaded by both frameworks from
that directory. Batch: one sequence of --prompt random prompt tokens + --response response tokens
(4096 in all by default), every response token counting. One step: forward, float32 log-probs of
the response tokens, the grpo loss, backward, clipping, AdamW (eureka_jax's defaults); the port
with remat "none" (what torch does: every activation kept) and "full" (the recipe's setting for
7B), its log-probs chunked (model.logits_chunk 512) as in training.

Each side runs in a fresh process of its own; "peak_rss_GiB" is that process's peak resident
memory (ru_maxrss) over load + optimizer init + one step, "step_GiB" the peak minus the resident
memory just before the step (what the step itself adds: activations, gradients, the optimizer's
first moments appearing, logits), "state_GiB" the resident memory before the step. A side the
kernel kills for want of memory is reported as failed (-9) and the others still run. Compare
peak_rss_GiB: transformers maps the safetensors lazily and torch's AdamW makes its moments in the
first step, so torch's state_GiB is small and its step_GiB holds the weights and moments too.
The two sides' losses differ (the port's old log-probs are zeros, torch's the current ones): the
shapes, not the values, are what this measures. For the port,
XLA's own figures from the compiled step's memory_analysis are printed beside (temp = what it
allocates besides its arguments and outputs). The last line is one JSON object. A report, not a
test; one step each (a memory peak does not need repeats), timed for reference only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

QWEN_0_5B_TEXT = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                       "mrope_section": [8, 12, 12]})
SMALL_VISION = dict(hidden_size=64, intermediate_size=128, depth=2, num_heads=2, window_size=112,
                    fullatt_block_indexes=[1], out_hidden_size=896)
GIB = 2**30


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def batch_arrays(prompt: int, response: int, vocab_limit: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"prompt": rng.integers(0, vocab_limit, prompt).astype(np.int32),
            "response": rng.integers(0, vocab_limit, response).astype(np.int32),
            "advantage": np.float32(1.0)}


def run_jax(model_dir: Path, arrays: dict, remat: str) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from eureka_jax import hf_io
    from eureka_jax.batch import Buckets
    from eureka_jax.configs_common import base_config
    from eureka_jax.processing import EncodedPrompt, qwen_rows
    from eureka_jax.rl_config import RLConfig
    from eureka_jax.rollout import ScoredGroup, collate_groups
    from eureka_jax.train import make_optimizer, make_update_step, split_trainable

    response = len(arrays["response"])
    model = hf_io.load_model(model_dir, remat=remat, freeze_vision=True)
    graphdef, params = nnx.split(model)
    optim = base_config().optim
    rl = RLConfig(loss="grpo", max_response_length=response)
    tx, _ = make_optimizer(optim, total_updates=1000)
    opt_state = jax.jit(tx.init)(split_trainable(params, True)[0])
    update = make_update_step(graphdef, tx, rl, True)
    encoded = EncodedPrompt(arrays["prompt"], np.zeros((0, 3), np.int32), [], "")
    group = ScoredGroup(
        row=qwen_rows.prompt_row(encoded, model.config, name="prompt"), record_id="0",
        tokens_GxL=arrays["response"][None], logprobs_GxL=np.zeros((1, response), np.float32),
        lengths_G=np.asarray([response]), rewards_G=np.zeros(1, np.float32),
        advantages_G=np.asarray([arrays["advantage"]]))
    batch = collate_groups([group], Buckets(lengths=(len(arrays["prompt"]),), patches=(0,)),
                           pad_token_id=0)
    batch = jax.device_put(jax.tree.map(lambda x: x[None], batch))
    scales = jnp.ones((1,), jnp.float32)
    del model
    compiled = update.lower(params, opt_state, None, batch, scales).compile()
    analysis = compiled.memory_analysis()
    before = rss_bytes()
    start = time.perf_counter()
    params, opt_state, metrics = compiled(params, opt_state, None, batch, scales)
    loss = float(jax.device_get(metrics["loss"])[0])
    return {"state_bytes": before, "step_s": time.perf_counter() - start, "loss": loss,
            "xla_temp_GiB": round(analysis.temp_size_in_bytes / GIB, 2),
            "xla_arguments_GiB": round(analysis.argument_size_in_bytes / GIB, 2),
            "xla_outputs_GiB": round(analysis.output_size_in_bytes / GIB, 2)}


def run_torch(model_dir: Path, arrays: dict, threads: int) -> dict:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from eureka_jax.configs_common import base_config
    from eureka_jax.rl_config import RLConfig

    torch.set_num_threads(threads)
    optim, rl = base_config().optim, RLConfig(loss="grpo")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(model_dir), dtype=torch.float32).train()
    for p in model.model.visual.parameters():  # frozen, as on the port's side
        p.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=optim.lr, betas=(optim.b1, optim.b2),
                                  eps=optim.eps, weight_decay=optim.weight_decay)
    prompt, response = arrays["prompt"], arrays["response"]
    ids = torch.as_tensor(np.concatenate([prompt, response]).astype(np.int64))[None]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "mm_token_type_ids": torch.zeros_like(ids), "use_cache": False,
              "logits_to_keep": len(response) + 1}
    targets = torch.as_tensor(response.astype(np.int64))[None]
    before = rss_bytes()
    start = time.perf_counter()
    logits = model(**inputs).logits[:, :len(response)].float()
    log_normaliser = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets[..., None])[..., 0] - log_normaliser
    with torch.no_grad():
        probs = torch.exp(logits - log_normaliser[..., None])
        (log_normaliser - (probs * logits).sum(-1)).mean()
    ratio = torch.exp(logp - logp.detach()).clamp(max=rl.ratio_cap)
    clipped = ratio.clamp(1 - rl.clip_eps_low, 1 + rl.clip_eps_high)
    advantage = float(arrays["advantage"])
    loss = (-torch.minimum(ratio * advantage, clipped * advantage)).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, optim.grad_clip)
    optimizer.step()
    return {"state_bytes": before, "step_s": time.perf_counter() - start,
            "loss": float(loss.detach())}


def child(args) -> None:
    arrays = batch_arrays(args.prompt, args.response, args.vocab_limit)
    if args.side == "torch":
        result = run_torch(args.model_dir, arrays, args.threads)
    else:
        result = run_jax(args.model_dir, arrays, args.side.split(":")[1])
    peak = peak_rss_bytes()
    state = result.pop("state_bytes")
    result.update(peak_rss_GiB=round(peak / GIB, 2), state_GiB=round(state / GIB, 2),
                  step_GiB=round((peak - state) / GIB, 2), step_s=round(result["step_s"], 1))
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--response", type=int, default=3072)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--sides", default="torch,jax:full,jax:none",
                        help="which steps to run, in order (jax:REMAT for the port)")
    parser.add_argument("--side", help=argparse.SUPPRESS)  # internal: one side, in a child
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--vocab-limit", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return child(args)

    from eureka_jax import testing

    workdir = Path(tempfile.mkdtemp(prefix="bench_train_memory_"))
    model_dir = testing.make_hf_model_dir(
        workdir / "model", initializer_range=0.02, text_config=QWEN_0_5B_TEXT,
        vision_config=SMALL_VISION, tie_word_embeddings=True)
    vocab_limit = testing.tiny_token_ids()["<|endoftext|>"]
    results = {}
    for side in args.sides.split(","):
        done = subprocess.run(
            [sys.executable, __file__, "--side", side, "--model-dir", str(model_dir),
             "--vocab-limit", str(vocab_limit), "--prompt", str(args.prompt),
             "--response", str(args.response), "--threads", str(args.threads)],
            capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        if done.returncode:  # e.g. -9: the kernel's out-of-memory killer
            results[side] = {"failed": done.returncode, "stderr": done.stderr[-500:]}
        else:
            results[side] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{side:<9} {results[side]}", flush=True)
    for side in results:
        if side != "torch" and "peak_rss_GiB" in results[side] and "peak_rss_GiB" in results.get(
                "torch", {}):
            results[side]["peak_over_torch"] = round(
                results[side]["peak_rss_GiB"] / results["torch"]["peak_rss_GiB"], 2)
    print(json.dumps({"benchmark": "train_memory", "tokens": args.prompt + args.response,
                      "prompt": args.prompt, "response": args.response,
                      "load_average": os.getloadavg()[0], "results": results}))


if __name__ == "__main__":
    main()
