"""Qwen2.5-VL prompt rows: an encoded prompt laid out for the model but not padded (its tokens,
M-RoPE positions, and its own images' patches in window order), and rows padded into a
PromptBatch.

Rows are independent, so groups kept by the online filter in different rollouts can be batched
together again for the update, and the vision tower's attention cost grows with one prompt's
patches, not the whole batch's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from eureka_jax.batch import Buckets, PromptBatch, pad_left, pad_right
from eureka_jax.errors import InputError
from eureka_jax.models.qwen2_5_vl import Qwen25VLConfig, VisionInputs
from eureka_jax.processing.layout import (
    gather_patches,
    image_token_sources,
    mrope_positions,
    vision_layout,
)
from eureka_jax.processing.prompt import EncodedPrompt


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


def collate_prompts(rows: Sequence[PromptRow], buckets: Buckets, *, pad_token_id: int,
                    prompt_keys: Sequence[int] | None = None) -> PromptBatch:
    """Left-pad the rows to a length bucket and their patches to a patch bucket (NumPy)."""
    if not rows:
        raise InputError("cannot collate an empty batch of prompts")
    rows = list(rows)
    length, patch_budget = buckets.length_for(rows), buckets.patches_for(rows)
    ids = [r.input_ids_T for r in rows]
    mask = pad_left([np.ones_like(i, dtype=bool) for i in ids], length, False)
    vision = None
    if patch_budget:
        vision = VisionInputs(
            patches_BxPxC=pad_right([r.patches_PxC for r in rows], patch_budget, 0.0),
            pos_hw_BxPx2=pad_right([r.pos_hw_Px2[: r.num_patches] for r in rows],
                                    patch_budget, 0),
            window_segment_BxP=pad_right([r.window_segment_P[: r.num_patches] for r in rows],
                                          patch_budget, -1),
            image_segment_BxP=pad_right([r.image_segment_P[: r.num_patches] for r in rows],
                                         patch_budget, -1),
        )
    keys = np.arange(len(rows)) if prompt_keys is None else np.asarray(prompt_keys)
    return PromptBatch(
        input_ids_BxT=pad_left(ids, length, pad_token_id),
        attention_mask_BxT=mask,
        positions_3xBxT=np.moveaxis(pad_left([r.positions_3xT for r in rows], length, 0), 1, 0),
        next_position_B=np.asarray([r.next_position for r in rows], np.int32),
        prompt_key_B=keys.astype(np.uint32),
        token_source_BxT=pad_left([r.token_source_T for r in rows], length, -1),
        vision=vision,
    )


def prompt_rows(batch: PromptBatch, config: Qwen25VLConfig) -> list[PromptRow]:
    """The rows of a NumPy PromptBatch without their padding: the inverse of `collate_prompts`.

    A row's tokens are the positions its attention mask marks (either padding side), its patches
    the slots with an image segment. E.g. `prompt_rows(port_inputs(hf_arrays, config))` (from
    eureka_jax/families/qwen2_5_vl.py) turns Hugging Face processor arrays into rows that can be
    bucketed for the sampler.
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
