"""GRPO update-step throughput: our jitted update (eureka_jax.train.make_update_step, grpo loss)
against the same step in PyTorch (transformers, float32, CPU) on the same weights and batch, as a
fraction of this machine's measured matmul peak; plus the rollout / reward / update time shares
of a demo run.

    .venv/bin/python benchmarks/train_step.py [--repeats 3] [--threads 2]
        [--demo-metrics runs/demo/grpo/metrics.jsonl]

Model: a random Qwen2.5-VL saved with save_pretrained into a temporary directory and loaded by
both frameworks from there (text: hidden 512, 8 layers, 8 heads / 2 kv heads, mlp 1536, vocab
32000 untied; vision: hidden 256, depth 4, 4 heads, mlp 768). Batch: 8 sequences, each its own
prompt (prompt bucket 128 + response 128, every response token counts), text-only (random
128-token prompts) and with one 224x224 image per prompt (256 patches = 64 image tokens, plus
question text, left-padded to 128). Every parameter trains (vision included); the optimizer is
eureka_jax's default: clip by global norm 1.0, AdamW (b2 0.95).

One step, on both sides: forward over prompt + response, float32 log-probs of the response
tokens, the grpo loss (ratio = exp(logp - old_logp), capped at 3, clipped to [0.8, 1.2],
-min(r A, clip(r) A), mean over each sequence's tokens, then over sequences), the token entropy as
a metric (no gradient), backward, gradient clipping and an AdamW update. transformers computes
logits for the last L + 1 positions only (logits_to_keep), as the port computes them for the L
response positions only. For the same starting weights the script prints the largest difference
between the two frameworks' response log-probs and both gradient norms: they must agree, or the
comparison is void. (The first step's loss agrees by construction: the old log-probs are the
current ones plus fixed noise, so it depends on that noise and the advantages alone.)

FLOPs per step (model FLOPs of what the port executes; padding positions count, since static
shapes compute them):
    matmul    = 6 * (W_dec * B * (T + L) + D * V * B * L + W_vis * B * P)
    attention = 3 * (layers * 4 * B * N * H * (T + L)^2 + depth * 4 * B * Nv * Hv * P^2)
W_dec = matmul weights of one token through the decoder stack (q, k, v, o, gate, up, down of every
layer), D * V the LM head (applied at the B * L response positions only), W_vis the vision
weights per patch (patch embedding, qkv, proj, gate, up, down of every block, and the merger's
two layers divided by the 4 patches each merged token takes). 6 = 2 (multiply-add) * 3 (forward,
then backward for activations and for weights). Attention: QK^T and PV are 2 * H FLOPs per
(query, key) pair each, over the whole dense T x S score matrix (no causal or window discount:
the port computes the masked dense matrix), 3x for forward + backward. Norms, rotary, softmax,
the loss and the optimizer are not counted (XLA's cost analysis of the compiled step gives 426.0
and 482.2 GFLOP for the two cases, against 422.8 and 479.6 from this formula).
fraction_of_peak = FLOPs / step time / peak, where the peak is the median rate of a jitted
float32 jnp.dot of two N x N matrices (torch.mm's with --threads threads is printed beside it),
sampled before the cases and again after every timed pair of steps, so that it sees the same
load from other processes as the steps do.

Processes and host memory: each framework runs in a worker process of its own (spawned; the
parent alternates their steps and samples the matmul peak), so each has the heap it would have in
real use. Both start with eureka_jax.host_memory.GLIBC_TUNABLES in their environment
(`--malloc default` leaves glibc as it comes): freed heap memory is reused rather than faulted
back in every step. Each step's minor page faults and system CPU seconds are in the JSON. On this
VM faulting XLA's 1.08 GB temporary buffer in again cost 0.4 s of system time per step on a quiet
machine and up to 8 s on a busy one. The in-process mallopt the eureka-jax command uses did not
take in these workers (host_memory's known limit: the JAX side still faulted ~280k pages per
step); the environment does (~1k per step in one run).

Demo shares: time/rollout (sampling), time/reward (reward pool, overlapped with the teacher-forced
log-prob pass) and time/update of each logged step of a demo run. The first two are means per
rollout and a step may run several rollouts, which metrics.jsonl does not record; the script
estimates it from time/step. Steps with an evaluation and step 1 (compilation) are left out.

A report, not a test: each timing is the median of --repeats after a warm-up, the two frameworks
alternating (which goes first swaps every round; use an even --repeats) so that load from
other processes hits them alike; every repeat and the minimum are
in the JSON too. On a shared machine the load changes within a run, and torch's OpenMP threads
slow down far more than XLA's when the cores are oversubscribed (see benchmarks/forward.py):
compare the minima, which approach the uncontended times, before drawing conclusions. Measured
on the 2-core development machine (load 0-1.8, see the README for the runs): torch took 0.72-0.77x
the port's time until the port's dense layers multiplied [rows, in] x [in, out] and its MLP
backward stopped keeping five activations per layer (2026-12-03); since then the ratio reads
0.8-1.2 from run to run, on par within this machine's noise. At a load of 4-6 from other jobs
torch took 1.2-2.6x the port's time (its threads starving). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from bench_common import TEXT_512, VISION_DEPTH_4, hf_prompt_inputs
from flax import nnx

from eureka_jax import hf_io, policy, testing
from eureka_jax.batch import Buckets, TrainBatch
from eureka_jax.configs_common import base_config
from eureka_jax.host_memory import environment_keeping_freed_memory
from eureka_jax.metrics import read_metrics
from eureka_jax.processing import EncodedPrompt, QwenVLProcessor, qwen_rows
from eureka_jax.rl_config import RLConfig
from eureka_jax.rollout import ScoredGroup, collate_groups
from eureka_jax.train import make_optimizer, make_update_step, split_trainable

BATCH, PROMPT, RESPONSE, IMAGE_PX = 8, 128, 128, 224
BUCKETS = Buckets(lengths=(PROMPT,), patches=(0, (IMAGE_PX // 14) ** 2))
WORDS = ("triangle", "area", "base", "height", "circle", "radius", "sum", "angle", "number",
         "square", "length", "width", "total", "value", "equation", "fraction")


# ---------------------------------------------------------------------------------------------
# Peak and FLOPs
# ---------------------------------------------------------------------------------------------


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class MatmulPeak:
    """float32 N x N x N matmul rates in GFLOP/s: jitted jnp.dot (the peak) and torch.mm (for
    reference); `sample()` adds one measurement of each, `medians()` summarises them."""

    def __init__(self, n: int):
        import torch

        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        dot = jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST))
        ta, tb = torch.randn(n, n), torch.randn(n, n)
        self.calls = {"jax": lambda: dot(a, b).block_until_ready(),
                      "torch": lambda: torch.mm(ta, tb)}
        for call in self.calls.values():
            call()
        self.flops = 2 * n**3
        self.samples: dict[str, list[float]] = {name: [] for name in self.calls}

    def sample(self) -> None:
        for name, call in self.calls.items():
            self.samples[name].append(self.flops / seconds(call) / 1e9)

    def medians(self) -> dict[str, float]:
        return {name: round(statistics.median(v), 1) for name, v in self.samples.items()}

    def ranges(self) -> dict[str, list[float]]:
        return {name: [round(min(v), 1), round(max(v), 1)] for name, v in self.samples.items()}


def step_flops(config, batch: int, prompt: int, response: int, patches: int) -> dict[str, float]:
    """Model FLOPs of one forward + backward (see the module docstring)."""
    text, vision = config.text, config.vision
    d, h, n, k = text.hidden_size, text.head_dim, text.num_attention_heads, text.num_key_value_heads
    per_layer = d * n * h + 2 * d * k * h + n * h * d + 3 * d * text.intermediate_size
    w_dec = text.num_hidden_layers * per_layer
    dv, merged = vision.hidden_size, vision.hidden_size * vision.merge_unit
    w_vis = (vision.patch_features * dv
             + vision.depth * (4 * dv * dv + 3 * dv * vision.intermediate_size)
             + (merged * merged + merged * d) / vision.merge_unit)
    s = prompt + response
    matmul = 6 * (w_dec * batch * s + d * text.vocab_size * batch * response
                  + (w_vis * batch * patches if patches else 0))
    attention = 3 * (text.num_hidden_layers * 4 * batch * n * h * s * s
                     + vision.depth * 4 * batch * vision.num_heads * vision.head_dim * patches**2)
    return {"matmul": matmul, "attention": attention, "total": matmul + attention}


# ---------------------------------------------------------------------------------------------
# The batch, as the trainer builds it and as transformers takes it
# ---------------------------------------------------------------------------------------------


def encode_prompts(processor: QwenVLProcessor, with_image: bool, vocab_limit: int, seed: int,
                   ) -> list[EncodedPrompt]:
    """BATCH prompts of at most PROMPT tokens: random ordinary tokens, or an image plus as many
    words of question as fit."""
    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(BATCH):
        if not with_image:
            ids = rng.integers(0, vocab_limit, PROMPT).astype(np.int32)
            prompts.append(EncodedPrompt(ids, np.zeros((0, 3), np.int32), [], ""))
            continue
        image = testing.draw_image(IMAGE_PX, IMAGE_PX, seed=i)
        words: list[str] = []
        best = processor.encode(question="What is shown?", images=[image])
        while True:
            words.append(str(rng.choice(WORDS)))
            encoded = processor.encode(question=" ".join(words) + "?", images=[image])
            if len(encoded.input_ids) > PROMPT:
                break
            best = encoded
        prompts.append(best)
    return prompts


def make_groups(prompts, config, vocab_limit: int, seed: int) -> list[ScoredGroup]:
    """One response per prompt (full RESPONSE tokens), unit-variance advantages; the old log-probs
    are placeholders until `with_old_logprobs`."""
    rng = np.random.default_rng(seed)
    groups = []
    for i, encoded in enumerate(prompts):
        groups.append(ScoredGroup(
            row=qwen_rows.prompt_row(encoded, config, name=f"prompt {i}"), record_id=str(i),
            tokens_GxL=rng.integers(0, vocab_limit, (1, RESPONSE)).astype(np.int32),
            logprobs_GxL=np.zeros((1, RESPONSE), np.float32),
            lengths_G=np.asarray([RESPONSE]), rewards_G=np.zeros(1, np.float32),
            advantages_G=rng.standard_normal(1).astype(np.float32)))
    return groups


def with_old_logprobs(batch: TrainBatch, logp_BxL: np.ndarray, seed: int):
    """Old log-probs = current ones + N(0, 0.1^2) noise: ratios near 1, a few clipped."""
    noise = np.random.default_rng(seed).normal(0.0, 0.1, logp_BxL.shape).astype(np.float32)
    return batch.replace(old_logp_BxL=(logp_BxL + noise).astype(np.float32))


def torch_inputs(prompts, batch: TrainBatch, pad_token_id: int, image_token_id: int):
    """The same sequences for transformers: prompts left-padded to PROMPT, then the response."""
    inputs = hf_prompt_inputs(prompts, PROMPT, pad_token_id, image_token_id,
                              batch.response_tokens_BxL, batch.response_mask_BxL)
    return {**inputs, "use_cache": False, "logits_to_keep": RESPONSE + 1}


# ---------------------------------------------------------------------------------------------
# The two update steps
# ---------------------------------------------------------------------------------------------


class TorchStep:
    """transformers forward + the grpo loss in torch + backward + clip + AdamW (same settings)."""

    def __init__(self, model_dir: Path, optim: ml_collections.ConfigDict, rl: RLConfig,
                 schedule):
        import torch
        from transformers import Qwen2_5_VLForConditionalGeneration

        self.torch = torch
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            str(model_dir), dtype=torch.float32).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=optim.lr, betas=(optim.b1, optim.b2),
                                           eps=optim.eps, weight_decay=optim.weight_decay)
        # The port's learning-rate schedule, so both sides take the same steps.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda count: float(schedule(count)) / optim.lr)
        self.grad_clip, self.rl = optim.grad_clip, rl

    def set_batch(self, inputs: dict, batch: TrainBatch) -> None:
        torch = self.torch
        self.inputs = inputs
        self.targets = torch.as_tensor(np.asarray(batch.response_tokens_BxL, np.int64))
        self.mask = torch.as_tensor(np.asarray(batch.response_mask_BxL, np.float32))
        self.old = torch.as_tensor(np.asarray(batch.old_logp_BxL))
        self.advantages = torch.as_tensor(np.asarray(batch.advantages_B))[:, None]

    def __call__(self) -> tuple[float, float]:
        torch, rl, mask = self.torch, self.rl, self.mask
        self.model.model.rope_deltas = None  # state kept between calls; these are independent
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(**self.inputs).logits[:, :RESPONSE].float()
        log_normaliser = torch.logsumexp(logits, dim=-1)
        logp = logits.gather(-1, self.targets[..., None])[..., 0] - log_normaliser
        with torch.no_grad():  # the entropy metric the port computes too
            probs = torch.exp(logits - log_normaliser[..., None])
            entropy = log_normaliser - (probs * logits).sum(-1)
            self.entropy = float((entropy * mask).sum() / mask.sum())
        ratio = torch.exp(logp - self.old).clamp(max=rl.ratio_cap)
        clipped = ratio.clamp(1 - rl.clip_eps_low, 1 + rl.clip_eps_high)
        per_token = -torch.minimum(ratio * self.advantages, clipped * self.advantages)
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
        self.logp = logp.detach().numpy()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return float(loss.detach()), float(norm)


class JaxStep:
    """make_update_step(grpo) on the loaded port; params and optimizer state are donated."""

    def __init__(self, model, optim: ml_collections.ConfigDict, rl: RLConfig):
        self.graphdef, self.params = nnx.split(model)
        tx, self.schedule = make_optimizer(optim, total_updates=1000)
        # The state committed to its device and the outputs pinned, as train.py does: otherwise
        # the second call sees new input shardings and compiles again, inside the timed repeats.
        trainable = split_trainable(self.params, optim.freeze_vision)[0]
        self.opt_state = jax.device_put(jax.jit(tx.init)(trainable), jax.devices()[0])
        self.update = make_update_step(
            self.graphdef, tx, rl, optim.freeze_vision,
            state_shardings=jax.tree.map(lambda x: x.sharding, (self.params, self.opt_state)))
        graphdef = self.graphdef
        self.logprobs = jax.jit(lambda params, batch: policy.response_logprobs(
            nnx.merge(graphdef, params), batch)[0])

    def set_batch(self, batch) -> None:
        # One micro-batch: the whole batch is one forward/backward, as on the torch side.
        self.batch = jax.device_put(jax.tree.map(lambda x: x[None], batch))

    def __call__(self) -> tuple[float, float]:
        self.params, self.opt_state, metrics = self.update(
            self.params, self.opt_state, None, self.batch, jnp.ones((1,), jnp.float32))
        metrics = jax.device_get(metrics)
        return float(metrics["loss"][0]), float(metrics["grad_norm"])


def interleaved_runs(sides: dict, repeats: int, between) -> dict[str, dict[str, list[float]]]:
    """Each side's timed steps, the sides alternating and their order reversed every other round
    (so neither always runs first after `between()`, which runs after each round)."""
    runs = {name: {"ms": [], "minor_faults": [], "system_s": []} for name in sides}
    for round_index in range(repeats):
        order = list(sides) if round_index % 2 == 0 else list(sides)[::-1]
        for name in order:
            for key, value in sides[name].call("step").items():
                runs[name][key].append(value)
        between()
    return runs


# ---------------------------------------------------------------------------------------------
# Each framework in a process of its own
# ---------------------------------------------------------------------------------------------


def timed(step) -> dict[str, float]:
    """One step's wall time and the kernel's share of it: minor page faults and system CPU
    seconds (the process runs nothing else meanwhile, so its counters are the step's)."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    step()
    elapsed_ms = (time.perf_counter() - start) * 1e3
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"ms": elapsed_ms, "minor_faults": after.ru_minflt - before.ru_minflt,
            "system_s": after.ru_stime - before.ru_stime}


