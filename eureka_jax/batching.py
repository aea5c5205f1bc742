"""Prompts as rows, and rows padded into the static-shape batches the compiled programs take.

A `PromptRow` is one encoded prompt laid out for the model but not padded: its tokens, M-RoPE
positions, and its own images' patches in window order. Rows are independent, so groups kept by
the online filter in different rollouts can be batched together again for the update, and the
vision tower's attention cost grows with one prompt's patches, not the whole batch's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from eureka_jax.errors import InputError
from eureka_jax.grpo import token_entropy, token_logprobs
from eureka_jax.models.qwen2_5_vl import Qwen25VLConfig, VisionInputs
from eureka_jax.processing import (
    EncodedPrompt,
    gather_patches,
    image_token_sources,
    mrope_positions,
    next_bucket,
    vision_layout,
)
from eureka_jax.sampler import PromptBatch


@dataclasses.dataclass(frozen=True)
class PromptRow:
    """One prompt, unpadded (host NumPy)."""

    input_ids_T: np.ndarray  # int32
    positions_3xT: np.ndarray  # int32 M-RoPE positions
    next_position: int  # position of the first generated token
    token_source_T: np.ndarray  # int32 window-order merged row filling each image pad, else -1
    patches_PxC: np.ndarray  # float32, this prompt's patches in window order
    pos_hw_Px2: np.ndarray  # int32
    window_segment_P: np.ndarray  # int32
    image_segment_P: np.ndarray  # int32

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids_T)

    @property
    def num_patches(self) -> int:
        return len(self.patches_PxC)


def prompt_row(encoded: EncodedPrompt, config: Qwen25VLConfig, *, name: str = "prompt"):
    vision = config.vision
    grids = encoded.image_grid_thw
    layout = vision_layout(grids, encoded.num_patches, vision.window_size, vision.patch_size,
                           vision.spatial_merge_size, source=name)
    ids_1xT = encoded.input_ids[None].astype(np.int32)
    positions_3x1xT, deltas_1 = mrope_positions(
        ids_1xT, None, grids, config.image_token_id, vision.spatial_merge_size, source=name)
    token_source_1xT = image_token_sources(ids_1xT, config.image_token_id, layout, source=name)
    if encoded.patches:
        patches = gather_patches(encoded.patches, layout)
    else:
        patches = np.zeros((0, vision.patch_features), np.float32)
    return PromptRow(
        input_ids_T=ids_1xT[0],
        positions_3xT=positions_3x1xT[:, 0],
        next_position=int(ids_1xT.shape[1] + deltas_1[0]),
        token_source_T=token_source_1xT[0],
        patches_PxC=patches,
        pos_hw_Px2=layout.pos_hw_Px2,
        window_segment_P=layout.window_segment_P,
        image_segment_P=layout.image_segment_P,
    )


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Static shapes: prompt lengths and per-row patch budgets (0 = a text-only program)."""

    lengths: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)
    patches: tuple[int, ...] = (0, 64, 256, 1024, 2560, 4096, 10240)

    def length_for(self, rows: Sequence[PromptRow]) -> int:
        sizes = [r.num_tokens for r in rows]
        row = int(np.argmax(sizes))
        return next_bucket(sizes[row], self.lengths, what=f"batch row {row}: prompt length")

    def patches_for(self, rows: Sequence[PromptRow]) -> int:
        sizes = [r.num_patches for r in rows]
        row = int(np.argmax(sizes))
        return next_bucket(sizes[row], self.patches, what=f"batch row {row}: patches per prompt")


def _pad_left(rows: list[np.ndarray], length: int, fill) -> np.ndarray:
    out = np.full((len(rows), *rows[0].shape[:-1], length), fill, dtype=rows[0].dtype)
    for i, row in enumerate(rows):
        if row.shape[-1]:
            out[i, ..., length - row.shape[-1]:] = row
    return out


