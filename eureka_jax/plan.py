"""Will a training config fit a TPU slice, and how fast can a step be? Answered before renting it.

    eureka-jax plan --config configs/qwen2_5_vl_7b_mmeureka.py \
        --config.model.path=Qwen/Qwen2.5-VL-7B-Instruct --topology v6e-8

`plan_training` compiles, ahead of time and with abstract parameters only (nothing is allocated),
every program one training step runs, at the config's largest shape buckets, with the project's own
functions (the optimizer init, `train.update_function` at train.micro_batch_size sequences, the
rollout's teacher-forced log-prob forward, the `Sampler` program: vision tower + prefill + one
while_loop per decoding phase), on compile-only devices of the named slice (libtpu, from the
`plan` extra; no TPU needed) or on fake CPU devices (`cpu-N`). For each program it reads the
compiler's per-device memory analysis, where an out-of-memory is a compile-time RESOURCE_EXHAUSTED
(reported as "does not fit" with the compiler's numbers). Then: what is resident across the step
(parameters, optimizer state, reference copy, a rollout's KV cache), the step's peak against the
chip's HBM, what to change when it does not fit, and a step-time lower bound from analytic model
FLOPs and bytes over the chip's peak FLOP/s and HBM bandwidth, with the MFU it implies.

FLOPs are analytic (2 x matmul parameters per token forward, plus 4 x queries x keys x heads x
head_dim per attention layer, over the dense T x S products the code computes; backward 2x forward,
full remat adds one forward of the decoder). XLA's cost_analysis is shown only as a cross-check: it
counts a while_loop body once, under-counts FSDP-sharded matmuls and can report negative times.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from eureka_jax import families, sharding
from eureka_jax.batch import PromptBatch, TrainBatch, batch_shardings
from eureka_jax.errors import InputError
from eureka_jax.models import presets
from eureka_jax.models.decoder import DTYPES
from eureka_jax.policy import make_forward_logprobs
from eureka_jax.rl_config import RLConfig
from eureka_jax.sampler import Sampler, SamplingConfig

GiB = 1 << 30
# What one training step runs, in the order they are compiled.
PROGRAMS = ("optimizer_init", "update", "logprob_forward", "sampler")

# ---------------------------------------------------------------------------------------------
# Chips and slices
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Chip:
    generation: str
    hbm_bytes: int  # documented HBM per chip (the compiler's usable figure is preferred)
    peak_flops: float  # dense bf16 FLOP/s per chip
    hbm_bandwidth: float  # bytes/s per chip
    source: str


# From the "System architecture" tables of the Google Cloud TPU documentation pages named in
# `source` (checked 2026): v4 "275 teraflops (bf16), HBM2 32 GiB, 1200 GBps"; v5e "197 TFLOPs
# (bf16), 16 GB, 819 GBps"; v5p "459 TFLOPs (bf16), HBM2e 95 GB, 2765 GBps"; v6e "918 TFLOPs
# (bf16), 32 GB, 1638 GBps". Per chip; a v4 / v5p chip is one megacore device of two TensorCores.
CHIPS = {
    "v4": Chip("v4", 32 * GiB, 275e12, 1200e9, "cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("v5e", 16 * 10**9, 197e12, 819e9, "cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", 95 * 10**9, 459e12, 2765e9, "cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", 32 * 10**9, 918e12, 1638e9, "cloud.google.com/tpu/docs/v6e"),
}
# chips -> libtpu topology. v5e / v6e slices are 2-D and named by chips; v4 / v5p slices are 3-D
# and named by TensorCores (2 per chip): v5p-8 is 4 chips, 2x2x1.
_GRID_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
            256: "16x16"}
_GRID_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
            256: "4x8x8", 512: "8x8x8"}
_LIBTPU_PREFIX = {"v4": "v4", "v5e": "v5e", "v5p": "v5p", "v6e": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as users rent it: v6e-8, v5p-16, cpu-8
    num_devices: int
    chip: Chip | None  # None for fake CPU devices
    libtpu_name: str = ""  # e.g. v6e:2x4
    options: tuple[tuple[str, Any], ...] = ()  # get_topology_desc keyword arguments


def known_topologies() -> list[str]:
    names = [f"{g}-{n}" for g in ("v5e", "v6e") for n in _GRID_2D]
    names += [f"{g}-{2 * n}" for g in ("v4", "v5p") for n in _GRID_3D]
    return names + ["cpu-N"]


def parse_topology(name: str) -> Topology:
    """A slice name (v6e-8, v5p-8, v5e-4, v4-8, ...) or cpu-N; InputError lists the known ones."""
    match = re.fullmatch(r"(v4|v5e|v5p|v6e|cpu)-(\d+)", name.strip().lower())
    count = int(match.group(2)) if match else 0
    if match and match.group(1) == "cpu" and count >= 1:
        return Topology(name, count, None)
    if match and match.group(1) in ("v5e", "v6e") and count in _GRID_2D:
        generation = match.group(1)
        # One chip, and the single-host 8-chip machines (ct5lp/ct6e-standard-8t), have their
        # own host bounds; larger slices are hosts of 2x2 chips.
        bounds = {1: (1, 1, 1), 8: (2, 4, 1)}.get(count)
        options = (("chips_per_host_bounds", bounds),) if bounds else ()
        return Topology(name, count, CHIPS[generation],
                        f"{_LIBTPU_PREFIX[generation]}:{_GRID_2D[count]}", options)
    if match and match.group(1) in ("v4", "v5p") and count % 2 == 0 and count // 2 in _GRID_3D:
        generation, chips = match.group(1), count // 2
        return Topology(name, chips, CHIPS[generation],
                        f"{_LIBTPU_PREFIX[generation]}:{_GRID_3D[chips]}",
                        (("chip_config_name", "megacore"),))
    raise InputError(f"unknown topology {name!r}; known: {', '.join(known_topologies())}")


def _quiet_libtpu(topology: Topology) -> None:
    """Compile-only use on a machine without a TPU: libtpu otherwise warns that it cannot find
    the accelerator type and worker hostnames (harmless), and refuses a second process."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if not glob.glob("/dev/accel*") and not os.path.exists("/dev/vfio"):
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", topology.name)
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")


