"""The batch types every stage passes on, and their shapes.

`PromptBatch` is what the sampler and the teacher-forced forward take for P prompts (a model
family's `collate_prompts` builds it from prompt rows, see eureka_jax/families); `TrainBatch` adds
B responses to them for the update. `Buckets` fixes the static shapes (one compiled program per
bucket).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from eureka_jax import sharding
from eureka_jax.processing import next_bucket


@struct.dataclass
class PromptBatch:
    """Device-ready prompts, left-padded to a length bucket (a family's collate_prompts)."""

    input_ids_BxT: jax.Array  # int32
    attention_mask_BxT: jax.Array  # bool, False on left padding
    positions_3xBxT: jax.Array  # int32 M-RoPE positions (1-D rotary: three equal rows)
    next_position_B: jax.Array  # int32: position of the first generated token (max + 1)
    prompt_key_B: jax.Array  # uint32: per-prompt seed component (reproducibility)
    token_source_BxT: jax.Array  # int32: merged vision token filling each image slot, else -1
    vision: Any = None  # the family's vision inputs (a pytree of arrays), None for text only


@struct.dataclass
class TrainBatch:
    """B responses to U unique prompts (each response row points at its prompt row)."""

    prompts: PromptBatch  # U rows
    prompt_index_B: jax.Array  # int32 row of `prompts` each response answers
    response_tokens_BxL: jax.Array  # int32
    response_mask_BxL: jax.Array  # bool: tokens that count (up to and including the stop token)
    old_logp_BxL: jax.Array  # float32 log-probs under the sampling policy
    advantages_B: jax.Array  # float32


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Static shapes: prompt lengths and per-row vision budgets (Qwen2.5-VL patches, InternVL
    tiles; 0 = a text-only program). Rows are any family's prompt rows (`num_tokens`,
    `num_patches`)."""

    lengths: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)
    patches: tuple[int, ...] = (0, 64, 256, 1024, 2560, 4096, 10240)

    def length_for(self, rows: Sequence[Any]) -> int:
        sizes = [r.num_tokens for r in rows]
        row = int(np.argmax(sizes))
        return next_bucket(sizes[row], self.lengths, what=f"batch row {row}: prompt length")

    def patches_for(self, rows: Sequence[Any]) -> int:
        sizes = [r.num_patches for r in rows]
        row = int(np.argmax(sizes))
        return next_bucket(sizes[row], self.patches,
                           what=f"batch row {row}: patches (tiles for InternVL) per prompt")


def batch_shardings(batch, mesh: jax.sharding.Mesh, *, micro_axis: bool = False):
    """NamedShardings that split every leaf of a PromptBatch or TrainBatch (concrete or abstract)
    over its row axis by the "batch" rule (data x fsdp): axis 0, or 1 for positions [3, B, T],
    one further with `micro_axis` (a leading micro-batch axis M). A row axis that does not divide
    is replicated. Placing a host batch with these puts on each device only its rows (on
    several processes each process transfers only its devices' rows)."""
    context = sharding.ShardingContext(mesh)

    def one(path, leaf):
        axes = [None] * len(leaf.shape)
        axes[int(jax.tree_util.keystr(path).endswith("positions_3xBxT")) + micro_axis] = "batch"
        return jax.sharding.NamedSharding(
            mesh, sharding.logical_to_spec(axes, leaf.shape, context))

    return jax.tree_util.tree_map_with_path(one, batch)


def pad_left(rows: list[np.ndarray], length: int, fill) -> np.ndarray:
    out = np.full((len(rows), *rows[0].shape[:-1], length), fill, dtype=rows[0].dtype)
    for i, row in enumerate(rows):
        if row.shape[-1]:
            out[i, ..., length - row.shape[-1]:] = row
    return out


def pad_right(rows: list[np.ndarray], length: int, fill) -> np.ndarray:
    out = np.full((len(rows), length, *rows[0].shape[1:]), fill, dtype=rows[0].dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def collate_responses(prompts: PromptBatch, responses: Sequence[np.ndarray], group: int, *,
                      length: int, old_logp: Sequence[np.ndarray] | None = None,
                      advantages: np.ndarray | None = None) -> TrainBatch:
    """A TrainBatch (NumPy) of `group` responses per prompt of `prompts`, prompt-major: the
    token ids of each (unpadded) response padded to `length`; `old_logp` (same shapes as the
    responses) and `advantages` [B] default to zeros (supervised training has neither)."""
    b = len(responses)
    if b != group * len(prompts.input_ids_BxT):
        raise ValueError(f"{b} responses for {len(prompts.input_ids_BxT)} prompts x {group}")
    tokens = np.zeros((b, length), np.int32)
    logp = np.zeros((b, length), np.float32)
    lengths = np.asarray([len(r) for r in responses])
    for i, response in enumerate(responses):
        tokens[i, :len(response)] = response
        if old_logp is not None:
            logp[i, :len(response)] = old_logp[i][:len(response)]
    return TrainBatch(
        prompts=prompts,
        prompt_index_B=np.repeat(np.arange(b // group, dtype=np.int32), group),
        response_tokens_BxL=tokens,
        response_mask_BxL=np.arange(length)[None, :] < lengths[:, None],
        old_logp_BxL=logp,
        advantages_B=(np.zeros(b, np.float32) if advantages is None
                      else np.asarray(advantages, np.float32)),
    )


def cut_by_prompt(batch: TrainBatch, pieces: int, xp=jnp) -> TrainBatch:
    """A TrainBatch whose rows are grouped by prompt (as `rollout_train_batch` and
    `collate_groups` lay them out) -> `pieces` equal pieces, every leaf with a leading piece
    axis; each piece holds its prompts and their responses, with prompt indices local to the
    piece. `xp`: jnp inside a jitted function, np for host arrays."""
    prompts_count = batch.prompts.input_ids_BxT.shape[0]
    if prompts_count % pieces:
        raise ValueError(f"{prompts_count} prompts do not split into {pieces} equal pieces")

    def cut(x):  # [pieces * n, ...] -> [pieces, n, ...]
        return x.reshape(pieces, x.shape[0] // pieces, *x.shape[1:])

    prompts = jax.tree.map(cut, batch.prompts.replace(
        positions_3xBxT=xp.moveaxis(batch.prompts.positions_3xBxT, 0, 1)))
    prompts = prompts.replace(positions_3xBxT=xp.moveaxis(prompts.positions_3xBxT, 2, 1))
    return TrainBatch(
        prompts=prompts,
        prompt_index_B=cut(batch.prompt_index_B) % (prompts_count // pieces),
        response_tokens_BxL=cut(batch.response_tokens_BxL),
        response_mask_BxL=cut(batch.response_mask_BxL),
        old_logp_BxL=cut(batch.old_logp_BxL),
        advantages_B=cut(batch.advantages_B),
    )


def to_device(tree, sharding=None):
    """NumPy pytree -> device arrays (optionally with one sharding for every leaf)."""
    if sharding is None:
        return jax.tree.map(jnp.asarray, tree)
    return jax.device_put(tree, sharding)