def _pad_right(rows: list[np.ndarray], length: int, fill) -> np.ndarray:
    out = np.full((len(rows), length, *rows[0].shape[1:]), fill, dtype=rows[0].dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def collate_prompts(rows: Sequence[PromptRow], buckets: Buckets, *, pad_token_id: int,
                    prompt_keys: Sequence[int] | None = None) -> PromptBatch:
    """Left-pad the rows to a length bucket and their patches to a patch bucket (NumPy)."""
    if not rows:
        raise InputError("cannot collate an empty batch of prompts")
    rows = list(rows)
    length, patch_budget = buckets.length_for(rows), buckets.patches_for(rows)
    ids = [r.input_ids_T for r in rows]
    mask = _pad_left([np.ones_like(i, dtype=bool) for i in ids], length, False)
    vision = None
    if patch_budget:
        vision = VisionInputs(
            patches_BxPxC=_pad_right([r.patches_PxC for r in rows], patch_budget, 0.0),
            pos_hw_BxPx2=_pad_right([r.pos_hw_Px2[: r.num_patches] for r in rows],
                                    patch_budget, 0),
            window_segment_BxP=_pad_right([r.window_segment_P[: r.num_patches] for r in rows],
                                          patch_budget, -1),
            image_segment_BxP=_pad_right([r.image_segment_P[: r.num_patches] for r in rows],
                                         patch_budget, -1),
        )
    keys = np.arange(len(rows)) if prompt_keys is None else np.asarray(prompt_keys)
    return PromptBatch(
        input_ids_BxT=_pad_left(ids, length, pad_token_id),
        attention_mask_BxT=mask,
        positions_3xBxT=np.moveaxis(_pad_left([r.positions_3xT for r in rows], length, 0), 1, 0),
        next_position_B=np.asarray([r.next_position for r in rows], np.int32),
        prompt_key_B=keys.astype(np.uint32),
        token_source_BxT=_pad_left([r.token_source_T for r in rows], length, -1),
        vision=vision,
    )


def prompt_rows(batch: PromptBatch, config: Qwen25VLConfig) -> list[PromptRow]:
    """The rows of a NumPy PromptBatch without their padding: the inverse of `collate_prompts`.

    A row's tokens are the positions its attention mask marks (either padding side), its patches
    the slots with an image segment. E.g. `prompt_rows(verify.port_inputs(hf_arrays, config))`
    turns Hugging Face processor arrays into rows that can be bucketed for the sampler.
    """
    rows = []
    for b in range(len(batch.input_ids_BxT)):
        valid_T = np.asarray(batch.attention_mask_BxT[b]).astype(bool)
        if batch.vision is None:
            patches = (np.zeros((0, config.vision.patch_features), np.float32),
                       np.zeros((0, 2), np.int32), np.zeros((0,), np.int32),
                       np.zeros((0,), np.int32))
        else:
            vision = batch.vision
            count = int((np.asarray(vision.image_segment_BxP[b]) >= 0).sum())
            patches = tuple(np.asarray(a[b, :count]) for a in (
                vision.patches_BxPxC, vision.pos_hw_BxPx2, vision.window_segment_BxP,
                vision.image_segment_BxP))
        rows.append(PromptRow(
            input_ids_T=np.asarray(batch.input_ids_BxT[b])[valid_T],
            positions_3xT=np.asarray(batch.positions_3xBxT[:, b])[:, valid_T],
            next_position=int(batch.next_position_B[b]),
            token_source_T=np.asarray(batch.token_source_BxT[b])[valid_T],
            patches_PxC=patches[0],
            pos_hw_Px2=patches[1],
            window_segment_P=patches[2],
            image_segment_P=patches[3],
        ))
    return rows


@struct.dataclass
class TrainBatch:
    """B responses to U unique prompts (each response row points at its prompt row)."""

    prompts: PromptBatch  # U rows
    prompt_index_B: jax.Array  # int32 row of `prompts` each response answers
    response_tokens_BxL: jax.Array  # int32
    response_mask_BxL: jax.Array  # bool: tokens that count (up to and including the stop token)
    old_logp_BxL: jax.Array  # float32 log-probs under the sampling policy
    advantages_B: jax.Array  # float32


def response_hidden(model, batch: TrainBatch) -> jax.Array:
    """Teacher-forced final hidden states [B, L, D] at the positions that predict the response
    tokens, in one causal pass over prompt + response.

    The vision tower runs once per unique prompt; its features are gathered per response.
    """
    prompts = batch.prompts
    index = batch.prompt_index_B
    features = None
    if prompts.vision is not None:
        features = model.encode_images(prompts.vision)[index]
    ids_BxT = prompts.input_ids_BxT[index]
    t = ids_BxT.shape[1]
    length = batch.response_tokens_BxL.shape[1]
    tokens = jnp.concatenate([ids_BxT, batch.response_tokens_BxL], axis=1)
    mask = jnp.concatenate([prompts.attention_mask_BxT[index], batch.response_mask_BxL], axis=1)
    response_positions_BxL = prompts.next_position_B[index][:, None] + jnp.arange(length)
    positions = jnp.concatenate(
        [prompts.positions_3xBxT[:, index],
         jnp.broadcast_to(response_positions_BxL, (3, *response_positions_BxL.shape))], axis=2)
    sources = jnp.concatenate(
        [prompts.token_source_BxT[index], jnp.full(batch.response_tokens_BxL.shape, -1)], axis=1)
    x = model.embed(tokens, features, sources)
    hidden, _ = model.decode(x, positions, mask.astype(bool))
    # Position t-1+i predicts response token i.
    return hidden[:, t - 1: t - 1 + length]


def response_logits(model, batch: TrainBatch) -> jax.Array:
    """Teacher-forced logits [B, L, V] (compute dtype) of the response tokens, all at once (for
    tests and tools; training goes through `response_logprobs`, which never builds them)."""
    return model.logits(response_hidden(model, batch))


def response_logprobs(model, batch: TrainBatch, *, with_entropy: bool = False):
    """Teacher-forced float32 log-probs (and entropies) of the response tokens, [B, L].

    The logits exist `model.config.logits_chunk` response positions at a time: the chunks are a
    lax.map whose body is rematerialised (jax.checkpoint), so the backward pass recomputes one
    chunk's logits at a time instead of keeping [B, L, V] of them."""
    hidden_BxLxD = response_hidden(model, batch)
    return chunked_logprobs(model.logits, hidden_BxLxD, batch.response_tokens_BxL,
                            model.config.logits_chunk, with_entropy)


def chunked_logprobs(head, hidden_BxLxD, targets_BxL, chunk: int, with_entropy: bool):
    """(log p(target), entropy or None) [B, L] float32 from hidden states, `chunk` positions of
    `head(hidden) -> logits` at a time (0, or chunk >= L: one piece, no loop)."""

    def piece(hidden_BxCxD, targets_BxC):
        logits_BxCxV = head(hidden_BxCxD)
        logp_BxC = token_logprobs(logits_BxCxV, targets_BxC)
        entropy_BxC = token_entropy(logits_BxCxV) if with_entropy else jnp.zeros_like(logp_BxC)
        return logp_BxC, entropy_BxC

    b, length, d = hidden_BxLxD.shape
    if chunk == 0 or chunk >= length:
        logp_BxL, entropy_BxL = piece(hidden_BxLxD, targets_BxL)
    else:
        pieces = -(-length // chunk)
        pad = pieces * chunk - length
        hidden_NxBxCxD = jnp.pad(hidden_BxLxD, ((0, 0), (0, pad), (0, 0))).reshape(
            b, pieces, chunk, d).swapaxes(0, 1)
        targets_NxBxC = jnp.pad(targets_BxL, ((0, 0), (0, pad))).reshape(
            b, pieces, chunk).swapaxes(0, 1)
        logp_NxBxC, entropy_NxBxC = jax.lax.map(
            lambda xs: jax.checkpoint(piece)(*xs), (hidden_NxBxCxD, targets_NxBxC))
        logp_BxL = logp_NxBxC.swapaxes(0, 1).reshape(b, -1)[:, :length]
        entropy_BxL = entropy_NxBxC.swapaxes(0, 1).reshape(b, -1)[:, :length]
    return logp_BxL, entropy_BxL if with_entropy else None


def to_device(tree, sharding=None):
    """NumPy pytree -> device arrays (optionally with one sharding for every leaf)."""
    if sharding is None:
        return jax.tree.map(jnp.asarray, tree)
    return jax.device_put(tree, sharding)