def topology_devices(topology: Topology) -> list:
    if topology.chip is None:
        devices = jax.devices("cpu")
        if len(devices) < topology.num_devices:
            raise InputError(
                f"{topology.name} needs {topology.num_devices} CPU devices, this process has "
                f"{len(devices)}: set XLA_FLAGS=--xla_force_host_platform_device_count="
                f"{topology.num_devices} before jax is imported (the eureka-jax plan command "
                "does this itself)")
        return devices[: topology.num_devices]
    _quiet_libtpu(topology)
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(
            platform="tpu", topology_name=topology.libtpu_name, **dict(topology.options)).devices)
    except Exception as error:  # libtpu missing, or a topology it rejects
        raise InputError(
            f"cannot create compile-only {topology.name} devices ({topology.libtpu_name}): "
            f"{str(error).splitlines()[0]}. Install libtpu with pip install -e '.[plan]' "
            "(make install does)") from error


_SIZE = re.compile(r"([\d.]+)\s*([KMGT]?)i?B?")


def _bytes_of(text: str) -> int:
    number, unit = _SIZE.fullmatch(text.strip()).groups()
    return int(float(number) * 1024 ** " KMGT".index(unit or " "))


def _oom_numbers(message: str) -> tuple[int | None, int | None]:
    """(required, available) bytes from a TPU compiler RESOURCE_EXHAUSTED message."""
    for pattern in (r"\(([\d.]+[KMGT]?)\) exceeds available HBM \(([\d.]+[KMGT]?)\)",
                    r"Used ([\d.]+[KMGT]?) of ([\d.]+[KMGT]?) hbm"):
        found = re.search(pattern, message)
        if found:
            return _bytes_of(found.group(1)), _bytes_of(found.group(2))
    return None, None


def compiler_hbm_bytes(device) -> int | None:
    """The HBM the TPU compiler lets a program use on `device`, read from the out-of-memory error
    of a program that needs 1 TiB (a compile of well under a second)."""
    mesh = jax.sharding.Mesh(np.asarray([device]), ("x",))
    size = 1 << 20
    x = jax.ShapeDtypeStruct((size,), jnp.int8, sharding=NamedSharding(mesh, PartitionSpec()))
    try:
        jax.jit(lambda v: jnp.broadcast_to(v, (size, size)) + 1).lower(x).compile()
    except Exception as error:  # the expected out-of-memory
        return _oom_numbers(str(error))[1]
    return None


