"""The CPU demo, end to end through the real code paths (what `make demo` runs):

  1. write the synthetic visual dataset (PIL drawings, MM-Eureka jsonl): "what colour is the
     square?", answered with the colour's number 1-4;
  2. train a tiny tokenizer locally and save a randomly initialised tiny Qwen2.5-VL as a HF dir;
  3. a cold-start SFT on demonstrations from a poor annotator: each demonstration gives the right
     number with probability TEACHER_ACCURACY (0.4) and otherwise the next colour's number (a
     systematic annotation error, as with a mismatched colour code). Trained until it fits them,
     the warm start reads every colour from the image (it must, to know which wrong number to
     give) but answers wrong greedily: held-out greedy accuracy ~0, sampled ~0.4;
  4. GRPO with the rule rewards (accuracy + 0.5 format) on the same prompts: only the reward
     knows which of the teacher's two answers is right, so everything it adds comes from it;
  5. report held-out greedy accuracy before the first GRPO update and at the end, the warm
     start's answer distribution per colour, and draw the curves.

Why this warm start (measured; ../README.md, benchmarks/demo_seeds.py): a warm start stopped at a
loss threshold on correct demonstrations left the tiny model telling only two pairs of colours
apart, at a point that moved with the seed and with float rounding; GRPO then often collapsed
each pair onto one answer and held-out accuracy did not move. A warm start on random answers
reads nothing, and GRPO did not learn to read the image either. Fitting the poor annotator takes
the model past both of these plateaus (every colour readable), and leaves a policy that is wrong
by construction, not by where the optimiser happened to stop.

`reward_control="shuffled"` trains GRPO on rewards permuted across each rollout (same mean, no
information): the control run that shows the gain comes from the reward.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from eureka_jax import families, policy
from eureka_jax.batch import Buckets
from eureka_jax.data import make_synthetic
from eureka_jax.metrics import read_metrics

DEMO_TASKS = ("colour",)
NUM_ANSWERS = 4  # the colour task's answers are 1..4
# The annotator is right this often; otherwise it gives the next colour's number.
TEACHER_ACCURACY = 0.4
SFT_LR = 1e-3
SFT_BATCH = 32  # 16 left some seeds confusing a pair of colours after 600 steps (measured)
SFT_MAX_STEPS = 1500
TINY_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny_cpu.py"
# Tiny models need tiny prompts: every extra token dilutes the attention to the image tokens.
DEMO_SYSTEM_PROMPT = "Answer."
RESPONSE_TEMPLATE = "<think>look</think><answer>{}</answer>"


def write_sft_data(train_jsonl: Path, output: Path, seed: int) -> Path:
    """The poor annotator's demonstrations of the training prompts (see the module docstring)."""
    rng = np.random.default_rng([seed, 0x5F7])
    lines = []
    for line in train_jsonl.read_text().splitlines():
        record = json.loads(line)
        answer = int(record["answer"])
        if rng.random() >= TEACHER_ACCURACY:
            answer = answer % NUM_ANSWERS + 1
        record["response"] = RESPONSE_TEMPLATE.format(answer)
        lines.append(json.dumps(record))
    output.write_text("\n".join(lines) + "\n")
    return output


def sft_fit_loss(tokenizer) -> float:
    """The SFT loss (token mean over a response and its stop token) at which the warm start has
    fit the annotator on every colour, a fifth of the way from the best possible loss (the
    annotator's answer entropy spread over the response tokens) to the loss of a model that
    reads nothing (ln 4 on the answer token). Measured plateaus in between: a model that tells
    only two pairs of colours apart sits ~0.45 of the way."""
    tokens = len(tokenizer(RESPONSE_TEMPLATE.format(1))["input_ids"]) + 1
    q = TEACHER_ACCURACY
    best = -(q * math.log(q) + (1 - q) * math.log(1 - q)) / tokens
    blind = math.log(NUM_ANSWERS) / tokens
    return best + 0.2 * (blind - best)