def serve(side: str, model_dir: Path, threads: int, connection) -> None:
    """A worker process: builds one framework's step on the saved model and answers the parent's
    calls ("case", "warm_up", "step") until "stop". One process per framework, so each has the
    heap it would have in real use."""
    processor = QwenVLProcessor.from_pretrained(model_dir, min_pixels=IMAGE_PX * IMAGE_PX,
                                                max_pixels=IMAGE_PX * IMAGE_PX)
    vocab_limit = testing.tiny_token_ids()["<|endoftext|>"]
    optim = base_config().optim
    optim.freeze_vision = False
    rl = RLConfig(loss="grpo", max_response_length=RESPONSE)
    if side == "jax":
        step = JaxStep(hf_io.load_model(model_dir), optim, rl)
        config = nnx.merge(step.graphdef, step.params).config
    else:
        import torch

        torch.set_num_threads(threads)
        step = TorchStep(model_dir, optim, rl, make_optimizer(optim, total_updates=1000)[1])
    note = f"host memory: GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(glibc defaults)')}"
    connection.send({"malloc": note, "attention": None if side == "jax" else
                     step.model.config._attn_implementation})
    while True:
        command, *args = connection.recv()
        if command == "stop":
            return
        if command == "case" and side == "jax":  # build the batch; the old log-probs are ours
            (with_image,) = args
            prompts = encode_prompts(processor, with_image, vocab_limit, seed=1)
            groups = make_groups(prompts, config, vocab_limit, seed=2)
            batch = collate_groups(groups, BUCKETS, processor.pad_token_id)
            logp = np.asarray(step.logprobs(step.params, jax.device_put(batch)))
            batch = with_old_logprobs(batch, logp, seed=3)
            step.set_batch(batch)
            patches = 0 if batch.prompts.vision is None else \
                batch.prompts.vision.patches_BxPxC.shape[1]
            connection.send({"prompts": prompts, "batch": batch, "logp": logp,
                             "patches": patches,
                             "flops": step_flops(config, BATCH, PROMPT, RESPONSE, patches),
                             "image_token_id": config.image_token_id})
        elif command == "case":  # the jax worker's prompts and batch
            prompts, batch, image_token_id = args
            step.set_batch(torch_inputs(prompts, batch, processor.pad_token_id, image_token_id),
                           batch)
            connection.send(None)
        elif command == "warm_up":  # the port compiles here
            start = time.perf_counter()
            loss, norm = step()
            connection.send({"loss": loss, "grad_norm": norm,
                             "seconds": time.perf_counter() - start,
                             "logp": getattr(step, "logp", None)})
        elif command == "step":
            connection.send(timed(step))


