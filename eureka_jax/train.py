"""The GRPO trainer, top to bottom: mesh -> model/optimizer -> checkpoint -> data -> sampler and
rewards -> loop (rollouts, online filter, updates, eval, metrics, checkpoints).

One step = one policy iteration: rollouts of `train.prompts_per_rollout` prompts x G samples are
drawn until `train.groups_per_step` groups have passed the online filter (surplus groups wait for
the next step, as in MM-Eureka), then `rl.ppo_epochs` passes of minibatch updates run over them,
with the log-probs of the rollout as the old log-probs. Sampling and updates use the same
parameters on the same mesh. Rerunning with the same workdir resumes from the last checkpoint and
reproduces the uninterrupted run's metrics step for step.

    eureka-jax train --config configs/tiny_cpu.py --workdir runs/tiny
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import nnx

from eureka_jax import distributed, families, grpo, hf_io, policy, sharding
from eureka_jax.batch import Buckets, TrainBatch, batch_shardings
from eureka_jax.checkpointing import Checkpointer, abstract_like, pack_arrays, unpack_arrays
from eureka_jax.configs_common import validate_config
from eureka_jax.data import PipelineConfig, make_pipeline, open_source
from eureka_jax.errors import InputError
from eureka_jax.evaluation import Evaluator
from eureka_jax.metrics import MetricsWriter, NullWriter, plot_curves
from eureka_jax.processing.examples import gather_examples, make_preprocess
from eureka_jax.rewards import RewardConfig, RewardPool
from eureka_jax.rl_config import RLConfig
from eureka_jax.rollout import (
    RolloutWorker,
    ScoredGroup,
    pack_groups,
    stack_micro_batches,
    unpack_groups,
    whiten_training_batch,
)
from eureka_jax.sampler import Sampler, SamplingConfig
from eureka_jax.workdirs import as_path

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: the run stops; the last good checkpoint is kept."""


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    num_steps: int
    prompts_per_rollout: int  # P prompts sampled per rollout (x G samples)
    groups_per_step: int  # kept groups that make one training batch
    minibatch_size: int  # sequences per optimizer update
    micro_batch_size: int  # sequences per forward/backward (gradient accumulation)
    max_rollouts_per_step: int = 8  # give up filling a batch after this many rollouts
    rollout_chunk: int = 0  # prompts per sampler call (0: the whole rollout at once)


# ---------------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------------