def _cpu_chip(num_devices: int) -> Chip:
    """Fake CPU devices share this host: its memory, and a matmul rate and copy bandwidth
    measured here (there is no published figure), divided among the devices."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    device = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((512, 512), jnp.float32), device)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    started = time.perf_counter()
    for _ in range(4):
        matmul(a).block_until_ready()
    flops = 4 * 2 * 512**3 / (time.perf_counter() - started)
    b = jax.device_put(jnp.ones((8 << 20,), jnp.float32), device)
    copy = jax.jit(lambda x: x + 1)
    copy(b).block_until_ready()
    started = time.perf_counter()
    for _ in range(4):
        copy(b).block_until_ready()
    bandwidth = 4 * 2 * b.nbytes / (time.perf_counter() - started)
    return Chip("cpu", memory // num_devices, flops / num_devices, bandwidth / num_devices,
                "this host: physical memory, a measured 512^3 matmul and array copy")


# ---------------------------------------------------------------------------------------------
# Analytic FLOPs (what the code computes: attention over the full T x S products it masks)
# ---------------------------------------------------------------------------------------------


def vision_flops(config, rows: int, patches: int) -> float:
    """Forward FLOPs of the family's vision encoder over `rows` prompts of `patches` patches
    (Qwen2.5-VL) or tiles (InternVL)."""
    if not patches:
        return 0.0
    return families.for_config(config).vision_flops(config, rows, patches)


def _text_layer_matmul_params(config) -> int:
    t = config.text
    d, h = t.hidden_size, t.head_dim
    return (2 * d * t.num_attention_heads * h + 2 * d * t.num_key_value_heads * h
            + 3 * d * t.intermediate_size)


def decoder_flops(config, rows: int, queries: int, keys: int) -> float:
    t = config.text
    per_layer = (2 * queries * _text_layer_matmul_params(config)
                 + 4 * queries * keys * t.num_attention_heads * t.head_dim)
    return rows * t.num_hidden_layers * per_layer


def logits_flops(config, rows: int, positions: int) -> float:
    return 2 * rows * positions * config.text.hidden_size * config.text.vocab_size


# ---------------------------------------------------------------------------------------------
# Abstract inputs
# ---------------------------------------------------------------------------------------------


def _with_shardings(tree, shardings):
    return jax.tree.map(lambda a, s: _abstract(a.shape, a.dtype, s), tree, shardings)


def _abstract(shape, dtype, sharding_):
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding_)


def abstract_prompts(rows: int, length: int, patches: int, config, sharding_) -> PromptBatch:
    """A PromptBatch of ShapeDtypeStructs as the family's `collate_prompts` would fill it
    (`patches`: the vision bucket, patches or tiles per prompt)."""
    vision = None
    if patches:
        vision = families.for_config(config).abstract_vision(rows, patches, config, sharding_)
    return PromptBatch(
        input_ids_BxT=_abstract((rows, length), np.int32, sharding_),
        attention_mask_BxT=_abstract((rows, length), np.bool_, sharding_),
        positions_3xBxT=_abstract((3, rows, length), np.int32, sharding_),
        next_position_B=_abstract((rows,), np.int32, sharding_),
        prompt_key_B=_abstract((rows,), np.uint32, sharding_),
        token_source_BxT=_abstract((rows, length), np.int32, sharding_),
        vision=vision)


def abstract_train_batch(prompts: int, group: int, length: int, patches: int,
                         response_length: int, config,
                         sharding_) -> TrainBatch:
    """A TrainBatch of ShapeDtypeStructs as `rollout.collate_groups` would fill it."""
    b = prompts * group
    return TrainBatch(
        prompts=abstract_prompts(prompts, length, patches, config, sharding_),
        prompt_index_B=_abstract((b,), np.int32, sharding_),
        response_tokens_BxL=_abstract((b, response_length), np.int32, sharding_),
        response_mask_BxL=_abstract((b, response_length), np.bool_, sharding_),
        old_logp_BxL=_abstract((b, response_length), np.float32, sharding_),
        advantages_B=_abstract((b,), np.float32, sharding_))


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of (abstract) arrays with shardings."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
    return total


# ---------------------------------------------------------------------------------------------
# Compiling one program
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Program:
    name: str
    description: str
    runs_per_step: int
    flops: float  # analytic model FLOPs of one run, all devices together
    min_bytes_per_device: float = 0.0  # bytes one run must move through HBM per device (>=)
    resident_besides: int = 0  # bytes resident during the run that are not its arguments
    compile_s: float = 0.0  # tracing + lowering + XLA compilation: the wait before a first run
    lower_s: float = 0.0  # the tracing + lowering part of compile_s (JAX, not XLA)
    fits: bool = True
    memory: dict[str, int] = dataclasses.field(default_factory=dict)
    peak_bytes_per_device: int | None = None
    xla_flops_per_device: float | None = None
    error: str = ""


def _compile(program: Program, lower: Callable[[], Any], log) -> Program:
    log(f"compiling {program.name}: {program.description} ...")
    started = time.perf_counter()
    lowered = lower()
    program.lower_s = time.perf_counter() - started
    try:
        compiled = lowered.compile()
    except Exception as error:  # an out-of-memory is the compiler's verdict, not a crash
        message = str(error)
        if "RESOURCE_EXHAUSTED" not in message:
            raise
        program.compile_s = time.perf_counter() - started
        program.fits = False
        program.error = next((line.strip() for line in message.splitlines()
                              if "RESOURCE_EXHAUSTED" in line), message.splitlines()[0])
        program.peak_bytes_per_device = _oom_numbers(message)[0]
        log(f"  {program.name}: does not fit ({program.error}) after {program.compile_s:.1f} s")
        return program
    program.compile_s = time.perf_counter() - started
    stats = compiled.memory_analysis()
    if stats is not None:
        program.memory = {key: int(getattr(stats, f"{key}_size_in_bytes")) for key in
                          ("argument", "output", "alias", "temp", "generated_code")}
        m = program.memory
        total = m["argument"] + m["output"] - m["alias"] + m["temp"]
        program.peak_bytes_per_device = max(total, int(getattr(stats, "peak_memory_in_bytes", 0)))
        program.min_bytes_per_device = max(program.min_bytes_per_device,
                                           m["argument"] + m["output"] - m["alias"])
    costs = compiled.cost_analysis()
    if isinstance(costs, list):
        costs = costs[0] if costs else None
    if costs and "flops" in costs:
        program.xla_flops_per_device = float(costs["flops"])
    log(f"  {program.name}: compiled in {program.compile_s:.1f} s (tracing and lowering "
        f"{program.lower_s:.1f} s), peak "
        f"{_size(program.peak_bytes_per_device)} per device")
    return program


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    config_name: str
    topology: Topology
    chip: Chip
    hbm_bytes: int
    hbm_source: str
    mesh_shape: dict[str, int]
    model: dict[str, Any]
    programs: list[Program]
    resident: dict[str, int]
    kv_cache_bytes: int
    step_peak_bytes: int | None
    step_peak_program: str
    fits: bool
    projected_step_s: float | None
    compute_s: float
    memory_s: float
    step_flops: float
    mfu: float | None
    advice: list[str]
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "topology": self.topology.name,
            "num_devices": self.topology.num_devices,
            "mesh": self.mesh_shape,
            "hbm_bytes_per_device": self.hbm_bytes,
            "programs": [{
                "name": p.name, "peak_bytes_per_device": p.peak_bytes_per_device,
                "flops": p.flops, "compile_s": round(p.compile_s, 2),
                "lower_s": round(p.lower_s, 2), "fits": p.fits,
                "runs_per_step": p.runs_per_step, "memory": p.memory,
                "xla_flops_per_device": p.xla_flops_per_device,
                **({"error": p.error} if p.error else {}),
            } for p in self.programs],
            "resident_bytes_per_device": self.resident,
            "kv_cache_bytes_per_device": self.kv_cache_bytes,
            "peak_bytes_per_device": self.step_peak_bytes,
            "peak_program": self.step_peak_program,
            "fits": self.fits,
            "projected_step_s": self.projected_step_s,
            "step_flops": self.step_flops,
            "mfu": self.mfu,
        }


def model_config_for(config: ml_collections.ConfigDict):
    """The model config of `config.model.path`: a local HF directory's config.json, else a named
    preset (presets.HF_CONFIGS); a plan never downloads anything."""
    runtime = dict(param_dtype=config.model.param_dtype, compute_dtype=config.model.compute_dtype,
                   remat=config.model.remat, freeze_vision=config.optim.freeze_vision)
    path = str(config.model.path)
    if not path:
        raise InputError("config.model.path is empty: set --config.model.path to a Hugging Face "
                         f"directory or one of {', '.join(presets.HF_CONFIGS)}")
    if Path(path).is_dir():
        return families.for_model_dir(path).read_config(Path(path), **runtime)
    return presets.preset_config(path, **runtime)


def _kv_cache_bytes(model_config, prompts: int, group: int, prompt_length: int,
                    buffer_length: int, context: sharding.ShardingContext) -> int:
    """Per-device bytes of the sampler's KV cache (prompt K/V once per prompt, generated K/V per
    sample), sharded as the cache's logical axes say."""
    from eureka_jax.models.decoder import CACHE_K_AXES

    t = model_config.text
    itemsize = jnp.dtype(DTYPES[model_config.compute_dtype]).itemsize
    total = 0
    for rows, length in ((prompts, prompt_length), (prompts * group, buffer_length)):
        shape = (t.num_hidden_layers, rows, t.num_key_value_heads, t.head_dim, length)
        sharded = NamedSharding(context.mesh, sharding.logical_to_spec(CACHE_K_AXES, shape,
                                                                       context))
        total += 2 * math.prod(sharded.shard_shape(shape)) * itemsize
    return total


