"""Supervised warm-start (cold-start SFT): teach a starting policy on (prompt, response) records.

Records are the same jsonl/parquet the RL data uses, with a `response` field (the assistant
turn, e.g. "<think>...</think><answer>...</answer>"). The loss is the token-mean negative
log-likelihood of the response and its end-of-turn token; the result is exported as a Hugging
Face directory that `eureka-jax train` starts from.

    eureka-jax sft --config configs/tiny_cpu.py --workdir runs/sft --data sft.jsonl --steps 200
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from eureka_jax import families, hf_io, policy, sharding
from eureka_jax.batch import Buckets, TrainBatch, batch_shardings, collate_responses
from eureka_jax.data import load_records
from eureka_jax.errors import InputError
from eureka_jax.metrics import MetricsWriter
from eureka_jax.processing.examples import make_preprocess
from eureka_jax.workdirs import as_path


def _demonstrations(records, examples, tokenizer, stop_id: int, length: int):
    """(prompt row, response token ids ending in the stop token) per record."""
    pairs = []
    for record, example in zip(records, examples, strict=True):
        response = record.extra.get("response")
        if not isinstance(response, str) or not response:
            raise InputError(f"{record.location} (id {record.id}): SFT records need a non-empty "
                             "'response' field with the assistant's answer")
        ids = tokenizer(response)["input_ids"] + [stop_id]
        if len(ids) > length:
            raise InputError(f"{record.location} (id {record.id}): response has {len(ids)} "
                             f"tokens, more than sft.max_response_tokens={length}")
        pairs.append((example.row, np.asarray(ids, np.int32)))
    return pairs


def _collate(demonstrations, buckets: Buckets, pad_token_id: int, length: int) -> TrainBatch:
    prompts = families.collate_prompts([row for row, _ in demonstrations], buckets,
                                       pad_token_id=pad_token_id)
    return collate_responses(prompts, [ids for _, ids in demonstrations], 1, length=length)


def sft(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, data: str, steps: int,
        batch_size: int, lr: float, max_response_tokens: int, show_progress: bool = True,
        stop_below_loss: float | None = None) -> Path:
    """Train on `data` for up to `steps` updates; returns the exported HF directory.

    stop_below_loss: stop early once the mean loss of the last 10 steps is below this value
    (a warm-start meant to leave learning to RL stops as soon as it beats the no-information
    loss)."""
    workdir = as_path(workdir)
    mesh = sharding.make_mesh(tuple(config.mesh.shape))
    with sharding.activate(mesh):
        model_dir = hf_io.resolve_model_dir(config.model.path)
        family = families.for_model_dir(model_dir)
        model = family.load_model(model_dir, mesh=mesh,
                                  param_dtype=config.model.param_dtype,
                                  compute_dtype=config.model.compute_dtype,
                                  remat=config.model.remat,
                                  logits_chunk=config.model.logits_chunk,
                                  attention_impl=config.model.attention_impl)
        processor = family.load_processor(
            model_dir, families.ImageOptions.from_data_config(config.data))
        buckets = Buckets(lengths=tuple(config.data.length_buckets),
                                   patches=tuple(config.data.patch_buckets))
        records, _ = load_records(data, decode_images=True)
        preprocess = make_preprocess(processor, model.config, config.data.system_prompt,
                                     max(buckets.lengths))
        stop_id = processor.tokenizer.convert_tokens_to_ids(config.sampling.stop_tokens[0])
        groups = _demonstrations(records, [preprocess(r) for r in records],
                                  processor.tokenizer, stop_id, max_response_tokens)
        if len(groups) < batch_size:
            raise InputError(f"{data}: {len(groups)} records, fewer than one batch of "
                             f"{batch_size}")

        graphdef, params = nnx.split(model)
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps,
                                                      lr * 0.1)
        tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.99))
        opt_state = tx.init(params)

        def loss_fn(params, batch: TrainBatch):
            logp_BxL, _ = policy.response_logprobs(nnx.merge(graphdef, params), batch)
            mask = batch.response_mask_BxL
            return -jnp.sum(jnp.where(mask, logp_BxL, 0.0)) / jnp.maximum(mask.sum(), 1)

        @jax.jit
        def update(params, opt_state, batch):
            loss, grads = jax.value_and_grad(loss_fn)(params, batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        rng = np.random.default_rng(config.seed)
        writer = MetricsWriter(workdir, steps, show_progress=False)
        order = rng.permutation(len(groups))
        position = 0
        recent: list[float] = []
        with tqdm(total=steps, desc="sft", unit="step", disable=not show_progress) as bar:
            for step in range(1, steps + 1):
                if position + batch_size > len(order):
                    order, position = rng.permutation(len(groups)), 0
                chosen = [groups[i] for i in order[position:position + batch_size]]
                position += batch_size
                started = time.perf_counter()
                batch = _collate(chosen, buckets, processor.pad_token_id, max_response_tokens)
                batch = jax.device_put(batch, batch_shardings(batch, mesh))
                params, opt_state, loss = update(params, opt_state, batch)
                loss = float(loss)
                if not np.isfinite(loss):
                    raise RuntimeError(f"sft step {step}: loss is {loss}; lower the lr")
                writer.write(step, {"sft/loss": loss, "time/step": time.perf_counter() - started})
                bar.set_postfix(loss=f"{loss:.3f}")
                bar.update(1)
                recent = (recent + [loss])[-10:]
                if stop_below_loss is not None and len(recent) == 10 and (
                        np.mean(recent) < stop_below_loss):
                    break
        writer.close()
        output = family.export_model(nnx.merge(graphdef, params), workdir / "model",
                                     source_dir=model_dir)
    return output
