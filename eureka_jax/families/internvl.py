"""The InternVL2.5 family: models/internvl.py, its HF name table and checkpoint I/O
(models/internvl_io.py), its processor and prompt rows (processing/internvl.py), and here
transformers' processor arrays -> the port's inputs and the transformers reference.

InternVLProcessor returns one padded batch: `input_ids` and `attention_mask` (B, T) and, when
there are images, `pixel_values` (N, 3, S, S): every image's tiles, thumbnail included, in prompt
order over the batch. The k-th run of tokens_per_tile <IMG_CONTEXT> tokens over the flattened
batch takes tile k, as transformers fills them. `port_inputs` turns that into the port's
PromptBatch without moving any token; transformers is given the same 1-D positions (0..n-1 over
each row's real tokens, as its `generate` computes them).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from eureka_jax.batch import Buckets, PromptBatch
from eureka_jax.errors import InputError
from eureka_jax.families import ImageOptions, ModelFamily
from eureka_jax.models import internvl_io
from eureka_jax.models.decoder import TextConfig
from eureka_jax.models.internvl import (
    InternVisionInputs,
    InternViTConfig,
    InternVL,
    InternVLConfig,
    text_positions,
)
from eureka_jax.processing import internvl as processing
from eureka_jax.processing.internvl import InternVLEncodedPrompt, InternVLPromptProcessor
from eureka_jax.verify import checked_tokens, token_arrays


def load_processor(model_dir: str | os.PathLike, images: ImageOptions | None = None,
                   ) -> InternVLPromptProcessor:
    """The directory's processor; `images` overrides its tiles per image (max_tiles) and bounds
    the tiles per prompt (vision_budget)."""
    images = images or ImageOptions()
    return InternVLPromptProcessor.from_pretrained(
        Path(model_dir), max_tiles_per_prompt=images.vision_budget,
        max_tiles_per_image=images.max_tiles)


# ---------------------------------------------------------------------------------------------
# HF processor arrays <-> the port's inputs
# ---------------------------------------------------------------------------------------------


def hf_arrays(prompts: Sequence[InternVLEncodedPrompt], pad_token_id: int,
              padding_side: str = "left") -> dict[str, np.ndarray]:
    """What `InternVLProcessor(text=..., images=..., padding=True)` returns for these prompts
    (eureka_jax's processor is equal to it, see tests/test_internvl_processing.py)."""
    arrays = token_arrays([p.input_ids for p in prompts], pad_token_id, padding_side)
    tiles = [p.tiles for p in prompts if p.num_tiles]
    if tiles:
        arrays["pixel_values"] = np.concatenate(tiles).astype(np.float32)
    return arrays


def port_inputs(arrays: Mapping[str, np.ndarray], config: InternVLConfig, *,
                source: str = "inputs") -> PromptBatch:
    """HF processor arrays -> the port's PromptBatch, every token at its input position.

    attention_mask may be omitted (all tokens real); padding may be on either side. Raises
    InputError naming the array and the row at fault."""
    ids_BxT, mask_BxT = checked_tokens(arrays, config.text.vocab_size, source)
    batch, length = ids_BxT.shape
    side, per_tile = config.vision.image_size, config.tokens_per_tile
    is_context_BxT = (ids_BxT == config.image_token_id) & mask_BxT
    contexts_B = is_context_BxT.sum(axis=1)
    if "pixel_values" in arrays:
        pixels = np.asarray(arrays["pixel_values"], np.float32)
        expected = (config.vision.num_channels, side, side)
        if pixels.ndim != 4 or pixels.shape[1:] != expected:
            raise InputError(f"{source}: pixel_values must have shape (tiles, {expected[0]}, "
                             f"{side}, {side}) for this model, got {pixels.shape}")
    elif contexts_B.sum():
        raise InputError(f"{source}: missing array 'pixel_values' for the {contexts_B.sum()} "
                         "<IMG_CONTEXT> tokens")
    else:
        pixels = np.zeros((0, config.vision.num_channels, side, side), np.float32)
    if contexts_B.sum() != per_tile * len(pixels):
        raise InputError(f"{source}: image features and image tokens do not match: "
                         f"{contexts_B.sum()} <IMG_CONTEXT> tokens but pixel_values has "
                         f"{len(pixels)} tiles of {per_tile} tokens; encode text and images with "
                         "one processor call")

    rows, next_tile = [], 0
    for b in range(batch):
        valid_T = np.flatnonzero(mask_BxT[b])
        if not len(valid_T):
            raise InputError(f"{source}: row {b} has no tokens (attention_mask is all 0)")
        if contexts_B[b] % per_tile:
            raise InputError(f"{source}: row {b} has {contexts_B[b]} <IMG_CONTEXT> tokens, not a "
                             f"multiple of the {per_tile} tokens of a tile")
        tiles = contexts_B[b] // per_tile
        row_ids = ids_BxT[b, valid_T].astype(np.int32)
        is_context = row_ids == config.image_token_id
        encoded = InternVLEncodedPrompt(
            input_ids=row_ids,
            token_source=np.where(is_context, np.cumsum(is_context) - 1, -1).astype(np.int32),
            tiles=pixels[next_tile:next_tile + tiles], tiles_per_image=(int(tiles),), text="")
        rows.append(processing.prompt_row(encoded, config, name=f"{source} row {b}"))
        next_tile += tiles

    # collate_prompts left-pads each row to `length`; then every token goes back to its slot.
    budget = max(r.num_patches for r in rows)
    left = processing.collate_prompts(rows, Buckets(lengths=(length,), patches=(budget,)),
                                      pad_token_id=0)
    token_source_BxT = np.full((batch, length), -1, np.int32)
    for b in range(batch):
        valid_T = np.flatnonzero(mask_BxT[b])
        token_source_BxT[b, valid_T] = left.token_source_BxT[b, length - len(valid_T):]
    return dataclasses.replace(
        left,
        input_ids_BxT=ids_BxT.astype(np.int32),
        attention_mask_BxT=mask_BxT,
        positions_3xBxT=text_positions(mask_BxT),
        token_source_BxT=token_source_BxT,
    )


# ---------------------------------------------------------------------------------------------
# The transformers reference
# ---------------------------------------------------------------------------------------------


def load_reference(model_dir: str | os.PathLike):
    """transformers' InternVLForConditionalGeneration in float32 on CPU, eval mode."""
    import torch
    from transformers import InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32)
    return model.eval()