def plan_training(config: ml_collections.ConfigDict, topology_name: str, *,
                  config_name: str = "config", hbm_bytes: int | None = None,
                  only: Sequence[str] = (), log: Callable[[str], None] = lambda _: None) -> Plan:
    """Compile one training step's programs for `topology_name` and judge the fit (see the module
    docstring). `hbm_bytes` overrides the per-device memory the verdict is judged against;
    `only` names a subset of PROGRAMS to compile (the verdict then covers those alone)."""
    from eureka_jax import train  # the loop module imports most of the package

    topology = parse_topology(topology_name)
    unknown = sorted(set(only) - set(PROGRAMS))
    if unknown:
        raise InputError(f"unknown program(s) {', '.join(unknown)}; known: {', '.join(PROGRAMS)}")
    wanted = set(only or PROGRAMS)
    from eureka_jax.configs_common import validate_config

    checked = config.to_dict()
    checked["data"]["train"] = checked["data"]["train"] or "(not read by plan)"
    validate_config(checked)
    rl = RLConfig.from_dict(config.rl)
    loop = train.LoopConfig(**config.train)
    group = rl.num_generations
    model_config = model_config_for(config)
    devices = topology_devices(topology)

    chip = topology.chip or _cpu_chip(topology.num_devices)
    hbm_source = "documented"
    if hbm_bytes is not None:
        hbm_source = "--hbm-gib override"
    elif topology.chip is not None:
        hbm_bytes = compiler_hbm_bytes(devices[0])
        hbm_source = "reported by the TPU compiler"
    if hbm_bytes is None:
        hbm_bytes = chip.hbm_bytes
        hbm_source = "documented" if topology.chip is not None else "host memory / devices"

    try:
        mesh = sharding.make_mesh(tuple(config.mesh.shape), devices)
    except ValueError as error:
        raise InputError(f"mesh.shape {tuple(config.mesh.shape)} on {topology.name}: {error}"
                         ) from error
    mesh_devices = mesh.devices.size
    notes = []
    if only:
        notes.append(f"only {', '.join(only)} compiled: the verdict covers those programs")
    if mesh_devices < len(devices):
        notes.append(f"mesh.shape {tuple(config.mesh.shape)} uses {mesh_devices} of the "
                     f"{len(devices)} devices (set -1 on one axis to use them all)")

    lengths, patch_buckets = tuple(config.data.length_buckets), tuple(config.data.patch_buckets)
    prompt_length, patches = max(lengths), max(patch_buckets)
    sampling = SamplingConfig(
        num_samples=group, max_new_tokens=config.sampling.max_new_tokens,
        temperature=config.sampling.temperature, top_k=config.sampling.top_k,
        top_p=config.sampling.top_p, stop_token_ids=_stop_ids(model_config),
        cache_phases=config.sampling.cache_phases)
    response = sampling.max_new_tokens
    # The sampler and the rollout's teacher-forced forward run on train.rollout_chunk prompts
    # at a time (all of the rollout when 0).
    chunk_prompts = loop.rollout_chunk or loop.prompts_per_rollout
    chunks_per_rollout = loop.prompts_per_rollout // chunk_prompts
    micro_prompts = loop.micro_batch_size // group

    with sharding.activate(mesh) as context:
        model_class = families.for_config(model_config).model_class
        abstract_model = nnx.eval_shape(lambda: model_class(model_config, nnx.Rngs(0)))
        graphdef, abstract_state = nnx.split(abstract_model)
        shardings = sharding.state_shardings(abstract_state, context)
        params = jax.tree.map(lambda a, s: _abstract(a.shape, a.dtype, s), abstract_state,
                              shardings)
        replicated = NamedSharding(mesh, PartitionSpec())

        accumulation = loop.minibatch_size // loop.micro_batch_size
        updates_per_step = rl.ppo_epochs * (loop.groups_per_step * group // loop.minibatch_size)
        tx, _ = train.make_optimizer(config.optim, loop.num_steps * updates_per_step)
        trainable, _ = train.split_trainable(params, model_config.freeze_vision)
        opt_shardings = train.optimizer_shardings(tx, trainable)
        opt_state = jax.tree.map(lambda a, s: _abstract(a.shape, a.dtype, s),
                                 jax.eval_shape(tx.init, trainable), opt_shardings)

        param_bytes = bytes_per_device(params)
        opt_bytes = bytes_per_device(opt_state)
        kl_in_loss = rl.kl_coef > 0 and rl.kl_placement == "loss"
        ref_bytes = param_bytes if rl.kl_coef > 0 else 0
        resident = {"params": param_bytes, "optimizer_state": opt_bytes, "reference": ref_bytes,
                    **_optimizer_breakdown(opt_state)}

        rollouts = -(-loop.groups_per_step // loop.prompts_per_rollout)
        micro_steps = rl.ppo_epochs * loop.groups_per_step * group // loop.micro_batch_size
        samples_from_policy = (sampling.temperature == 1.0 and sampling.top_k == 0
                               and sampling.top_p == 1.0)
        forward_runs = rollouts * chunks_per_rollout * (
            int(config.train_extras.measure_logprob_mismatch or not samples_from_policy)
            + int(rl.kl_coef > 0 and rl.kl_placement == "reward"))
        full_length = prompt_length + response
        vision_train = 1 if model_config.freeze_vision else 3
        decoder_train = 4 if model_config.remat == "full" else 3
        programs: list[Program] = []

        # optimizer init (once, at start-up)
        def add(program: Program, lower) -> None:
            if program.name in wanted:
                programs.append(_compile(program, lower, log))

        add(Program("optimizer_init", "tx.init on the sharded parameters", 0, 0.0),
            lambda: jax.jit(tx.init, out_shardings=opt_shardings).lower(trainable))

        # update step at micro_batch_size sequences
        micro = abstract_train_batch(micro_prompts, group, prompt_length, patches, response,
                                     model_config, replicated)
        # Batches are placed as train.py places them: rows over data x fsdp.
        micro = _with_shardings(micro, batch_shardings(micro, mesh))
        micro_forward = (vision_flops(model_config, micro_prompts, patches),
                         decoder_flops(model_config, loop.micro_batch_size, full_length,
                                       full_length),
                         logits_flops(model_config, loop.micro_batch_size, response))
        update_flops = (vision_train * micro_forward[0] + decoder_train * micro_forward[1]
                        + 3 * micro_forward[2])
        if kl_in_loss:
            update_flops += sum(micro_forward)
        # One program per optimizer update: a scan over `accumulation` micro-batches.
        update = Program(
            "update", f"{accumulation} x {loop.micro_batch_size} sequences x ({prompt_length} + "
            f"{response}) tokens, {patches} patches (tiles) per prompt",
            micro_steps // accumulation, accumulation * update_flops,
            resident_besides=0 if kl_in_loss else ref_bytes)
        update_fn = train.update_function(graphdef, tx, rl, model_config.freeze_vision)
        ref_arg = params if kl_in_loss else None
        stacked = jax.tree.map(
            lambda a: _abstract((accumulation, *a.shape), a.dtype, replicated), micro)
        stacked = _with_shardings(stacked, batch_shardings(stacked, mesh, micro_axis=True))
        add(update, lambda: jax.jit(
            update_fn, donate_argnums=(0, 1), out_shardings=(shardings, opt_shardings, None)
        ).lower(params, opt_state, ref_arg, stacked,
                _abstract((accumulation,), np.float32, replicated)))

        # teacher-forced log-probs of a rollout chunk (old / mismatch / reference)
        if forward_runs:
            rollout_batch = abstract_train_batch(chunk_prompts, group, prompt_length,
                                                 patches, response, model_config, replicated)
            rollout_batch = _with_shardings(rollout_batch, batch_shardings(rollout_batch, mesh))
            forward = Program(
                "logprob_forward", f"{chunk_prompts} prompts x {group} samples x "
                f"({prompt_length} + {response}) tokens, {loop.micro_batch_size} sequences per "
                "pass", forward_runs,
                vision_flops(model_config, chunk_prompts, patches)
                + decoder_flops(model_config, chunk_prompts * group, full_length,
                                full_length)
                + logits_flops(model_config, chunk_prompts * group, response),
                resident_besides=opt_bytes + ref_bytes)
            forward_fn = make_forward_logprobs(graphdef, loop.micro_batch_size)
            add(forward, lambda: forward_fn.lower(params, rollout_batch))
        else:
            notes.append("no teacher-forced rollout forward: sampling from the policy with "
                         "train_extras.measure_logprob_mismatch=False and no KL in the reward")

        # the sampler: vision + prefill, then one while_loop per decoding phase
        ends = sampling.phase_ends()
        n = chunk_prompts * group
        sampler_flops = (vision_flops(model_config, chunk_prompts, patches)
                         + decoder_flops(model_config, chunk_prompts, prompt_length,
                                         prompt_length)
                         + logits_flops(model_config, chunk_prompts, 1))
        decode_bytes = 0.0
        start = 1
        for end in ends:
            steps = end - start
            sampler_flops += steps * (decoder_flops(model_config, n, 1, prompt_length + end)
                                      + logits_flops(model_config, n, 1))
            decode_bytes += steps * (param_bytes + _kv_cache_bytes(
                model_config, chunk_prompts, group, prompt_length, end, context))
            start = end
        kv_bytes = _kv_cache_bytes(model_config, chunk_prompts, group, prompt_length,
                                   ends[-1], context)
        sampler = Program(
            "sampler", f"{chunk_prompts} prompts x {group} samples, {prompt_length}-token "
            f"prompts, {patches} patches (tiles), {response} new tokens in {len(ends)} phase(s) "
            f"(buffers {', '.join(map(str, ends))})", rollouts * chunks_per_rollout, sampler_flops,
            min_bytes_per_device=decode_bytes, resident_besides=opt_bytes + ref_bytes)
        prompt_batch = abstract_prompts(chunk_prompts, prompt_length, patches,
                                        model_config, replicated)
        prompt_batch = _with_shardings(prompt_batch, batch_shardings(prompt_batch, mesh))
        add(sampler, lambda: Sampler(graphdef, sampling).lower(params, prompt_batch))

    # -- the step ---------------------------------------------------------------------------
    for p in programs:  # a program fits when it fits beside the state resident during it
        if p.peak_bytes_per_device is not None:
            p.fits = p.fits and p.peak_bytes_per_device + p.resident_besides <= hbm_bytes
    running = [p for p in programs if p.runs_per_step or p.name == "optimizer_init"]
    peaks = [((p.peak_bytes_per_device or 0) + p.resident_besides, p.name) for p in running
             if p.peak_bytes_per_device is not None]
    step_peak, peak_program = max(peaks) if peaks else (None, "")
    fits = all(p.fits for p in programs) and step_peak is not None and step_peak <= hbm_bytes

    compute_s = memory_s = 0.0
    step_flops = 0.0
    for p in programs:
        if not p.runs_per_step:
            continue
        step_flops += p.runs_per_step * p.flops
        p_compute = p.flops / mesh_devices / chip.peak_flops
        p_memory = p.min_bytes_per_device / chip.hbm_bandwidth
        compute_s += p.runs_per_step * p_compute
        memory_s += p.runs_per_step * max(p_memory - p_compute, 0.0)
    projected = compute_s + memory_s
    mfu = step_flops / (projected * mesh_devices * chip.peak_flops) if projected else None
    notes.append(f"step = {rollouts} rollout(s) of {loop.prompts_per_rollout} prompts in "
                 f"chunks of {chunk_prompts} (the online "
                 f"filter keeping every group), {micro_steps} update micro-steps of "
                 f"{loop.micro_batch_size} sequences, every response {response} tokens long")
    plan = Plan(
        config_name=config_name, topology=topology, chip=chip, hbm_bytes=int(hbm_bytes),
        hbm_source=hbm_source, mesh_shape=dict(mesh.shape), model=_model_summary(
            model_config, abstract_state), programs=programs, resident=resident,
        kv_cache_bytes=kv_bytes, step_peak_bytes=step_peak, step_peak_program=peak_program,
        fits=fits, projected_step_s=projected if chip.peak_flops else None,
        compute_s=compute_s, memory_s=memory_s, step_flops=step_flops, mfu=mfu, advice=[],
        notes=notes)
    plan.advice = _advice(plan, config, loop)
    return plan


def _stop_ids(model_config) -> tuple[int, ...]:
    eos = model_config.eos_token_id
    if eos is None:
        return (0,)
    return tuple(eos) if isinstance(eos, tuple) else (int(eos),)


def _optimizer_breakdown(opt_state) -> dict[str, int]:
    """Per-device bytes of Adam's moments within the optimizer state."""
    out = {"moments": 0}
    for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state):
        key = jax.tree_util.keystr(path)
        if ".mu" in key or ".nu" in key:
            out["moments"] += bytes_per_device([leaf])
    return out


def _model_summary(model_config, abstract_state) -> dict[str, Any]:
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state))
    from eureka_jax.train import VISION_TOWERS

    vision = sum(math.prod(x.shape) for name in VISION_TOWERS if name in abstract_state
                 for x in jax.tree.leaves(abstract_state[name]))
    return {"parameters": count, "vision_parameters": vision,
            "param_dtype": model_config.param_dtype, "compute_dtype": model_config.compute_dtype,
            "remat": model_config.remat, "freeze_vision": model_config.freeze_vision}