def run_demo(workdir: str | Path, *, family: str = "qwen2_5_vl", num_train: int = 512,
             num_eval: int = 64, seed: int = 0,
             grpo_steps: int | None = None, reward_control: str = "none",
             config_overrides: dict | None = None, show_progress: bool = True) -> dict:
    from eureka_jax.configs_common import load_config_file
    from eureka_jax.sft import sft
    from eureka_jax.train import train

    workdir = Path(workdir)
    started = time.perf_counter()
    data = make_synthetic(workdir / "data", num_train, num_eval, seed=seed, tasks=DEMO_TASKS,
                          short_questions=True)
    init_dir = workdir / "init_model"
    if not (init_dir / "config.json").exists():
        model = families.get(family).make_tiny_model_dir(init_dir, seed=seed)
        print(f"[demo] random tiny model: {_count(model):,} parameters -> {init_dir}")

    if not TINY_CONFIG.exists():
        from eureka_jax.errors import InputError

        raise InputError(f"{TINY_CONFIG} not found: configs/ ships with the repository, not the "
                         "wheel; run the demo from a checkout (pip install -e .)")
    config = load_config_file(TINY_CONFIG, None if family == "qwen2_5_vl" else family)
    config.seed = seed
    config.data.system_prompt = DEMO_SYSTEM_PROMPT
    config.data.train = str(data.train_jsonl)
    config.eval.data = str(data.eval_jsonl)
    config.eval.max_examples = num_eval
    config.train_extras.reward_control = reward_control
    config.train_extras.progress_bar = show_progress
    if grpo_steps is not None:
        config.train.num_steps = grpo_steps
    for key, value in (config_overrides or {}).items():
        section, field = key.split(".")
        config[section][field] = value

    sft_dir = workdir / "sft"
    if not (sft_dir / "model" / "config.json").exists():
        config.model.path = str(init_dir)
        sft_data = write_sft_data(data.train_jsonl, workdir / "data" / "sft.jsonl", seed)
        tokenizer = families.for_model_dir(init_dir).load_processor(init_dir).tokenizer
        fit = sft_fit_loss(tokenizer)
        print(f"[demo] cold-start SFT on a poor annotator's demonstrations (right "
              f"{TEACHER_ACCURACY:.0%} of the time), until it fits them (loss < {fit:.4f})")
        sft(config, sft_dir, data=str(sft_data), steps=SFT_MAX_STEPS, batch_size=SFT_BATCH,
            lr=SFT_LR, stop_below_loss=fit, max_response_tokens=config.sampling.max_new_tokens,
            show_progress=show_progress)
    config.model.path = str(sft_dir / "model")
    warm = answer_distribution(config.model.path, data.eval_jsonl, config)
    print("[demo] the warm start's held-out answer distribution (row: true colour):")
    print(format_distribution(warm))
    print(f"[demo] GRPO for {config.train.num_steps} steps -> {workdir / 'grpo'}"
          + (f" (control: rewards {reward_control})" if reward_control != "none" else ""))
    train(config, workdir / "grpo")

    evals = [(r["step"], r["eval/accuracy"]) for r in read_metrics(workdir / "grpo")
             if "eval/accuracy" in r]
    sft_steps = sum(1 for _ in read_metrics(sft_dir))
    summary = {
        "seed": seed,
        "reward_control": reward_control,
        "sft_steps": sft_steps,
        "warm_start_sampled_accuracy": warm["sampled_accuracy"],
        "eval_accuracy_before": evals[0][1] if evals else None,
        "eval_accuracy_after": evals[-1][1] if evals else None,
        "eval_curve": evals,
        "curves_png": str(workdir / "grpo" / "curves.png"),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# ---------------------------------------------------------------------------------------------
# What the warm start knows
# ---------------------------------------------------------------------------------------------


def answer_distribution(model_dir: str, eval_jsonl: str | Path, config) -> dict:
    """P(answer k | prompt) for every held-out prompt, from the teacher-forced log-probs of the
    demonstration response with each answer (the exact distribution over the four well-formed
    answers; mass on malformed responses is reported as `format_mass` < 1).

    Returns `matrix` [true colour][answer] (mean renormalised probabilities), `greedy_accuracy`
    (argmax over the four), `sampled_accuracy` (mean probability of the right answer) and
    `format_mass`."""
    from eureka_jax.data import load_records
    from eureka_jax.processing.examples import make_preprocess
    from eureka_jax.rollout import ScoredGroup, collate_groups

    family = families.for_model_dir(model_dir)
    model = family.load_model(model_dir)
    processor = family.load_processor(model_dir,
                                      families.ImageOptions.from_data_config(config.data))
    buckets = Buckets(lengths=tuple(config.data.length_buckets),
                               patches=tuple(config.data.patch_buckets))
    records, _ = load_records(eval_jsonl, decode_images=True)
    preprocess = make_preprocess(processor, model.config, config.data.system_prompt,
                                 max(buckets.lengths))
    examples = [preprocess(r) for r in records]
    tokenizer = processor.tokenizer
    stop_id = tokenizer.convert_tokens_to_ids(config.sampling.stop_tokens[0])
    length = config.sampling.max_new_tokens
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, b: policy.response_logprobs(nnx.merge(graphdef, p), b)[0])
    logp_ExK = np.zeros((len(examples), NUM_ANSWERS))
    for k in range(NUM_ANSWERS):
        ids = tokenizer(RESPONSE_TEMPLATE.format(k + 1))["input_ids"] + [stop_id]
        tokens = np.zeros((1, length), np.int32)
        tokens[0, :len(ids)] = ids
        groups = [ScoredGroup(row=e.row, record_id=e.record_id, tokens_GxL=tokens,
                              logprobs_GxL=np.zeros((1, length), np.float32),
                              lengths_G=np.asarray([len(ids)]), rewards_G=np.zeros(1, np.float32),
                              advantages_G=np.zeros(1, np.float32)) for e in examples]
        batch_size = config.eval.batch_size
        for start in range(0, len(groups), batch_size):
            chunk = groups[start:start + batch_size]
            chunk += [chunk[-1]] * (batch_size - len(chunk))  # one compiled shape
            batch = collate_groups(chunk, buckets, processor.pad_token_id)
            logp = np.asarray(forward(params, batch)) * np.asarray(batch.response_mask_BxL)
            count = min(batch_size, len(groups) - start)
            logp_ExK[start:start + count, k] = logp.sum(axis=1)[:count]
    probs_ExK = np.exp(logp_ExK)
    gold_E = np.asarray([int(e.answer) for e in examples]) - 1
    renormalised_ExK = probs_ExK / probs_ExK.sum(axis=1, keepdims=True)
    matrix = [renormalised_ExK[gold_E == c].mean(axis=0).tolist() if (gold_E == c).any()
              else [math.nan] * NUM_ANSWERS for c in range(NUM_ANSWERS)]
    return {
        "matrix": matrix,
        "greedy_accuracy": float((renormalised_ExK.argmax(axis=1) == gold_E).mean()),
        "sampled_accuracy": float(probs_ExK[np.arange(len(gold_E)), gold_E].mean()),
        "format_mass": float(probs_ExK.sum(axis=1).mean()),
    }


def format_distribution(dist: dict) -> str:
    lines = ["  colour | " + "  ".join(f"P({k + 1})" for k in range(NUM_ANSWERS))]
    for c, row in enumerate(dist["matrix"]):
        lines.append(f"  {c + 1:>6} | " + "  ".join(f"{p:4.2f}" for p in row))
    lines.append(f"  greedy accuracy {dist['greedy_accuracy']:.3f}, sampled accuracy "
                 f"{dist['sampled_accuracy']:.3f}, well-formed mass {dist['format_mass']:.3f}")
    return "\n".join(lines)


def _count(model) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
