"""`eureka-jax plan`: the JSON contract on a TPU topology (compile-only libtpu devices) and on fake
CPU devices, the does-not-fit verdict (an HBM override, and a compiler out-of-memory), bad input;
and the optimizer state sharded like the parameters."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from eureka_jax import hf_io, sharding, train
from eureka_jax.commands import plan as plan_command
from eureka_jax.configs_common import base_config
from eureka_jax.models.qwen2_5_vl import Qwen25VLConfig
from eureka_jax.testing import tiny_hf_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GiB = 1 << 30


def _tiny_hf():
    # Fewer blocks than the parity model: compile time is what these tests pay for.
    return tiny_hf_config(depth=2, fullatt_block_indexes=[1], num_hidden_layers=1)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan_model")
    _tiny_hf().save_pretrained(path)  # config.json only: a plan never reads weights
    return path


def run_plan(capsys, *args):
    code = plan_command.main(list(args))
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return code, lines, err


def tiny_args(model_dir, topology, *extra):
    return (f"--config={CONFIGS / 'tiny_cpu.py'}:smoke", f"--config.model.path={model_dir}",
            "--config.mesh.shape=(1,-1,1)", f"--topology={topology}", *extra)


def check_contract(report, topology, num_devices):
    assert report["topology"] == topology
    assert report["num_devices"] == num_devices
    assert report["hbm_bytes_per_device"] > 0
    names = [p["name"] for p in report["programs"]]
    assert names == ["optimizer_init", "update", "logprob_forward", "sampler"]
    for program in report["programs"]:
        assert program["peak_bytes_per_device"] > 0
        assert program["flops"] >= 0 and program["compile_s"] >= 0
        assert 0 <= program["lower_s"] <= program["compile_s"], program
    running = [p["peak_bytes_per_device"] for p in report["programs"] if p["runs_per_step"]]
    assert report["peak_bytes_per_device"] >= max(running)
    assert isinstance(report["fits"], bool)
    assert report["projected_step_s"] > 0


def test_plan_tpu_topology_fits(capsys, tiny_model_dir):
    code, lines, err = run_plan(capsys, *tiny_args(tiny_model_dir, "v5e-4"))
    report = json.loads(lines[-1])
    check_contract(report, "v5e-4", 4)
    assert code == 0 and report["fits"]
    assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    # The compiler's usable HBM (15.75 GiB on v5e), not the documented 16 GB.
    assert 15 * GiB < report["hbm_bytes_per_device"] < 16 * GiB
    assert "compiling sampler" in err
    text = "\n".join(lines)
    assert "verdict: fits on v5e-4" in text and "projected step time" in text


def test_plan_cpu_devices_and_a_verdict_that_does_not_fit(capsys, tiny_model_dir):
    code, lines, _ = run_plan(capsys, *tiny_args(tiny_model_dir, "cpu-8", "--hbm_gib=0.0001"))
    report = json.loads(lines[-1])
    check_contract(report, "cpu-8", 8)
    assert code == 1 and report["fits"] is False
    assert report["hbm_bytes_per_device"] == int(0.0001 * GiB)
    text = "\n".join(lines)
    assert "verdict: DOES NOT FIT on cpu-8" in text
    assert "lower train.micro_batch_size" in text  # what to change


def test_plan_reports_a_compile_time_out_of_memory(capsys):
    """The 7B optimizer state (44 GiB in float32) on one v5e chip: the TPU compiler refuses the
    optimizer init (RESOURCE_EXHAUSTED), reported as does-not-fit with its numbers."""
    code, lines, _ = run_plan(
        capsys, f"--config={CONFIGS / 'qwen2_5_vl_7b_mmeureka.py'}",
        "--config.model.path=Qwen/Qwen2.5-VL-7B-Instruct", "--topology=v5e-1",
        "--programs=optimizer_init")
    report = json.loads(lines[-1])
    assert code == 1 and report["fits"] is False
    (program,) = report["programs"]
    assert program["name"] == "optimizer_init" and program["fits"] is False
    assert "RESOURCE_EXHAUSTED" in program["error"]
    assert program["peak_bytes_per_device"] > 40 * GiB  # the compiler's figure
    assert "DOES NOT FIT" in "\n".join(lines)


def test_plan_unknown_topology_lists_the_known_ones(capsys, tiny_model_dir):
    code, lines, err = run_plan(capsys, *tiny_args(tiny_model_dir, "v9-8"))
    assert code == 2 and not lines
    assert "unknown topology 'v9-8'" in err and "v6e-8" in err and "v5p-8" in err


def test_plan_needs_a_model_it_can_read_without_downloading(capsys):
    code, _, err = run_plan(capsys, f"--config={CONFIGS / 'qwen2_5_vl_7b_mmeureka.py'}",
                            "--config.model.path=someone/unknown-model", "--topology=v6e-8")
    assert code == 2 and "Qwen/Qwen2.5-VL-7B-Instruct" in err


def test_optimizer_state_is_sharded_like_the_parameters():
    """No optimizer leaf above 4 KiB replicated on a (1, 8, 1) mesh, and no moments for the frozen
    vision tower (jit(tx.init) without out_shardings replicated every leaf)."""
    model_config = Qwen25VLConfig.from_hf_dict(_tiny_hf().to_dict(), freeze_vision=True)
    mesh = sharding.make_mesh((1, 8, 1))
    params = nnx.state(hf_io.init_model(model_config, mesh=mesh))
    tx, _ = train.make_optimizer(base_config().optim, 10)
    trainable, _ = train.split_trainable(params, freeze_vision=True)
    opt_state = jax.jit(tx.init, out_shardings=train.optimizer_shardings(tx, trainable))(
        trainable)
    leaves = jax.tree_util.tree_leaves_with_path(opt_state)
    replicated = [(jax.tree_util.keystr(path), leaf.nbytes) for path, leaf in leaves
                  if leaf.sharding.is_fully_replicated and leaf.nbytes > 4096]
    assert not replicated
    sharded = [leaf for _, leaf in leaves if not leaf.sharding.is_fully_replicated]
    assert sum(leaf.nbytes for leaf in sharded) > 0.9 * sum(leaf.nbytes for _, leaf in leaves)
    moments = [jax.tree_util.keystr(path) for path, _ in leaves
               if ".mu" in jax.tree_util.keystr(path) or ".nu" in jax.tree_util.keystr(path)]
    assert moments and not any("['visual']" in key for key in moments)
    # The state holds the same numbers as an unsharded init (zeros and counts).
    assert all(np.all(np.asarray(leaf) == 0) for _, leaf in leaves)
