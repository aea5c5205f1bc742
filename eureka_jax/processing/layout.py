"""Static-shape index arrays for the Flax model: M-RoPE positions and the vision window layout.

Qwen2.5-VL's vision tower (HF `Qwen2_5_VisionTransformerPretrainedModel.forward`):
  1. patch-embeds the concatenated patch rows of all images (HF order: image by image, merge
     blocks of merge_size**2 consecutive rows);
  2. reorders merge units into window order (`get_vision_window_index`) and applies the same
     permutation to the (h, w) rotary coordinates (`get_vision_position_ids`);
  3. attends within windows (`cu_window_seqlens`) except in fullatt_block_indexes, which attend
     within each image frame (`cu_seqlens`);
  4. merges each 4 consecutive rows into one LM token and un-permutes (argsort(window_index)).
The LM then fills the k-th <|image_pad|> of the flattened batch with merged token k.

Patch embedding acts row by row, so reordering raw patch rows on the host is equivalent to HF's
reordering after embedding. `VisionLayout` describes one padded stream of P slots (P a multiple of
merge_size**2) in window order; padding slots are masked with segment id -1. The model keeps its
merged tokens in window order (row m = slots 4m..4m+3) and `image_token_sources` says which merged
row fills each <|image_pad|>.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from eureka_jax.errors import InputError


def next_bucket(n: int, buckets: Sequence[int], *, what: str = "length") -> int:
    """Smallest bucket >= n. Static shapes come from a short list of buckets so jit compiles once
    per bucket."""
    fitting = [b for b in buckets if b >= n]
    if not fitting:
        raise InputError(
            f"{what} {n} exceeds the largest bucket {max(buckets)}: add a larger bucket or "
            "shorten the input"
        )
    return min(fitting)


# ----------------------------------------------------------------------------- M-RoPE positions


def mrope_positions(
    input_ids_BxT: np.ndarray,
    attention_mask_BxT: np.ndarray | None,
    image_grid_thw_Ix3: np.ndarray | Sequence[Sequence[int]],
    image_token_id: int,
    spatial_merge_size: int = 2,
    *,
    source: str = "the batch",
) -> tuple[np.ndarray, np.ndarray]:
    """3-D rotary positions, equal to HF `Qwen2_5_VLModel.get_rope_index` for images.

    Returns (positions_3xBxT int32, rope_deltas_B int32). Over the non-padding tokens of a row,
    text tokens advance (t, h, w) together by one; each run of image tokens takes the next grid
    of `image_grid_thw_Ix3` (in order over the flattened batch) and gets (start, start + i,
    start + j) over its merged (grid_h/m, grid_w/m) grid; the text after it starts at
    start + max(grid_h, grid_w) / m. Padding positions (attention_mask 0) are 0, as in HF.
    rope_deltas = max position + 1 - number of non-padding tokens: the token generated after n
    non-padding tokens has position n + rope_delta in all three components.
    """
    ids_BxT = np.asarray(input_ids_BxT)
    batch, length = ids_BxT.shape
    mask_BxT = (np.ones_like(ids_BxT, dtype=bool) if attention_mask_BxT is None
                else np.asarray(attention_mask_BxT).astype(bool))
    grids_Ix3 = np.asarray(image_grid_thw_Ix3, dtype=np.int64).reshape(-1, 3)
    m = spatial_merge_size
    positions_3xBxT = np.zeros((3, batch, length), dtype=np.int32)
    deltas_B = np.zeros((batch,), dtype=np.int32)
    next_image = 0
    for b in range(batch):
        valid = np.flatnonzero(mask_BxT[b])
        is_image = ids_BxT[b, valid] == image_token_id
        n = len(valid)
        if n == 0:
            continue
        row_3xN = np.empty((3, n), dtype=np.int64)
        bounds = np.flatnonzero(np.diff(is_image.astype(np.int8))) + 1
        current = 0
        for start, end in zip(np.r_[0, bounds], np.r_[bounds, n], strict=True):
            if not is_image[start]:
                row_3xN[:, start:end] = current + np.arange(end - start)
                current += end - start
                continue
            if next_image >= len(grids_Ix3):
                raise InputError(
                    f"{source}: row {b} has more runs of image tokens than the {len(grids_Ix3)} "
                    "images given; pass one image_grid_thw row per image, in prompt order"
                )
            t, h, w = (int(x) for x in grids_Ix3[next_image])
            if end - start != t * (h // m) * (w // m):
                raise InputError(
                    f"{source}: row {b} image {next_image} has {end - start} image tokens but its "
                    f"grid {t}x{h}x{w} needs {t * (h // m) * (w // m)}: encode prompts with the "
                    "same processor settings as the images (and keep images separated by text)"
                )
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h // m), np.arange(w // m),
                                     indexing="ij")
            row_3xN[:, start:end] = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + current
            current += max(h, w) // m
            next_image += 1
        positions_3xBxT[:, b, valid] = row_3xN
        deltas_B[b] = row_3xN.max() + 1 - n
    if next_image != len(grids_Ix3):
        raise InputError(
            f"{source}: {len(grids_Ix3)} image grids but {next_image} runs of image tokens; pass "
            "exactly the grids of the images in these prompts"
        )
    return positions_3xBxT, deltas_B


# ----------------------------------------------------------------------------- vision layout


@dataclasses.dataclass(frozen=True)
class VisionLayout:
    """Where each of the P vision slots comes from, in HF's window order. Slots >= num_patches
    are padding: they point at row 0 and have segment ids -1. M = P / merge_size**2."""

    order_P: np.ndarray  # int32: source patch row (HF concatenated order) of each slot
    pos_hw_Px2: np.ndarray  # int32: (h, w) rotary coordinates of each slot
    window_segment_P: np.ndarray  # int32: attention window id (unique over the batch), -1 = pad
    image_segment_P: np.ndarray  # int32: image id (image-frame for t > 1), -1 = pad
    merged_row_of_unit_M: np.ndarray  # int32: window-order merged row holding HF merged unit k
    image_grid_thw_Ix3: np.ndarray  # int32: the grids this layout was built from
    num_patches: int  # real (non-padding) slots

    @property
    def valid_P(self) -> np.ndarray:
        return self.image_segment_P >= 0

    @property
    def num_merged(self) -> int:
        """Number of real merged vision tokens, i.e. of <|image_pad|> tokens they fill."""
        return int((self.merged_row_of_unit_M >= 0).sum())


def vision_layout(
    image_grid_thw_list: Sequence[Sequence[int]] | np.ndarray,
    patch_budget: int,
    window_size: int = 112,
    patch_size: int = 14,
    spatial_merge_size: int = 2,
    *,
    source: str = "the batch",
) -> VisionLayout:
    """Layout of all images' patches in one stream of `patch_budget` slots, in HF window order.

    Equal to transformers' vision_utils: order_P[:N] = the rows of window_index expanded to
    patches, pos_hw_Px2[:N] = get_vision_position_ids permuted the same way, window_segment_P /
    image_segment_P = the segments of cu_window_seqlens / cu_seqlens.
    """
    m = spatial_merge_size
    unit = m * m
    grids_Ix3 = np.asarray(image_grid_thw_list, dtype=np.int64).reshape(-1, 3)
    units_per_window_side = window_size // m // patch_size
    if units_per_window_side < 1:
        raise InputError(f"window_size={window_size} is smaller than one merge unit "
                         f"({m * patch_size} pixels): fix the vision config")
    if patch_budget % unit:
        raise InputError(f"patch budget {patch_budget} is not a multiple of "
                         f"spatial_merge_size**2={unit}: fix data.max_patches")
    num_patches = int(grids_Ix3.prod(axis=1).sum())
    if num_patches > patch_budget:
        raise InputError(
            f"{source} needs {num_patches} patches but the budget is {patch_budget}: raise "
            "data.max_patches or lower max_pixels"
        )

    window_index, window_id, image_id, pos_h, pos_w = [], [], [], [], []
    unit_offset = window_offset = frame_offset = 0
    ws = units_per_window_side
    for t, h, w in grids_Ix3.tolist():
        if h % m or w % m:
            raise InputError(f"{source}: image grid {t}x{h}x{w} is not divisible by "
                             f"spatial_merge_size={m}; the image was not preprocessed for it")
        lh, lw = h // m, w // m
        f, i, j = (a.ravel() for a in np.meshgrid(np.arange(t), np.arange(lh), np.arange(lw),
                                                    indexing="ij"))
        nwh, nww = -(-lh // ws), -(-lw // ws)
        window = (f * nwh + i // ws) * nww + j // ws
        order = np.lexsort((j % ws, i % ws, window))  # window-major, raster inside a window
        window_index.append(order + unit_offset)
        _, dense = np.unique(window[order], return_inverse=True)
        window_id.append(dense + window_offset)
        image_id.append(f[order] + frame_offset)
        pos_h.append(i[order])
        pos_w.append(j[order])
        unit_offset += t * lh * lw
        window_offset += int(dense.max()) + 1 if len(dense) else 0
        frame_offset += t

    num_units, budget_units = num_patches // unit, patch_budget // unit
    order_P = np.zeros((patch_budget,), dtype=np.int32)
    pos_hw_Px2 = np.zeros((patch_budget, 2), dtype=np.int32)
    window_segment_P = np.full((patch_budget,), -1, dtype=np.int32)
    image_segment_P = np.full((patch_budget,), -1, dtype=np.int32)
    merged_row_of_unit_M = np.full((budget_units,), -1, dtype=np.int32)
    if num_units:
        window_index_U = np.concatenate(window_index)
        within = np.arange(unit)
        order_P[:num_patches] = (window_index_U[:, None] * unit + within).ravel()
        # Rotary coordinates of the patch inside its merge block: row-major (r // m, r % m).
        pos_hw_Px2[:num_patches, 0] = (np.concatenate(pos_h)[:, None] * m + within // m).ravel()
        pos_hw_Px2[:num_patches, 1] = (np.concatenate(pos_w)[:, None] * m + within % m).ravel()
        window_segment_P[:num_patches] = np.repeat(np.concatenate(window_id), unit)
        image_segment_P[:num_patches] = np.repeat(np.concatenate(image_id), unit)
        merged_row_of_unit_M[:num_units] = np.argsort(window_index_U)
    return VisionLayout(
        order_P=order_P,
        pos_hw_Px2=pos_hw_Px2,
        window_segment_P=window_segment_P,
        image_segment_P=image_segment_P,
        merged_row_of_unit_M=merged_row_of_unit_M,
        image_grid_thw_Ix3=grids_Ix3.astype(np.int32),
        num_patches=num_patches,
    )


def gather_patches(patches_list: Sequence[np.ndarray], layout: VisionLayout) -> np.ndarray:
    """Concatenate the images' patch rows (HF order) and place them in the layout's slots:
    patches_PxC float32, zeros in padding slots."""
    sizes = [len(p) for p in patches_list]
    if sum(sizes) != layout.num_patches:
        raise InputError(
            f"{len(patches_list)} images have {sum(sizes)} patch rows but the layout was built "
            f"for {layout.num_patches}: build the layout from these images' grids"
        )
    budget = len(layout.order_P)
    dim = patches_list[0].shape[1] if patches_list else 0
    patches_PxC = np.zeros((budget, dim), dtype=np.float32)
    if layout.num_patches:
        all_NxC = np.concatenate(patches_list, axis=0)
        patches_PxC[: layout.num_patches] = all_NxC[layout.order_P[: layout.num_patches]]
    return patches_PxC


def image_token_sources(
    input_ids_BxT: np.ndarray, image_token_id: int, layout: VisionLayout, *,
    source: str = "the batch",
) -> np.ndarray:
    """token_source_BxT int32: for each <|image_pad|> (k-th in row-major order over the batch,
    as HF's masked_scatter fills them) the window-order merged row that fills it; -1 for text."""
    ids_BxT = np.asarray(input_ids_BxT)
    is_image_BxT = ids_BxT == image_token_id
    count = int(is_image_BxT.sum())
    if count != layout.num_merged:
        raise InputError(
            f"{source}: image features and image tokens do not match: the prompts have {count} "
            f"<|image_pad|> tokens but their images give {layout.num_merged} merged patches; "
            "encode prompts and images together with one processor (same min/max_pixels) and "
            "do not truncate prompts"
        )
    sources_BxT = np.full(ids_BxT.shape, -1, dtype=np.int32)
    sources_BxT[is_image_BxT] = layout.merged_row_of_unit_M[:count]
    return sources_BxT