def _advice(plan: Plan, config, loop) -> list[str]:
    """What to change, from the largest contributors, when the step does not fit."""
    hbm = plan.hbm_bytes
    advice = []
    state = plan.resident["params"] + plan.resident["optimizer_state"] + plan.resident["reference"]
    by_name = {p.name: p for p in plan.programs}
    if plan.fits:
        if plan.step_peak_bytes and plan.step_peak_bytes > 0.9 * hbm:
            advice.append(f"fits with less than 10% headroom ({_size(plan.step_peak_bytes)} of "
                          f"{_size(hbm)}): fragmentation may still run out of memory")
        return advice
    if state > 0.5 * hbm:
        advice.append(
            f"parameters + optimizer state{' + reference' if plan.resident['reference'] else ''} "
            f"take {_size(state)} of {_size(hbm)} per device: shard over more chips "
            f"(a larger slice with mesh.shape=(1, -1, 1)), add tensor parallelism "
            f"(mesh.shape=(1, -1, T)), or keep fewer float32 copies")
    update = by_name.get("update")
    if update and _over(update, hbm):
        remat = "" if config.model.remat == "full" else ", model.remat=full"
        advice.append(f"update: lower train.micro_batch_size (now {loop.micro_batch_size}, "
                      f"a multiple of rl.num_generations){remat}, or shorter "
                      f"data.length_buckets / sampling.max_new_tokens")
    forward = by_name.get("logprob_forward")
    if forward and _over(forward, hbm):
        advice.append("logprob_forward runs train.micro_batch_size sequences per pass: a "
                      "smaller micro-batch, shorter buckets, or "
                      "train_extras.measure_logprob_mismatch=False when sampling from the policy")
    sampler = by_name.get("sampler")
    if sampler and _over(sampler, hbm):
        chunk = _rollout_chunk(plan, sampler, loop)
        advice.append(
            f"sampler: the KV cache of {loop.rollout_chunk or loop.prompts_per_rollout} prompts "
            f"x G alone is {_size(plan.kv_cache_bytes)} per device; set train.rollout_chunk"
            + (f" to about {chunk} (a divisor of train.prompts_per_rollout)" if chunk else "")
            + ", or lower sampling.max_new_tokens or the largest data.length_buckets")
    return advice


