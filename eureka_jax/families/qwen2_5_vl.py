"""The Qwen2.5-VL family: models/qwen2_5_vl.py, its HF name table (hf_io.py), its processor
(processing/prompt.py), its prompt rows (processing/qwen_rows.py), and here the conversion of
transformers' processor arrays into the port's inputs and the transformers reference.

Qwen2_5_VLProcessor returns one padded batch: `input_ids` and `attention_mask` (B, T), and, when
there are images, `pixel_values` (all images' patch rows concatenated, in prompt order over the
batch) and `image_grid_thw` (one row per image). The port instead takes one window-ordered patch
stream per batch row (processing/qwen_rows.py). `port_inputs` converts the first into the second
without moving any token.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from eureka_jax import hf_io
from eureka_jax.batch import Buckets, PromptBatch
from eureka_jax.errors import InputError
from eureka_jax.families import ImageOptions, ModelFamily
from eureka_jax.models.decoder import TextConfig
from eureka_jax.models.qwen2_5_vl import Qwen25VL, Qwen25VLConfig, VisionConfig, VisionInputs
from eureka_jax.processing import EncodedPrompt, QwenVLProcessor, qwen_rows
from eureka_jax.processing.qwen_rows import collate_prompts, prompt_row
from eureka_jax.verify import checked_tokens, integer_array, token_arrays


def load_processor(model_dir: str | os.PathLike, images: ImageOptions | None = None,
                   ) -> QwenVLProcessor:
    """The directory's processor; `images` overrides its min/max_pixels."""
    images = images or ImageOptions()
    return QwenVLProcessor.from_pretrained(Path(model_dir), min_pixels=images.min_pixels,
                                           max_pixels=images.max_pixels)


def hf_arrays(prompts: Sequence[EncodedPrompt], pad_token_id: int,
              padding_side: str = "left") -> dict[str, np.ndarray]:
    """What `Qwen2_5_VLProcessor(text=..., images=..., padding=True)` returns for these prompts
    (eureka_jax's processor is equal to it, see tests/test_processing.py)."""
    arrays = token_arrays([p.input_ids for p in prompts], pad_token_id, padding_side)
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


def port_inputs(arrays: Mapping[str, np.ndarray], config: Qwen25VLConfig, *,
                source: str = "inputs") -> PromptBatch:
    """HF processor arrays -> the port's PromptBatch, every token at its input position.

    attention_mask may be omitted (all tokens real); padding may be on either side. Images are
    assigned to rows in the order of their runs of <|image_pad|> tokens over the flattened batch,
    as transformers fills them. Raises InputError naming the array and the row at fault.
    """
    ids_BxT, mask_BxT = checked_tokens(arrays, config.text.vocab_size, source)
    batch, length = ids_BxT.shape
    if (ids_BxT[mask_BxT] == config.video_token_id).any():
        raise InputError(f"{source}: video tokens are not supported; pass images only")

    has_images = ((ids_BxT == config.image_token_id) & mask_BxT).any()
    if has_images or "image_grid_thw" in arrays:
        grids_Ix3 = integer_array(arrays, "image_grid_thw", 2, source)
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


def _tiny_config(vocab_size: int, ids: dict[str, int]) -> Qwen25VLConfig:
    """A few hundred thousand parameters: trains in minutes on two CPU cores."""
    return Qwen25VLConfig(
        vision=VisionConfig(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                            window_size=56, out_hidden_size=128, fullatt_block_indexes=(1,)),
        text=TextConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                        mrope_section=(4, 6, 6), max_position_embeddings=4096),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )


def make_tiny_model_dir(directory: Path, seed: int = 0) -> Qwen25VL:
    """A tiny random Qwen2.5-VL with a locally trained tokenizer, saved as a HF directory (the
    demo's starting point); returns the model."""
    from eureka_jax import testing

    ids = testing.make_tokenizer_dir(directory, min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)
    model = hf_io.init_model(_tiny_config(ids["vocab_size"], ids), seed=seed)
    hf_io.export_model(model, directory, source_dir=directory)
    return model


# ---------------------------------------------------------------------------------------------
# For `eureka-jax plan`: abstract vision inputs and analytic FLOPs
# ---------------------------------------------------------------------------------------------


def abstract_vision(rows: int, patches: int, config: Qwen25VLConfig, sharding_) -> VisionInputs:
    """VisionInputs of ShapeDtypeStructs as `collate_prompts` fills them for a patch bucket."""

    def abstract(shape, dtype):
        return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding_)

    return VisionInputs(
        patches_BxPxC=abstract((rows, patches, config.vision.patch_features), np.float32),
        pos_hw_BxPx2=abstract((rows, patches, 2), np.int32),
        window_segment_BxP=abstract((rows, patches), np.int32),
        image_segment_BxP=abstract((rows, patches), np.int32))


def vision_flops(config: Qwen25VLConfig, rows: int, patches: int) -> float:
    """Forward FLOPs of the vision tower over `rows` padded streams of `patches` patches (the
    window attention is computed as a masked P x P product)."""
    v = config.vision
    d = v.hidden_size
    block = 2 * patches * (4 * d * d + 3 * d * v.intermediate_size) + 4 * patches**2 * d
    merged, width = patches // v.merge_unit, d * v.merge_unit
    merger = 2 * merged * (width * width + width * v.out_hidden_size)
    return rows * (v.depth * block + 2 * patches * v.patch_features * d + merger)


def _reference_logits(hf_model, arrays: Mapping[str, np.ndarray], config: Qwen25VLConfig,
                      ) -> np.ndarray:
    return reference_logits(hf_model, arrays, config.image_token_id)


FAMILY = ModelFamily(
    name="qwen2_5_vl",
    model_types=("qwen2_5_vl",),
    config_class=Qwen25VLConfig,
    model_class=Qwen25VL,
    row_class=qwen_rows.PromptRow,
    read_config=hf_io.read_config,
    load_model=hf_io.load_model,
    init_model=hf_io.init_model,
    export_model=hf_io.export_model,
    load_processor=load_processor,
    prompt_row=qwen_rows.prompt_row,
    collate_prompts=qwen_rows.collate_prompts,
    prompt_rows=qwen_rows.prompt_rows,
    port_inputs=port_inputs,
    verification_cases=verification_cases,
    load_reference=load_reference,
    reference_logits=_reference_logits,
    make_tiny_model_dir=make_tiny_model_dir,
    abstract_vision=abstract_vision,
    vision_flops=vision_flops,
)
