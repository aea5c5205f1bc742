"""The GRPO trainer end to end on a tiny random model: resume after SIGKILL equals the
uninterrupted run, a (2,2,2) mesh equals one device, no recompilation after the first step, the
frozen vision tower stays put while the rest moves, and a diverging run stops loudly."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from eureka_jax import hf_io, testing
from eureka_jax.checkpointing import Checkpointer, abstract_like
from eureka_jax.configs_common import load_config_file
from eureka_jax.data import make_synthetic
from eureka_jax.metrics import read_metrics
from eureka_jax.train import TrainingDiverged, train

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny_cpu.py"
# Wall-clock figures differ between runs by nature; everything else must match.
NONDETERMINISTIC = ("time/", "throughput/")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model_dir = testing.make_hf_model_dir(root / "model", initializer_range=0.2)
    data = make_synthetic(root / "data", num_train=32, num_eval=8, seed=0,
                          tasks=("colour", "count"))
    return model_dir, data


def smoke_config(setup, **changes):
    model_dir, data = setup
    config = load_config_file(TINY, "smoke")
    config.model.path = str(model_dir)
    config.data.train = str(data.train_jsonl)
    config.eval.data = str(data.eval_jsonl)
    config.data.system_prompt = "Answer."
    config.rewards.num_workers = 0
    config.train_extras.progress_bar = False
    config.checkpoint.every = 1
    config.checkpoint.async_save = False
    # A random model earns no reward, so every advantage is 0; the entropy bonus gives each step
    # a real gradient, which the mesh, resume and freezing comparisons need to mean anything.
    config.rl.entropy_coef = 0.01
    for key, value in changes.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def by_step(workdir):
    """Last record per step (a resumed run may repeat the step that was in flight)."""
    records = {}
    for record in read_metrics(workdir):
        records.setdefault(record["step"], {}).update(record)
    return records


def assert_same_metrics(a, b, steps):
    for step in steps:
        keys = {k for k in a[step] if not k.startswith(NONDETERMINISTIC)}
        assert keys == {k for k in b[step] if not k.startswith(NONDETERMINISTIC)}
        for key in keys:
            assert math.isclose(a[step][key], b[step][key], rel_tol=1e-6, abs_tol=1e-7), (
                step, key, a[step][key], b[step][key])


def test_resume_after_sigkill_equals_uninterrupted(setup, tmp_path):
    config = smoke_config(setup, **{"train.num_steps": 4})
    train(config, tmp_path / "straight")

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "eureka_jax.cli", "train", f"--config={TINY}:smoke",
               f"--workdir={killed}"]
    overrides = {"model.path": config.model.path, "data.train": config.data.train,
                 "eval.data": config.eval.data, "data.system_prompt": "Answer.",
                 "rewards.num_workers": 0, "train_extras.progress_bar": False,
                 "checkpoint.every": 1, "checkpoint.async_save": False, "train.num_steps": 4,
                 "rl.entropy_coef": 0.01}
    command += [f"--config.{k}={v}" for k, v in overrides.items()]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "JAX_PLATFORMS": "cpu"})
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "2").exists():
        assert process.poll() is None, "the run ended before its second checkpoint"
        assert time.time() < deadline, "no second checkpoint within 240 s"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()

    train(config, killed)  # the same command again: resumes
    straight, resumed = by_step(tmp_path / "straight"), by_step(killed)
    assert sorted(straight) == sorted(resumed) == [0, 1, 2, 3, 4]
    assert_same_metrics(straight, resumed, steps=[1, 2, 3, 4])


def test_mesh_equals_single_device_and_no_recompilation(setup, tmp_path):
    # One length bucket, so that every step has the same shapes: one program each.
    changes = {"train.num_steps": 3, "data.length_buckets": (128,)}
    single = by_step_after(train, smoke_config(setup, **changes), tmp_path / "one")
    config = smoke_config(setup, **changes)
    config.mesh.shape = (2, 2, 2)
    sharded = by_step_after(train, config, tmp_path / "mesh")
    for step in (1, 2, 3):
        for key in ("loss", "grad_norm", "param_norm", "reward/mean", "response_length/mean"):
            np.testing.assert_allclose(sharded[step][key], single[step][key], rtol=2e-4,
                                       atol=1e-6, err_msg=f"step {step} {key}")
    assert single[3]["grad_norm"] > 1e-3  # a real update was compared
    for run in (single, sharded):
        assert run[3]["compilations/sampler"] == 1
        assert run[3]["compilations/update"] == 1


def by_step_after(fn, config, workdir):
    fn(config, workdir)
    return by_step(workdir)


@pytest.fixture(scope="module")
def one_step_run(setup, tmp_path_factory):
    """A one-step run with the vision tower frozen."""
    workdir = tmp_path_factory.mktemp("one_step")
    config = smoke_config(setup, **{"train.num_steps": 1, "optim.freeze_vision": True})
    train(config, workdir)
    return config, workdir


def test_frozen_vision_stays_and_language_model_moves(setup, one_step_run):
    model_dir, _ = setup
    config, workdir = one_step_run
    initial = nnx.state(hf_io.load_model(model_dir, freeze_vision=True))
    checkpointer = Checkpointer(workdir / "checkpoints", every_steps=1, keep=1, async_save=False)
    state, _ = checkpointer.restore(1, {"params": abstract_like(initial),
                                        "opt_state": _abstract_opt_state(config, initial)})
    checkpointer.close()
    trained = state["params"]
    vision_moved = [not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(initial["visual"]), jax.tree.leaves(trained["visual"]), strict=True)]
    lm_moved = [not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(initial["layers"]), jax.tree.leaves(trained["layers"]), strict=True)]
    assert not any(vision_moved)
    assert all(lm_moved)
    # The optimizer keeps no moments for the frozen tower.
    opt_paths = [jax.tree_util.keystr(p) for p, _ in
                 jax.tree_util.tree_leaves_with_path(state["opt_state"])]
    assert opt_paths and not any("visual" in p for p in opt_paths)


def _abstract_opt_state(config, params):
    from eureka_jax.train import make_optimizer, split_trainable

    tx, _ = make_optimizer(config.optim, 10)
    trainable, _ = split_trainable(params, config.optim.freeze_vision)
    return abstract_like(jax.eval_shape(tx.init, trainable))


def test_diverging_run_stops_loudly_and_keeps_last_good_checkpoint(setup, tmp_path):
    config = smoke_config(setup, **{"train.num_steps": 4, "optim.lr": 1e30,
                                    "optim.warmup_fraction": 0.0})
    with pytest.raises(TrainingDiverged, match="not finite"):
        train(config, tmp_path)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    good = by_step(tmp_path)
    assert steps and all(math.isfinite(good[s]["loss"]) for s in steps)
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["lr"] == 1e30


def test_export_command_round_trips_the_trained_parameters(setup, one_step_run, tmp_path):
    from eureka_jax.cli import main
    from eureka_jax.train import load_trained_model

    _, workdir = one_step_run
    assert main(["export", "--checkpoint", str(workdir), "--output", str(tmp_path / "hf")]) == 0
    trained, _ = load_trained_model(workdir)
    exported = hf_io.load_model(tmp_path / "hf", freeze_vision=True)
    for a, b in zip(jax.tree.leaves(nnx.state(trained)), jax.tree.leaves(nnx.state(exported)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (tmp_path / "hf" / "tokenizer.json").exists()


def test_eval_command_on_a_run(setup, one_step_run, tmp_path):
    from eureka_jax.cli import main

    _, data = setup
    _, workdir = one_step_run
    output = tmp_path / "results.json"
    code = main(["eval", "--model", str(workdir), "--data", str(data.eval_jsonl),
                 "--output", str(output), "--max-new-tokens", "8", "--batch-size", "4",
                 "--system", "Answer.", "--length-buckets", "128", "--patch-buckets", "64"])
    assert code == 0
    results = json.loads(output.read_text())
    assert results["num_examples"] == 8 and 0.0 <= results["accuracy"] <= 1.0
    assert all(len(item["completions"]) == 1 for item in results["items"])


@pytest.mark.parametrize("placement", ["reward", "loss"])
def test_kl_runs_where_its_placement_says(setup, tmp_path, placement):
    # The reference is the initial policy, so after one step's rollout the KL is ~0; what is
    # checked is where it is computed: the rollout's reward penalty or the update's loss term.
    config = smoke_config(setup, **{"train.num_steps": 1, "rl.kl_coef": 0.05,
                                    "rl.kl_placement": placement, "rl.whiten_advantages": True})
    config.eval.data = ""
    metrics = by_step_after(train, config, tmp_path)[1]
    assert ("kl/reward_penalty" in metrics) == (placement == "reward")
    assert ("kl" in metrics) == (placement == "loss")
    assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))


def test_accumulation_and_rollout_chunks_change_memory_not_results(setup, tmp_path):
    # The smoke config's minibatch of 16 sequences as two scanned micro-batches of 8 and its
    # rollout of 2 prompts in one sampler call, against one pass over all 16 and the rollout
    # in chunks of one prompt: the same samples, rewards and gradient, so the same update.
    changes = {"train.num_steps": 1, "data.length_buckets": (128,)}
    base = by_step_after(train, smoke_config(setup, **changes), tmp_path / "base")
    variant = by_step_after(train, smoke_config(setup, **changes, **{
        "train.micro_batch_size": 16, "train.rollout_chunk": 1}), tmp_path / "variant")
    assert base[1]["grad_norm"] > 1e-3
    for key in ("reward/mean", "response_length/mean", "loss", "grad_norm", "param_norm"):
        np.testing.assert_allclose(variant[1][key], base[1][key], rtol=1e-5, err_msg=key)
