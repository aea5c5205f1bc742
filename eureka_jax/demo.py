"""The CPU demo, end to end through the real code paths (what `make demo` runs):

  1. write the synthetic visual dataset (PIL drawings, MM-Eureka jsonl);
  2. train a tiny tokenizer locally and save a randomly initialised tiny Qwen2.5-VL as a HF dir;
  3. a short cold-start SFT on correct demonstrations ("<think>look</think><answer>N</answer>"),
     stopped as soon as its loss beats the no-information loss: it teaches the output format
     and gives a weak policy that has begun to read the image. (A policy that has not, e.g. one
     warm-started on random answers, gives GRPO nothing to amplify: measured, accuracy stayed at
     chance for 150 GRPO steps.);
  4. GRPO with the rule rewards (accuracy + 0.5 format) on the same prompts: everything it adds
     beyond the SFT policy comes from the reward;
  5. report held-out accuracy before the first GRPO update and at the end, and draw the curves.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
from flax import nnx

from eureka_jax import hf_io, testing
from eureka_jax.data import make_synthetic
from eureka_jax.metrics import read_metrics
from eureka_jax.models.qwen2_5_vl import Qwen25VLConfig, TextConfig, VisionConfig

DEMO_TASKS = ("colour",)
# The SFT loss when the answer carries no information about the image is ~0.11 per token (a
# uniform 4-way answer in a 14-token response); stopping just below it hands GRPO a policy that
# has begun to read the image (held-out greedy accuracy ~0.45 measured) and leaves the rest to RL.
SFT_STOP_LOSS = 0.09
TINY_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny_cpu.py"
# Tiny models need tiny prompts: every extra token dilutes the attention to the image tokens.
DEMO_SYSTEM_PROMPT = "Answer."


def tiny_model_config(vocab_size: int, ids: dict[str, int]) -> Qwen25VLConfig:
    """A few hundred thousand parameters: trains in minutes on two CPU cores."""
    return Qwen25VLConfig(
        vision=VisionConfig(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                            window_size=56, out_hidden_size=128, fullatt_block_indexes=(1,)),
        text=TextConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                        mrope_section=(4, 6, 6), max_position_embeddings=4096),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )


def write_sft_data(train_jsonl: Path, output: Path) -> Path:
    """Cold-start demonstrations: the training prompts with a short, correct response."""
    lines = []
    for line in train_jsonl.read_text().splitlines():
        record = json.loads(line)
        record["response"] = f"<think>look</think><answer>{record['answer']}</answer>"
        lines.append(json.dumps(record))
    output.write_text("\n".join(lines) + "\n")
    return output


def run_demo(workdir: str | Path, *, num_train: int = 512, num_eval: int = 64, seed: int = 0,
             sft_max_steps: int = 400, grpo_steps: int | None = None,
             config_overrides: dict | None = None) -> dict:
    from eureka_jax.configs_common import load_config_file
    from eureka_jax.sft import sft
    from eureka_jax.train import train

    workdir = Path(workdir)
    started = time.perf_counter()
    data = make_synthetic(workdir / "data", num_train, num_eval, seed=seed, tasks=DEMO_TASKS,
                          short_questions=True)
    init_dir = workdir / "init_model"
    if not (init_dir / "config.json").exists():
        ids = testing.make_tokenizer_dir(init_dir, min_pixels=4 * 28 * 28,
                                         max_pixels=16 * 28 * 28)
        model = hf_io.init_model(tiny_model_config(ids["vocab_size"], ids), seed=seed)
        hf_io.export_model(model, init_dir, source_dir=init_dir)
        print(f"[demo] random tiny model: {_count(model):,} parameters -> {init_dir}")

    if not TINY_CONFIG.exists():
        from eureka_jax.errors import InputError

        raise InputError(f"{TINY_CONFIG} not found: configs/ ships with the repository, not the "
                         "wheel; run the demo from a checkout (pip install -e .)")
    config = load_config_file(TINY_CONFIG)
    config.data.system_prompt = DEMO_SYSTEM_PROMPT
    config.data.train = str(data.train_jsonl)
    config.eval.data = str(data.eval_jsonl)
    config.eval.max_examples = num_eval
    if grpo_steps is not None:
        config.train.num_steps = grpo_steps
    for key, value in (config_overrides or {}).items():
        section, field = key.split(".")
        config[section][field] = value

    sft_dir = workdir / "sft"
    if not (sft_dir / "model" / "config.json").exists():
        config.model.path = str(init_dir)
        sft_data = write_sft_data(data.train_jsonl, workdir / "data" / "sft.jsonl")
        print("[demo] cold-start SFT on correct demonstrations, until it beats chance")
        sft(config, sft_dir, data=str(sft_data), steps=sft_max_steps, batch_size=16, lr=1e-3,
            stop_below_loss=SFT_STOP_LOSS,
            max_response_tokens=config.sampling.max_new_tokens)
    config.model.path = str(sft_dir / "model")
    print(f"[demo] GRPO for {config.train.num_steps} steps -> {workdir / 'grpo'}")
    train(config, workdir / "grpo")

    evals = [(r["step"], r["eval/accuracy"]) for r in read_metrics(workdir / "grpo")
             if "eval/accuracy" in r]
    summary = {
        "eval_accuracy_before": evals[0][1] if evals else None,
        "eval_accuracy_after": evals[-1][1] if evals else None,
        "eval_curve": evals,
        "curves_png": str(workdir / "grpo" / "curves.png"),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _count(model) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
