"""Collate encoded prompts into the static-shape arrays the Flax model consumes."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from eureka_jax.errors import InputError
from eureka_jax.processing.layout import (
    VisionLayout,
    gather_patches,
    image_token_sources,
    mrope_positions,
    vision_layout,
)
from eureka_jax.processing.prompt import EncodedPrompt


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """B prompts padded to T tokens and their images padded to P patch slots (window order)."""

    input_ids_BxT: np.ndarray  # int32, pad_token_id in padding
    attention_mask_BxT: np.ndarray  # int32, 1 for real tokens
    positions_3xBxT: np.ndarray  # int32 M-RoPE (t, h, w) positions, 0 in padding
    rope_deltas_B: np.ndarray  # int32, next position = number of real tokens + delta
    token_source_BxT: np.ndarray  # int32 merged vision row filling each image pad, -1 for text
    patches_PxC: np.ndarray  # float32 patch rows in window order, zeros in padding
    layout: VisionLayout


def collate_prompts(
    prompts: Sequence[EncodedPrompt],
    *,
    length: int,
    patch_budget: int,
    pad_token_id: int,
    image_token_id: int,
    window_size: int = 112,
    patch_size: int = 14,
    spatial_merge_size: int = 2,
    padding_side: str = "left",
    source: str = "the batch",
) -> PromptBatch:
    """Pad `prompts` to `length` tokens (left padding by default, as the sampler decodes after
    the last prompt token) and lay out all their images in one stream of `patch_budget` slots."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    batch = len(prompts)
    input_ids_BxT = np.full((batch, length), pad_token_id, dtype=np.int32)
    attention_mask_BxT = np.zeros((batch, length), dtype=np.int32)
    for b, prompt in enumerate(prompts):
        n = len(prompt.input_ids)
        if n > length:
            raise InputError(
                f"{source}: prompt {b} has {n} tokens but the prompt length is {length}: raise "
                "the prompt length (or its largest bucket) or lower max_pixels"
            )
        columns = slice(length - n, length) if padding_side == "left" else slice(0, n)
        input_ids_BxT[b, columns] = prompt.input_ids
        attention_mask_BxT[b, columns] = 1
    grids = [g for prompt in prompts for g in prompt.image_grid_thw]
    layout = vision_layout(grids, patch_budget, window_size, patch_size, spatial_merge_size,
                           source=source)
    positions_3xBxT, rope_deltas_B = mrope_positions(
        input_ids_BxT, attention_mask_BxT, np.asarray(grids).reshape(-1, 3), image_token_id,
        spatial_merge_size, source=source,
    )
    return PromptBatch(
        input_ids_BxT=input_ids_BxT,
        attention_mask_BxT=attention_mask_BxT,
        positions_3xBxT=positions_3xBxT,
        rope_deltas_B=rope_deltas_B,
        token_source_BxT=image_token_sources(input_ids_BxT, image_token_id, layout,
                                             source=source),
        patches_PxC=gather_patches([p for prompt in prompts for p in prompt.patches], layout),
        layout=layout,
    )
