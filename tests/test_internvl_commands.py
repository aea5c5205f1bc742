"""InternVL through the commands Qwen2.5-VL has, with the same contracts: `verify-port`, `logits`
(HF processor arrays in an npz), `sample`, `train` -> `export` -> `eval`, and `plan`, on the tiny
random InternVL that `eureka-jax demo --family internvl` starts from (eureka_jax/families)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from eureka_jax import families, verify
from eureka_jax.cli import main
from eureka_jax.configs_common import load_config_file
from eureka_jax.data import make_synthetic
from eureka_jax.families import internvl as internvl_family
from eureka_jax.metrics import read_metrics
from eureka_jax.testing import draw_image

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny_cpu.py"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("internvl")
    model_dir = root / "model"
    families.get("internvl").make_tiny_model_dir(model_dir, seed=0)
    data = make_synthetic(root / "data", num_train=32, num_eval=8, seed=0, tasks=("colour",))
    return model_dir, data


def test_verify_port_passes_on_an_internvl_directory(setup, capsys):
    model_dir, _ = setup
    assert main(["verify-port", "--model", str(model_dir)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["passed"]
    assert set(report["cases"]) == {"text", "one_tile", "many_tiles", "two_images",
                                    "left_padded_batch"}
    for case in report["cases"].values():
        assert case["rel_diff"] <= 1e-5 and case["greedy_agree"] == 1.0


def test_logits_command_takes_the_processor_arrays(setup, tmp_path):
    model_dir, _ = setup
    family = families.for_model_dir(model_dir)
    processor = family.load_processor(model_dir)
    prompts = [processor.encode(question="What colour is it?", images=[draw_image(40, 30, 1)]),
               processor.encode(question="What is 2 + 2?")]
    arrays = internvl_family.hf_arrays(prompts, processor.pad_token_id, padding_side="right")
    assert set(arrays) == {"input_ids", "attention_mask", "pixel_values"}
    np.savez(tmp_path / "in.npz", **arrays)
    assert main(["logits", "--model", str(model_dir), "--inputs", str(tmp_path / "in.npz"),
                 "--output", str(tmp_path / "out.npz"), "--mesh", "1,2,1"]) == 0
    ours = np.load(tmp_path / "out.npz")["logits"]
    config = family.read_config(model_dir)
    theirs = family.reference_logits(family.load_reference(model_dir), arrays, config)
    result = verify.compare(ours, theirs, arrays["attention_mask"])
    assert result["rel_diff"] <= 1e-5 and result["reference_std"] >= 0.1

    bad = {**arrays, "pixel_values": arrays["pixel_values"][:, :, :8]}
    np.savez(tmp_path / "bad.npz", **bad)
    assert main(["logits", "--model", str(model_dir), "--inputs", str(tmp_path / "bad.npz"),
                 "--output", str(tmp_path / "x.npz")]) == 2


def test_sample_command_on_an_image(setup, tmp_path, capsys):
    model_dir, _ = setup
    image = tmp_path / "image.png"
    draw_image(50, 40, 2).save(image)
    assert main(["sample", "--model", str(model_dir), "--prompt", "What colour?", "--image",
                 str(image), "--num-samples", "2", "--max-new-tokens", "6", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [(r["prompt_index"], r["sample_index"]) for r in records] == [(0, 0), (0, 1)]
    for record in records:
        assert 1 <= len(record["tokens"]) <= 6
        assert record["finish_reason"] in ("stop", "length")
        assert len(record["logprobs"]) == len(record["tokens"])
        assert all(lp <= 0 for lp in record["logprobs"])


def _smoke_config(model_dir, data):
    config = load_config_file(TINY, "smoke")
    internvl = load_config_file(TINY, "internvl").data
    config.data.max_tiles, config.data.patch_buckets = internvl.max_tiles, internvl.patch_buckets
    config.model.path = str(model_dir)
    config.data.train = str(data.train_jsonl)
    config.eval.data = str(data.eval_jsonl)
    config.data.system_prompt = "Answer."
    config.rl.entropy_coef = 0.01  # a random model earns no reward: a gradient all the same
    config.rewards.num_workers = 0
    config.train_extras.progress_bar = False
    config.checkpoint.async_save = False
    return config


def test_train_export_and_eval_an_internvl_run(setup, tmp_path):
    from eureka_jax.train import load_trained_model, train

    model_dir, data = setup
    workdir = tmp_path / "run"
    last = train(_smoke_config(model_dir, data), workdir)
    assert np.isfinite(last["loss"])
    steps = {r["step"] for r in read_metrics(workdir)}
    assert {1, 2} <= steps

    trained, source = load_trained_model(workdir)
    family = families.for_config(trained.config)
    initial = family.load_model(model_dir)
    moved = [not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
        jax.tree.leaves(nnx.state(trained)), jax.tree.leaves(nnx.state(initial)), strict=True)]
    assert any(moved)

    assert main(["export", "--checkpoint", str(workdir), "--output", str(tmp_path / "hf")]) == 0
    exported = family.load_model(tmp_path / "hf")
    for a, b in zip(jax.tree.leaves(nnx.state(trained)), jax.tree.leaves(nnx.state(exported)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (tmp_path / "hf" / "preprocessor_config.json").exists()

    output = tmp_path / "results.json"
    assert main(["eval", "--model", str(workdir), "--data", str(data.eval_jsonl), "--output",
                 str(output), "--max-new-tokens", "8", "--batch-size", "4", "--system",
                 "Answer.", "--length-buckets", "128", "--patch-buckets", "1"]) == 0
    results = json.loads(output.read_text())
    assert results["num_examples"] == 8 and 0.0 <= results["accuracy"] <= 1.0


def test_plan_compiles_an_internvl_step(setup, capsys):
    from eureka_jax.commands import plan as plan_command

    model_dir, _ = setup
    code = plan_command.main([f"--config={TINY}:internvl", f"--config.model.path={model_dir}",
                              "--config.mesh.shape=(1,-1,1)", "--topology=cpu-4",
                              "--config.train.micro_batch_size=8",
                              "--config.train.minibatch_size=16",
                              "--config.train.prompts_per_rollout=2",
                              "--config.train.groups_per_step=2"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and report["fits"]
    assert [p["name"] for p in report["programs"]] == ["optimizer_init", "update",
                                                        "logprob_forward", "sampler"]
    assert report["resident_bytes_per_device"]["params"] > 0
    assert all(p["flops"] > 0 for p in report["programs"][1:])