def reference_logits(hf_model, arrays: Mapping[str, np.ndarray], config: InternVLConfig,
                     ) -> np.ndarray:
    """transformers' logits (B, T, V) float32 for HF processor arrays, at the port's 1-D
    positions (0..n-1 over each row's real tokens)."""
    import torch

    ids = np.asarray(arrays["input_ids"], np.int64)
    mask = np.asarray(arrays.get("attention_mask", np.ones_like(ids)), np.int64)
    inputs = {"input_ids": torch.as_tensor(ids), "attention_mask": torch.as_tensor(mask),
              "position_ids": torch.as_tensor(text_positions(mask)[0].astype(np.int64)),
              "use_cache": False}
    if "pixel_values" in arrays:
        inputs["pixel_values"] = torch.as_tensor(np.asarray(arrays["pixel_values"], np.float32))
    with torch.no_grad():
        return hf_model(**inputs).logits.float().numpy()


def verification_cases(processor: InternVLPromptProcessor) -> dict[str, dict[str, np.ndarray]]:
    """HF arrays for: text only, an image of one tile, an image of many tiles with its thumbnail,
    two images, a left-padded batch of two (text only + one image)."""
    from eureka_jax.testing import draw_image

    side = processor.tiles.tile_size
    text = processor.encode(question="What is 3 + 4? Think step by step.")
    one = processor.encode(question="What is in the picture?",
                           images=[draw_image(side - side // 4, side // 2, 1)])
    many = processor.encode(question="Read the wide picture.",
                            images=[draw_image(3 * side, side, 4)])
    two = processor.encode(question="Compare the two pictures.",
                           images=[draw_image(side, side // 2, 2), draw_image(side // 3, side, 3)])
    pad = processor.pad_token_id
    return {
        "text": hf_arrays([text], pad),
        "one_tile": hf_arrays([one], pad),
        "many_tiles": hf_arrays([many], pad),
        "two_images": hf_arrays([two], pad),
        "left_padded_batch": hf_arrays([text, one], pad, padding_side="left"),
    }


# ---------------------------------------------------------------------------------------------
# The demo's tiny model, and `eureka-jax plan`'s abstract inputs and FLOPs
# ---------------------------------------------------------------------------------------------

TINY_TILE, TINY_PATCH = 56, 7  # 8 x 8 patches -> 4 x 4 = 16 vision tokens per tile


def make_tiny_model_dir(directory: Path, seed: int = 0) -> InternVL:
    """A tiny random InternVL (Qwen2 language model) with a locally trained tokenizer, saved as a
    HF directory (the demo's starting point; one tile per image); returns the model."""
    from eureka_jax import testing

    tokens_per_tile = (TINY_TILE // TINY_PATCH // 2) ** 2
    ids = testing.make_internvl_tokenizer_dir(directory, tile=TINY_TILE,
                                              tokens_per_tile=tokens_per_tile, max_patches=1)
    config = InternVLConfig(
        vision=InternViTConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                               num_attention_heads=2, image_size=TINY_TILE,
                               patch_size=TINY_PATCH),
        text=TextConfig(vocab_size=ids["vocab_size"], hidden_size=128, intermediate_size=256,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                        mrope_section=(16,), max_position_embeddings=4096),
        image_token_id=ids["<IMG_CONTEXT>"], image_seq_length=tokens_per_tile,
        tie_word_embeddings=True, eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"])
    model = internvl_io.init_model(config, seed=seed)
    internvl_io.export_model(model, directory, source_dir=directory)
    return model


def abstract_vision(rows: int, tiles: int, config: InternVLConfig, sharding_,
                    ) -> InternVisionInputs:
    """InternVisionInputs of ShapeDtypeStructs as `collate_prompts` fills them for a tile
    bucket."""
    side, channels = config.vision.image_size, config.vision.num_channels
    return InternVisionInputs(
        pixels_BxIxCxSxS=jax.ShapeDtypeStruct((rows, tiles, channels, side, side),
                                              jnp.float32, sharding=sharding_),
        tile_valid_BxI=jax.ShapeDtypeStruct((rows, tiles), jnp.bool_, sharding=sharding_))


def vision_flops(config: InternVLConfig, rows: int, tiles: int) -> float:
    """Forward FLOPs of InternViT (the layers `vision_feature_layer` needs) on `rows` x `tiles`
    tiles, full attention within a tile over its patches and cls token, plus the projector."""
    v = config.vision
    d, patches = v.hidden_size, v.grid**2 + 1
    layer = 2 * patches * (4 * d * d + 2 * d * v.intermediate_size) + 4 * patches**2 * d
    embed = 2 * v.grid**2 * v.patch_features * d
    width = d * config.shuffle_factor**2
    tokens, hidden = config.tokens_per_tile, config.text.hidden_size
    projector = 2 * tokens * (width * hidden + hidden * hidden)
    return rows * tiles * (config.vision_layers_run * layer + embed + projector)


FAMILY = ModelFamily(
    name="internvl",
    model_types=("internvl",),
    config_class=InternVLConfig,
    model_class=InternVL,
    row_class=processing.InternVLPromptRow,
    read_config=internvl_io.read_config,
    load_model=internvl_io.load_model,
    init_model=internvl_io.init_model,
    export_model=internvl_io.export_model,
    load_processor=load_processor,
    prompt_row=processing.prompt_row,
    collate_prompts=processing.collate_prompts,
    prompt_rows=processing.prompt_rows,
    port_inputs=port_inputs,
    verification_cases=verification_cases,
    load_reference=load_reference,
    reference_logits=reference_logits,
    make_tiny_model_dir=make_tiny_model_dir,
    abstract_vision=abstract_vision,
    vision_flops=vision_flops,
)