class Side:
    """The parent's handle on one worker process."""

    def __init__(self, side: str, model_dir: Path, threads: int):
        context = multiprocessing.get_context("spawn")  # no forked JAX or OpenMP state
        self.connection, theirs = context.Pipe()
        self.process = context.Process(target=serve, args=(side, model_dir, threads, theirs),
                                       daemon=True)
        self.process.start()
        self.note = self.connection.recv()

    def call(self, *command):
        self.connection.send(command)
        return self.connection.recv()

    def stop(self) -> None:
        self.connection.send(("stop",))
        self.process.join(timeout=60)


# ---------------------------------------------------------------------------------------------
# Demo time shares
# ---------------------------------------------------------------------------------------------


def demo_shares(path: Path) -> dict:
    if not path.is_file():
        return {"path": str(path), "available": False,
                "note": "no metrics file: run `make demo` (or eureka-jax demo) first"}
    by_step: dict[int, dict] = {}
    for record in read_metrics(path.parent):
        by_step.setdefault(record["step"], {}).update(record)
    config_file = path.parent / "config.json"
    planned = json.loads(config_file.read_text())["train"]["num_steps"] if config_file.is_file() \
        else None
    keys = ("time/rollout", "time/reward", "time/update", "time/step")
    steps = [r for s, r in sorted(by_step.items())
             if s > 1 and "eval/accuracy" not in r and all(k in r for k in keys)]
    result = {"path": str(path), "available": bool(steps), "steps_logged": len(by_step),
              "steps_planned": planned, "finished": planned is not None and
              max(by_step, default=0) >= planned, "steps_used": len(steps)}
    if not steps:
        result["note"] = "no logged step without evaluation after step 1"
        return result
    totals = {"rollout": 0.0, "reward": 0.0, "update": 0.0, "step": 0.0}
    rollouts = []
    for r in steps:
        per_rollout = r["time/rollout"] + r["time/reward"]
        # Rollouts this step: what time/step leaves after the update, in per-rollout times.
        count = max(1, round((r["time/step"] - r["time/update"]) / per_rollout))
        rollouts.append(count)
        totals["rollout"] += count * r["time/rollout"]
        totals["reward"] += count * r["time/reward"]
        totals["update"] += r["time/update"]
        totals["step"] += r["time/step"]
    result.update({
        f"median_{k.replace('/', '_')}_s": round(statistics.median(r[k] for r in steps), 3)
        for k in keys})
    result["mean_rollouts_per_step_estimated"] = round(float(np.mean(rollouts)), 2)
    result["shares_of_step_time"] = {
        "rollout": round(totals["rollout"] / totals["step"], 3),
        "reward": round(totals["reward"] / totals["step"], 3),
        "update": round(totals["update"] / totals["step"], 3),
        "other": round(1 - (totals["rollout"] + totals["reward"] + totals["update"])
                       / totals["step"], 3)}
    return result


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--peak-size", type=int, default=2048, help="N of the N x N matmul")
    parser.add_argument("--demo-metrics", type=Path,
                        default=Path("runs/demo/grpo/metrics.jsonl"))
    parser.add_argument("--malloc", choices=("keep", "default"), default="keep",
                        help="keep: both frameworks' processes start with "
                        "eureka_jax.host_memory.GLIBC_TUNABLES; default: glibc as it comes")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    peak = MatmulPeak(args.peak_size)
    for _ in range(5):
        peak.sample()

    workdir = Path(tempfile.mkdtemp(prefix="bench_train_step_"))
    model_dir = testing.make_hf_model_dir(workdir / "model", initializer_range=0.02,
                                          text_config=TEXT_512, vision_config=VISION_DEPTH_4)
    if args.malloc == "keep":  # spawned workers inherit it and glibc reads it at their start
        os.environ.update(environment_keeping_freed_memory(os.environ))
    sides = {name: Side(name, model_dir, args.threads) for name in ("jax", "torch")}
    print(sides["jax"].note["malloc"])

    cases = {}
    for name, with_image in (("text", False), ("one_image", True)):
        case = sides["jax"].call("case", with_image)
        sides["torch"].call("case", case["prompts"], case["batch"], case["image_token_id"])
        batch, logp, patches, flops = case["batch"], case["logp"], case["patches"], case["flops"]
        # Warm-up from weights both sides still share: the response log-probs and the gradient
        # norms must agree.
        ours, theirs = sides["jax"].call("warm_up"), sides["torch"].call("warm_up")
        loss_jax, norm_jax, compile_s = ours["loss"], ours["grad_norm"], ours["seconds"]
        loss_torch, norm_torch, theirs_logp = theirs["loss"], theirs["grad_norm"], theirs["logp"]
        runs = interleaved_runs(sides, args.repeats, peak.sample)
        times = {side: run["ms"] for side, run in runs.items()}

        tokens = BATCH * (PROMPT + RESPONSE)
        valid = int(np.asarray(batch.prompts.attention_mask_BxT).sum()) + BATCH * RESPONSE
        jax_ms, torch_ms = statistics.median(times["jax"]), statistics.median(times["torch"])
        cases[name] = {
            "tokens": tokens, "valid_tokens": valid, "patches": BATCH * patches,
            "gflop": round(flops["total"] / 1e9, 1),
            "attention_share_of_flops": round(flops["attention"] / flops["total"], 3),
            "jax_ms": round(jax_ms, 1), "torch_ms": round(torch_ms, 1),
            "torch_over_jax": round(torch_ms / jax_ms, 2),
            "jax_tokens_per_s": round(tokens / jax_ms * 1e3, 1),
            "torch_tokens_per_s": round(tokens / torch_ms * 1e3, 1),
            "jax_gflop_per_s": round(flops["total"] / jax_ms / 1e6, 1),
            "torch_gflop_per_s": round(flops["total"] / torch_ms / 1e6, 1),
            "jax_ms_min": round(min(times["jax"]), 1),
            "torch_ms_min": round(min(times["torch"]), 1),
            "torch_over_jax_min": round(min(times["torch"]) / min(times["jax"]), 2),
            "jax_ms_each": [round(t) for t in times["jax"]],
            "torch_ms_each": [round(t) for t in times["torch"]],
            "minor_faults_median": {name: int(statistics.median(run["minor_faults"]))
                                    for name, run in runs.items()},
            "system_s_each": {name: [round(t, 2) for t in run["system_s"]]
                              for name, run in runs.items()},
            "jax_compile_and_first_step_s": round(compile_s, 1),
            "logp_max_abs_diff": float(f"{np.abs(theirs_logp - logp).max():.2e}"),
            "loss": {"jax": round(loss_jax, 6), "torch": round(loss_torch, 6)},
            "grad_norm": {"jax": round(norm_jax, 5), "torch": round(norm_torch, 5)},
        }
    peaks = peak.medians()
    print(f"matmul peak ({args.peak_size}^3 float32, median of {len(peak.samples['jax'])}): "
          f"jax {peaks['jax']} GFLOP/s, torch ({args.threads} threads) {peaks['torch']} GFLOP/s")
    for name, c in cases.items():
        c["jax_fraction_of_peak"] = round(c["jax_gflop_per_s"] / peaks["jax"], 3)
        c["torch_fraction_of_peak"] = round(c["torch_gflop_per_s"] / peaks["jax"], 3)
        print(f"{name:<10} {c['tokens']} tokens ({c['valid_tokens']} valid), {c['patches']} "
              f"patches, {c['gflop']} GFLOP | jax {c['jax_ms']:.0f} ms "
              f"({c['jax_tokens_per_s']:.0f} tok/s, {c['jax_fraction_of_peak']:.1%} of peak) | "
              f"torch {c['torch_ms']:.0f} ms ({c['torch_tokens_per_s']:.0f} tok/s, "
              f"{c['torch_fraction_of_peak']:.1%}) | torch/jax {c['torch_over_jax']} (minima "
              f"{c['jax_ms_min']:.0f} / {c['torch_ms_min']:.0f} ms) | logp max "
              f"diff {c['logp_max_abs_diff']:.1e}, grad norm {c['grad_norm']['jax']:.5f} vs "
              f"{c['grad_norm']['torch']:.5f} | minor faults per step "
              f"{c['minor_faults_median']['jax']} / {c['minor_faults_median']['torch']}")

    demo = demo_shares(args.demo_metrics)
    if demo.get("shares_of_step_time"):
        print(f"demo ({demo['steps_used']} steps of {demo['path']}, finished: "
              f"{demo['finished']}): shares of step time {demo['shares_of_step_time']}")
    else:
        print(f"demo: {demo.get('note')} ({demo['path']})")
    for side in sides.values():
        side.stop()
    load_after = os.getloadavg()[0]
    print(json.dumps({
        "benchmark": "train_step", "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(), "load_average": [round(load_before, 2), round(load_after, 2)],
        "torch_threads": args.threads, "repeats": args.repeats, "malloc": args.malloc,
        "torch_attention": sides["torch"].note["attention"],
        "matmul_peak_gflops": peaks,
        "matmul_peak_gflops_min_max": peak.ranges(), "batch": {"sequences": BATCH, "prompt": PROMPT,
                                               "response": RESPONSE},
        "cases": cases, "demo": demo}))


if __name__ == "__main__":
    main()