def make_optimizer(optim: ml_collections.ConfigDict, total_updates: int,
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW, warmup then cosine to min_lr_ratio*lr, global-norm clipping. It sees the trainable
    parameters only (`trainable_filter`): a frozen tower has no moments and no gradients."""
    warmup = int(round(optim.warmup_fraction * total_updates))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim.lr, warmup_steps=warmup,
        decay_steps=max(total_updates, warmup + 1), end_value=optim.lr * optim.min_lr_ratio)
    tx = optax.chain(
        optax.clip_by_global_norm(optim.grad_clip),
        optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                    weight_decay=optim.weight_decay),
    )
    if optim.master_weights:
        tx = with_float32_master_weights(tx)
    return tx, schedule


class MasterWeightsState(NamedTuple):
    master: Any  # float32 copy of the parameters
    inner: Any  # the wrapped transformation's state, built on the float32 copy


def with_float32_master_weights(inner: optax.GradientTransformation):
    """Low-precision parameters (model.param_dtype=bfloat16) with float32 master weights: the
    optimizer keeps a float32 copy, applies `inner` to it in float32, and returns the float32
    difference to the parameters, which optax.apply_updates adds in float32 and rounds once
    (the parameters become the rounded master weights). Updates smaller than a bfloat16 ulp of
    a weight (lr 1e-6 is far smaller) accumulate in the master copy instead of vanishing."""

    def init(params):
        master = jax.tree.map(lambda p: p.astype(jnp.float32), params)
        return MasterWeightsState(master, inner.init(master))

    def update(grads, state, params):
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        updates, inner_state = inner.update(grads, state.inner, state.master)
        master = optax.apply_updates(state.master, updates)
        to_params = jax.tree.map(lambda m, p: m - p.astype(jnp.float32), master, params)
        return to_params, MasterWeightsState(master, inner_state)

    return optax.GradientTransformation(init, update)


# The vision tower's attribute in each family's model (Qwen2.5-VL, InternVL): what freezing the
# vision tower freezes. InternVL's projector trains, as in InternVL's own fine-tuning.
VISION_TOWERS = ("visual", "vision_tower")


def trainable_filter(freeze_vision: bool):
    """The nnx filter of the parameters the optimizer updates."""
    if freeze_vision:
        return lambda path, _: not path or path[0] not in VISION_TOWERS
    return nnx.Param


def split_trainable(params: nnx.State, freeze_vision: bool) -> tuple[nnx.State, nnx.State]:
    """(trainable, frozen) states; nnx.merge_state(trainable, frozen) gives `params` back."""
    return nnx.split_state(params, trainable_filter(freeze_vision), ...)


# ---------------------------------------------------------------------------------------------
# The update step
# ---------------------------------------------------------------------------------------------


def update_function(graphdef, tx, rl: RLConfig, freeze_vision: bool):
    """The update as a pure function (params, opt_state, ref_params, batches, scales) ->
    (params, opt_state, metrics). `make_update_step` jits it for training; eureka_jax.plan
    compiles it on abstract arguments.

    One optimizer update over a minibatch of M micro-batches: `batches` is a TrainBatch whose
    every leaf has a leading M axis (`rollout.stack_micro_batches`), `scales` [M] the weight of
    each micro-batch's loss (`micro_loss_scales`). A lax.scan accumulates the gradients of the
    trainable parameters only (a frozen vision tower gets none), so accumulation is one program
    with no host round trip per micro-batch; the metrics come back per micro-batch, [M] each.

    `ref_params` (an argument, not a constant baked into the program) are the reference policy
    when the KL is in the loss (rl.kl_coef > 0, placement 'loss'), else None."""
    kl_in_loss = rl.kl_coef > 0 and rl.kl_placement == "loss"

    def loss_fn(trainable, frozen, ref_params, batch: TrainBatch, scale):
        model = nnx.merge(graphdef, trainable, frozen)
        logp, entropy = policy.response_logprobs(model, batch, with_entropy=True)
        ref_logp = None
        if kl_in_loss:
            ref_logp = jax.lax.stop_gradient(
                policy.response_logprobs(nnx.merge(graphdef, ref_params), batch)[0])
        loss, metrics = grpo.policy_loss(
            logp, batch.old_logp_BxL, batch.advantages_B, batch.response_mask_BxL, rl,
            ref_logp_BxT=ref_logp, entropy_BxT=entropy)
        return loss * scale, metrics

    def update(params, opt_state, ref_params, batches, scales_M):
        if kl_in_loss != (ref_params is not None):
            raise ValueError("ref_params are needed exactly when rl.kl_coef > 0 and "
                             "rl.kl_placement == 'loss'")
        trainable, frozen = split_trainable(params, freeze_vision)

        def micro(grad_sum, xs):
            batch, scale = xs
            grads, metrics = jax.grad(loss_fn, has_aux=True)(trainable, frozen, ref_params,
                                                             batch, scale)
            return jax.tree.map(jnp.add, grad_sum, grads), metrics

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        grad_sum, metrics = jax.lax.scan(micro, zeros, (batches, scales_M))
        grads = jax.tree.map(lambda g: g / scales_M.shape[0], grad_sum)
        metrics["grad_norm"] = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        params = nnx.merge_state(optax.apply_updates(trainable, updates), frozen)
        metrics["param_norm"] = optax.tree.norm(params)
        return params, opt_state, metrics

    return update


def make_update_step(graphdef, tx, rl: RLConfig, freeze_vision: bool, state_shardings=None):
    """jit(update_function(...)), donating params and opt_state. `state_shardings` (of (params,
    opt_state)) pins the outputs to the inputs' shardings, so the second call does not see new
    input shardings and compile again."""
    out_shardings = None if state_shardings is None else (*state_shardings, None)
    return jax.jit(update_function(graphdef, tx, rl, freeze_vision), donate_argnums=(0, 1),
                   out_shardings=out_shardings)


def optimizer_shardings(tx, params):
    """Shardings of tx.init(params) (the trainable parameters, concrete or abstract with
    shardings): every moment sharded like its parameter, the counts replicated. Without them
    jit(tx.init) replicates the whole state (the 7B recipe's 87.6 GiB per chip)."""
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return sharding.mirror_shardings(jax.eval_shape(tx.init, params), params, replicated)


def assemble_batch(fresh: list[ScoredGroup], carried: list[ScoredGroup], size: int):
    """(batch, carried to the next step, counts): the step's fresh groups first, then the previous
    step's surplus (newest first) only to fill the batch. Fresh groups beyond the batch carry
    over; carried groups that were not needed are dropped, never trained two steps stale."""
    batch = fresh[:size]
    filled = carried[::-1][:size - len(batch)]
    counts = {"fresh": len(batch), "carried": len(filled),
              "dropped": len(carried) - len(filled)}
    return batch + filled, fresh[size:], counts


def split_minibatches(groups, loop: LoopConfig, group: int, rng: np.random.Generator):
    """Shuffle groups, then cut them into minibatches of micro-batches (lists of groups). A last,
    partial minibatch is padded with empty groups (no response token: they count nowhere), so
    every group is trained and every update has the compiled shape."""
    order = rng.permutation(len(groups))
    per_minibatch, per_micro = loop.minibatch_size // group, loop.micro_batch_size // group
    minibatches = []
    for start in range(0, len(groups), per_minibatch):
        chosen = [groups[i] for i in order[start:start + per_minibatch]]
        chosen += [_empty_group(chosen[0])] * (per_minibatch - len(chosen))
        minibatches.append([chosen[i:i + per_micro] for i in range(0, len(chosen), per_micro)])
    return minibatches


def _empty_group(like: ScoredGroup) -> ScoredGroup:
    zeros = np.zeros_like
    return dataclasses.replace(
        like, record_id="", tokens_GxL=zeros(like.tokens_GxL),
        logprobs_GxL=zeros(like.logprobs_GxL), lengths_G=zeros(like.lengths_G),
        rewards_G=zeros(like.rewards_G),
        advantages_G=zeros(like.advantages_G))


def step_minibatches(groups, loop: LoopConfig, rl: RLConfig, rng: np.random.Generator):
    """One step's updates: rl.ppo_epochs passes over the groups, each shuffled afresh."""
    return [minibatch for _ in range(rl.ppo_epochs)
            for minibatch in split_minibatches(groups, loop, rl.num_generations, rng)]


def micro_loss_scales(micro_batches, rl: RLConfig) -> list[float]:
    """The update averages micro-batch gradients; these scales make the average equal the
    loss over the whole minibatch (token-weighted for token-mean losses, sequence-weighted for
    the others)."""
    token_mean = rl.loss in ("dapo", "cpgd")
    weights = [sum(int(g.lengths_G.sum()) if token_mean else int((g.lengths_G > 0).sum())
                   for g in micro) for micro in micro_batches]
    total = max(sum(weights), 1)
    return [len(micro_batches) * w / total for w in weights]


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Run (or resume) training; returns the last step's metrics."""
    validate_config(config)
    workdir = as_path(workdir)
    # On several processes (hosts) process 0 alone writes the run's files; every process calls
    # the checkpointer, which orbax needs for a multi-process save or restore.
    primary = distributed.is_primary()
    if primary:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    rl = RLConfig.from_dict(config.rl)
    loop = LoopConfig(**config.train)
    group = rl.num_generations

    # -- Mesh and model ------------------------------------------------------------------------
    mesh = sharding.make_mesh(tuple(config.mesh.shape))
    with sharding.activate(mesh):
        model_dir = hf_io.resolve_model_dir(config.model.path)
        family = families.for_model_dir(model_dir)
        model = family.load_model(
            model_dir, mesh=mesh, param_dtype=config.model.param_dtype,
            compute_dtype=config.model.compute_dtype, remat=config.model.remat,
            logits_chunk=config.model.logits_chunk, attention_impl=config.model.attention_impl,
            freeze_vision=config.optim.freeze_vision)
        graphdef, params = nnx.split(model)
        model_config = model.config
        del model
        processor = family.load_processor(
            model_dir, families.ImageOptions.from_data_config(config.data))
        buckets = Buckets(lengths=tuple(config.data.length_buckets),
                                   patches=tuple(config.data.patch_buckets))
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

        # Every process holds the same host batches (the shares are gathered, below); placed
        # with their rows split over the data x fsdp axes, they are one global array whose
        # shards each process fills from its copy.
        def put_on_device(batch, micro_axis: bool = False):
            return jax.device_put(batch, batch_shardings(batch, mesh, micro_axis=micro_axis))

        # -- Optimizer and update -------------------------------------------------------------
        updates_per_step = rl.ppo_epochs * (loop.groups_per_step * group // loop.minibatch_size)
        tx, schedule = make_optimizer(config.optim, loop.num_steps * updates_per_step)
        trainable, _ = split_trainable(params, config.optim.freeze_vision)
        opt_state = jax.jit(tx.init, out_shardings=optimizer_shardings(tx, trainable))(
            trainable)
        del trainable
        ref_params = jax.tree.map(jnp.copy, params) if rl.kl_coef > 0 else None
        kl_in_loss = rl.kl_placement == "loss"
        update_step = make_update_step(
            graphdef, tx, rl, config.optim.freeze_vision,
            state_shardings=jax.tree.map(lambda x: x.sharding, (params, opt_state)))

        # -- Checkpoint: resume if the workdir has one -----------------------------------------
        checkpointer = Checkpointer(workdir / "checkpoints", every_steps=config.checkpoint.every,
                                    keep=config.checkpoint.keep,
                                    async_save=config.checkpoint.async_save)
        checkpointer.install_sigterm_handler()
        step, host = 0, {}
        latest = checkpointer.latest_step()
        if latest is not None:
            device, host = checkpointer.restore(
                latest, abstract_like({"params": params, "opt_state": opt_state}))
            params, opt_state = device["params"], device["opt_state"]
            step = latest
            log.info("resumed from %s at step %d", checkpointer.directory, step)
        carried = unpack_groups(unpack_arrays(host["carried_groups"])) if host else []

        # -- Data ---------------------------------------------------------------------------------
        preprocess = make_preprocess(processor, model_config=model_config,
                                     system_prompt=config.data.system_prompt,
                                     max_prompt_length=max(buckets.lengths))
        # Every process walks the same seeded order of all records and loads and preprocesses
        # only its share of each rollout chunk; the shares are gathered into the rollout one
        # process would read, so a step trains on the same records whatever the number of
        # processes. Each process's iterator state goes into the checkpoint.
        chunk, share = _chunk_share(loop)
        source = open_source(config.data.train)
        pipeline = make_pipeline(source, preprocess, PipelineConfig(
            batch_size=loop.prompts_per_rollout * share // chunk, seed=config.seed,
            shuffle=True, num_epochs=None, skip_bad_records=config.data.skip_bad_records,
            num_threads=config.data.num_threads),
            chunk_share=(chunk, jax.process_index() * share, (jax.process_index() + 1) * share))
        data_iter = iter(pipeline)
        if host:
            data_iter.set_state(_own_iterator_state(host, checkpointer.directory))

        # -- Sampler, rewards, evaluation ------------------------------------------------------
        tokenizer = processor.tokenizer
        stop_ids = tuple(tokenizer.convert_tokens_to_ids(t) for t in config.sampling.stop_tokens)
        sampling = SamplingConfig(
            num_samples=group, max_new_tokens=config.sampling.max_new_tokens,
            temperature=config.sampling.temperature, top_k=config.sampling.top_k,
            top_p=config.sampling.top_p, stop_token_ids=stop_ids,
            cache_phases=config.sampling.cache_phases, layer_loop=config.sampling.layer_loop)
        sampler = Sampler(graphdef, sampling)
        reward_config = RewardConfig.from_mapping(
            {**config.rewards.to_dict(), "max_length": sampling.max_new_tokens})
        reward_pool = RewardPool(reward_config)
        pad_id = tokenizer.pad_token_id
        worker = RolloutWorker(
            sampler=sampler, reward_pool=reward_pool, tokenizer=tokenizer, rl=rl,
            buckets=buckets, pad_token_id=pad_id, graphdef=graphdef,
            recompute_old_logprobs=not _samples_from_policy(sampling),
            measure_mismatch=config.train_extras.measure_logprob_mismatch,
            put_on_device=put_on_device, ref_params=None if kl_in_loss else ref_params,
            reward_control=config.train_extras.reward_control, chunk=loop.rollout_chunk,
            forward_sequences=loop.micro_batch_size)
        evaluator = None
        if config.eval.data:
            evaluator = Evaluator(
                graphdef=graphdef, processor=processor, model_config=model_config,
                data=config.eval.data, max_examples=config.eval.max_examples,
                batch_size=config.eval.batch_size, buckets=buckets,
                system_prompt=config.data.system_prompt,
                max_new_tokens=config.sampling.max_new_tokens, stop_token_ids=stop_ids,
                reward_pool=reward_pool, put_on_device=put_on_device)

        writer = (MetricsWriter(workdir, loop.num_steps, step,
                                show_progress=config.train_extras.progress_bar)
                  if primary else NullWriter())
        last: dict[str, Any] = {}
        try:
            if step == 0 and evaluator is not None:
                last = {"eval/accuracy": evaluator.accuracy(params)}
                writer.write(0, last)

            # -- The loop ---------------------------------------------------------------------
            while step < loop.num_steps:
                step += 1
                step_started = time.perf_counter()
                metrics: dict[str, list[float]] = {}

                # Rollouts until the filter has kept a full batch of fresh groups (MM-Eureka's
                # accumulation), then the batch: every fresh group first, the previous step's
                # surplus only to fill what is left.
                fresh: list = []
                for rollout in range(loop.max_rollouts_per_step):
                    if rollout > 0 and len(fresh) + len(carried) >= loop.groups_per_step:
                        break
                    examples = gather_examples(next(data_iter), share)
                    seed = _rollout_seed(config.seed, step, rollout)
                    groups, rollout_metrics, samples = worker.run(params, examples, seed)
                    fresh.extend(groups)
                    for key, value in rollout_metrics.items():
                        metrics.setdefault(key, []).append(float(value))
                batch_groups, carried, counts = assemble_batch(fresh, carried,
                                                               loop.groups_per_step)
                if len(batch_groups) < loop.groups_per_step and loop.max_rollouts_per_step > 1:
                    log.warning("step %d: the online filter kept %d groups in %d rollouts; "
                                "training on %d (batch %d)", step, len(fresh), rollout + 1,
                                len(batch_groups), loop.groups_per_step)
                batch_groups = whiten_training_batch(batch_groups, rl)

                # Updates: ppo_epochs passes of minibatches, micro-batches accumulated.
                update_started = time.perf_counter()
                shuffle_rng = np.random.default_rng([config.seed, step])
                outputs = []
                for minibatch in step_minibatches(batch_groups, loop, rl, shuffle_rng):
                    scales_M = np.asarray(micro_loss_scales(minibatch, rl), np.float32)
                    batches = put_on_device(stack_micro_batches(minibatch, buckets, pad_id),
                                            micro_axis=True)
                    params, opt_state, out = update_step(
                        params, opt_state, ref_params if kl_in_loss else None, batches,
                        jax.device_put(scales_M, replicated))
                    outputs.append((out, scales_M))
                update_metrics = _update_metrics(distributed.to_host(outputs))  # one fetch a step
                if update_metrics:
                    _check_finite(step, update_metrics)
                update_time = time.perf_counter() - update_started
                metrics = {k: float(np.mean(v)) for k, v in (metrics | update_metrics).items()}
                metrics["time/update"] = update_time
                trained_tokens = sum(int(g.lengths_G.sum()) for g in batch_groups)
                metrics["throughput/tokens_per_s"] = trained_tokens * rl.ppo_epochs / update_time
                metrics["filter/trained_groups"] = len(batch_groups)
                metrics["filter/fresh_groups"] = counts["fresh"]
                metrics["filter/carried_groups"] = counts["carried"]
                metrics["filter/dropped_groups"] = counts["dropped"]
                metrics["compilations/sampler"] = sampler.num_compilations
                metrics["compilations/update"] = update_step._cache_size()
                metrics["lr"] = float(schedule(_optimizer_count(opt_state)))
                metrics["time/step"] = time.perf_counter() - step_started
                if evaluator is not None and (step % config.eval.every == 0
                                              or step == loop.num_steps):
                    metrics["eval/accuracy"] = evaluator.accuracy(params)
                writer.write(step, metrics)
                if config.log.samples_every and step % config.log.samples_every == 0:
                    writer.write_samples(step, samples[: config.log.num_samples])
                writer.advance(step, metrics)
                last = metrics

                # A SIGTERM reaches the processes at different moments: they agree on it, so that
                # all save and stop after the same step (orbax's save waits for every process).
                checkpointer.preempted = distributed.any_process(checkpointer.preempted)
                if checkpointer.should_save(step) or step == loop.num_steps:
                    checkpointer.save(step, {"params": params, "opt_state": opt_state}, {
                        "data_iterators": [json.loads(state) for state in distributed.gather_bytes(
                            json.dumps(data_iter.get_state()).encode())],
                        "carried_groups": pack_arrays(pack_groups(carried)),
                    })
                if checkpointer.preempted:
                    log.warning("SIGTERM: checkpoint saved at step %d; exiting", step)
                    break
        finally:
            checkpointer.close()
            reward_pool.close()
            writer.close()
        if primary:
            plot_curves(workdir)
        return last


def _chunk_share(loop: LoopConfig) -> tuple[int, int]:
    """(prompts per sampler call, how many of them each process loads)."""
    chunk, processes = loop.rollout_chunk or loop.prompts_per_rollout, jax.process_count()
    if processes > 1 and (chunk % processes or loop.prompts_per_rollout % chunk):
        raise InputError(
            f"{processes} processes share every rollout chunk of {chunk} prompts equally: make "
            f"train.rollout_chunk (or train.prompts_per_rollout when it is 0) a multiple of "
            f"{processes}, and train.prompts_per_rollout ({loop.prompts_per_rollout}) a "
            "multiple of the chunk")
    return chunk, chunk // processes


def _own_iterator_state(host: dict[str, Any], directory) -> dict[str, Any]:
    """This process's data-iterator state from a checkpoint's host state (checkpoints written
    before per-process states hold one, of a one-process run)."""
    states = host.get("data_iterators") or [host["data_iterator"]]
    if len(states) != jax.process_count():
        raise InputError(
            f"{directory}: the checkpoint was written by {len(states)} process(es); resume it "
            f"with as many (this run has {jax.process_count()}), or start a new workdir")
    return states[jax.process_index()]


def _samples_from_policy(sampling: SamplingConfig) -> bool:
    """True when the sampler draws from the policy itself, so its log-probs are the old ones."""
    return sampling.temperature == 1.0 and sampling.top_k == 0 and sampling.top_p == 1.0


def _rollout_seed(seed: int, step: int, rollout: int) -> int:
    return int(np.random.SeedSequence([seed, step, rollout]).generate_state(1)[0])


def _update_metrics(outputs) -> dict[str, list[float]]:
    """Per-update metrics from (metrics, scales_M) of each update: per-micro-batch values are
    averaged over the micro-batches that hold sequences (padding-only ones have scale 0)."""
    merged: dict[str, list[float]] = {}
    for metrics, scales_M in outputs:
        real_M = np.asarray(scales_M) > 0
        for key, value in metrics.items():
            value = np.asarray(value)
            merged.setdefault(key, []).append(
                float(value) if value.ndim == 0 else float(value[real_M].mean()))
    return merged


def _optimizer_count(opt_state) -> int:
    """Number of optimizer updates applied so far (for the learning-rate metric)."""
    counts = [int(x) for path, x in jax.tree_util.tree_leaves_with_path(opt_state)
              if jax.tree_util.keystr(path).endswith(".count") and jnp.ndim(x) == 0]
    return max(counts) - 1 if counts else 0


def _check_finite(step: int, metrics: dict[str, list[float]]) -> None:
    for key in ("loss", "grad_norm"):
        values = metrics.get(key, [])
        if any(not math.isfinite(v) for v in values):
            raise TrainingDiverged(
                f"step {step}: {key} is not finite ({values}); the update was not checkpointed, "
                "the last good checkpoint is kept. Lower optim.lr, check the data, or use "
                "float32 compute")


# ---------------------------------------------------------------------------------------------
# Loading a trained policy (export, eval)
# ---------------------------------------------------------------------------------------------


def default_mesh():
    """None on one process (a model on the first device); on several, a mesh that spreads the
    parameters over every process's devices (fsdp), which commands that load one model use."""
    if jax.process_count() == 1:
        return None
    return sharding.make_mesh((1, -1, 1))


def checkpoint_paths(checkpoint: str | os.PathLike) -> tuple[epath.Path, int]:
    """(run workdir, step) for WORKDIR, WORKDIR/checkpoints or WORKDIR/checkpoints/STEP."""
    path = as_path(checkpoint)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if path.name.isdigit() and path.parent.name == "checkpoints":
        return path.parent.parent, int(path.name)
    if path.name == "checkpoints" and path.is_dir():
        steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit())
        if steps:
            return path.parent, steps[-1]
    raise InputError(f"{checkpoint}: not a training run or checkpoint (expected WORKDIR, "
                     "WORKDIR/checkpoints or WORKDIR/checkpoints/STEP with complete checkpoints)")


def load_trained_model(checkpoint: str | os.PathLike, mesh=None, **runtime):
    """(model, source HF dir for tokenizer files) from a training checkpoint: on this process's
    first device, or sharded over `mesh` (a run of several processes needs a mesh over all
    their devices: `default_mesh()`)."""
    workdir, step = checkpoint_paths(checkpoint)
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    source = hf_io.resolve_model_dir(config.model.path)
    family = families.for_model_dir(source)
    model_config = family.read_config(source, freeze_vision=config.optim.freeze_vision,
                                      **runtime)
    abstract = nnx.eval_shape(lambda: family.model_class(model_config, nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract)
    tx, _ = make_optimizer(config.optim, 1)
    abstract_opt = jax.eval_shape(
        tx.init, split_trainable(abstract_params, config.optim.freeze_vision)[0])
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                              {"params": abstract_params, "opt_state": abstract_opt})
    else:
        with sharding.activate(mesh) as context:
            param_shardings = sharding.state_shardings(abstract_params, context)
        params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              abstract_params, param_shardings)
        trainable = split_trainable(params, config.optim.freeze_vision)[0]
        opt = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                           abstract_opt, optimizer_shardings(tx, trainable))
        target = {"params": params, "opt_state": opt}
    checkpointer = Checkpointer(workdir / "checkpoints", every_steps=0, keep=1000,
                                async_save=False)
    try:
        state, _ = checkpointer.restore(step, target)
    finally:
        checkpointer.close()
    return nnx.merge(graphdef, state["params"]), source
