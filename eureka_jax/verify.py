"""The Flax port against transformers: HF processor arrays in, logits out, differences measured.

The Hugging Face processor returns one padded batch: `input_ids` and `attention_mask` (B, T), and,
when there are images, `pixel_values` (all images' patch rows concatenated, in prompt order over the
batch) and `image_grid_thw` (one row per image). The port instead takes one window-ordered patch
stream per batch row (eureka_jax/batching.py). `port_inputs` converts the first into the second
without moving any token, so logits[b, t] of the port and of transformers describe the same token.

    arrays = hf_arrays([processor.encode(question="...", images=[image])], pad_token_id)
    ours = port_logits(model, port_inputs(arrays, model.config))
    theirs = reference_logits(load_reference(model_dir), arrays, model.config.image_token_id)
    compare(ours, theirs, arrays["attention_mask"])  # {"max_abs_diff": ..., "rel_diff": ...}

torch and transformers' models are imported inside the functions that need them only.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eureka_jax.batching import Buckets, collate_prompts, prompt_row
from eureka_jax.errors import InputError
from eureka_jax.models.qwen2_5_vl import Qwen25VL, Qwen25VLConfig
from eureka_jax.processing import EncodedPrompt
from eureka_jax.sampler import PromptBatch

# ---------------------------------------------------------------------------------------------
# HF processor arrays <-> the port's inputs
# ---------------------------------------------------------------------------------------------


def hf_arrays(prompts: Sequence[EncodedPrompt], pad_token_id: int,
              padding_side: str = "left") -> dict[str, np.ndarray]:
    """What `Qwen2_5_VLProcessor(text=..., images=..., padding=True)` returns for these prompts
    (eureka_jax's processor is equal to it, see tests/test_processing.py)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    length = max(len(p.input_ids) for p in prompts)
    input_ids = np.full((len(prompts), length), pad_token_id, np.int64)
    attention_mask = np.zeros((len(prompts), length), np.int64)
    for b, prompt in enumerate(prompts):
        n = len(prompt.input_ids)
        span = slice(length - n, length) if padding_side == "left" else slice(0, n)
        input_ids[b, span] = prompt.input_ids
        attention_mask[b, span] = 1
    arrays = {"input_ids": input_ids, "attention_mask": attention_mask}
    patches = [p for prompt in prompts for p in prompt.patches]
    if patches:
        arrays["pixel_values"] = np.concatenate(patches).astype(np.float32)
        arrays["image_grid_thw"] = np.concatenate(
            [p.image_grid_thw for p in prompts if len(p.image_grid_thw)]).astype(np.int64)
    return arrays


def _image_runs(is_image_T: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of True."""
    edges = np.flatnonzero(np.diff(np.r_[0, is_image_T.astype(np.int8), 0]))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def _integer_array(arrays: Mapping[str, np.ndarray], key: str, ndim: int, source: str,
                   ) -> np.ndarray:
    if key not in arrays:
        raise InputError(f"{source}: missing array {key!r} (have {sorted(arrays)}); save the HF "
                         "processor's output with np.savez(path, **processor(...))")
    array = np.asarray(arrays[key])
    if array.ndim != ndim or not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"{source}: {key!r} must be a {ndim}-D integer array, got shape "
                         f"{array.shape} dtype {array.dtype}")
    return array


def port_inputs(arrays: Mapping[str, np.ndarray], config: Qwen25VLConfig, *,
                source: str = "inputs") -> PromptBatch:
    """HF processor arrays -> the port's PromptBatch, every token at its input position.

    attention_mask may be omitted (all tokens real); padding may be on either side. Images are
    assigned to rows in the order of their runs of <|image_pad|> tokens over the flattened batch,
    as transformers fills them. Raises InputError naming the array and the row at fault.
    """
    ids_BxT = _integer_array(arrays, "input_ids", 2, source)
    batch, length = ids_BxT.shape
    if "attention_mask" in arrays:
        mask_BxT = _integer_array(arrays, "attention_mask", 2, source)
        if mask_BxT.shape != ids_BxT.shape or not np.isin(mask_BxT, (0, 1)).all():
            raise InputError(f"{source}: attention_mask must be 0/1 with the shape of input_ids "
                             f"{ids_BxT.shape}, got shape {mask_BxT.shape}")
        mask_BxT = mask_BxT.astype(bool)
    else:
        mask_BxT = np.ones(ids_BxT.shape, bool)
    vocab = config.text.vocab_size
    if ids_BxT.size and (ids_BxT.min() < 0 or ids_BxT.max() >= vocab):
        raise InputError(f"{source}: input_ids must lie in [0, {vocab}) (the model's vocab_size), "
                         f"got [{ids_BxT.min()}, {ids_BxT.max()}]; wrong tokenizer?")
    if (ids_BxT[mask_BxT] == config.video_token_id).any():
        raise InputError(f"{source}: video tokens are not supported; pass images only")

    has_images = ((ids_BxT == config.image_token_id) & mask_BxT).any()
    if has_images or "image_grid_thw" in arrays:
        grids_Ix3 = _integer_array(arrays, "image_grid_thw", 2, source)
        if grids_Ix3.shape[1] != 3:
            raise InputError(f"{source}: image_grid_thw must have shape (images, 3), got "
                             f"{grids_Ix3.shape}")
        if "pixel_values" not in arrays:
            raise InputError(f"{source}: missing array 'pixel_values' for the "
                             f"{len(grids_Ix3)} images of image_grid_thw")
        pixels_NxC = np.asarray(arrays["pixel_values"], np.float32)
        patch_features = config.vision.patch_features
        if pixels_NxC.ndim != 2 or pixels_NxC.shape[1] != patch_features:
            raise InputError(f"{source}: pixel_values must have shape (patches, {patch_features}) "
                             f"for this model, got {pixels_NxC.shape}")
        sizes_I = grids_Ix3.prod(axis=1)
        if sizes_I.sum() != len(pixels_NxC):
            raise InputError(f"{source}: image_grid_thw describes {sizes_I.sum()} patches but "
                             f"pixel_values has {len(pixels_NxC)} rows")
    else:
        grids_Ix3 = np.zeros((0, 3), np.int64)
        pixels_NxC = np.zeros((0, config.vision.patch_features), np.float32)
        sizes_I = np.zeros((0,), np.int64)
    offsets = np.r_[0, np.cumsum(sizes_I)]
    merge_unit = config.vision.merge_unit

    rows, next_image = [], 0
    for b in range(batch):
        valid_T = np.flatnonzero(mask_BxT[b])
        if not len(valid_T):
            raise InputError(f"{source}: row {b} has no tokens (attention_mask is all 0)")
        row_ids = ids_BxT[b, valid_T].astype(np.int32)
        runs = _image_runs(row_ids == config.image_token_id)
        images = range(next_image, next_image + len(runs))
        if images.stop > len(grids_Ix3):
            raise InputError(
                f"{source}: image features and image tokens do not match: the rows up to row {b} "
                f"have {images.stop} runs of <|image_pad|> tokens but image_grid_thw has "
                f"{len(grids_Ix3)} images; encode text and images with one processor call")
        for (start, end), i in zip(runs, images, strict=True):
            needed = int(sizes_I[i]) // merge_unit
            if end - start != needed:
                raise InputError(
                    f"{source}: image features and image tokens do not match: row {b} image "
                    f"{i} has {end - start} <|image_pad|> tokens but its grid "
                    f"{grids_Ix3[i].tolist()} gives {needed}; encode text and images with one "
                    "processor call (same min/max_pixels), and keep images separated by text")
        encoded = EncodedPrompt(
            input_ids=row_ids,
            image_grid_thw=grids_Ix3[images.start:images.stop].astype(np.int32).reshape(-1, 3),
            patches=[pixels_NxC[offsets[i]:offsets[i + 1]] for i in images],
            text="",
        )
        rows.append(prompt_row(encoded, config, name=f"{source} row {b}"))
        next_image = images.stop
    if next_image != len(grids_Ix3):
        raise InputError(f"{source}: image_grid_thw has {len(grids_Ix3)} images but the prompts "
                         f"have {next_image} runs of <|image_pad|> tokens")

    # collate_prompts left-pads each row to `length`; then every token goes back to its input slot.
    patch_budget = max(r.num_patches for r in rows)
    left = collate_prompts(rows, Buckets(lengths=(length,), patches=(patch_budget,)),
                           pad_token_id=0)
    positions_3xBxT = np.zeros((3, batch, length), np.int32)
    token_source_BxT = np.full((batch, length), -1, np.int32)
    for b in range(batch):
        valid_T = np.flatnonzero(mask_BxT[b])
        positions_3xBxT[:, b, valid_T] = left.positions_3xBxT[:, b, length - len(valid_T):]
        token_source_BxT[b, valid_T] = left.token_source_BxT[b, length - len(valid_T):]
    return dataclasses.replace(
        left,
        input_ids_BxT=ids_BxT.astype(np.int32),
        attention_mask_BxT=mask_BxT,
        positions_3xBxT=positions_3xBxT,
        token_source_BxT=token_source_BxT,
    )


@functools.lru_cache(maxsize=8)
def _forward(graphdef: nnx.GraphDef, jit: bool):
    """The teacher-forced forward of models with this structure; the jitted one is kept so that
    equal shapes are compiled once (graph definitions of equal configs are equal)."""

    def forward(state, batch: PromptBatch):
        model = nnx.merge(graphdef, state)
        logits = model(batch.input_ids_BxT, batch.positions_3xBxT, batch.attention_mask_BxT,
                       vision=batch.vision, token_source_BxT=batch.token_source_BxT)
        return logits.astype(jnp.float32)

    return jax.jit(forward) if jit else forward


def port_logits(model: Qwen25VL, batch: PromptBatch, *, jit: bool = True) -> np.ndarray:
    """The port's teacher-forced logits (B, T, V) as float32 NumPy. Runs on the active mesh, if
    any (`with sharding.activate(mesh):`)."""
    graphdef, state = nnx.split(model)
    logits = _forward(graphdef, jit)(state, jax.tree.map(jnp.asarray, batch))
    return np.asarray(jax.device_get(logits))


# ---------------------------------------------------------------------------------------------
# The transformers reference
# ---------------------------------------------------------------------------------------------


def load_reference(model_dir: str | os.PathLike):
    """transformers' Qwen2_5_VLForConditionalGeneration in float32 on CPU, eval mode."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(model_dir), dtype=torch.float32)
    return model.eval()


def reference_inputs(arrays: Mapping[str, np.ndarray], image_token_id: int) -> dict:
    """Keyword arguments of transformers' forward for HF processor arrays (torch tensors)."""
    import torch

    ids = torch.as_tensor(np.asarray(arrays["input_ids"], np.int64))
    mask = arrays.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(np.asarray(mask, np.int64))
    # Without mm_token_type_ids transformers silently falls back to 1-D positions.
    kwargs = {"input_ids": ids, "attention_mask": mask,
              "mm_token_type_ids": (ids == image_token_id).long(), "use_cache": False}
    if "pixel_values" in arrays:
        kwargs["pixel_values"] = torch.as_tensor(np.asarray(arrays["pixel_values"], np.float32))
        kwargs["image_grid_thw"] = torch.as_tensor(np.asarray(arrays["image_grid_thw"], np.int64))
    return kwargs


def reference_forward(hf_model, inputs: dict):
    """transformers' logits tensor for `reference_inputs`, without autograd."""
    import torch

    hf_model.model.rope_deltas = None  # state kept between calls; these calls are independent
    with torch.no_grad():
        return hf_model(**inputs).logits


def reference_logits(hf_model, arrays: Mapping[str, np.ndarray], image_token_id: int,
                     ) -> np.ndarray:
    """transformers' logits (B, T, V) float32 for HF processor arrays."""
    inputs = reference_inputs(arrays, image_token_id)
    return reference_forward(hf_model, inputs).float().numpy()


def compare(ours_BxTxV: np.ndarray, reference_BxTxV: np.ndarray, mask_BxT: np.ndarray,
            ) -> dict[str, float]:
    """Differences over the non-padding positions.

    rel_diff = max |ours - reference| / max |reference|; greedy_agree = fraction of positions
    whose argmax (the greedy next token) is the same.
    """
    valid = np.asarray(mask_BxT).astype(bool)
    ours, reference = ours_BxTxV[valid], reference_BxTxV[valid]
    max_abs_diff = float(np.abs(ours - reference).max())
    reference_max = float(np.abs(reference).max())
    return {
        "max_abs_diff": max_abs_diff,
        "rel_diff": max_abs_diff / reference_max,
        "greedy_agree": float((ours.argmax(-1) == reference.argmax(-1)).mean()),
        "reference_max": reference_max,
        "reference_std": float(reference.std()),
    }


# ---------------------------------------------------------------------------------------------
# verify-port
# ---------------------------------------------------------------------------------------------


def verification_cases(processor) -> dict[str, dict[str, np.ndarray]]:
    """HF arrays for: text only, one image, two images of different sizes, a left-padded batch
    of two (text only + one image). Images are small so that real checkpoints run on CPU."""
    from eureka_jax.testing import draw_image

    text = processor.encode(question="What is 3 + 4? Think step by step.")
    one = processor.encode(question="What is in the picture?", images=[draw_image(60, 45, 1)])
    two = processor.encode(question="Compare the two pictures.",
                           images=[draw_image(90, 60, 2), draw_image(40, 130, 3)])
    pad = processor.pad_token_id
    return {
        "text": hf_arrays([text], pad),
        "one_image": hf_arrays([one], pad),
        "two_images": hf_arrays([two], pad),
        "left_padded_batch": hf_arrays([text, one], pad, padding_side="left"),
    }


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    cases: dict[str, dict[str, float]]
    tolerance: float

    @property
    def passed(self) -> bool:
        return all(case["rel_diff"] <= self.tolerance for case in self.cases.values())

    def table(self) -> str:
        header = (f"{'case':<20} {'max|diff|':>11} {'max|ref|':>10} {'rel_diff':>10} "
                  f"{'greedy':>7}  ok")
        lines = [header, "-" * len(header)]
        for name, c in self.cases.items():
            ok = "yes" if c["rel_diff"] <= self.tolerance else "NO"
            lines.append(f"{name:<20} {c['max_abs_diff']:>11.3e} {c['reference_max']:>10.3f} "
                         f"{c['rel_diff']:>10.3e} {c['greedy_agree']:>7.3f}  {ok}")
        return "\n".join(lines)


def verify_port(model_dir: str | os.PathLike, *, dtype: str = "float32",
                tolerance: float = 1e-5, min_pixels: int | None = None,
                max_pixels: int | None = None) -> VerifyReport:
    """Run transformers (float32) and the port (`dtype`) on `verification_cases` built with the
    directory's own processor. Passed when every case's rel_diff <= tolerance."""
    from eureka_jax import hf_io
    from eureka_jax.processing import QwenVLProcessor

    model_dir = hf_io.resolve_model_dir(model_dir)
    processor = QwenVLProcessor.from_pretrained(Path(model_dir), min_pixels=min_pixels,
                                                max_pixels=max_pixels)
    cases = verification_cases(processor)
    model = hf_io.load_model(model_dir, param_dtype=dtype, compute_dtype=dtype)
    image_token_id = model.config.image_token_id
    ours = {name: port_logits(model, port_inputs(arrays, model.config, source=name))
            for name, arrays in cases.items()}
    del model  # one model in memory at a time: real checkpoints are large
    reference = load_reference(model_dir)
    results = {
        name: compare(ours[name], reference_logits(reference, arrays, image_token_id),
                      arrays["attention_mask"])
        for name, arrays in cases.items()
    }
    return VerifyReport(results, tolerance)