def _over(program: Program, hbm: int) -> bool:
    return not program.fits or (program.peak_bytes_per_device or 0) + program.resident_besides > hbm


def _rollout_chunk(plan: Plan, sampler: Program, loop) -> int | None:
    """Prompts per rollout that would leave 10% headroom, scaling the sampler's activation and
    cache memory linearly with the prompt count."""
    if sampler.peak_bytes_per_device is None:
        return None
    fixed = plan.resident["params"] + sampler.resident_besides
    per_prompt = max(sampler.peak_bytes_per_device - plan.resident["params"], 1) / (
        loop.rollout_chunk or loop.prompts_per_rollout)
    chunk = int((0.9 * plan.hbm_bytes - fixed) // per_prompt)
    return max(chunk, 0)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _size(value) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1."""
    if value is None:
        return "-"
    for unit, scale in (("G", GiB), ("M", 1 << 20), ("K", 1 << 10)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{int(value)}B"


def _rate(value: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} "


def format_plan(plan: Plan) -> str:
    chip, m = plan.chip, plan.model
    mesh = " ".join(f"{k}={v}" for k, v in plan.mesh_shape.items())
    lines = [
        f"plan: {plan.config_name} on {plan.topology.name} ({plan.topology.num_devices} devices"
        f"{', ' + plan.topology.libtpu_name if plan.topology.libtpu_name else ''}; mesh {mesh})",
        f"chip: {_size(plan.hbm_bytes)} HBM per device ({plan.hbm_source}), "
        f"{_rate(chip.peak_flops)}FLOP/s, {_rate(chip.hbm_bandwidth)}B/s "
        f"({chip.source})",
        f"model: {m['parameters'] / 1e9:.2f} B parameters ({m['vision_parameters'] / 1e9:.2f} B "
        f"vision{', frozen' if m['freeze_vision'] else ''}), {m['param_dtype']} parameters, "
        f"{m['compute_dtype']} compute, remat {m['remat']}",
        "",
        f"{'program':<16} {'runs':>5} {'compile s':>9} {'lower s':>7} {'args':>8} {'out':>8} "
        f"{'alias':>8} {'temp':>8} {'peak':>8} {'TFLOP/run':>10} {'XLA TF/dev':>10}  fits",
    ]
    for p in plan.programs:
        mem = p.memory
        xla = "-" if p.xla_flops_per_device is None else f"{p.xla_flops_per_device / 1e12:.3f}"
        sizes = " ".join(f"{_size(mem.get(key)):>8}" for key in
                         ("argument", "output", "alias", "temp"))
        lines.append(
            f"{p.name:<16} {p.runs_per_step:>5} {p.compile_s:>9.1f} {p.lower_s:>7.1f} {sizes} "
            f"{_size(p.peak_bytes_per_device):>8} {p.flops / 1e12:>10.3f} {xla:>10}  "
            f"{'yes' if p.fits else 'NO'}")
        lines.append(f"{'':<16} {p.description}")
        if p.error:
            lines.append(f"{'':<16} {p.error}")
    r = plan.resident
    lines += [
        "(bytes per device; peak = args + out - alias + temp, or the compiler's peak if larger; "
        "TFLOP/run analytic, all devices)",
        "",
        f"resident across the step, per device: parameters {_size(r['params'])}, optimizer "
        f"state {_size(r['optimizer_state'])} (moments {_size(r['moments'])}), "
        f"reference {_size(r['reference'])}; the rollout's KV cache {_size(plan.kv_cache_bytes)}"
        " (inside the sampler's temp)",
    ]
    if plan.step_peak_bytes is not None:
        lines.append(f"step peak: {_size(plan.step_peak_bytes)} of {_size(plan.hbm_bytes)} per "
                     f"device during {plan.step_peak_program} (its peak + resident state that is "
                     "not its argument)")
    lines.append("verdict: " + ("fits" if plan.fits else "DOES NOT FIT") +
                 f" on {plan.topology.name}")
    contributors = sorted(
        [(r["params"], "parameters"), (r["optimizer_state"], "optimizer state"),
         (r["reference"], "reference copy"), (plan.kv_cache_bytes, "rollout KV cache")]
        + [(p.memory.get("temp", p.peak_bytes_per_device or 0), f"{p.name} temporaries")
           for p in plan.programs], reverse=True)
    lines.append("largest contributors: " + ", ".join(
        f"{name} {_size(size)}" for size, name in contributors[:4] if size))
    for item in plan.advice:
        lines.append(f"  - {item}")
    if plan.projected_step_s is not None:
        mfu = "-" if plan.mfu is None else f"{100 * plan.mfu:.0f}%"
        lines.append(
            f"projected step time >= {plan.projected_step_s:.1f} s ({plan.compute_s:.1f} s at peak "
            f"FLOP/s + {plan.memory_s:.1f} s where HBM bandwidth binds; "
            f"{plan.step_flops / 1e15:.2f} PFLOP per step), MFU at that time {mfu}: a lower "
            "bound on time (upper bound on MFU), not a measurement")
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)


def stderr_log(message: str) -> None:
    print(f"[plan] {message}", file=sys.stderr, flush=True)
